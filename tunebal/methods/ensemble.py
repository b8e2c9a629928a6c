"""Unimodal ensemble: each modality learns on its own, predictions are combined at evaluation.

Du et al. (ICML 2023) and MCR (arXiv 2411.07335) find that balancing methods often fail to
beat this simple baseline. Training minimises Σ_m CE(p^m, y), where p^m are modality m's
zero-out logits (METHODS.md "Common notation"): each encoder learns only from its own
prediction, with no fused loss, so no modality can suppress another. With concat fusion the
modalities' head blocks W_m are disjoint; they share only the bias b (documented coupling;
it carries no modality's information). Evaluation scores the average of the modalities'
class probabilities (returned as its log, so argmax, CE and mAP read it like logits).
For a regression target each modality's output is trained with L1 and the outputs are averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunebal.methods.base import Method, StepContext
from tunebal.methods.registry import register_method
from tunebal.models import MultimodalModel


def average_probabilities(unimodal_logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """log( (1/M) Σ_m softmax(p^m) ): the ensemble's prediction as log-probabilities."""
    stacked = torch.stack([F.log_softmax(lg.float(), dim=1) for lg in unimodal_logits.values()])
    return torch.logsumexp(stacked, dim=0) - math.log(len(unimodal_logits))


@register_method
class UnimodalEnsemble(Method):
    name = "ensemble"
    description = "unimodal ensemble: each modality trained on its own CE, probabilities averaged at evaluation"
    supported_fusions = ("concat",)
    regression_refusal = None  # Σ_m L1(p^m, y); the unimodal outputs are averaged

    def loss(self, ctx: StepContext) -> torch.Tensor:
        return sum(self.supervised_loss(lg, ctx.labels) for lg in ctx.unimodal_logits().values())

    def eval_logits(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.regression:
            return torch.stack(list(model.unimodal_logits(features).values())).mean(dim=0)
        return average_probabilities(model.unimodal_logits(features))
