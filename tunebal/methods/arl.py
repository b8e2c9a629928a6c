"""ARL: Asymmetric Representation Learning (ARL (ICCV 2025) §3.2, Algorithm 1).

Per step, from the zero-out unimodal logits p^m (``ctx.unimodal_logits()``: the shared fusion
and classifier with every other feature zeroed -- the paper's "auxiliary regularisers", no
extra parameters):

* **Loss** (Eqs. 21-22): L = CE(p^f, y) + γ·Σ_m CE(p^m, y).
* **Inverse variance** (Eq. 17): q^m = 1 / H̄^m with H̄^m = mean_i H(σ(p^m_i)), the batch mean of
  the prediction entropy H(p) = −Σ_j p_j log p_j. Eq. 17 as printed, 1/Σ σ log σ, lacks the
  entropy's minus sign (it would make q negative); only ratios q^{m0}/q^{m1} enter Eq. 18, and
  they are the same either way. tunebal inverts the batch-mean entropy (as the authors'
  code does), not the mean of per-sample inverses, which explodes on a single confident sample.
* **Dependency ratio** (Eq. 4): d^{m0}/d^{m1} with d^m = σ(p^m)[y], the true-class score.
  Eq. 4 is per sample; knob ``d_reduce`` picks the batch estimate: ``ratio_of_means``
  (default: Σ_i s^{m0}_i / Σ_i s^{m1}_i, robust, and for M = 2 identical to OPM/OGM (TPAMI 2024)'s ρ^{m0})
  or ``mean_of_ratios`` (mean_i s^{m0}_i / s^{m1}_i, heavy-tailed when s^{m1}_i is tiny).
* **Coefficients** (Eq. 18): [a^{m0}, a^{m1}] = softmax([T·q^{m0}/q^{m1}, T·d^{m0}/d^{m1}]).
  The first entry goes to m0: when the dependency ratio is below the target (inverse-variance)
  ratio, m0 is accelerated ("increase the gradient of m0 to increase d^{m0}/d^{m1} when it is
  smaller than q^{m0}/q^{m1}", §3.2). m0 is the first modality in the dataset's order (audio
  for audio-visual data, as in the paper's Fig. 3). Note that Eq. 18 is not symmetric under
  swapping m0 and m1; tunebal keeps it as printed.
* **Gradient** (Eqs. 19-20): the gradient reaching encoder m becomes g + a^m·g. Every encoder
  parameter's gradient is multiplied by (1 + a^m) after back-propagation. Because the
  unimodal terms also reach the encoder through the shared fusion and classifier, this scales
  the whole encoder gradient (fused and unimodal CE alike), which is what one backward pass
  through Eq. 22 followed by Eqs. 19-20 gives. Fusion and classifier gradients are unchanged.

**More than two modalities** (the paper defines M = 2 only): every ordered pair (i, j) with
i before j in the dataset order is treated by Eq. 18 as (m0, m1) = (i, j), giving i the share
P_ij = softmax([T·q^i/q^j, T·d^i/d^j])[0] and j the share 1 − P_ij; a^m is the mean of m's shares
over its M − 1 pairs. For M = 2 this is exactly Eq. 18. Each a^m lies in (0, 1), Σ_m a^m = M/2,
and a^m = 1/2 for all m when every dependency ratio equals its target ratio.

Variant knobs: ``warmup`` (the release's ``start``: for the first epochs γ = 1 and the
coefficients are held balanced, a^m = 1/2); ``modulate`` off gives the paper's "UR only"
ablation (Table 5: no gradient scaling); ``residual`` off drops the residual (g^m = a^m·g, the
"w/o GR" ablation). The release computes other coefficients and never applies them
(METHODS.md); tunebal applies the paper's. The release's gradient-norm clip of 40 is the
common ``grad_clip`` knob.

Logged every epoch: ``a_<m>``, ``q_<m>``, ``uce_<m>`` (unimodal CE), and for each pair
``q_ratio_<i>_<j>`` = q^i/q^j and ``d_ratio_<i>_<j>`` = d^i/d^j.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tunebal.knobs import Knob, knobs
from tunebal.methods._modulation import EPS, MultimodalOnly, encoder_grad_params, scale_grads, true_class_scores
from tunebal.methods.base import StepContext
from tunebal.methods.registry import register_method

if TYPE_CHECKING:  # pragma: no cover
    from tunebal.engine import Engine

ARL_KNOBS = knobs(
    Knob("T", "float", 4.0, "temperature of Eq. 18 (paper: 8 CREMA-D, 4 elsewhere)", low=0.0, high=100.0),
    Knob("gamma", "float", 4.0, "weight γ of the unimodal CE terms (Eq. 22; paper 4, release scripts 3-5)", low=0.0, high=100.0),
    Knob("d_reduce", "str", "ratio_of_means", "batch estimate of d^i/d^j (Eq. 4)", choices=("ratio_of_means", "mean_of_ratios")),
    Knob("warmup", "int", 0, "first epochs with γ=1 and balanced a=1/2 (release: 5; paper: 0)", low=0, high=100000),
    Knob("modulate", "bool", True, "scale encoder gradients by (1+a) (off: unimodal regularisation only)"),
    Knob("residual", "bool", True, "keep the residual g + a·g (off: a·g, the 'w/o GR' ablation)"),
)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample prediction entropy H(σ(p)) = −Σ_j σ_j log σ_j (float32, natural log)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def arl_statistics(
    logits: list[torch.Tensor], labels: torch.Tensor, d_reduce: str = "ratio_of_means"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, Q, D) from the unimodal logits of M modalities (detached inside).

    q: (M,) inverse batch-mean entropies (Eq. 17); Q[i, j] = q^i/q^j; D[i, j] = d^i/d^j (Eq. 4).
    """
    q = torch.stack([1.0 / entropy(lg.detach()).mean().clamp_min(EPS) for lg in logits])
    scores = torch.stack([true_class_scores(lg.detach(), labels) for lg in logits])  # (M, B)
    Q = q[:, None] / q[None, :]
    if d_reduce == "ratio_of_means":
        sums = scores.sum(dim=1).clamp_min(EPS)
        D = sums[:, None] / sums[None, :]
    elif d_reduce == "mean_of_ratios":
        s = scores.clamp_min(EPS)
        D = (s[:, None, :] / s[None, :, :]).mean(dim=2)
    else:
        raise ValueError(f"unknown d_reduce {d_reduce!r}")
    return q, Q, D


