"""OPM: On-the-fly Prediction Modulation (OPM/OGM (TPAMI 2024) §3.2.1, Algorithm 1).

Each step t:

1. ρ^m_t of the current mini-batch from the zero-out true-class scores of the **unmodified**
   features (Eqs. 6-7; dropping never changes ρ).
2. Modality m's feature z^m is zeroed per sample, before fusion, with probability q^m_t, the
   probability computed at the **previous** step: q^m_t = q_base·(1 + λ·tanh(ρ^m_{t−1} − 1)) if
   ρ^m_{t−1} > 1 else 0, clipped to [0, 1] (Eq. 8, "determined by the discriminative discrepancy
   ratio at the last iteration", Fig. 2). The first step of a run has no previous ρ: q = 0.
3. q_{t+1} is computed from ρ_t and kept as method state (saved in checkpoints, so a resumed
   run drops exactly the same features).

Draws come from ``self.device_rng``: one uniform per (modality, sample) and one per batch
(for ``p_exe``), every step, whether or not they are used, so the random stream does not
depend on the data and resumes bit-exactly.

Release variants (BML_TPAMI2024), as knobs, with the paper's behaviour as default:

* ``p_exe`` -- the whole batch is modulated only with this probability (release 0.7; paper 1.0);
* ``rescale`` -- in a modulated batch, the kept features of **every** modality are multiplied
  by one global factor 1/(1 − θ), θ = Σ_m d_m·q_m / Σ_m d_m with d_m modality m's feature
  size, as the release does (release on; paper off). A dropped feature stays 0;
* ``warmup`` -- no dropping during the first ``warmup`` epochs (the release skips epochs 0-5,
  i.e. ``warmup=6``; paper 0); q is still updated there, so the first modulated step uses the
  previous step's ρ.

**Samples losing every modality.** The release removes them from the batch. Under Eq. 8 it
cannot happen: the modality with the smallest batch score sum has ρ ≤ 1 (each of its ratios
Σs^m/Σs^j is ≤ 1), so its q is 0 and it is never dropped -- for any M, including M = 3, where
two modalities can both have ρ > 1 and be dropped together, but never the third. tunebal
therefore keeps every sample in the loss (the batch size is constant) and tests this.

Logged every epoch: ``q_<m>`` (the probability applied, 0 in warm-up), ``drop_<m>`` (the
fraction of samples whose feature m was zeroed) and ``rho_<m>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tunebal.knobs import Knob, knobs
from tunebal.methods._modulation import MultimodalOnly, batch_rho, opm_probabilities
from tunebal.methods.base import StepContext
from tunebal.methods.registry import register_method

if TYPE_CHECKING:  # pragma: no cover
    from tunebal.engine import Engine

OPM_KNOBS = knobs(
    Knob("q_base", "float", 0.5, "base drop probability q_base in (0, 1) (OPM/OGM (TPAMI 2024), Eq. 8; Fig. 7: 0.5)", low=0.0, high=1.0),
    Knob("lam", "float", 0.5, "λ > 0: how much ρ raises the drop probability (Eq. 8; Fig. 7: 0.5)", low=0.0, high=10.0),
    Knob("p_exe", "float", 1.0, "probability that a batch is modulated at all (release: 0.7; paper: 1)", low=0.0, high=1.0),
    Knob("rescale", "bool", False, "scale kept features by the release's global 1/(1-θ), θ = Σ d_m q_m / Σ d_m (release: on; paper: off)"),
    Knob("warmup", "int", 0, "epochs without dropping at the start (release: 6, epochs 0-5; paper: 0)", low=0, high=100000),
)


@register_method
class OPM(MultimodalOnly):
    name = "opm"
    description = "OPM: drop the dominant modality's feature with probability q(ρ) before fusion (OPM/OGM (TPAMI 2024) §3.2.1)"
    regression_refusal = "its discrepancy ratio (OPM/OGM (TPAMI 2024), Eq. 7) is built on softmax scores of the true class"
    KNOBS = OPM_KNOBS

    def __init__(self, values, modalities, num_classes, seed) -> None:
        super().__init__(values, modalities, num_classes, seed)
        #: q_t: drop probability of each modality for the next step (from the last step's ρ)
        self.q = torch.zeros(len(modalities), dtype=torch.float32)

    def setup(self, engine: "Engine") -> None:
        super().setup(engine)
        self.q = self.q.to(engine.device)

    def probabilities(self, rho: torch.Tensor) -> torch.Tensor:
        return opm_probabilities(rho, self.knobs["q_base"], self.knobs["lam"])

    def before_fusion(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        assert ctx.encoded is not None
        feats = dict(ctx.encoded.features)
        rho = batch_rho(ctx, self.epoch_means)
        first = feats[self.modalities[0]]
        device, batch = first.device, first.shape[0]
        if self.q.device != device:
            self.q = self.q.to(device)
        q = self.q
        # fixed draws every step: one per (modality, sample), one for the batch (p_exe)
        u = torch.rand((len(self.modalities), batch), generator=self.device_rng, device=device)
        u_batch = torch.rand((), generator=self.device_rng, device=device)
        modulate = ctx.epoch >= self.knobs["warmup"]
        if modulate:
            execute = u_batch < self.knobs["p_exe"]
            drop = (u < q[:, None]) & execute
            if self.knobs["rescale"]:  # the release: one factor 1/(1 − θ), θ = Σ d_m q_m / Σ d_m
                dims = torch.tensor([feats[m][0].numel() for m in self.modalities], dtype=q.dtype, device=device)
                theta = (dims * q).sum() / dims.sum()
                factor = 1.0 / (1.0 - theta).clamp_min(1e-6)
            for i, m in enumerate(self.modalities):
                z = feats[m]
                keep = torch.ones_like(u[i])
                if self.knobs["rescale"]:
                    keep = torch.where(execute, factor, keep)
                scale = torch.where(drop[i], torch.zeros_like(keep), keep).to(z.dtype)
                feats[m] = z * scale.view(-1, *([1] * (z.dim() - 1)))
                self.epoch_means.add(f"q_{m}", q[i])
                self.epoch_means.add(f"drop_{m}", drop[i].float().mean())
        else:
            for m in self.modalities:
                self.epoch_means.add(f"q_{m}", 0.0)
                self.epoch_means.add(f"drop_{m}", 0.0)
        self.q = self.probabilities(rho).to(device)  # q_{t+1} from ρ_t
        return feats

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["q"] = self.q.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.q = state["q"].to(device=self.q.device, dtype=torch.float32).clone()
