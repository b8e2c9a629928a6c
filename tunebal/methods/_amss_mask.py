"""Mask units, Fisher importance and importance sampling for AMSS / AMSS+ (AMSS (TPAMI 2025) §III-B, III-C).

This module holds the tensor-level machinery; the method itself (modal significance, the update
ratio and the hooks) lives in :mod:`tunebal.methods.amss`. Nothing here synchronises with the
device: the number of units to keep is a 0-d tensor, selection is a rank comparison.

Mask units (``find_mask_layers``)
    A *mask layer* is a leaf module of a modality's encoder whose ``weight`` has >= 2 dims
    (``nn.Conv*``, ``nn.Linear``). With ``unit="channel"`` a unit is one slice along dim 0 of
    the weight -- an output channel (filter) of a conv, an output row of a linear layer -- plus
    the matching entry of the layer's bias and, with ``mask_norm``, the matching γ/β of the
    norm layer (BatchNorm/GroupNorm/LayerNorm with one affine entry per channel) that is the
    next module with parameters after it in registration order (small encoders: conv->BN,
    linear->BN1d; ResNet: conv1->bn1, conv2->bn2, downsample.0->downsample.1). With
    ``unit="element"`` every weight element is a unit and biases/norm parameters are left
    unmasked (they have no element-level counterpart). Encoder parameters that belong to no
    unit (a norm layer not directly after a masked layer, ``mask_norm=False``) are never masked.

Fisher importance (``layer_fisher_from_grad``, ``PerSampleFisher``)
    The paper's diagonal empirical Fisher is F_j = (1/B) Σ_i (∂ log p(y_i|x_i)/∂w_j)^2 (§III-B 2).
    ``"batch"`` uses the squared mini-batch gradient (∂L/∂w_j)^2 with L the batch-mean loss --
    the released code's estimator, free because the gradient exists anyway; it equals
    (mean_i g_ij)^2 = F_j - Var_i(g_ij) (up to the constant B that the normalisation removes),
    i.e. it favours units whose per-sample gradients agree. ``"per_sample"`` is the exact
    diagonal empirical Fisher of the decomposition g_i = B·(a_i ⊗ δ_i) of the batch gradient
    into per-sample contributions (a_i: the layer's input for sample i, δ_i: the gradient
    reaching its output), computed from forward/gradient hooks on ``nn.Linear`` and
    ``nn.Conv2d`` layers (unfold + bmm; frames of one clip are summed first, so a "sample" is
    a clip). Without BatchNorm coupling g_i is exactly ∂ℓ_i/∂w; with train-mode BatchNorm it
    is sample i's share of the batch gradient. Other layer types fall back to ``"batch"``.
    A unit's importance is the sum of F over its weight (and bias) elements.

Sampling (``sample_units``)
    ⌈p·N⌉ units are drawn without replacement with probability proportional to importance.
    This is exactly ``torch.multinomial(w, n, replacement=False)``: PyTorch implements it as
    the top-n of the keys w_j / E_j with E_j ~ Exp(1) (successive sampling / Efraimidis-
    Spirakis), and ``sample_units`` draws the same exponentials from the same generator, so it
    selects the same set, draw for draw (tested). It also returns the keys' (n+1)-th largest
    value κ, which gives every selected unit its *rank-conditioned inclusion probability*
    π_j = P(j selected | the other keys) = 1 - exp(-w_j / κ): given the other units' keys, j
    is selected iff its key beats their n-th largest, which is κ whenever j is selected. The
    Horvitz-Thompson weight 1{j ∈ S}/π_j is therefore exactly unbiased (E = 1; Cohen &
    Kaplan's bottom-k / priority-sampling argument), with no approximation of the unconditional
    inclusion probabilities, which have no closed form for successive sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: added to the normalised importance (relative to the uniform 1/N) so that every unit can be
#: drawn and π_j > 0 (a unit with zero Fisher would otherwise break sampling without replacement)
IMPORTANCE_FLOOR = 1e-6

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class MaskLayer:
    """One masked weight and the per-unit parameters tied to it."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    tied: list[nn.Parameter] = field(default_factory=list)  # norm γ/β of the same channels
    element: bool = False

    @property
    def units(self) -> int:
        """C_l: mask units of this layer."""
        return self.weight.numel() if self.element else self.weight.shape[0]

    def unit_view(self, values: torch.Tensor) -> torch.Tensor:
        """Per-unit values broadcastable against the weight."""
        if self.element:
            return values.view(self.weight.shape)
        return values.view(-1, *([1] * (self.weight.dim() - 1)))

    def parameters(self) -> list[nn.Parameter]:
        out = [self.weight]
        if not self.element:
            out += ([self.bias] if self.bias is not None else []) + self.tied
        return out


