"""Shared pieces of the on-the-fly modulation methods (OGM-GE, OPM, OPM+OGM) and ARL.

Everything here works on tensors and never synchronises with the device, so a method built
from these helpers adds no host round-trip to a training step.

* :func:`zero_out_true_class_scores` -- s^m_i, the softmax probability of the true class under
  modality m's zero-out logits (the one unimodal estimate of tunebal, METHODS.md "Common
  notation"; OPM/OGM (TPAMI 2024), Eq. 6 with the full bias instead of b/M);
* :func:`discrepancy_ratios` -- ρ^m of OPM/OGM (TPAMI 2024), Eq. 7 as a tensor (same definition as
  :func:`tunebal.metrics.discrepancy_ratios`, which works on Python floats);
* :func:`batch_rho` -- ρ of the current mini-batch, computed once per step and shared by every
  hook (and by both halves of OPM+OGM);
* :func:`ogm_coefficients` (OPM/OGM (TPAMI 2024), Eq. 11, plus the CVPR-release form) and
  :func:`opm_probabilities` (OPM/OGM (TPAMI 2024), Eq. 8);
* :class:`MultimodalOnly`, the compatibility rule shared by these methods (M >= 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tunebal.errors import ConfigError
from tunebal.methods.base import EpochMeans, Method, StepContext

if TYPE_CHECKING:  # pragma: no cover
    from tunebal.models import MultimodalModel

#: floor for batch sums and entropies before dividing by them (softmax scores are > 0 unless
#: they underflow; an all-underflow batch must not produce inf/nan coefficients)
EPS = 1e-12

_RHO_KEY = "tunebal.modulation.rho"
_SCORES_KEY = "tunebal.modulation.scores"


class MultimodalOnly(Method):
    """Mixin for methods that balance modalities against each other: they need M >= 2."""

    @classmethod
    def check_compatible(cls, num_modalities: int, fusion: str) -> None:
        super().check_compatible(num_modalities, fusion)
        if num_modalities < 2:
            raise ConfigError(
                f"method '{cls.name}' balances modalities against each other and needs at least 2; "
                f"the dataset has {num_modalities}"
            )


def true_class_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[y] per sample, in float32 (OPM/OGM (TPAMI 2024), Eq. 6)."""
    return torch.softmax(logits.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)


def zero_out_true_class_scores(ctx: StepContext) -> torch.Tensor:
    """(M, B) detached true-class scores of every modality's zero-out logits, in model order.

    Uses the step's shared autograd logits when a hook already asked for them
    (``ctx.unimodal_logits()``); otherwise runs the zero-out heads under ``no_grad`` (cheaper:
    no graph is kept) without caching them as the autograd version.
    """
    cached = ctx.scratch.get(_SCORES_KEY)
    if cached is not None:
        return cached
    assert ctx.encoded is not None
    if ctx._unimodal is not None:
        logits = {m: lg.detach() for m, lg in ctx._unimodal.items()}
    else:
        with torch.no_grad():
            logits = ctx.model.unimodal_logits(ctx.encoded.features)
    scores = torch.stack([true_class_scores(logits[m], ctx.labels) for m in ctx.model.modalities])
    ctx.scratch[_SCORES_KEY] = scores
    return scores


def discrepancy_ratios(scores: torch.Tensor) -> torch.Tensor:
    """ρ^m = 1/(M−1) Σ_{j≠m} Σ_i s^m_i / Σ_i s^j_i  (OPM/OGM (TPAMI 2024), Eq. 7) for (M, B) scores -> (M,).

    ρ^m > 1 means modality m dominates the batch. With M = 1 every ρ is 1. The modality with
    the smallest batch score sum always has ρ <= 1 (each of its ratios is <= 1); OPM relies
    on that (no sample ever loses every modality).
    """
    sums = scores.float().sum(dim=1).clamp_min(EPS)
    m = sums.shape[0]
    if m < 2:
        return torch.ones_like(sums)
    ratios = sums[:, None] / sums[None, :]
    off_diag = ~torch.eye(m, dtype=torch.bool, device=sums.device)
    return (ratios * off_diag).sum(dim=1) / (m - 1)


def batch_rho(ctx: StepContext, means: EpochMeans | None = None) -> torch.Tensor:
    """ρ of the current mini-batch (detached, (M,) in model order), computed once per step.

    When ``means`` is given, ``rho_<m>`` is logged the first time ρ is computed in this step,
    so a composite method (OPM+OGM) logs it once.
    """
    rho = ctx.scratch.get(_RHO_KEY)
    if rho is None:
        rho = discrepancy_ratios(zero_out_true_class_scores(ctx))
        ctx.scratch[_RHO_KEY] = rho
        if means is not None:
            for i, m in enumerate(ctx.model.modalities):
                means.add(f"rho_{m}", rho[i])
    return rho


def ogm_coefficients(rho: torch.Tensor, alpha: float, form: str = "tpami") -> torch.Tensor:
    """OGM's gradient coefficients k^m from ρ (tensor in, tensor out).

    * ``"tpami"`` (OPM/OGM (TPAMI 2024), Eq. 11 with z(x) = tanh(x − 1)): k = 1 − α·tanh(ρ − 1) if ρ > 1
      else 1, clipped at 0 (the paper: "the minimum value of k is set to 0").
    * ``"cvpr"`` (the OGM-GE CVPR 2022 release): k = 1 − tanh(α·ρ) for the dominant modality
      (ρ > 1) else 1. It is discontinuous at ρ = 1 (k jumps from 1 to 1 − tanh(α)) and always
      in (0, 1), so the clip is a no-op.
    """
    rho = rho.float()
    if form == "tpami":
        k = (1.0 - alpha * torch.tanh(rho - 1.0)).clamp_min(0.0)
    elif form == "cvpr":
        k = 1.0 - torch.tanh(alpha * rho)
    else:
        raise ConfigError(f"ogm: unknown form '{form}'; valid: tpami, cvpr")
    return torch.where(rho > 1.0, k, torch.ones_like(k))


def opm_probabilities(rho: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """OPM's drop probabilities (OPM/OGM (TPAMI 2024), Eq. 8 with z(x) = tanh(x − 1)), clipped to [0, 1].

    q = q_base·(1 + λ·tanh(ρ − 1)) if ρ > 1 else 0.
    """
    rho = rho.float()
    q = (q_base * (1.0 + lam * torch.tanh(rho - 1.0))).clamp(0.0, 1.0)
    return torch.where(rho > 1.0, q, torch.zeros_like(q))


def encoder_grad_params(model: "MultimodalModel", modality: str, conv_only: bool = False) -> list[torch.nn.Parameter]:
    """Trainable parameters of modality ``modality``'s encoder (optionally only 4-D conv kernels).

    Fusion and classifier parameters are never included: the methods here modulate the
    encoders only (OPM/OGM (TPAMI 2024) §3.2.2; ARL (ICCV 2025), Eqs. 19-20).
    """
    return [p for p in model.encoders[modality].parameters() if p.requires_grad and (not conv_only or p.dim() == 4)]


def scale_grads(params: list[torch.nn.Parameter], factor: torch.Tensor) -> None:
    """Multiply every existing ``.grad`` of ``params`` by the 0-d tensor ``factor`` in place."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))
