"""AIM: Adaptive Intra-Network Modulation (AIM §III, Algorithm 1). No public code exists.

Every modality encoder is a list of D blocks E^m_1..E^m_D (ResNet18: its four stages). At
each depth d, AIM compares each block's output with the depth-adaptive prototypes P^m_d
(DAP, prototypes.py), decouples each block's "under-optimised" parameters into an
auxiliary block (PAM, decoupler.py), weights the blocks' losses by their performance
(Eqs. 11-12) and the depths by their imbalance (DAM, Eqs. 14-15).

Algorithm 1 as implemented (E = ``start_epoch``; formulas in losses.py):

* **Epochs e < E** ("pre" phase). Each step: the framework trains on plain CE (Eq. 2); the
  decoupler trains on L_pam = Σ_{m,d} [L_a + ||θ − Ψ(θ_lat)||²] (Eq. 8), where L_a is the CE
  over −δ of the *complement* block E^a_d(I_d) against the DAP. L_pam trains the decoupler
  only: θ, I_d and the DAP are constants in it, so the framework's update in this phase is
  bit-identical to joint training. At the end of each such epoch the framework is frozen
  (eval mode, no gradient) and the DAP is fitted for ``proto_steps`` Adam steps on
  L_cls + rec_weight·L_r (Eq. 5).
* **Epochs e >= E** ("modulation" phase). Each step: decouple every block (Eq. 7), compute
  s^m_d, ŝ^m_d, L^m_d, L̂^m_d against the DAP (Eqs. 9-10, ŝ/L̂ with the auxiliary block on the
  original block's input I^m_d), ρ, ρ̂ (Eq. 12), L_d (Eq. 11), α_d (Eq. 14), L_mod (Eq. 15);
  the loss is ``ce_weight``·CE + ``mod_weight``·L_mod + L_pam + [L_cls + rec_weight·L_r].
  The framework learns from CE and from L_mod through its data path only (original blocks,
  and auxiliary blocks via the decoupler's Jacobian, Eq. 13); the decoupler from L_pam only;
  the DAP from Eq. 5 only, one Adam step every ``proto_refresh`` steps, when P_d = E_≤d(P_0)
  is also re-propagated (interpretations 2, 12, 16).

Interpretations (the paper leaves these open; each is a knob or documented here):

1. **Plain CE after E** is kept with weight ``ce_weight`` (default 1): Algorithm 1 line 10
   names only L_mod and Eq. 5, but L_mod alone never trains the fusion module and the
   classifier (it only reaches the encoders), so without CE the head would freeze at E.
2. **The decoupler keeps learning after E** (``pam_after_start``, default on). The paper's
   mask exists to find "the under-optimized parameters" of each block (§III-D), which change
   as the block trains, and Algorithm 1 line 2 trains "the multimodal framework and the
   parameter decoupling mechanism jointly using Eqs. (2) and (8)"; line 10 ("Jointly update
   multimodal framework and DAP using L_mod and Eq. (5)") does not name the decoupler, and read
   literally it freezes it at E (``pam_after_start=false``). Frozen, the decoupler is never
   trained when E = 0 (the mask stays at 0.5). On synth (3 seeds, raw distance, precise BN)
   the literal readings of lines 10 (decoupler frozen, DAP trained by L_mod) scored 90.9 ± 6.7 %
   test against 96.2 ± 2.3 with these defaults (w/o PAM: 97.1 ± 1.6, so PAM itself did not
   add accuracy there; tunebal/bench/aim.py, compare part). With the default, E = 0 is meaningful: the
   DAP is fitted once before epoch 0 (interpretation 5) and the decoupler learns alongside
   modulation from the first step.
3. **L_mod does not train the decoupler**: the auxiliary branch is computed with the
   decoupler's parameters frozen, so only θ (Eq. 13) and the shared BatchNorm affine
   parameters learn from L̂. Otherwise L̂ would push the mask to make the *auxiliary* block
   good, the opposite of L_a's role (the mask selects the under-optimised parameters).
4. **ρ, ρ̂ and α are detached** ("ρ is the fixed weight in Eq. (11)", text of Eq. 13): they
   weight the losses, no gradient flows through them. α_d uses the original blocks' s^m_d
   (Eq. 14 as printed), with the population std (1/M).
5. **The DAP is fitted once before the first epoch** when it has never been fitted (not
   just at the end of epochs < E): with E = 0 modulation would otherwise start against
   random prototypes, and with E > 0 the first epoch's L_a would.
6. **Block input I^m_d is not detached** in L^m_d and L̂^m_d: L_d also supervises the blocks
   before d (deep supervision); in L_pam (decoupler only) it is.
7. **BatchNorm**: the framework's own forward is untouched; auxiliary/complement blocks
   normalise with their batch's statistics and never update running statistics; the DAP
   propagates in eval mode (running statistics). BN affine parameters are shared.
8. **Depth output of block D**: I^m_{d+1} is block d's output; block D's output is captured
   with a forward hook on the last block during the engine's own forward (no recompute).
9. **AIM-label** (``target=label``, §IV-F): "the classifier's predicted distribution of each
   modality at depth d" is read as: run the remaining *original* blocks d+1..D after the
   block at depth d, pool, and apply the shared fusion+classifier with every other modality
   zeroed (tunebal's one unimodal-logits definition). For original blocks this is the same
   unimodal prediction at every depth (a label target cannot tell depths apart, which is the
   paper's argument for DAP); for auxiliary and complement blocks it differs per depth.
   Eq. 9 becomes the probability of the true class, Eq. 10 its CE. No DAP is built.
10. **Ablations**: ``pam=false`` removes the decoupler, the auxiliary blocks and L_pam, and ρ
    is normalised over the original blocks only; ``dam=false`` sets α_d = 1.
11. **Optimisers**: the framework keeps the engine's optimiser and schedule. The decoupler
    and the DAP (prototypes + decoders) each have their own Adam (``decoupler_lr``,
    ``proto_lr``, constant), stepped in ``after_step`` whenever their loss was in the step's
    loss (the DAP's also for the epoch-end fits); neither is in the engine's gradient
    clipping. The decoupler's outputs feed BatchNorm-normalised layers, which makes its
    loss scale-invariant in θ^a; plain SGD at the framework's rate diverged on a toy
    problem while Adam trains the mask stably.
12. **The DAP learns from Eq. 5 only** (``dap_from_mod``, default off). Line 10, "Jointly
    update multimodal framework and DAP using L_mod and Eq. (5)", is read as the framework
    from L_mod and the DAP from Eq. 5, the DAP's own objective (line 2: "Freeze the multimodal
    framework and optimize DAP using Eq. (5)"): P_d are the *targets* of Eqs. 9-10, and L_mod
    through P_d would pull the prototypes towards the blocks' outputs, away from Eq. 5's
    minimiser, shrinking the gaps in s that α (Eq. 14) and ρ (Eq. 12) measure. In L_mod the
    P_d are constants. ``dap_from_mod=true`` is the literal reading (L_mod also reaches P_0
    and the decoders). The prototype path never trains the framework (Eq. 5 freezes it).
13. **Sums**: L_pam sums Eq. 8 over all blocks (m, d) (each block has its own decoupler, so
    this trains each on its own Eq. 8); ||θ − Ψ(θ_lat)||² sums over the block's decoupled
    tensors (Frobenius); L_r is Eq. 4 as printed (squared Frobenius norm, not a mean).
14. **Distances are standardised by default** (``distance``; losses.py): logits −δ/σ with σ
    the batch's mean spread of δ over the K prototypes (detached), so the logits are
    scale-free. The paper's raw −δ (``distance=euclidean``) makes L_mod's gradient
    independent of the feature map's size: at E on synth it was 4-15x CE's on the audio
    encoder's convolutions (relative to the weights), and at the search space's high learning
    rates L_mod grew without bound (23 then 66 in the two epochs after E at lr 0.071,
    mod_weight 3.6, even with gradient clipping at 1) while training accuracy fell from 91 to
    77 %; with the standardised δ the same configuration kept L_mod at 1-2 and validation at
    99-99.8 % after E. At lr 0.01 the raw form scored 2.6 points more on synth (96.2 ± 2.3
    against 93.6 ± 2.9 %, 3 seeds; tunebal/bench/aim.py, compare part). ``rms`` divides δ by sqrt(dim):
    it makes s ≈ 1/K and α ≈ 0 on synth (modulation does nothing), so it is not the default.
16. **Prototype refresh** (``proto_refresh``, default 1 = every step). From E on, P_d is
    re-propagated and the DAP takes its Eq. 5 Adam step on steps 0, n, 2n, ... of each epoch;
    in between, L_mod uses the last propagated P_d. Eq. 5 keeps its meaning (the DAP
    minimises it for the current framework, updated every n steps instead of every step).
    The counter restarts each epoch, so a resume at an epoch boundary stays bit-exact.
17. **Factorised auxiliary convolutions** (``aux_form``, default ``factorised``): the
    auxiliary and complement layers are computed as a convolution with the L + 1 basis filters
    of Ψ followed by a 1x1 mix (decoupler.py), exactly equal in outputs and gradients to the
    direct form (``aux_form=direct``), and cheaper wherever (L+1)(n + C_out) < C_out·n.
18. **Prototype orthogonality** (Eq. 16, Fig. 4): at each epoch's end the mean |off-diagonal|
    cosine similarity of the K prototypes at each depth is logged as ``proto_cos/<m>/d<d>``.
19. **BatchNorm statistics after E**: modulation at high learning rates moves the early
    convolutions quickly, so the running statistics lag and eval-mode accuracy can collapse
    while the weights are fine; the common knob ``bn_recalibrate`` (tunebal/bn.py, precise
    BN) recomputes them before validation. The AIM search space turns it on.
15. **Speed knob** ``branch_fraction``: the auxiliary and complement blocks see only the
    first ⌈f·B⌉ samples of each shuffled batch (1 = the paper). Faithfully, every step of
    the modulation phase runs each block twice (original and auxiliary, both with their
    backward) plus the K prototypes through the whole network, with a distance loss at
    every depth; before E each block runs twice too (original, complement).
    tunebal/bench/aim.py measures the step time over the baseline's (timing and resnet parts).

All of AIM's state (decoupler and its Adam, prototypes, decoders and their Adam, whether
the DAP was fitted, the RNG) is in ``state_dict``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tunebal.errors import ConfigError
from tunebal.knobs import Knob, knobs
from tunebal.methods.aim.decoupler import Decoupler, run_block
from tunebal.methods.aim.losses import (
    DISTANCES,
    depth_loss,
    distance_logits,
    flat,
    imbalance,
    interaction_weights,
    modulation_loss,
    performance_and_loss,
)
from tunebal.methods.aim.prototypes import DepthAdaptivePrototypes, eval_mode, frozen
from tunebal.methods.base import Method, StepContext
from tunebal.methods.registry import register_method

if TYPE_CHECKING:  # pragma: no cover
    from tunebal.engine import Engine

def prototype_overlap(protos: torch.Tensor) -> torch.Tensor:
    """Mean |off-diagonal| of O^m_d = <S(P^m_d), S(P^m_d)ᵀ> (AIM, Eq. 16; cosine similarity of
    the K flattened prototypes of one depth): 0 = mutually orthogonal, 1 = collinear. The paper's
    Fig. 4 shows it falling with depth on CREMA-D (stricter targets deeper in the network)."""
    flat_p = F.normalize(protos.detach().float().reshape(protos.shape[0], -1), dim=1)
    cos = flat_p @ flat_p.t()
    k = cos.shape[0]
    off = cos[~torch.eye(k, dtype=torch.bool, device=cos.device)]
    return off.abs().mean() if off.numel() else torch.zeros((), device=cos.device)


TARGETS = ("dap", "label")
AUX_FORMS = ("factorised", "direct")


@register_method
class AIM(Method):
    name = "aim"
    description = "Adaptive Intra-Network Modulation: DAP + parameter- and depth-adaptive modulation (AIM, Algorithm 1)"
    regression_refusal = "its depth-adaptive prototypes and performance scores (AIM, Eq. 3-9) are per-class softmax scores"
    needs_block_inputs = True
    KNOBS = knobs(
        Knob("start_epoch", "int", 2, "E: first epoch of modulation; before it CE + L_pam and DAP fitting", low=0, high=10000),
        Knob("latent_dim", "int", 16, "decoupler latent size L per filter (capped per layer at min(L, C_in·k·k, C_out))", low=1, high=4096),
        Knob("pam", "bool", True, "parameter-adaptive modulation (false: w/o PAM ablation)"),
        Knob("dam", "bool", True, "depth-adaptive modulation (false: w/o DAM ablation, alpha_d = 1)"),
        Knob("target", "str", "dap", "performance target: DAP prototypes or labels (AIM-label)", choices=TARGETS),
        Knob("ce_weight", "float", 1.0, "weight of plain CE from E on (before E it is 1)", low=0.0, high=100.0),
        Knob("mod_weight", "float", 1.0, "weight of L_mod (Eq. 15) in the loss", low=0.0, high=100.0),
        Knob("decoupler_lr", "float", 0.01, "Adam learning rate of the parameter decoupling mechanism", low=1e-6, high=10.0, log=True),
        Knob("pam_after_start", "bool", True, "keep training the decoupler with L_pam from E on (false: Algorithm 1 line 10 read literally)"),
        Knob("dap_from_mod", "bool", False, "L_mod also trains the DAP through P_d = E_<=d(P_0) (literal reading of Algorithm 1 line 10)"),
        Knob("proto_refresh", "int", 1, "from E on, propagate P_d and take one Eq. 5 step of the DAP every this many steps (1: every step)", low=1, high=100000),
        Knob("aux_form", "str", "factorised", "auxiliary/complement convolutions: basis conv + 1x1 mix (exact) or direct weights", choices=AUX_FORMS),
        Knob("proto_steps", "int", 50, "Adam steps fitting the DAP at the end of each epoch < E (and once before epoch 0)", low=0, high=100000),
        Knob("proto_lr", "float", 0.05, "Adam learning rate of the prototypes and their decoders", low=1e-6, high=10.0, log=True),
        Knob("rec_weight", "float", 1.0, "weight of the prototype reconstruction loss L_r (Eq. 4) in Eq. 5", low=0.0, high=100.0),
        Knob("distance", "str", "standardised", "logits -delta/spread of delta over the prototypes (standardised, scale-free), -delta (euclidean: the paper's raw form) or -delta/sqrt(dim) (rms)", choices=DISTANCES),
        Knob("temperature", "float", 1.0, "divide the distance logits by this", low=1e-4, high=1e4, log=True),
        Knob("branch_fraction", "float", 1.0, "fraction of each batch fed to auxiliary/complement blocks", low=0.01, high=1.0),
    )

    def __init__(self, values: dict[str, Any], modalities: tuple[str, ...], num_classes: int, seed: int) -> None:
        super().__init__(values, modalities, num_classes, seed)
        self.start_epoch: int = values["start_epoch"]
        self.use_pam: bool = values["pam"]
        self.use_dam: bool = values["dam"]
        self.target: str = values["target"]
        self.decoupler: Decoupler | None = None
        self.decoupler_opt: torch.optim.Optimizer | None = None
        self.dap: DepthAdaptivePrototypes | None = None
        self.proto_opt: torch.optim.Optimizer | None = None
        self.class_means: dict[str, torch.Tensor] = {}
        self.dap_fitted = False
        self.depth = 0
        self._capture = True
        self._last_out: dict[str, torch.Tensor] = {}
        self._vec_sums: dict[str, torch.Tensor] = {}
        self._vec_counts: dict[str, int] = {}
        self._hooks: list[Any] = []
        self._proto_cache: dict[str, list[torch.Tensor]] | None = None
        self._step_in_epoch = 0

    # --- setup -----------------------------------------------------------------------------
    def setup(self, engine: Engine) -> None:
        super().setup(engine)
        model = engine.model
        depths = {m: model.encoders[m].depth for m in self.modalities}
        if len(set(depths.values())) != 1:
            raise ConfigError(f"aim: every encoder needs the same number of blocks D, got {depths}")
        self.depth = next(iter(depths.values()))
        device = engine.device
        if self.use_pam:
            self.decoupler = Decoupler({m: model.encoders[m] for m in self.modalities}, self.knobs["latent_dim"]).to(device)
            self.decoupler_opt = torch.optim.Adam(self.decoupler.parameters(), lr=self.knobs["decoupler_lr"])
        if self.target == "dap":
            gen = torch.Generator().manual_seed(self.seed + 104_729)
            shapes = {m: engine.data.input_shape(m) for m in self.modalities}
            self.dap = DepthAdaptivePrototypes(self.modalities, engine.data.kinds, shapes, self.num_classes, gen).to(device)
            self.proto_opt = torch.optim.Adam(self.dap.parameters(), lr=self.knobs["proto_lr"])
            self.class_means = {m: x.to(device) for m, x in engine.data.class_means("train").items()}
        for m in self.modalities:
            self._hooks.append(model.encoders[m].blocks[-1].register_forward_hook(self._capture_hook(m)))

    def _capture_hook(self, modality: str):
        def hook(module, inputs, output):
            if self._capture and module.training and torch.is_grad_enabled():
                self._last_out[modality] = output

        return hook

    def parameter_counts(self, model: torch.nn.Module) -> dict[str, int]:
        """Parameters of the encoders, the decoupler and the DAP (prototypes + decoders)."""
        enc = sum(p.numel() for m in self.modalities for p in model.encoders[m].parameters())
        out = {"encoders": enc, "decoupler": self.decoupler.num_parameters() if self.decoupler else 0}
        out["dap"] = sum(p.numel() for p in self.dap.parameters()) if self.dap else 0
        for m in self.modalities:
            out[f"encoder/{m}"] = sum(p.numel() for p in model.encoders[m].parameters())
            out[f"decoupler/{m}"] = self.decoupler.num_parameters(m) if self.decoupler else 0
        return out

    # --- DAP fitting (Eq. 5) ---------------------------------------------------------------
    def fit_dap(self, engine: Engine, steps: int) -> None:
        """``steps`` Adam steps of Eq. 5 with the framework frozen (eval mode, no gradient)."""
        assert self.dap is not None and self.proto_opt is not None
        model = engine.model
        with torch.enable_grad(), eval_mode(model), frozen(model):
            for _ in range(steps):
                with engine.autocast():
                    _, feats = self.dap.propagate(model)
                    l_cls, acc = self.dap.classification_loss(model, feats)
                    l_rec = self.dap.reconstruction_loss(self.class_means)
                    loss = l_cls + self.knobs["rec_weight"] * l_rec
                self.proto_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.proto_opt.step()
            self.proto_opt.zero_grad(set_to_none=True)
            if steps:
                self.epoch_means.add("dap_fit/cls_loss", l_cls)
                self.epoch_means.add("dap_fit/rec_loss", l_rec)
                self.epoch_means.add("dap_fit/acc", acc)
        self.dap_fitted = True

    # --- hooks -----------------------------------------------------------------------------
    def on_epoch_start(self, engine: Engine) -> None:
        super().on_epoch_start(engine)
        self._vec_sums.clear()
        self._vec_counts.clear()
        self._capture = True
        self._proto_cache = None
        self._step_in_epoch = 0
        if self.dap is not None and not self.dap_fitted:
            self.fit_dap(engine, self.knobs["proto_steps"])

    def on_epoch_end(self, engine: Engine) -> None:
        if self.dap is not None and engine.epoch < self.start_epoch:
            self.fit_dap(engine, self.knobs["proto_steps"])
        if self.dap is not None:
            with torch.no_grad(), engine.autocast():
                protos, _ = self.dap.propagate(engine.model)
            for m in self.modalities:
                for d, p in enumerate(protos[m]):
                    self.epoch_means.add(f"proto_cos/{m}/d{d + 1}", prototype_overlap(p))


    def before_fusion(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        assert ctx.encoded is not None
        outs = {}
        for m in self.modalities:
            last = self._last_out.pop(m, None)
            if last is None:
                raise RuntimeError("aim: the last block's output was not captured (train mode with grad enabled?)")
            outs[m] = list(ctx.encoded.block_inputs[m][1:]) + [last]
        ctx.scratch["aim_outputs"] = outs
        self._capture = False
        return super().before_fusion(ctx)

    def after_step(self, ctx: StepContext) -> None:
        self._capture = True
        self._step_in_epoch += 1
        if self.decoupler_opt is not None and ctx.scratch.get("aim_pam_grad", False):
            self.decoupler_opt.step()
            self.decoupler_opt.zero_grad(set_to_none=True)
        if self.proto_opt is not None and ctx.scratch.get("aim_dap_grad", False):
            self.proto_opt.step()
            self.proto_opt.zero_grad(set_to_none=True)

    # --- the loss --------------------------------------------------------------------------
    def _rest_logits(
        self, ctx: StepContext, modality: str, d: int, out: torch.Tensor, n: int
    ) -> torch.Tensor:
        """AIM-label: unimodal logits of ``modality`` when block d's output is ``out`` (n samples).

        The original blocks d+1..D run on clones of their buffers (no running-stat update).
        """
        enc = ctx.model.encoders[modality]
        h = out
        for block in list(enc.blocks)[d + 1 :]:
            h = run_block(block, {}, h)
        z = enc.pool(h, n)
        assert ctx.encoded is not None
        feats = {j: (z if j == modality else torch.zeros_like(f[:n])) for j, f in ctx.encoded.features.items()}
        return ctx.model.head(feats)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.logits is not None and ctx.encoded is not None
        model, labels = ctx.model, ctx.labels
        b, k = labels.shape[0], self.num_classes
        knob = self.knobs
        modulating = ctx.epoch >= self.start_epoch
        ce = F.cross_entropy(ctx.logits, labels)
        outs: dict[str, list[torch.Tensor]] = ctx.scratch.pop("aim_outputs")
        ins = ctx.encoded.block_inputs
        mods, depth = self.modalities, self.depth
        dist = lambda x, p: distance_logits(x, p, knob["distance"], knob["temperature"])

        total = knob["ce_weight"] * ce if modulating else ce
        self.epoch_means.add("loss/ce", ce)
        self.epoch_means.add("phase", float(modulating))

        # --- targets at every depth: DAP prototypes (Eq. 6) or the unimodal prediction ----
        protos: dict[str, list[torch.Tensor]] = {}
        if self.dap is not None:
            refresh = self._proto_cache is None or self._step_in_epoch % knob["proto_refresh"] == 0
            if modulating and (refresh or knob["dap_from_mod"]):
                protos, pfeats = self.dap.propagate(model)
                l_cls, p_acc = self.dap.classification_loss(model, pfeats)
                l_rec = self.dap.reconstruction_loss(self.class_means)
                total = total + l_cls + knob["rec_weight"] * l_rec
                ctx.scratch["aim_dap_grad"] = True
                self.epoch_means.add("loss/dap_cls", l_cls)
                self.epoch_means.add("loss/dap_rec", l_rec)
                self.epoch_means.add("dap/acc", p_acc)
                if not knob["dap_from_mod"]:  # targets only: the DAP learns from Eq. 5 alone
                    protos = {m: [p.detach() for p in ps] for m, ps in protos.items()}
                    self._proto_cache = protos
            elif modulating:  # between refreshes: the last propagated prototypes (constants)
                assert self._proto_cache is not None
                protos = self._proto_cache
            else:
                with torch.no_grad():
                    protos, _ = self.dap.propagate(model)
        uni = ctx.unimodal_logits() if self.target == "label" else {}

        # --- original blocks: s^m_d, L^m_d (Eqs. 9-10) -------------------------------------
        s = torch.zeros(len(mods), depth, device=labels.device)
        losses: list[list[torch.Tensor]] = [[] for _ in mods]
        with torch.set_grad_enabled(modulating and torch.is_grad_enabled()):
            for i, m in enumerate(mods):
                for d in range(depth):
                    if self.dap is not None:
                        logits = dist(flat(outs[m][d], b), flat(protos[m][d], k))
                    else:
                        logits = uni[m]
                    s_md, l_md = performance_and_loss(logits, labels)
                    s[i, d] = s_md.detach()
                    losses[i].append(l_md)

        # --- PAM: auxiliary (Eq. 7, 9-10 with hats) and complement (Eq. 8) blocks ----------
        s_aux = torch.zeros_like(s)
        losses_aux: list[list[torch.Tensor]] = [[] for _ in mods]
        if self.decoupler is not None:
            nb = b if knob["branch_fraction"] >= 1.0 else min(b, max(2, math.ceil(knob["branch_fraction"] * b)))
            y = labels[:nb]
            train_pam = (not modulating) or knob["pam_after_start"]
            factorised = knob["aux_form"] == "factorised"
            l_pam = torch.zeros((), device=labels.device)
            s_comp = torch.zeros_like(s)
            masks = torch.zeros_like(s)
            for i, m in enumerate(mods):
                enc = model.encoders[m]
                for d in range(depth):
                    block, dec = enc.blocks[d], self.decoupler.blocks[m][d]
                    x = ins[m][d]
                    x = x[: nb * (x.shape[0] // b)]
                    if modulating:  # auxiliary block: θ^b(θ), decoupler frozen (interpretation 3)
                        with frozen(dec):
                            aux = dec.decouple(block, ("aux",), detach_theta=False, reconstruct=False, factorised=factorised)
                        aux_params, aux_factors = aux.branch("aux")
                        out = run_block(block, aux_params, x, aux_factors)
                        if self.dap is not None:
                            logits = dist(flat(out, nb), flat(protos[m][d], k))
                        else:
                            logits = self._rest_logits(ctx, m, d, out, nb)
                        s_md, l_md = performance_and_loss(logits, y)
                        s_aux[i, d] = s_md.detach()
                        masks[i, d] = aux.mask_mean
                        losses_aux[i].append(l_md)
                    if train_pam:  # complement block: trains the decoupler only
                        with frozen(model):
                            comp = dec.decouple(block, ("comp",), detach_theta=True, factorised=factorised)
                            out = run_block(block, comp.params["comp"], x.detach(), comp.branch("comp")[1])
                            if self.dap is not None:
                                logits = dist(flat(out, nb), flat(protos[m][d].detach(), k))
                            else:
                                logits = self._rest_logits(ctx, m, d, out, nb)
                        s_md, l_a = performance_and_loss(logits, y)
                        s_comp[i, d] = s_md.detach()
                        masks[i, d] = comp.mask_mean
                        l_pam = l_pam + l_a + comp.rec
                        self.epoch_means.add("loss/pam_a", l_a)
                        self.epoch_means.add("loss/pam_rec", comp.rec)
            self._add_vec("mask_mean", masks)
            self.epoch_means.add("mask_mean", masks.mean())
            if train_pam:
                total = total + l_pam
                ctx.scratch["aim_pam_grad"] = True
                self.epoch_means.add("loss/pam", l_pam)
                self._add_vec("s_comp", s_comp)

        # --- ρ (Eq. 12), L_d (Eq. 11), α (Eq. 14), L_mod (Eq. 15) ---------------------------
        alphas = torch.stack([imbalance(s[:, d]) for d in range(depth)])
        self._add_vec("s", s)
        self._add_vec("alpha", alphas.unsqueeze(0))
        if modulating:
            pam = self.decoupler is not None
            rho_all, rho_aux_all, l_depth = [], [], []
            for d in range(depth):
                rho, rho_aux = interaction_weights(s[:, d], s_aux[:, d] if pam else None)
                l_m = torch.stack([losses[i][d] for i in range(len(mods))])
                l_aux = torch.stack([losses_aux[i][d] for i in range(len(mods))]) if pam else None
                l_depth.append(depth_loss(l_m, rho, l_aux, rho_aux))
                rho_all.append(rho)
                if rho_aux is not None:
                    rho_aux_all.append(rho_aux)
            weights = alphas if self.use_dam else torch.ones_like(alphas)
            l_mod = modulation_loss(weights, torch.stack(l_depth))
            total = total + knob["mod_weight"] * l_mod
            self.epoch_means.add("loss/mod", l_mod)
            self._add_vec("rho", torch.stack(rho_all, dim=1))
            self._add_vec("L", torch.stack([torch.stack(row) for row in losses]))
            if pam:
                self._add_vec("L_aux", torch.stack([torch.stack(row) for row in losses_aux]))
                self._add_vec("s_aux", s_aux)
                self._add_vec("rho_aux", torch.stack(rho_aux_all, dim=1))
        return total

    # --- logging and state -----------------------------------------------------------------
    def _add_vec(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._vec_sums[name] = self._vec_sums[name] + value if name in self._vec_sums else value.clone()
        self._vec_counts[name] = self._vec_counts.get(name, 0) + 1

    def metrics(self) -> dict[str, float]:
        """Scalars, plus per (modality, depth) means: ``s/<m>/d<d>``, ``s_aux``, ``s_comp``,
        ``rho``, ``rho_aux``, ``mask_mean``, ``L``/``L_aux`` (Eq. 10's losses), and per depth ``alpha/d<d>`` (d counted from 1)."""
        out = self.epoch_means.means()
        for name, total in self._vec_sums.items():
            mean = (total / self._vec_counts[name]).cpu()
            for d in range(mean.shape[1]):
                if name == "alpha":
                    out[f"alpha/d{d + 1}"] = float(mean[0, d])
                else:
                    for i, m in enumerate(self.modalities):
                        out[f"{name}/{m}/d{d + 1}"] = float(mean[i, d])
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dap_fitted"] = self.dap_fitted
        if self.decoupler is not None and self.decoupler_opt is not None:
            state["decoupler"] = self.decoupler.state_dict()
            state["decoupler_opt"] = self.decoupler_opt.state_dict()
        if self.dap is not None and self.proto_opt is not None:
            state["dap"] = self.dap.state_dict()
            state["proto_opt"] = self.proto_opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.dap_fitted = bool(state["dap_fitted"])
        if self.decoupler is not None and self.decoupler_opt is not None:
            self.decoupler.load_state_dict(state["decoupler"])
            self.decoupler_opt.load_state_dict(state["decoupler_opt"])
        if self.dap is not None and self.proto_opt is not None:
            self.dap.load_state_dict(state["dap"])
            self.proto_opt.load_state_dict(state["proto_opt"])
