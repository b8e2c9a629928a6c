"""AIM's formulas as small pure functions (AIM, Eqs. 4, 8-12, 14, 15).

Notation: B samples, K classes, M modalities, D depths. A block output or prototype is
flattened per sample (``x.reshape(B, -1)``; frame clips (B·T, C, H, W) become one vector of
all T frames per sample), so δ is the Euclidean distance between whole depth-d outputs.

Distance scale (our interpretation). The paper's logits are −δ. Raw Euclidean distances
between high-dimensional feature maps differ by many units between prototypes, so the
softmax over −δ is close to one-hot: s^m_d then behaves like nearest-prototype accuracy
(still well defined; the CE gradient w.r.t. the features stays bounded by 2 since ∂δ/∂x is
a unit vector). ``distance="euclidean", temperature=1`` is the paper's form and the default;
``distance="rms"`` divides δ by sqrt(dim) (the root-mean-square difference per element,
comparable across depths) and ``temperature`` divides the logits further.

``distance="standardised"`` (ours) measures δ in units of its own spread: logits
−δ_ik / σ, σ = the batch mean over samples of the standard deviation of δ_i· over the K
prototypes, detached. It is scale-free (features and prototypes scaled together give the
same logits), so every depth's softmax has gaps of order one whatever the size of its feature
map, and the gradient w.r.t. the features is the raw one divided by σ. The raw form's
gradient does not shrink with the feature map: at E on synth, L_mod's gradient on the audio
encoder's convolutions was 4-15x CE's (relative to the weights' norms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DISTANCES = ("euclidean", "rms", "standardised")


def flat(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n·T, ...) or (n, ...) -> (n, -1): one vector per sample (frames of a clip concatenated)."""
    return x.reshape(n, -1)


class _EuclideanDistance(torch.autograd.Function):
    """δ(x_i, p_k) = ||x_i − p_k||₂ for (B, N) x (K, N) -> (B, K), with a hand-written backward.

    Forward is ``torch.cdist``'s matrix-product form, sqrt(||x||² + ||p||² − 2 x·p). Backward
    uses ∂δ_ik/∂x_i = (x_i − p_k)/δ_ik, so with W = G/δ:

        ∂L/∂X = X ⊙ rowsum(W) − W P,      ∂L/∂P = P ⊙ colsum(W) − Wᵀ X

    two matrix products and one scaled copy, where autograd through cdist makes about three
    times as many passes over the (B, N) features (δ at depth 1 dominates AIM's distance
    cost: N is a whole feature map). The gradient is 0 where δ = 0 (cdist's convention).
    Runs in float32 with autocast off.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with torch.autocast(device_type=x.device.type, enabled=False):
            d2 = torch.addmm((x * x).sum(1, keepdim=True) + (p * p).sum(1), x, p.t(), alpha=-2.0)
            d = d2.clamp_min_(0.0).sqrt_()
        ctx.save_for_backward(x, p, d)
        return d

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x, p, d = ctx.saved_tensors
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = torch.where(d > 0, grad / d.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))
            gx = torch.addmm(x * w.sum(1, keepdim=True), w, p, alpha=-1.0) if ctx.needs_input_grad[0] else None
            gp = torch.addmm(p * w.sum(0).unsqueeze(1), w.t(), x, alpha=-1.0) if ctx.needs_input_grad[1] else None
        return gx, gp


def euclidean_distance(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """δ between every row of ``x`` (B, N) and of ``p`` (K, N), in float32: (B, K)."""
    return _EuclideanDistance.apply(x.float(), p.float())


def distance_logits(
    feats: torch.Tensor, protos: torch.Tensor, distance: str = "euclidean", temperature: float = 1.0
) -> torch.Tensor:
    """Logits −δ(x_i, p_k)/τ, (B, N) x (K, N) -> (B, K), in float32 (Eqs. 8-10)."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    d = euclidean_distance(feats, protos)
    if distance == "rms":
        d = d / math.sqrt(feats.shape[1])
    elif distance == "standardised":
        spread = d.detach().std(dim=1, unbiased=False).mean() if d.shape[1] > 1 else d.new_ones(())
        d = d / spread.clamp_min(1e-12)
    return -d / temperature


def performance_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, L): the batch mean of softmax(logits)[y] (Eq. 9) and the CE over them (Eq. 10).

    s keeps its autograd history; callers detach it where it is only a weight.
    """
    log_p = F.log_softmax(logits, dim=1)
    picked = log_p.gather(1, labels.view(-1, 1)).squeeze(1)
    return picked.exp().mean(), -picked.mean()


def interaction_weights(s: torch.Tensor, s_aux: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ρ_d and ρ̂_d over M modalities (Eq. 12), from detached performances ``s``/``s_aux`` (M,).

    ρ^m = exp(−s^m) / Σ_m' (exp(−s^m') + exp(−ŝ^m')), ρ̂^m the same with ŝ^m on top. Without
    PAM (``s_aux`` None) the denominator has the original blocks only.
    """
    e = torch.exp(-s)
    if s_aux is None:
        return e / e.sum(), None
    e_aux = torch.exp(-s_aux)
    denom = e.sum() + e_aux.sum()
    return e / denom, e_aux / denom


def imbalance(s: torch.Tensor) -> torch.Tensor:
    """α_d = std_m(s^m_d) / mean_m(s^m_d) (Eq. 14): the coefficient of variation over modalities.

    Eq. 14 averages the squared deviations over the M modalities (population std, 1/M).
    """
    mean = s.mean()
    std = ((s - mean) ** 2).mean().sqrt()
    return std / mean.clamp_min(1e-12)


def depth_loss(
    losses: torch.Tensor, rho: torch.Tensor, losses_aux: torch.Tensor | None = None, rho_aux: torch.Tensor | None = None
) -> torch.Tensor:
    """L_d = Σ_m (ρ^m_d L^m_d + ρ̂^m_d L̂^m_d) (Eq. 11); all tensors (M,)."""
    out = (rho * losses).sum()
    if losses_aux is not None:
        assert rho_aux is not None
        out = out + (rho_aux * losses_aux).sum()
    return out


def modulation_loss(alphas: torch.Tensor, depth_losses: torch.Tensor) -> torch.Tensor:
    """L_mod = Σ_d α_d L_d (Eq. 15); both (D,)."""
    return (alphas * depth_losses).sum()


def reconstruction_loss(decoded: dict[str, torch.Tensor], class_means: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_r = 1/(M·K) Σ_m Σ_k ||W^m_dec(p^{m,k}_0) − X̄^{m,k}||²_F (Eq. 4)."""
    total = None
    count = 0
    for m, dec in decoded.items():
        err = (dec.float() - class_means[m].float()).pow(2).sum()
        total = err if total is None else total + err
        count += dec.shape[0]
    assert total is not None
    return total / count


__all__ = [
    "DISTANCES",
    "depth_loss",
    "distance_logits",
    "euclidean_distance",
    "flat",
    "imbalance",
    "interaction_weights",
    "modulation_loss",
    "performance_and_loss",
    "reconstruction_loss",
]