def arl_coefficients(Q: torch.Tensor, D: torch.Tensor, T: float) -> torch.Tensor:
    """a^m from the pairwise ratio matrices (Eq. 18, generalised over ordered pairs; see module doc).

    P[i, j] = softmax([T·Q_ij, T·D_ij])[0] = sigmoid(T·(Q_ij − D_ij)) is i's share as m0 of the
    pair (i, j); for i < j, i takes P[i, j] and j takes 1 − P[i, j].
    """
    m = Q.shape[0]
    if m < 2:
        return torch.full((m,), 0.5, device=Q.device)
    P = torch.sigmoid(T * (Q - D))
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=Q.device), diagonal=1)
    shares = torch.where(upper, P, 1.0 - P.transpose(0, 1))  # shares[i, j]: i's share in pair {i, j}
    shares = shares.masked_fill(torch.eye(m, dtype=torch.bool, device=Q.device), 0.0)
    return shares.sum(dim=1) / (m - 1)


@register_method
class ARL(MultimodalOnly):
    name = "arl"
    description = "ARL: asymmetric (1+a) encoder gradients from inverse entropy vs dependency, plus unimodal CE (ARL (ICCV 2025) §3.2)"
    regression_refusal = "its coefficients (ARL, Eq. 18) are built on softmax scores of the true class and prediction entropies"
    KNOBS = ARL_KNOBS

    def __init__(self, values, modalities, num_classes, seed) -> None:
        super().__init__(values, modalities, num_classes, seed)
        self._params: dict[str, list[torch.nn.Parameter]] = {}

    def setup(self, engine: "Engine") -> None:
        super().setup(engine)
        self._params = {m: encoder_grad_params(engine.model, m) for m in self.modalities}

    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.knobs["warmup"]

    def loss(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.logits is not None
        uni = ctx.unimodal_logits()
        logits = [uni[m] for m in self.modalities]
        gamma = 1.0 if self.in_warmup(ctx.epoch) else self.knobs["gamma"]
        fused = F.cross_entropy(ctx.logits, ctx.labels)
        uces = [F.cross_entropy(lg, ctx.labels) for lg in logits]
        total = fused + gamma * torch.stack(uces).sum()

        q, Q, D = arl_statistics(logits, ctx.labels, self.knobs["d_reduce"])
        if self.in_warmup(ctx.epoch):
            a = torch.full_like(q, 0.5)
        else:
            a = arl_coefficients(Q, D, self.knobs["T"])
        ctx.scratch["arl.a"] = a
        means = self.epoch_means
        for i, m in enumerate(self.modalities):
            means.add(f"a_{m}", a[i])
            means.add(f"q_{m}", q[i])
            means.add(f"uce_{m}", uces[i].detach())
            for j in range(i + 1, len(self.modalities)):
                n = self.modalities[j]
                means.add(f"q_ratio_{m}_{n}", Q[i, j])
                means.add(f"d_ratio_{m}_{n}", D[i, j])
        return total

    def after_backward(self, ctx: StepContext) -> None:
        if not self.knobs["modulate"]:
            return
        if not self._params:
            self._params = {m: encoder_grad_params(ctx.model, m) for m in self.modalities}
        a = ctx.scratch["arl.a"]
        factor = 1.0 + a if self.knobs["residual"] else a
        for i, m in enumerate(self.modalities):
            scale_grads(self._params[m], factor[i])
