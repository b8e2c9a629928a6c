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

    **Attention heads** (AMSS §III-B: "a head-wise mask unit for Transformer"). With
    ``unit="channel"`` an ``nn.MultiheadAttention`` with packed projections is one mask layer
    whose units are its H heads: head h owns the rows ``s·D + h·d_h .. s·D + (h+1)·d_h`` of
    ``in_proj_weight`` and ``in_proj_bias`` for s = 0, 1, 2 (its q, k and v slices, the layout
    ``F.multi_head_attention_forward`` splits into heads) and the input columns
    ``h·d_h .. (h+1)·d_h`` of ``out_proj.weight`` (the columns that read head h's output);
    ``out_proj.bias`` belongs to no head and is never masked. Its importance is the sum of F
    over all of those elements. ``out_proj`` is therefore not a row-unit layer of its own. The
    LayerNorms of a Transformer layer normalise the residual stream, not the output channels of
    the linear layer registered before them, so they are never tied. With ``unit="element"``
    ``in_proj_weight`` is an element layer (``out_proj`` one too, as an ``nn.Linear``). An
    attention without packed projections (kdim/vdim != embed_dim) is not masked.

    **Classifier blocks** (``classifier_block``; AMSS §IV-C3 masks the classifier too): a
    *column* layer is a block of input columns ``[a, b)`` of a head ``nn.Linear`` -- the weights
    that read one modality's feature. Its units are the columns (feature channels of that
    modality; ``unit="channel"``) or the block's elements (``unit="element"``); the bias is
    shared by all modalities and never masked.

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
    a clip). For a sequence input (B, L, D) through a linear layer, sample i's contribution is
    summed over its L positions, g_i = B·Σ_l δ_il ⊗ a_il (tested against per-sample gradients
    of a Transformer encoder). A module called several times in one step (the classifier, once
    fused and once per zero-out prediction) adds the contributions of every call whose output
    receives a gradient. Without BatchNorm coupling g_i is exactly ∂ℓ_i/∂w; with train-mode
    BatchNorm it is sample i's share of the batch gradient. Other layer types -- among them
    attention heads, whose packed projections run inside ``F.multi_head_attention_forward``
    and expose no per-sample gradient -- fall back to ``"batch"``.
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
    """One masked weight and the per-unit parameters tied to it.

    Kinds: output rows (``channel``), weight elements (``element``), attention heads
    (``heads`` > 0: weight = ``in_proj_weight``, bias = ``in_proj_bias``, ``out_weight`` =
    ``out_proj.weight``) and input-column blocks of a head linear layer (``columns``).
    """

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    tied: list[nn.Parameter] = field(default_factory=list)  # norm γ/β of the same channels
    element: bool = False
    heads: int = 0
    out_weight: nn.Parameter | None = None
    columns: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        if self.heads:
            return "head"
        if self.columns is not None:
            return "column_element" if self.element else "column"
        return "element" if self.element else "channel"

    @property
    def head_dim(self) -> int:
        return self.weight.shape[0] // (3 * self.heads)

    @property
    def units(self) -> int:
        """C_l: mask units of this layer."""
        if self.heads:
            return self.heads
        if self.columns is not None:
            width = self.columns[1] - self.columns[0]
            return width * self.weight.shape[0] if self.element else width
        return self.weight.numel() if self.element else self.weight.shape[0]

    def unit_view(self, values: torch.Tensor) -> torch.Tensor:
        """Per-unit values broadcastable against the weight (row and element layers)."""
        if self.element:
            return values.view(self.weight.shape)
        return values.view(-1, *([1] * (self.weight.dim() - 1)))

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter some of whose entries belong to a unit of this layer."""
        if self.heads:
            return [p for p in (self.weight, self.bias, self.out_weight) if p is not None]
        out = [self.weight]
        if not self.element and self.columns is None:
            out += ([self.bias] if self.bias is not None else []) + self.tied
        return out

    def fisher_parameters(self) -> list[nn.Parameter]:
        """The parameters whose squared gradients make a unit's importance (norms excluded)."""
        if self.heads:
            return self.parameters()
        if self.element or self.columns is not None or self.bias is None:
            return [self.weight]
        return [self.weight, self.bias]

    def _head_views(self, tensors: list[torch.Tensor | None]) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """(view, dims to reduce) of in_proj weight/bias and out_proj weight with heads on dim 1."""
        h, d = self.heads, self.head_dim
        out = []
        for t, kind in zip(tensors, ("w", "b", "o")):
            if t is None:
                continue
            if kind == "w":  # (3D, D) -> (3, H, d_h, D): q/k/v, head, row in head, input
                out.append((t.view(3, h, d, -1), (0, 2, 3)))
            elif kind == "b":  # (3D,) -> (3, H, d_h)
                out.append((t.view(3, h, d), (0, 2)))
            else:  # out_proj.weight (E, D) -> (E, H, d_h): input columns of head h
                out.append((t.view(t.shape[0], h, d), (0, 2)))
        return out

    def unit_square_sums(self, grads: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Σ over each unit's elements of the squared ``grads`` (given in ``fisher_parameters`` order)."""
        if not grads or grads[0] is None:
            return None
        sq = [None if g is None else g.detach().float().square() for g in grads]
        if self.heads:
            views = self._head_views([sq[0], sq[1] if self.bias is not None else None, sq[-1] if self.out_weight is not None else None])
            return sum(v.sum(dim=dims) for v, dims in views)
        if self.columns is not None:
            block = sq[0][:, self.columns[0] : self.columns[1]]
            return block.reshape(-1) if self.element else block.sum(dim=0)
        if self.element:
            return sq[0].reshape(-1)
        fisher = sq[0].reshape(sq[0].shape[0], -1).sum(dim=1)
        if len(sq) > 1 and sq[1] is not None:
            fisher = fisher + sq[1]
        return fisher

    def scale_gradients(self, scale: torch.Tensor) -> None:
        """Multiply every unit's gradient entries by its ``scale`` (0: masked)."""
        if self.heads:
            grads = [self.weight.grad, None if self.bias is None else self.bias.grad,
                     None if self.out_weight is None else self.out_weight.grad]
            for view, dims in self._head_views(grads):
                shape = [1] * view.dim()
                shape[1] = self.heads
                view.mul_(scale.view(shape).to(view.dtype))
            return
        grad = self.weight.grad
        if grad is None:
            return
        if self.columns is not None:
            a, b = self.columns
            block = grad[:, a:b]
            block.mul_((scale.view(grad.shape[0], b - a) if self.element else scale.view(1, -1)).to(grad.dtype))
            return
        grad.mul_(self.unit_view(scale).to(grad.dtype))
        if not self.element:
            for param in ([self.bias] if self.bias is not None else []) + self.tied:
                if param.grad is not None:
                    param.grad.mul_(scale.to(param.grad.dtype))


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
    skip: set[int] = set()  # out_proj of a head-unit attention: its columns belong to the heads
    residual_norms = {  # a Transformer layer's norms act on the residual stream: never tied
        id(n) for t in encoder.modules() if isinstance(t, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
        for n in t.modules() if isinstance(n, _NORMS)
    }
    for name, module in encoder.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            last = None
            packed = module._qkv_same_embed_dim and module.in_proj_weight is not None
            if packed and unit == "channel":
                layers.append(MaskLayer(f"{prefix}{name}", module, module.in_proj_weight, module.in_proj_bias,
                                        heads=module.num_heads, out_weight=module.out_proj.weight))
                skip.add(id(module.out_proj))
            elif packed:
                layers.append(MaskLayer(f"{prefix}{name}", module, module.in_proj_weight, None, element=True))
            continue
        if id(module) in skip:
            last = None
            continue
        own = [p for p in module.parameters(recurse=False)]
        if not own:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, _NORMS):
            if last is not None and unit == "channel" and mask_norm and id(module) not in residual_norms:
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


def classifier_block(name: str, linear: nn.Linear, start: int, stop: int, unit: str = "channel") -> MaskLayer:
    """The input columns ``[start, stop)`` of a head linear layer (one modality's classifier part) as a mask layer."""
    if unit not in ("channel", "element"):
        raise ValueError(f"unknown mask unit {unit!r}")
    return MaskLayer(name, linear, linear.weight, None, element=(unit == "element"), columns=(start, stop))


def layer_fisher_from_grad(layer: MaskLayer, grads: dict[nn.Parameter, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Unit importance from the squared mini-batch gradient (the ``"batch"`` estimator).

    ``grads`` maps parameters to gradients (from ``torch.autograd.grad``); by default ``.grad``.
    Returns None when the weight has no gradient.
    """
    get = (lambda p: p.grad) if grads is None else (lambda p: grads.get(p))
    return layer.unit_square_sums([get(p) for p in layer.fisher_parameters()])


class PerSampleFisher:
    """Diagonal empirical Fisher per unit from per-sample gradient contributions (hooks).

    A forward hook on each supported layer puts a tensor hook on its output; while ``capture``
    is on, that hook appends the call's input (already saved by autograd, so no copy) and the
    gradient reaching the output to ``inputs[idx]`` / ``grads[idx]`` (one pair per call whose
    output receives a gradient).
    """

    def __init__(self, layers: list[MaskLayer]) -> None:
        self.capture = False
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.grads: dict[int, list[torch.Tensor]] = {}
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
            a = inputs[0]

            def keep_grad(grad: torch.Tensor) -> None:
                if self.capture:
                    self.inputs.setdefault(idx, []).append(a)
                    self.grads.setdefault(idx, []).append(grad)

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
        per_row = sum(self._per_row(layer.module, a.detach().float(), g.detach().float(), layer.bias is not None)
                      for a, g in zip(self.inputs[idx], self.grads[idx]))
        rows = per_row.shape[0]
        if rows != batch_size and rows % batch_size == 0:  # frames folded into the batch: sum per clip
            per_row = per_row.reshape(batch_size, rows // batch_size, *per_row.shape[1:]).sum(dim=1)
        # g_i = B·(a_i ⊗ δ_i) because the loss is the batch mean: F = (1/B) Σ_i g_i^2 (C_out, P)
        fisher = per_row.square().mean(dim=0) * float(batch_size) ** 2
        if layer.columns is not None:  # a classifier block: its input columns
            block = fisher[:, layer.columns[0] : layer.columns[1]]
            return block.reshape(-1) if layer.element else block.sum(dim=0)
        if layer.element:
            n_w = layer.weight[0].numel()
            return fisher[:, :n_w].reshape(-1)
        return fisher.sum(dim=1)

    @staticmethod
    def _per_row(module: nn.Module, a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
        """(R, C_out, P): each row's share Σ_positions δ ⊗ a of the weight (+ bias column) gradient."""
        rows = a.shape[0]
        if isinstance(module, nn.Linear):  # (R, ..., C): a sequence's positions are summed per row
            a = a.reshape(rows, -1, a.shape[-1])
            g = g.reshape(rows, -1, g.shape[-1])
            if bias:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            return torch.einsum("rlo,rli->roi", g, a)  # (R, C_out, C_in[+1])
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        g = g.reshape(rows, g.shape[1], -1)  # (R, C_out, L)
        per_row = torch.bmm(g, cols.transpose(1, 2))  # (R, C_out, C_in*k*k)
        if bias:
            per_row = torch.cat([per_row, g.sum(dim=2, keepdim=True)], dim=2)
        return per_row


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
