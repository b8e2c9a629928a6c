"""Depth-Adaptive Prototypes, DAP (AIM §III-C, Eqs. 3-6).

K learnable, input-shaped prototypes P^m_0 = {p^{m,k}_0} per modality live at the encoder
input. They are fitted with the framework frozen on

    L_cls = CE(Θ(P_0), [0..K−1])       (Eq. 3: class k's prototypes of *all* modalities go
                                        through the whole multimodal model together)
    L_r   = 1/(M·K) Σ_m Σ_k ||W^m_dec(p^{m,k}_0) − X̄^{m,k}||²_F     (Eq. 4)

and give the prototypes of depth d by forward propagation, P^m_d = E^m_{≤d}(P^m_0) (Eq. 6).

Our choices (the paper leaves them open):

- **Decoder W^m_dec**: a *pointwise* affine map, initialised to the identity. For a
  spectrogram (1, F, T) it is one scale and one shift; for frames (T, C, H, W) a 1x1
  channel-mixing map C -> C (+ bias) applied to every pixel of every frame; for a vector a
  full Linear(D, D). It is cheap (2, 12 and D²+D parameters) and weak on purpose: the
  prototype must look like the class mean up to a global affine change of intensity/colour,
  which is what "information consistency with the input data" asks for, while staying
  free to move where the frozen classifier needs it.
- **Initialisation**: P_0 ~ N(0, 1) elementwise ("randomly initialized learnable tensor",
  Algorithm 1), drawn from the method's seeded generator.
- **BatchNorm**: prototypes always propagate with the framework in **eval mode** (running
  statistics). Prototypes are K single examples, not a batch: batch statistics over them
  would be meaningless and would update the running statistics. Eval mode makes
  E^m_{≤d} the deterministic per-sample function the network computes at inference.
- **Frozen framework**: the prototype path is computed with every framework parameter's
  ``requires_grad`` switched off (``frozen``), so gradients of anything computed from P_d
  reach P_0 and the decoders only — never the framework. This is Eq. 5's "freeze" while the
  DAP is fitted and, after the start epoch, makes the joint update of Algorithm 1 line 10
  update the DAP with L_mod + Eq. 5 and the framework with L_mod through its data path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tunebal.methods.aim.losses import reconstruction_loss
from tunebal.models import MultimodalModel


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Switch ``requires_grad`` off for the modules' parameters (restored on exit).

    Autograd records no edge to a parameter that does not require grad, so a graph built
    inside stays disconnected from these parameters even after the flags are restored.
    """
    params = [p for mod in modules for p in mod.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, then restore every submodule's own flag."""
    flags = [(mod, mod.training) for mod in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for mod, flag in flags:
            mod.training = flag


class PointwiseDecoder(nn.Module):
    """W^m_dec: a pointwise affine map over the channels of an input-shaped tensor (identity at init)."""

    def __init__(self, kind: str, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.kind = kind
        if kind == "vector":
            channels = input_shape[0]
        elif kind == "frames":
            channels = input_shape[1]  # (T, C, H, W)
        else:  # spectrogram (C, F, T)
            channels = input_shape[0]
        self.map = nn.Linear(channels, channels)
        with torch.no_grad():
            self.map.weight.copy_(torch.eye(channels))
            self.map.bias.zero_()

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "vector":
            return self.map(p)
        ch_dim = 2 if self.kind == "frames" else 1
        return self.map(p.movedim(ch_dim, -1)).movedim(-1, ch_dim)


class DepthAdaptivePrototypes(nn.Module):
    """P^m_0 for every modality, their decoders, and the propagation E^m_{≤d}(P^m_0)."""

    def __init__(
        self,
        modalities: tuple[str, ...],
        kinds: dict[str, str],
        input_shapes: dict[str, tuple[int, ...]],
        num_classes: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        self.protos = nn.ParameterDict(
            {m: nn.Parameter(torch.randn((num_classes, *input_shapes[m]), generator=generator)) for m in modalities}
        )
        self.decoders = nn.ModuleDict({m: PointwiseDecoder(kinds[m], input_shapes[m]) for m in modalities})

    def propagate(self, model: MultimodalModel) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """({m: [P^m_1..P^m_D]}, {m: pooled feature of P^m_D}) with the framework in eval mode and frozen."""
        k = self.num_classes
        depths: dict[str, list[torch.Tensor]] = {}
        feats: dict[str, torch.Tensor] = {}
        with eval_mode(model), frozen(model):
            for m in self.modalities:
                enc = model.encoders[m]
                h = enc.prepare(self.protos[m])
                outs = []
                for block in enc.blocks:
                    h = block(h)
                    outs.append(h)
                depths[m] = outs
                feats[m] = enc.pool(h, k)
        return depths, feats

    def classification_loss(self, model: MultimodalModel, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_cls of Eq. 3, fraction of classes whose prototypes the frozen framework classifies right)."""
        with eval_mode(model), frozen(model):
            logits = model.head(feats)
        target = torch.arange(self.num_classes, device=logits.device)
        acc = (logits.detach().argmax(dim=1) == target).float().mean()
        return F.cross_entropy(logits.float(), target), acc

    def reconstruction_loss(self, class_means: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_r of Eq. 4."""
        decoded = {m: self.decoders[m](self.protos[m]) for m in self.modalities}
        return reconstruction_loss(decoded, class_means)


__all__ = ["DepthAdaptivePrototypes", "PointwiseDecoder", "eval_mode", "frozen"]
