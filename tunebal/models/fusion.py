"""Fusion modules: concat, sum, FiLM and gated (the four studied in OPM/OGM (TPAMI 2024) §4.3 / AIM).

Each takes the list of unimodal features [z^1..z^M] (same order as the model's modalities)
and returns one fused vector of ``out_dim``; a linear classifier follows. Zeroing z^j
(the zero-out estimate, METHODS.md "Common notation") is well defined for all of them.
For FiLM and gated fusion the *last* modality conditions the others (for audio-visual
with modalities ("audio", "visual") the visual features modulate the audio ones, as in
the released OGM-GE code with x_film/x_gate = audio).
"""

from __future__ import annotations

import torch
from torch import nn

FUSIONS = ("concat", "sum", "film", "gated")


class ConcatFusion(nn.Module):
    def __init__(self, dims: list[int], hidden: int) -> None:
        super().__init__()
        self.out_dim = sum(dims)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(feats, dim=1)


class SumFusion(nn.Module):
    """Σ_m W_m z^m + b: each modality is projected to ``hidden`` and the projections are summed."""

    def __init__(self, dims: list[int], hidden: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, hidden, bias=(i == 0)) for i, d in enumerate(dims))
        self.out_dim = hidden

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return sum(p(z) for p, z in zip(self.proj, feats))


class FiLMFusion(nn.Module):
    """γ(z^M) ⊙ [z^1..z^{M-1}] + β(z^M)  (feature-wise linear modulation by the last modality)."""

    def __init__(self, dims: list[int], hidden: int) -> None:
        super().__init__()
        self.out_dim = sum(dims[:-1])
        self.film = nn.Linear(dims[-1], 2 * self.out_dim)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(feats[-1]).chunk(2, dim=1)
        return gamma * torch.cat(feats[:-1], dim=1) + beta


class GatedFusion(nn.Module):
    """σ(W_M z^M) ⊙ Σ_{m<M} W_m z^m: the last modality gates the projected others."""

    def __init__(self, dims: list[int], hidden: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, hidden) for d in dims)
        self.out_dim = hidden

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.proj[-1](feats[-1]))
        return gate * sum(p(z) for p, z in zip(self.proj[:-1], feats[:-1]))


def build_fusion(name: str, dims: list[int], hidden: int = 256) -> nn.Module:
    classes = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}
    if name not in classes:
        raise ValueError(f"unknown fusion {name!r}; valid: {', '.join(FUSIONS)}")
    if name in ("film", "gated") and len(dims) < 2:
        raise ValueError(f"{name} fusion needs at least 2 modalities")
    return classes[name](dims, hidden)
