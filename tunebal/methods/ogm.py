"""OGM-GE: On-the-fly Gradient Modulation with Generalisation Enhancement (OPM/OGM (TPAMI 2024) §3.2.2).

Each step (Algorithm 2 of OPM/OGM (TPAMI 2024)):

1. ρ^m of the current mini-batch from the zero-out true-class scores s^m (Eqs. 6-7; detached,
   computed in ``before_fusion`` so it runs under the same autocast as the forward pass).
2. k^m from ρ^m (Eq. 11, knob ``form``):

   * ``tpami`` (default, the paper): k^m = 1 − α·tanh(ρ^m − 1) if ρ^m > 1 else 1, clipped at 0;
   * ``cvpr`` (the CVPR 2022 release, ``OGM-GE_CVPR2022``): k^m = 1 − tanh(α·ρ^m) if ρ^m > 1
     else 1. For ρ slightly above 1 this is much stronger (α = 0.8: k ≈ 0.34 against the
     TPAMI form's k ≈ 1).

3. After back-propagation, modality m's **encoder** gradient g^m becomes k^m·g^m + h^m
   (Eq. 16: θ ← θ − η(k·g + h)). Fusion and classifier gradients are never touched.

**GE noise h** (knob ``ge``): zero-mean Gaussian with "the same covariance as the current
g(θ)" (Eqs. 15-17). The full covariance would need per-sample gradients; tunebal uses, like
the release, an isotropic Gaussian whose std is the std of the **unmodulated** mini-batch
gradient (taken before multiplying by k), knob ``ge_std``:

* ``tensor`` (default, release): one std per parameter tensor (``grad.std()``);
* ``encoder``: one std over all of modality m's encoder gradient entries.

Knob ``ge_scope``: ``all`` (default) adds h to every modality's encoder, as Algorithm 2
(θ^m for every m, with k^m = 1 for the weak modality) and the release do; ``modulated`` adds it
only where k^m < 1, the encoders whose SGD noise the modulation shrank (Eqs. 15-17).
Tensors with fewer than 2 entries get no noise (their std is undefined).

**Window**: modulation and noise are active for 0-based epochs ``start <= epoch <= end``;
``end = -1`` means until the last epoch (the release's ``modulation_starts/ends`` are
inclusive too). Outside the window the step is plain joint training; ρ is still logged.

``conv_only`` reproduces the release, which modulates (and perturbs) only 4-D conv kernels;
BatchNorm parameters and the vector (MLP) encoder's linear weights are then left alone.

Logged every epoch (under ``method/``): ``rho_<m>`` and ``k_<m>`` (the applied k; 1 outside
the window). Random draws use ``self.device_rng`` (state saved by the base class).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tunebal.errors import ConfigError
from tunebal.knobs import Knob, knobs
from tunebal.methods._modulation import (
    MultimodalOnly,
    batch_rho,
    encoder_grad_params,
    ogm_coefficients,
    scale_grads,
)
from tunebal.methods.base import StepContext
from tunebal.methods.registry import register_method

if TYPE_CHECKING:  # pragma: no cover
    from tunebal.engine import Engine

OGM_KNOBS = knobs(
    Knob("alpha", "float", 0.8, "modulation strength α (OPM/OGM (TPAMI 2024), Eq. 11; release: 0.8 CREMA-D, 0.1 VGGSound)", low=0.0, high=10.0),
    Knob("form", "str", "tpami", "k formula: tpami 1-α·tanh(ρ-1) (paper) | cvpr 1-tanh(α·ρ) (CVPR release)", choices=("tpami", "cvpr")),
    Knob("start", "int", 0, "first epoch (0-based) of the modulation window", low=0, high=100000),
    Knob("end", "int", -1, "last epoch (0-based, inclusive) of the window; -1: until the last epoch", low=-1, high=100000),
    Knob("ge", "bool", True, "generalisation enhancement: add Gaussian noise with the gradient's std (Eq. 16)"),
    Knob("ge_std", "str", "tensor", "GE noise std: per parameter tensor (release) | one per encoder", choices=("tensor", "encoder")),
    Knob("ge_scope", "str", "all", "GE noise on every encoder (Alg. 2, release) | only where k<1", choices=("all", "modulated")),
    Knob("conv_only", "bool", False, "modulate only 4-D conv kernels, as the CVPR release does"),
)


@register_method
class OGM(MultimodalOnly):
    name = "ogm"
    description = "OGM-GE: scale the dominant encoder's gradient by k(ρ) plus Gaussian noise (OPM/OGM (TPAMI 2024) §3.2.2)"
    regression_refusal = "its discrepancy ratio (OPM/OGM (TPAMI 2024), Eq. 7) is built on softmax scores of the true class"
    KNOBS = OGM_KNOBS

    def __init__(self, values, modalities, num_classes, seed) -> None:
        super().__init__(values, modalities, num_classes, seed)
        if values["end"] != -1 and values["end"] < values["start"]:
            raise ConfigError(f"ogm: window end ({values['end']}) is before start ({values['start']}); use -1 for 'until the last epoch'")
        self._params: dict[str, list[torch.nn.Parameter]] = {}

    def setup(self, engine: "Engine") -> None:
        super().setup(engine)
        self.bind(engine.model)

    def bind(self, model) -> None:
        """Remember each modality's encoder parameters (those whose gradient OGM modulates)."""
        self._params = {m: encoder_grad_params(model, m, self.knobs["conv_only"]) for m in self.modalities}

    def active(self, epoch: int) -> bool:
        start, end = self.knobs["start"], self.knobs["end"]
        return epoch >= start and (end < 0 or epoch <= end)

    def before_fusion(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        batch_rho(ctx, self.epoch_means)
        return super().before_fusion(ctx)

    def coefficients(self, rho: torch.Tensor) -> torch.Tensor:
        return ogm_coefficients(rho, self.knobs["alpha"], self.knobs["form"])

    def after_backward(self, ctx: StepContext) -> None:
        rho = batch_rho(ctx, self.epoch_means)
        if not self.active(ctx.epoch):
            for m in self.modalities:
                self.epoch_means.add(f"k_{m}", 1.0)
            return
        if not self._params:
            self.bind(ctx.model)
        k = self.coefficients(rho)
        for i, m in enumerate(self.modalities):
            self.epoch_means.add(f"k_{m}", k[i])
            params = [p for p in self._params[m] if p.grad is not None]
            if not params:
                continue
            if self.knobs["ge"]:
                self._modulate_with_noise(params, k[i])
            else:
                scale_grads(params, k[i])

    def _modulate_with_noise(self, params: list[torch.nn.Parameter], k: torch.Tensor) -> None:
        """g ← k·g + h, h ~ N(0, std(g)²) with std from the unmodulated g (per tensor or encoder)."""
        grads = [p.grad for p in params]
        dtype, device = grads[0].dtype, grads[0].device
        k = k.to(dtype)
        if self.knobs["ge_std"] == "encoder":
            flat = torch.cat([g.reshape(-1) for g in grads])
            std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
            stds = [std] * len(grads)
        else:
            stds = [g.std() if g.numel() > 1 else g.new_zeros(()) for g in grads]
        if self.knobs["ge_scope"] == "modulated":
            gate = (k < 1.0).to(dtype)
            stds = [s * gate for s in stds]
        # one draw for the whole encoder (fixed order: parameter order), then split
        noise = torch.randn(sum(g.numel() for g in grads), generator=self.device_rng, device=device, dtype=dtype)
        torch._foreach_mul_(grads, k)
        offset = 0
        for g, s in zip(grads, stds):
            n = g.numel()
            g.add_(noise[offset : offset + n].view_as(g) * s)
            offset += n
