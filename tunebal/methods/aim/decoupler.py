"""PAM's parameter decoupling mechanism (AIM §III-D1, Eq. 7, Eq. 8's reconstruction, Eq. 13).

For a block E^m_d with parameters θ the paper maps the *flattened* θ through one FC layer
Φ_lat to a 512-d latent θ_lat, learns a mask w = σ(Φ_mask(θ_lat)) and decodes

    θ^b = Ψ(θ_lat ⊙ w)          auxiliary block (the "under-optimised" parameters)
    θ^a = Ψ(θ_lat ⊙ (1 − w))    complement block (trained to perform well, Eq. 8)

Granularity (our interpretation). A literal FC over a ResNet stage's flattened parameters
(2.4 M weights for one layer4 conv) would hold billions of weights. We decouple **per output
filter**: every parameter tensor of the block with ``ndim >= 2`` (conv kernels, linear
weights, ResNet downsample convs) is viewed as a matrix of C_out rows ("filters"), each
row being the filter's C_in·k·k weights (plus its bias, appended, when the layer has one).
One *layer-shared* triple of FC layers maps every row of that layer:

    Φ_lat: R^n -> R^L,   Φ_mask: R^L -> R^L,   Ψ: R^L -> R^n     (n = C_in·k·k [+1])

so a layer's decoupler has 2nL + L² + 2L + n parameters, O(n·L), against the layer's own
C_out·n. The latent size is ``L = min(latent_dim, n, C_out)`` per layer: a latent wider
than a filter or than the number of filters (the rank of the layer's weight matrix) adds
parameters without adding anything the reconstruction can use.

Initialisation (ours; the paper gives none): Φ_lat and Ψ start as the rank-L PCA of the
layer's initial filters (Φ_lat = V_Lᵀ, Ψ = V_L, zero biases), so Ψ(Φ_lat(θ)) is the best
rank-L reconstruction of θ from the first step; Φ_mask starts at zero, so w = 0.5 and the
auxiliary and complement blocks start identical (θ^a = θ^b = ½·Ψ(θ_lat)); Eq. 8's L_a then
breaks the symmetry.

Parameters that are not decoupled: BatchNorm / LayerNorm affine parameters and every other
1-D parameter are **shared** — the auxiliary and complement blocks use the original block's
tensors. BatchNorm buffers are **not touched**: decoupled blocks run in the block's current
mode on *clones* of the running statistics, so in training they normalise with their own
batch statistics and never update the original block's running mean/var.

Decoupled blocks are run with ``torch.func.functional_call`` on the block module itself, so
``θ^b`` stays a differentiable function of θ and ∂L/∂θ = J_Fpdm(θ)ᵀ ∂L/∂θ^b (Eq. 13).

Factorised form (exact, ours). Ψ is shared by every filter of a layer, so a decoupled
filter is a combination of L + 1 basis filters: with z = θ_lat ⊙ keep (C_out, L),

    θ^b rows = z Ψ_Wᵀ + ψ_b = [z, 1] · [Ψ_Wᵀ; ψ_bᵀ] = mix · basis       (C_out, L+1)·(L+1, n)

and, convolution being linear in its filters, conv(x, θ^b) = mix ⋆₁ₓ₁ conv(x, basis): one
convolution with the L + 1 basis filters followed by a 1x1 channel mix. Outputs and every
gradient (to θ through Φ_lat, to the mask, Eq. 13's path) are those of the direct form up to
float rounding; the cost falls from C_out·n to (L + 1)(n + C_out) multiply-adds per output
pixel (4x less for a ResNet18 3x3 conv of 64 channels at L = 16). ``decouple(...,
factorised=True)`` uses it for every ``nn.Conv*`` (groups = 1) and ``nn.Linear`` layer
where it is cheaper, and the direct form elsewhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

BRANCHES = ("aux", "comp")


def decoupled_parameters(block: nn.Module) -> list[tuple[str, str | None]]:
    """``(weight_name, bias_name or None)`` of every tensor of ``block`` that PAM decouples.

    A module's ``weight`` with ``ndim >= 2`` is decoupled per output row; its ``bias`` (when
    it exists and has one entry per row) travels with it as an extra column.
    """
    out = []
    for mod_name, mod in block.named_modules():
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        bias = getattr(mod, "bias", None)
        has_bias = isinstance(bias, nn.Parameter) and bias.dim() == 1 and bias.shape[0] == weight.shape[0]
        out.append((prefix + "weight", prefix + "bias" if has_bias else None))
    return out


def _rows(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        rows = torch.cat([rows, bias.unsqueeze(1)], dim=1)
    return rows


class LayerDecoupler(nn.Module):
    """Φ_lat, Φ_mask and Ψ for one layer, shared by all of its output filters."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, latent_dim: int) -> None:
        super().__init__()
        self.weight_shape = tuple(weight.shape)
        self.has_bias = bias is not None
        rows = _rows(weight.detach().float(), None if bias is None else bias.detach().float())
        c_out, n = rows.shape
        latent = max(1, min(latent_dim, n, c_out))
        self.latent = latent
        self.lat = nn.Linear(n, latent)  # Φ_lat
        self.mask = nn.Linear(latent, latent)  # Φ_mask
        self.dec = nn.Linear(latent, n)  # Ψ
        with torch.no_grad():
            # rank-L PCA of the layer's filters (deterministic; rows of Vh are orthonormal)
            _, _, vh = torch.linalg.svd(rows.cpu(), full_matrices=False)
            basis = vh[:latent].to(rows.device)  # (L, n)
            self.lat.weight.copy_(basis)
            self.lat.bias.zero_()
            self.dec.weight.copy_(basis.t())
            self.dec.bias.zero_()
            self.mask.weight.zero_()
            self.mask.bias.zero_()

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (C_out, n) -> (θ_lat (C_out, L), w (C_out, L))."""
        lat = self.lat(rows)
        return lat, torch.sigmoid(self.mask(lat))

    def unrows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.has_bias:
            return rows[:, :-1].reshape(self.weight_shape), rows[:, -1]
        return rows.reshape(self.weight_shape), None

    def factors(self, z: torch.Tensor) -> Factored:
        """The factorised layer for latent codes ``z`` = θ_lat ⊙ keep (C_out, L): mix (C_out, L+1)
        and basis = [Ψ_Wᵀ; ψ_bᵀ] (L+1, n), split into basis filters and basis biases."""
        mix = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
        basis = torch.cat([self.dec.weight.t(), self.dec.bias.unsqueeze(0)], dim=0)  # (L+1, n)
        if self.has_bias:
            basis_w, basis_b = basis[:, :-1], basis[:, -1]
        else:
            basis_w, basis_b = basis, None
        return Factored(mix, basis_w.reshape(basis.shape[0], *self.weight_shape[1:]), basis_b)


@dataclass
class Factored:
    """A decoupled layer as ``mix ⋆ layer(x; basis)`` (see the module docstring)."""

    mix: torch.Tensor  # (C_out, L+1)
    basis_w: torch.Tensor  # (L+1, *weight_shape[1:])
    basis_b: torch.Tensor | None  # (L+1,) or None


def _factorisable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1 and module.padding_mode == "zeros"


def _cheaper_factorised(weight_shape: tuple[int, ...], latent: int) -> bool:
    """(L+1)(n + C_out) < C_out·n multiply-adds per output position."""
    c_out = weight_shape[0]
    n = math.prod(weight_shape[1:])
    return (latent + 1) * (n + c_out) < c_out * n


def _factored_forward(module: nn.Module, f: Factored, x: torch.Tensor) -> torch.Tensor:
    """``module``'s output with its weight (and bias) given by ``f``: basis layer, then 1x1 mix."""
    mix = f.mix.to(f.basis_w.dtype)
    if isinstance(module, nn.Linear):
        return F.linear(F.linear(x, f.basis_w, f.basis_b), mix)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[f.basis_w.dim() - 2]
    u = conv(x, f.basis_w, f.basis_b, module.stride, module.padding, module.dilation, 1)
    return conv(u, mix.reshape(*mix.shape, *([1] * (f.basis_w.dim() - 2))))


