"""One modality alone: the unimodal baseline every balancing method should be compared with.

The model keeps the multimodal framework's shapes (so checkpoints, metrics and searches work
unchanged), but only modality ``modality`` reaches the fusion module: every other modality's
feature is replaced by zeros, in training and in evaluation. With concat fusion and a linear
head this is exactly a unimodal classifier W_m·z^m + b on that encoder (the zero-out
estimate, METHODS.md "Common notation"); the other encoders receive no gradient. Comparing
its accuracy with the modality's zero-out accuracy inside a jointly trained model measures how
much joint training suppresses that modality (OPM/OGM, TPAMI 2024, §4.3.7).
"""

from __future__ import annotations

import torch

from tunebal.errors import ConfigError
from tunebal.knobs import Knob, knobs
from tunebal.methods.base import Method, StepContext
from tunebal.methods.registry import register_method
from tunebal.models import MultimodalModel


def keep_only(features: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """``features`` with every modality but ``modality`` set to zeros (no gradient reaches them)."""
    return {m: z if m == modality else torch.zeros_like(z) for m, z in features.items()}


@register_method
class Unimodal(Method):
    name = "unimodal"
    description = "one modality alone (the others zeroed at the fusion input): the unimodal baseline"
    KNOBS = knobs(Knob("modality", "str", "", "the modality trained and evaluated alone (required, e.g. audio)"))
    regression_refusal = None  # L1 on the one modality's output

    def __init__(self, values, modalities, num_classes, seed) -> None:
        super().__init__(values, modalities, num_classes, seed)
        if values["modality"] not in modalities:
            raise ConfigError(
                f"method unimodal trains one modality alone: pass --set modality=NAME ({', '.join(modalities)}), "
                f"got {values['modality']!r}"
            )

    def before_fusion(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        assert ctx.encoded is not None
        return keep_only(ctx.encoded.features, self.knobs["modality"])

    def eval_logits(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.head(keep_only(features, self.knobs["modality"]))
