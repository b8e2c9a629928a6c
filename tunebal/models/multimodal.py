"""The multimodal framework Θ = classifier(fusion(E^1(x^1), ..., E^M(x^M))) (AIM, Eq. 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tunebal.models.encoders import BlockEncoder, build_encoder
from tunebal.models.fusion import build_fusion


@dataclass
class Encoded:
    """Unimodal features and, when requested, the input of every encoder block (AIM's I_d)."""

    features: dict[str, torch.Tensor]
    block_inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class MultimodalModel(nn.Module):
    """Per-modality block encoders, a fusion module and a linear classifier."""

    def __init__(self, encoders: dict[str, BlockEncoder], fusion: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.modalities = tuple(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.classifier = nn.Linear(fusion.out_dim, num_classes)

    def encode(self, inputs: dict[str, torch.Tensor], keep_block_inputs: bool = False) -> Encoded:
        """Run every encoder; optionally keep I_1..I_D of each (for AIM)."""
        out = Encoded(features={})
        for m in self.modalities:
            enc = self.encoders[m]
            x = inputs[m]
            h = enc.prepare(x)
            kept = []
            for block in enc.blocks:
                if keep_block_inputs:
                    kept.append(h)
                h = block(h)
            out.features[m] = enc.pool(h, x.shape[0])
            if keep_block_inputs:
                out.block_inputs[m] = kept
        return out

    def head(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fusion + classifier on (possibly modified) unimodal features."""
        return self.classifier(self.fusion([features[m] for m in self.modalities]))

    def unimodal_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Zero-out estimate: logits of modality m with every other feature set to zero.

        This is the one definition of unimodal logits used everywhere in tunebal (methods and
        per-modality metrics; METHODS.md "Common notation"). For concat fusion with a linear
        head it equals W_m z^m + b, i.e. the full bias is kept, unlike the papers'
        "split head + b/M"; the ranking of classes differs from that form only through b.
        """
        out = {}
        for m in self.modalities:
            masked = {j: (z if j == m else torch.zeros_like(z)) for j, z in features.items()}
            out[m] = self.head(masked)
        return out

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encode(inputs).features)

    def encoder_parameters(self, modality: str) -> list[nn.Parameter]:
        return list(self.encoders[modality].parameters())


def build_model(
    modalities: tuple[str, ...],
    kinds: dict[str, str],
    input_shapes: dict[str, tuple[int, ...]],
    num_classes: int,
    backbone: str = "small",
    fusion: str = "concat",
    width: int = 16,
    pretrained: str = "",
) -> MultimodalModel:
    encoders = {m: build_encoder(kinds[m], input_shapes[m], backbone, width, pretrained) for m in modalities}
    fusion_module = build_fusion(fusion, [encoders[m].out_dim for m in modalities])
    return MultimodalModel(encoders, fusion_module, num_classes)