@dataclass
class Decoupled:
    """The decoupled parameters of one block and what PAM logs or trains from them."""

    params: dict[str, dict[str, torch.Tensor]]  # branch -> {parameter name: tensor}
    rec: torch.Tensor  # Σ_layers ||θ − Ψ(θ_lat)||²_F (Eq. 8)
    mask_mean: torch.Tensor  # mean of w over the block's layers (weighted by element count)
    factors: dict[str, dict[str, Factored]] = field(default_factory=dict)  # branch -> {module name: factors}

    def branch(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Factored]]:
        """(replaced parameters, factorised modules) of one branch, for ``run_block``."""
        return self.params[name], self.factors.get(name, {})


class BlockDecoupler(nn.Module):
    """The decoupling mechanism F_pdm of one block E^m_d: one ``LayerDecoupler`` per layer."""

    def __init__(self, block: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.names = decoupled_parameters(block)
        if not self.names:
            raise ValueError("block has no parameter with ndim >= 2 to decouple")
        params = dict(block.named_parameters())
        self.layers = nn.ModuleList(
            LayerDecoupler(params[w], params[b] if b else None, latent_dim) for w, b in self.names
        )

    def decouple(
        self,
        block: nn.Module,
        branches: tuple[str, ...],
        detach_theta: bool,
        reconstruct: bool = True,
        factorised: bool = False,
    ) -> Decoupled:
        """θ^b ('aux') and/or θ^a ('comp') of ``block`` (Eq. 7), plus L_rec and the mask mean.

        ``detach_theta``: treat θ as a constant (L_pam trains the decoupler only); otherwise
        gradients of anything computed from θ^b/θ^a reach θ through this function (Eq. 13).
        ``reconstruct=False`` skips Eq. 8's ||θ − Ψ(θ_lat)||² (``rec`` is then 0): the
        auxiliary branch of the modulation phase does not use it. ``factorised=True`` returns the
        layers where that is cheaper as ``Factored`` (exact; see the module docstring) instead
        of materialising their weights.
        """
        params = dict(block.named_parameters())
        modules = dict(block.named_modules())
        out: dict[str, dict[str, torch.Tensor]] = {b: {} for b in branches}
        facs: dict[str, dict[str, Factored]] = {b: {} for b in branches}
        rec = torch.zeros((), device=next(self.parameters()).device)
        mask_sum = torch.zeros((), device=rec.device)
        count = 0
        for (wname, bname), layer in zip(self.names, self.layers):
            weight = params[wname]
            bias = params[bname] if bname else None
            rows = _rows(weight, bias)
            if detach_theta:
                rows = rows.detach()
            lat, w = layer.split(rows)
            if reconstruct:
                rec = rec + (rows.float() - layer.dec(lat).float()).pow(2).sum()
            mask_sum = mask_sum + w.detach().float().sum()
            count += w.numel()
            mod_name = wname.rsplit(".", 1)[0] if "." in wname else ""
            use_factors = (
                factorised and _factorisable(modules[mod_name]) and _cheaper_factorised(layer.weight_shape, layer.latent)
            )
            for branch in branches:
                keep = w if branch == "aux" else 1.0 - w
                if use_factors:
                    facs[branch][mod_name] = layer.factors(lat * keep)
                    continue
                new_w, new_b = layer.unrows(layer.dec(lat * keep))
                out[branch][wname] = new_w.to(weight.dtype)
                if bname:
                    out[branch][bname] = new_b.to(weight.dtype)
        return Decoupled(out, rec, mask_sum / max(count, 1), facs)


@contextlib.contextmanager
def _factored_modules(block: nn.Module, factors: dict[str, Factored]) -> Iterator[None]:
    """Route the named submodules' forward through ``_factored_forward`` (restored on exit)."""
    modules = dict(block.named_modules())
    patched = []
    try:
        for name, f in factors.items():
            mod = modules[name]
            mod.forward = lambda x, mod=mod, f=f: _factored_forward(mod, f, x)  # instance attribute
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


def run_block(
    block: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, factors: dict[str, Factored] | None = None
) -> torch.Tensor:
    """Run ``block`` with some parameters replaced, on clones of its buffers.

    Replaced parameters keep their autograd history; the parameters not given are the
    block's own (shared). ``factors`` names submodules computed in factorised form. Buffers
    are cloned, so BatchNorm in training mode normalises with the batch's statistics without
    updating the block's running statistics.
    """
    buffers = {name: buf.clone() for name, buf in block.named_buffers()}
    if not factors:
        return functional_call(block, {**params, **buffers}, (x,))
    with _factored_modules(block, factors):
        return functional_call(block, {**params, **buffers}, (x,))


class Decoupler(nn.Module):
    """All of AIM's decoupling mechanisms: ``blocks[modality][d]`` for d = 0..D-1."""

    def __init__(self, encoders: dict[str, nn.Module], latent_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(
            {m: nn.ModuleList(BlockDecoupler(block, latent_dim) for block in enc.blocks) for m, enc in encoders.items()}
        )

    def num_parameters(self, modality: str | None = None) -> int:
        mods = [modality] if modality else list(self.blocks)
        return sum(p.numel() for m in mods for p in self.blocks[m].parameters())


def num_decoupler_parameters(block: nn.Module, latent_dim: int) -> int:
    """Parameter count of a ``BlockDecoupler`` for ``block`` without building it."""
    params = dict(block.named_parameters())
    total = 0
    for wname, bname in decoupled_parameters(block):
        weight = params[wname]
        n = weight[0].numel() + (1 if bname else 0)
        latent = max(1, min(latent_dim, n, weight.shape[0]))
        total += (n * latent + latent) + (latent * latent + latent) + (latent * n + n)
    return total


__all__ = [
    "BRANCHES",
    "BlockDecoupler",
    "Decoupled",
    "Decoupler",
    "Factored",
    "LayerDecoupler",
    "decoupled_parameters",
    "num_decoupler_parameters",
    "run_block",
]
