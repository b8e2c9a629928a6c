"""PAM's parameter decoupling mechanism (seed 000 §III-D1, Eq. 7, Eq. 8's reconstruction, Eq. 13).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


@dataclass
class Decoupled:
    """The decoupled parameters of one block and what PAM logs or trains from them."""

    params: dict[str, dict[str, torch.Tensor]]  # branch -> {parameter name: tensor}
    rec: torch.Tensor  # Σ_layers ||θ − Ψ(θ_lat)||²_F (Eq. 8)
    mask_mean: torch.Tensor  # mean of w over the block's layers (weighted by element count)


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

    def decouple(self, block: nn.Module, branches: tuple[str, ...], detach_theta: bool, reconstruct: bool = True) -> Decoupled:
        """θ^b ('aux') and/or θ^a ('comp') of ``block`` (Eq. 7), plus L_rec and the mask mean.

        ``detach_theta``: treat θ as a constant (L_pam trains the decoupler only); otherwise
        gradients of anything computed from θ^b/θ^a reach θ through this function (Eq. 13).
        ``reconstruct=False`` skips Eq. 8's ||θ − Ψ(θ_lat)||² (``rec`` is then 0): the
        auxiliary branch of the modulation phase does not use it.
        """
        params = dict(block.named_parameters())
        out: dict[str, dict[str, torch.Tensor]] = {b: {} for b in branches}
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
            for branch in branches:
                keep = w if branch == "aux" else 1.0 - w
                new_w, new_b = layer.unrows(layer.dec(lat * keep))
                out[branch][wname] = new_w.to(weight.dtype)
                if bname:
                    out[branch][bname] = new_b.to(weight.dtype)
        return Decoupled(out, rec, mask_sum / max(count, 1))


def run_block(block: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run ``block`` with some parameters replaced, on clones of its buffers.

    Replaced parameters keep their autograd history; the parameters not given are the
    block's own (shared). Buffers are cloned, so BatchNorm in training mode normalises with
    the batch's statistics without updating the block's running statistics.
    """
    buffers = {name: buf.clone() for name, buf in block.named_buffers()}
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
    "LayerDecoupler",
    "decoupled_parameters",
    "num_decoupler_parameters",
    "run_block",
]
