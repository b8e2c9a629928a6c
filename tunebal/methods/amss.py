"""AMSS and AMSS+: Adaptively Mask Subnetworks considering modal significance (AMSS (TPAMI 2025) §III).

Every training step (all tensors, no host sync):

1. **Modal significance** (Eq. 2, §III-B 1), in the ``loss`` hook, detached:
   ξ^k = I(X^k; Y) / H(X^k) with the Barber-Agakov bound
   I(X^k; Y) >= H(Y) + (1/B) Σ_i log q(y_i | x_i^k), where

   * q is the softmax of modality k's zero-out logits (``ctx.unimodal_logits()``; the paper's
     zero-padding for feature-level fusion, tunebal's one unimodal estimate);
   * H(Y) = -Σ_c p̂_c log p̂_c is the entropy of the batch's label distribution p̂ (nats; the
     release's ``CrossEntropyLoss(label_probs, label_probs)`` is not this entropy -- it takes
     log-softmax of the probabilities -- and tunebal uses the true entropy);
   * the bound is floored at 0: mutual information is non-negative, so max(0, bound) is still
     a valid lower bound (early in training the bound is slightly negative; the release instead
     adds 0.5 and falls back to equal ratios when that is still <= 0);
   * H(X^k) is not defined in the paper beyond "the information entropy of the k-th modality".
     Knob ``entropy``: ``feature`` (default, the release) is the batch mean of the entropy of
     softmax(z_i^k) over the D feature dimensions of the encoder output z^k (in [0, log D];
     a spread-out feature has high entropy and low significance); ``none`` sets H = 1, so
     ξ^k is the Barber-Agakov mutual-information bound itself.

2. **Momentum** (Eq. 3): u^k <- λ·u^k + (1 - λ)·ξ^k, knob ``ms_momentum`` = λ (called so
   because ``momentum`` is the SGD momentum common knob). The paper uses Eq. 3 but gives no λ;
   the release has none (λ = 0). u is initialised with the first step's ξ (no bias towards 0).

3. **Update ratio** (Eq. 4): p^k = 1 - exp(u^k/τ) / Σ_j exp(u^j/τ), knob ``tau`` = τ. The most
   significant (dominant) modality gets the smallest p. Eq. 4 is applied as written for every
   M: for M = 2 it is the release's ``coeff_a = softmax(u/τ)_v`` and p^1 + p^2 = 1; for M > 2
   the ratios sum to M - 1 and equally significant modalities each keep 1 - 1/M of their units
   (2/3 for M = 3), and each p^k stays in (0, 1). ``clamp`` limits p to [0.1, 0.9] like the
   release (off in the paper).

4. **Importance** (§III-B 2): diagonal empirical Fisher of log p(y_i | x_i) for every mask unit
   of modality k's encoder, normalised to a distribution. Which prediction: knob
   ``fisher_source``. ``fused`` (default) is the multimodal model's prediction q(x_i) =
   f(φ(x_i)) -- the likelihood that is actually trained (Eq. 1 masks the gradient of that
   loss), the one the release uses, and free; ``unimodal`` is the paper's notation
   p(ŷ_i | x_i^(k); w^(k)) read literally: modality k's zero-out prediction, which costs one
   extra backward pass through the encoders (``torch.autograd.grad`` in the ``loss`` hook).
   ŷ_i = argmax(y_i) is the ground-truth class (the *empirical* Fisher). Estimator: knob
   ``fisher`` (``batch``: squared mini-batch gradient, the release's; ``per_sample``: exact
   per-sample contributions via hooks) -- see :mod:`tunebal.methods._amss_mask`.

5. **Masking** (Eq. 1 with S^(k), §III-B 2), in ``after_backward``: ⌈p^k·N⌉ of N mask units are
   sampled without replacement with probability ∝ importance (exactly ``torch.multinomial``'s
   successive sampling, from ``self.rng``/``self.device_rng``); the gradients of the other units
   are set to zero, the forward pass used every parameter. Knob ``scope``: ``modality``
   (default, the paper's S^(k) of ⌈p^(k)·|w^(k)|⌉ units drawn from one distribution P^(k) over
   all of modality k's units) or ``layer`` (the release: ⌈p^k·C_l⌉ of each layer's C_l units,
   importance normalised per layer). Knob ``mask_unit``: ``channel`` (default; §III-B "channel-
   wise mask unit for CNN": a conv's output filter, a linear layer's output row, with its bias
   entry and, with ``mask_norm``, the γ/β of the BatchNorm that follows it -- a channel that is
   not updated is not updated at all; the release masks only the stage convs' filters, i.e.
   ``mask_norm=False``; in a Transformer encoder an attention layer's unit is a *head*: its
   q/k/v rows of the packed in-projection and its columns of the out-projection, §III-B
   "head-wise mask unit for Transformer", see :mod:`tunebal.methods._amss_mask`) or ``element``
   (every weight element; biases/norms unmasked). The importance of a unit is the sum of F
   over its weight (and bias) elements. Masking acts on the gradient, as Eq. 1 and the
   release do: with SGD momentum or weight decay a masked unit still moves by its momentum
   buffer and decay.

   **Which parts** (knob ``mask_parts``): the paper masks the backbone *and the classifier*
   (§IV-C3, "we implement the adaptive subnetwork masking strategy independently for the
   classifier and the backbone network"; its Table VII: on Kinetics-Sounds backbone-only
   66.68 / classifier-only 65.37 / both 68.96 accuracy for AMSS, 69.15 / 66.80 / 72.25 for
   AMSS+), so ``both`` is the default; ``backbone`` (tunebal's behaviour before this knob) and
   ``classifier`` are the table's ablation rows. Modality k's
   classifier part is the head weights that read its feature: with concat fusion the columns
   of the linear classifier that multiply z^k (the paper's "feature concatenation of a single
   fully connected layer (considered decoupled)"); with sum and gated fusion the input columns
   of the fusion's projection of z^k; with FiLM the classifier columns of each modulated
   modality and the input columns of the FiLM generator for the conditioning (last) one. Its
   units are those columns (feature channels of z^k; ``mask_unit=channel``) or the block's
   elements (``element``); the classifier's bias is shared by the modalities and never
   masked, nor is any other fusion parameter. The classifier part is drawn *independently*
   of the backbone (its own ⌈p^k·N⌉ of its own N units, same p^k, importance normalised over
   the block), after all backbone draws.

6. **AMSS+** (Eq. 5-6, §III-C): every selected unit's gradient (weight, bias, tied norm) is
   scaled by 1/(π_j + a), so that E[masked gradient] = full gradient for a = 0. π_j is the
   unit's *inclusion probability* under sampling without replacement -- the paper's Eq. 5 uses
   the one-draw probability p_j (and the release 1/(p_j + 1/N)), which is the inclusion
   probability only when one unit is drawn; with ⌈p·N⌉ draws 1/p_j over-weights every unit by
   about ⌈p·N⌉. tunebal uses the exact rank-conditioned π_j of the draw
   (:func:`tunebal.methods._amss_mask.sample_units`), for which 1{j ∈ S}/π_j is exactly
   unbiased. The constant a keeps the weight bounded (<= 1/a); following the paper's "we
   substitute the number of mask units C_l of the l-th layer for a" it is a = ``plus_a``/C_l,
   C_l = the units of the unit's own layer (``plus_a`` = 1: the paper; 0: exact Horvitz-
   Thompson, unbounded weights). With a > 0, E[ĝ_j] = g_j·E[π_j/(π_j + a)] (slightly shrunk).

Compatibility: every fusion and M >= 2 (with M = 1, Eq. 4 gives p = 0); classification only
(``regression_refusal``: the significance and the Fisher are class log-likelihoods).
Logged per modality every epoch (``method/``): ``xi_<m>``, ``mi_<m>``
(the floored Barber-Agakov bound), ``hx_<m>``, ``u_<m>`` and ``p_<m>``. State for resume:
u (and the RNGs, saved by the base class).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tunebal.errors import ConfigError
from tunebal.knobs import Knob, knobs
from tunebal.methods._amss_mask import (
    MaskLayer,
    PerSampleFisher,
    classifier_block,
    find_mask_layers,
    importance_weights,
    layer_fisher_from_grad,
    sample_units,
    units_to_keep,
)
from tunebal.methods.base import Method, StepContext
from tunebal.methods.registry import register_method

if TYPE_CHECKING:  # pragma: no cover
    from tunebal.engine import Engine

#: floor of H(X^k) before dividing by it
EPS = 1e-12
#: p is clamped to [CLAMP_LOW, CLAMP_HIGH] with ``clamp`` (the release's limit_number)
CLAMP_LOW, CLAMP_HIGH = 0.1, 0.9

AMSS_KNOBS = knobs(
    Knob("tau", "float", 0.2, "temperature τ of the update ratio (Eq. 4); paper sweeps 0.1-4, 0.2 best on KS", low=0.01, high=100.0, log=True),
    Knob("ms_momentum", "float", 0.9, "momentum λ of the modal significance (Eq. 3); the release has none (0)", low=0.0, high=0.999),
    Knob("mask_unit", "str", "channel", "mask unit: conv output channel / linear output row (+bias, +norm) / attention head / classifier column | weight element", choices=("channel", "element")),
    Knob("mask_parts", "str", "both", "mask the backbone and the classifier (paper, Table VII) | backbone only | classifier only (its ablations)", choices=("both", "backbone", "classifier")),
    Knob("scope", "str", "modality", "draw ⌈p·N⌉ units from the whole encoder (paper) | ⌈p·C_l⌉ per layer (release)", choices=("modality", "layer")),
    Knob("clamp", "bool", False, "clamp the update ratio p to [0.1, 0.9] (release; off in the paper)"),
    Knob("mask_norm", "bool", True, "channel units include the γ/β of the norm layer that follows (release: false)"),
    Knob("fisher", "str", "batch", "Fisher estimator: squared batch gradient (release) | exact per-sample contributions", choices=("batch", "per_sample")),
    Knob("fisher_source", "str", "fused", "likelihood of the Fisher: fused prediction (release) | zero-out unimodal (+1 backward)", choices=("fused", "unimodal")),
    Knob("entropy", "str", "feature", "H(X^k): entropy of softmax(feature) (release) | none (ξ = MI bound)", choices=("feature", "none")),
)

AMSS_PLUS_KNOBS = AMSS_KNOBS + knobs(
    Knob("plus_a", "float", 1.0, "AMSS+ weight 1/(π+a) with a = plus_a / C_l (1: paper's a = 1/C_l; 0: exact unbiased)", low=0.0, high=1000.0),
)


# --------------------------------------------------------------------------- the formulas


def label_entropy(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """H(Y) of the batch's label distribution, in nats (Eq. 2)."""
    probs = torch.bincount(labels, minlength=num_classes).float() / labels.shape[0]
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum()


