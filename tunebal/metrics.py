"""Evaluation metrics: accuracy, macro-F1 and mAP (scikit-learn definitions), per-modality
accuracy from zero-out logits, and the discrepancy ratio ρ (OPM/OGM (TPAMI 2024), Eq. 7)."""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score


def true_class_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s = softmax(logits)[y] per sample: the score of the true class (OPM/OGM (TPAMI 2024), Eq. 6)."""
    return torch.softmax(logits.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)


def discrepancy_ratios(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """ρ^m = 1/(M−1) Σ_{j≠m} Σ_i s^m_i / Σ_i s^j_i (OPM/OGM (TPAMI 2024), Eq. 7); ρ^m > 1: m dominates.

    ``scores`` maps each modality to its per-sample true-class scores over the same samples.
    """
    sums = {m: float(s.sum()) for m, s in scores.items()}
    mods = list(sums)
    if len(mods) < 2:
        return {m: 1.0 for m in mods}
    out = {}
    for m in mods:
        ratios = [sums[m] / sums[j] if sums[j] > 0 else float("inf") for j in mods if j != m]
        out[m] = sum(ratios) / len(ratios)
    return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and mAP over all samples (no sample is dropped).

    Macro-F1 is the unweighted mean of the per-class F1 over the classes that occur in
    ``labels``: a class absent from the labels (even if predicted) has no recall and is left
    out, as for mAP; a sample wrongly predicted as such a class still counts as a miss of its
    own class.
    mAP is scikit-learn's average precision of each class's softmax score (one-vs-rest),
    averaged over the classes that occur in ``labels`` (AP is undefined without positives).
    """
    y = labels.cpu().numpy()
    probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
    pred = probs.argmax(axis=1)
    onehot = np.eye(num_classes, dtype=np.int64)[y]
    present = onehot.sum(axis=0) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = average_precision_score(onehot[:, present], probs[:, present], average="macro") if present.any() else 0.0
    return {
        "acc": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=np.arange(num_classes)[present], zero_division=0)),
        "map": float(ap),
    }


def modality_metrics(
    unimodal_logits: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> dict[str, float]:
    """Per-modality zero-out accuracy ``acc_<m>`` and discrepancy ratio ``rho_<m>``."""
    out: dict[str, float] = {}
    scores = {}
    for m, logits in unimodal_logits.items():
        out[f"acc_{m}"] = float((logits.argmax(dim=1) == labels).float().mean())
        scores[m] = true_class_scores(logits, labels)
    for m, rho in discrepancy_ratios(scores).items():
        out[f"rho_{m}"] = rho
    return out