def _norm_params(module: nn.Module, channels: int) -> list[nn.Parameter]:
    params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if isinstance(p, nn.Parameter)]
    if params and all(p.dim() == 1 and p.shape[0] == channels for p in params):
        return params
    return []


def find_mask_layers(encoder: nn.Module, unit: str = "channel", mask_norm: bool = True, prefix: str = "") -> list[MaskLayer]:
    """The mask layers of one encoder, in registration (= forward, for our encoders) order."""
    if unit not in ("channel", "element"):
        raise ValueError(f"unknown mask unit {unit!r}")
    layers: list[MaskLayer] = []
    last: MaskLayer | None = None
    for name, module in encoder.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if not own:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, _NORMS):
            if last is not None and unit == "channel" and mask_norm:
                last.tied = _norm_params(module, last.weight.shape[0])
            last = None
            continue
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            bias = getattr(module, "bias", None)
            bias = bias if isinstance(bias, nn.Parameter) and bias.shape == weight.shape[:1] else None
            last = MaskLayer(f"{prefix}{name}", module, weight, bias, element=(unit == "element"))
            layers.append(last)
        else:
            last = None
    return layers


def layer_fisher_from_grad(layer: MaskLayer, grads: dict[nn.Parameter, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Unit importance from the squared mini-batch gradient (the ``"batch"`` estimator).

    ``grads`` maps parameters to gradients (from ``torch.autograd.grad``); by default ``.grad``.
    Returns None when the weight has no gradient.
    """
    get = (lambda p: p.grad) if grads is None else (lambda p: grads.get(p))
    g = get(layer.weight)
    if g is None:
        return None
    sq = g.detach().float().square()
    if layer.element:
        return sq.reshape(-1)
    fisher = sq.reshape(sq.shape[0], -1).sum(dim=1)
    if layer.bias is not None and get(layer.bias) is not None:
        fisher = fisher + get(layer.bias).detach().float().square()
    return fisher


class PerSampleFisher:
    """Diagonal empirical Fisher per unit from per-sample gradient contributions (hooks).

    Forward hooks keep each supported layer's input (already saved by autograd, so no copy);
    a tensor hook on the layer's output keeps the gradient reaching it while ``capture`` is on.
    """

    def __init__(self, layers: list[MaskLayer]) -> None:
        self.capture = False
        self.inputs: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.handles = []
        self.supported: set[int] = set()
        for idx, layer in enumerate(layers):
            if self._supports(layer.module):
                self.supported.add(idx)
                self.handles.append(layer.module.register_forward_hook(self._forward_hook(idx)))

    @staticmethod
    def _supports(module: nn.Module) -> bool:
        if isinstance(module, nn.Linear):
            return True
        return (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )

    def _forward_hook(self, idx: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and output.requires_grad):
                return
            self.inputs[idx] = inputs[0]

            def keep_grad(grad: torch.Tensor) -> None:
                if self.capture:
                    self.grads[idx] = grad

            output.register_hook(keep_grad)

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.grads.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def fisher(self, idx: int, layer: MaskLayer, batch_size: int) -> torch.Tensor | None:
        """F per unit of layer ``idx`` from the captured input/gradient; None if not captured."""
        if idx not in self.grads or idx not in self.inputs:
            return None
        a, g = self.inputs[idx].detach().float(), self.grads[idx].detach().float()
        module = layer.module
        rows = a.shape[0]
        if isinstance(module, nn.Linear):
            a = a.reshape(rows, -1, a.shape[-1])
            g = g.reshape(rows, -1, g.shape[-1])
            if layer.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            per_row = torch.einsum("rlo,rli->roi", g, a)  # (R, C_out, C_in[+1])
        else:  # Conv2d
            cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
            g = g.reshape(rows, g.shape[1], -1)  # (R, C_out, L)
            per_row = torch.bmm(g, cols.transpose(1, 2))  # (R, C_out, C_in*k*k)
            if layer.bias is not None:
                per_row = torch.cat([per_row, g.sum(dim=2, keepdim=True)], dim=2)
        if rows != batch_size and rows % batch_size == 0:  # frames folded into the batch: sum per clip
            per_row = per_row.reshape(batch_size, rows // batch_size, *per_row.shape[1:]).sum(dim=1)
        # g_i = B·(a_i ⊗ δ_i) because the loss is the batch mean: F = (1/B) Σ_i g_i^2 (C_out, P)
        fisher = per_row.square().mean(dim=0) * float(batch_size) ** 2
        if layer.element:
            n_w = layer.weight[0].numel()
            return fisher[:, :n_w].reshape(-1)
        return fisher.sum(dim=1)


def importance_weights(fisher: torch.Tensor) -> torch.Tensor:
    """Fisher -> sampling distribution P = F / ΣF (paper §III-B 2), floored so every π_j > 0."""
    n = fisher.numel()
    total = fisher.sum()
    w = fisher / total
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))  # ΣF = 0 or non-finite: uniform
    return w + IMPORTANCE_FLOOR / n


def units_to_keep(p: torch.Tensor, n_units: int) -> torch.Tensor:
    """n = ⌈p·N⌉ as a 0-d long tensor (no device sync); p·N within 1e-6 of an integer rounds to it."""
    dtype = torch.float64 if p.device.type != "mps" else torch.float32
    n = torch.ceil(p.to(dtype) * n_units - 1e-6)
    return n.clamp(0, n_units).long()


def sample_units(
    weights: torch.Tensor, n: torch.Tensor | int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` of the ``N`` units along the last dim of ``weights`` without replacement, P ∝ weights.

    Returns ``(selected, pi)`` of ``weights``' shape: a bool mask with exactly ``n`` True entries
    per row (the same set as ``torch.multinomial(weights, n, replacement=False,
    generator=generator)``, draw for draw), and for every selected unit its rank-conditioned
    inclusion probability π_j = 1 - exp(-w_j/κ), κ the row's (n+1)-th largest key (π = 1 when
    n = N). ``pi`` of unselected units is meaningless. Rows (a leading batch of independent
    draws) are for tests; the method draws one row.
    """
    total = weights.shape[-1]
    if not isinstance(n, torch.Tensor):
        n = torch.tensor(int(n), device=weights.device)
    q = torch.empty_like(weights).exponential_(1.0, generator=generator)
    keys = weights / q
    sorted_keys, order = torch.sort(keys, dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(total, device=weights.device).expand_as(order))
    selected = rank < n
    index = n.clamp(max=total - 1).reshape(*([1] * weights.dim())).expand(*weights.shape[:-1], 1)
    kappa = sorted_keys.gather(-1, index)
    kappa = torch.where(n >= total, torch.zeros_like(kappa), kappa)
    pi = -torch.expm1(-weights / kappa)  # κ = 0 (keep all): w/0 = inf -> π = 1
    return selected, pi


def exact_inclusion_probabilities(weights: list[float], n: int) -> list[float]:
    """Exact π_j of successive sampling (n draws without replacement, P ∝ w) by enumeration.

    For small N only (used by the tests to check ``sample_units`` and the method's selection).
    """
    total = len(weights)
    pi = [0.0] * total

    def walk(chosen: tuple[int, ...], prob: float, left: float) -> None:
        if len(chosen) == n:
            for j in chosen:
                pi[j] += prob
            return
        for j in range(total):
            if j not in chosen:
                walk(chosen + (j,), prob * weights[j] / left, left - weights[j])

    walk((), 1.0, math.fsum(weights))
    return pi