def feature_entropy(features: torch.Tensor) -> torch.Tensor:
    """Batch mean of the entropy of softmax over a feature's dimensions (the release's H(X^k))."""
    logp = torch.log_softmax(features.detach().float().flatten(1), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


def modal_significance(
    unimodal_logits: dict[str, torch.Tensor],
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    entropy: str = "feature",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ξ, MI bound, H(X)) as (M,) tensors in the order of ``unimodal_logits`` (Eq. 2)."""
    h_y = label_entropy(labels, num_classes)
    mis, hxs = [], []
    for m, logits in unimodal_logits.items():
        log_q = torch.log_softmax(logits.detach().float(), dim=1).gather(1, labels.view(-1, 1)).mean()
        mis.append((h_y + log_q).clamp_min(0.0))
        hxs.append(feature_entropy(features[m]) if entropy == "feature" else torch.ones((), device=logits.device))
    mi, hx = torch.stack(mis), torch.stack(hxs)
    return mi / hx.clamp_min(EPS), mi, hx


def update_ratios(u: torch.Tensor, tau: float, clamp: bool = False) -> torch.Tensor:
    """p^k = 1 - softmax(u/τ)_k (Eq. 4), optionally clamped to [0.1, 0.9]."""
    p = 1.0 - torch.softmax(u / tau, dim=0)
    return p.clamp(CLAMP_LOW, CLAMP_HIGH) if clamp else p


def classifier_parts(model: torch.nn.Module, unit: str = "channel") -> dict[str, list[MaskLayer]]:
    """Per modality, the head weights that read its feature (the paper's classifier mask, §IV-C3).

    concat: the classifier's columns over z^k; sum / gated: the input columns of the fusion's
    projection of z^k; FiLM: the classifier's columns over each modulated modality's block and
    the FiLM generator's input columns for the conditioning (last) modality. Biases are shared
    by the modalities and stay unmasked.
    """
    from tunebal.models.fusion import ConcatFusion, FiLMFusion, GatedFusion, SumFusion

    mods = list(model.modalities)
    dims = [model.encoders[m].out_dim for m in mods]
    fusion, classifier = model.fusion, model.classifier
    offsets = [sum(dims[:k]) for k in range(len(dims) + 1)]
    out: dict[str, list[MaskLayer]] = {}
    for k, m in enumerate(mods):
        if isinstance(fusion, ConcatFusion) or (isinstance(fusion, FiLMFusion) and k < len(mods) - 1):
            out[m] = [classifier_block(f"{m}/classifier", classifier, offsets[k], offsets[k + 1], unit)]
        elif isinstance(fusion, (SumFusion, GatedFusion)):
            out[m] = [classifier_block(f"{m}/fusion.proj.{k}", fusion.proj[k], 0, dims[k], unit)]
        elif isinstance(fusion, FiLMFusion):
            out[m] = [classifier_block(f"{m}/fusion.film", fusion.film, 0, dims[k], unit)]
        else:
            raise ConfigError(f"AMSS classifier masking does not know fusion {type(fusion).__name__}; use mask_parts=backbone")
    return out


# --------------------------------------------------------------------------- the methods


@register_method
class AMSS(Method):
    name = "amss"
    description = "AMSS: update a Fisher-sampled subnetwork whose size falls with modal significance (AMSS (TPAMI 2025) §III-B)"
    KNOBS = AMSS_KNOBS
    regression_refusal = ("its modal significance (AMSS, Eq. 2) is a Barber-Agakov bound over class log-likelihoods "
                          "and the label entropy H(Y), and its Fisher importance uses log p(ŷ|x) of the true class")
    #: AMSS+ rescales the kept units by 1/(π + a)
    unbiased = False

    def __init__(self, values: dict[str, Any], modalities: tuple[str, ...], num_classes: int, seed: int) -> None:
        super().__init__(values, modalities, num_classes, seed)
        self.tau = float(values["tau"])
        self.lam = float(values["ms_momentum"])
        self.u: torch.Tensor | None = None
        self.p: torch.Tensor | None = None  # this step's update ratios, (M,)
        self.layers: dict[str, list[MaskLayer]] = {}
        self.per_sample: PerSampleFisher | None = None
        self._layer_index: dict[str, list[int]] = {}
        self._unimodal_grads: dict[torch.nn.Parameter, torch.Tensor] | None = None
        self.plus_a = float(values.get("plus_a", 0.0))
        self._a_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def check_compatible(cls, num_modalities: int, fusion: str) -> None:
        super().check_compatible(num_modalities, fusion)
        if num_modalities < 2:
            raise ConfigError(f"method '{cls.name}' balances modalities against each other and needs at least 2; the dataset has {num_modalities}")

    # --- setup -------------------------------------------------------------------------------
    def setup(self, engine: "Engine") -> None:
        super().setup(engine)
        self.attach(engine.model)

    def attach(self, model: torch.nn.Module) -> None:
        """Find the mask units of every encoder and classifier part (and hook them for per-sample Fisher).

        ``layers[m]`` are modality m's encoder layers, ``classifier_layers[m]`` its classifier
        part (empty unless ``mask_parts`` includes it); ``_groups`` lists the independent draws
        of a step in order: every modality's backbone, then every modality's classifier part.
        """
        unit, mask_norm, parts = self.knobs["mask_unit"], self.knobs["mask_norm"], self.knobs["mask_parts"]
        flat: list[MaskLayer] = []
        self._groups: list[tuple[int, list[MaskLayer], list[int]]] = []
        self._encoders = {m: model.encoders[m] for m in self.modalities}
        self.classifier_layers = classifier_parts(model, unit) if parts != "backbone" else {m: [] for m in self.modalities}
        for k, m in enumerate(self.modalities):
            layers = find_mask_layers(model.encoders[m], unit, mask_norm, prefix=f"{m}/")
            if not layers:
                raise ConfigError(f"method '{self.name}': the {m} encoder has no conv/linear layer to mask")
            self.layers[m] = layers
            if parts != "classifier":
                self._layer_index[m] = list(range(len(flat), len(flat) + len(layers)))
                self._groups.append((k, layers, self._layer_index[m]))
                flat += layers
        for k, m in enumerate(self.modalities):
            if self.classifier_layers[m]:
                part = self.classifier_layers[m]
                self._groups.append((k, part, list(range(len(flat), len(flat) + len(part)))))
                flat += part
        self._flat = flat
        if self.knobs["fisher"] == "per_sample":
            self.per_sample = PerSampleFisher(flat)

    def coverage(self) -> dict[str, float]:
        """Fraction of each encoder's parameters that belongs to a mask unit."""
        out = {}
        for m, layers in self.layers.items():
            masked = sum(p.numel() for layer in layers for p in layer.parameters())
            out[m] = masked / sum(p.numel() for p in self._encoders[m].parameters())
        return out

    # --- hooks -------------------------------------------------------------------------------
    def loss(self, ctx: StepContext) -> torch.Tensor:
        loss = super().loss(ctx)
        self._update_ratios(ctx)
        if self.knobs["fisher_source"] == "unimodal":
            self._unimodal_fisher_grads(ctx)
        elif self.per_sample is not None:
            self.per_sample.capture = True  # the main backward feeds the per-sample Fisher
        return loss

    def after_backward(self, ctx: StepContext) -> None:
        if self.per_sample is not None:
            self.per_sample.capture = False
        assert self.p is not None
        for k, layers, indices in self._groups:  # backbones first, then classifier parts (independent draws)
            fishers = [self._fisher(idx, layer, ctx.labels.shape[0]) for idx, layer in zip(indices, layers)]
            self.mask_modality(layers, fishers, self.p[k])
        if self.per_sample is not None:
            self.per_sample.clear()
        self._unimodal_grads = None

    # --- steps ---------------------------------------------------------------------------------
    def _update_ratios(self, ctx: StepContext) -> None:
        assert ctx.encoded is not None
        uni = ctx.unimodal_logits()
        xi, mi, hx = modal_significance(
            {m: uni[m] for m in self.modalities}, ctx.encoded.features, ctx.labels, self.num_classes, self.knobs["entropy"]
        )
        if self.u is None:
            self.u = xi
        else:
            self.u = self.lam * self.u + (1.0 - self.lam) * xi
        self.p = update_ratios(self.u, self.tau, self.knobs["clamp"])
        for k, m in enumerate(self.modalities):
            self.epoch_means.add(f"xi_{m}", xi[k])
            self.epoch_means.add(f"mi_{m}", mi[k])
            self.epoch_means.add(f"hx_{m}", hx[k])
            self.epoch_means.add(f"u_{m}", self.u[k])
            self.epoch_means.add(f"p_{m}", self.p[k])

    def _unimodal_fisher_grads(self, ctx: StepContext) -> None:
        """Gradients of Σ_k CE(zero-out logits of k) w.r.t. the masked parameters (+1 backward).

        Under zero-out, modality k's unimodal logits depend on encoder k alone, so encoder k
        receives exactly the gradient of its own unimodal log-likelihood.
        """
        uni = ctx.unimodal_logits()
        loss = sum(F.cross_entropy(uni[m].float(), ctx.labels) for m in self.modalities)
        params = list({id(p): p for layer in self._flat for p in layer.fisher_parameters()}.values())
        if self.per_sample is not None:
            self.per_sample.capture = True
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        if self.per_sample is not None:
            self.per_sample.capture = False
        self._unimodal_grads = {p: g for p, g in zip(params, grads) if g is not None}

    def _fisher(self, idx: int, layer: MaskLayer, batch_size: int) -> torch.Tensor | None:
        if self.per_sample is not None and idx in self.per_sample.supported:
            fisher = self.per_sample.fisher(idx, layer, batch_size)
            if fisher is not None:
                return fisher
        return layer_fisher_from_grad(layer, self._unimodal_grads)

    def _unit_scale(self, selected: torch.Tensor, pi: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
        """Gradient multiplier of every unit: 0 if dropped, 1 (AMSS) or 1/(π + a) (AMSS+) if kept."""
        if not self.unbiased:
            return selected.float()
        return torch.where(selected, 1.0 / (pi + a), torch.zeros_like(pi))

    def mask_modality(self, layers: list[MaskLayer], fishers: list[torch.Tensor | None], p: torch.Tensor) -> None:
        """Keep ⌈p·N⌉ units of one modality's encoder (drawn ∝ importance), zero the others' grads."""
        live = [(layer, f) for layer, f in zip(layers, fishers) if f is not None and layer.weight.grad is not None]
        if not live:
            return
        gen = self.device_rng if live[0][1].device.type != "cpu" else self.rng
        if self.knobs["scope"] == "layer":
            scales = []
            for layer, fisher in live:
                selected, pi = sample_units(importance_weights(fisher), units_to_keep(p, layer.units), gen)
                scales.append(self._unit_scale(selected, pi, self.plus_a / layer.units))
        else:
            fisher = torch.cat([f for _, f in live])
            sizes = [layer.units for layer, _ in live]
            selected, pi = sample_units(importance_weights(fisher), units_to_keep(p, fisher.numel()), gen)
            a = self._pooled_a(sizes, pi.device) if self.unbiased else 0.0
            scales = list(torch.split(self._unit_scale(selected, pi, a), sizes))
        for (layer, _), scale in zip(live, scales):
            layer.scale_gradients(scale)

    def _pooled_a(self, sizes: list[int], device: torch.device) -> torch.Tensor:
        """a = plus_a / C_l for every unit of a pooled (scope=modality) draw, cached."""
        key = (tuple(sizes), str(device))
        if key not in self._a_cache:
            self._a_cache[key] = torch.cat([torch.full((n,), self.plus_a / n, device=device) for n in sizes])
        return self._a_cache[key]

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["u"] = None if self.u is None else self.u.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        u = state.get("u")
        device = self._flat[0].weight.device if getattr(self, "_flat", None) else torch.device("cpu")
        self.u = None if u is None else u.to(device=device, dtype=torch.float32)


@register_method
class AMSSPlus(AMSS):
    name = "amss_plus"
    description = "AMSS+: AMSS with kept units rescaled by 1/(π+a), an unbiased masked gradient (AMSS (TPAMI 2025) §III-C)"
    KNOBS = AMSS_PLUS_KNOBS
    unbiased = True
