"""Evaluation metrics: accuracy, macro-F1 and mAP (scikit-learn definitions), per-modality
accuracy from zero-out logits, and the discrepancy ratio ρ (OPM/OGM (TPAMI 2024), Eq. 7);
for a regression target (CMU-MOSI's sentiment score) the standard MOSI metrics
(:func:`regression_metrics`)."""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch
from scipy.stats import pearsonr
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    mean_absolute_error,
)


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


def sign_hits(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample, whether prediction and target fall on the same side of 0 (negative < 0 vs
    non-negative >= 0): the training-time Acc-2 of a regression target (no host sync)."""
    return (predictions >= 0) == (targets >= 0)


def regression_metrics(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The standard CMU-MOSI regression metrics over all samples (as computed by MulT's and
    MMSA's evaluation scripts), with scikit-learn / SciPy doing the arithmetic:

    - ``mae``: mean absolute error; ``corr``: Pearson correlation (0 when either side is
      constant, where it is undefined);
    - ``acc``: Acc-2 "with zeros": negative (< 0) vs non-negative (>= 0), over every sample --
      tunebal's selection metric (``val/acc``), the convention of the ``binary`` label mode;
    - ``acc2_nonzero``: Acc-2 "without zeros": negative vs positive (> 0) over the samples whose
      target is not 0 (MulT's binary accuracy); 0 if every target is 0;
    - ``f1`` / ``f1_nonzero``: the weighted F1 of the same two binary decisions;
    - ``acc7``: accuracy over 7 classes after rounding the scores clipped to [-3, 3]
      (``np.round``: halves to even, as the released scripts).
    """
    p = predictions.detach().float().reshape(-1).cpu().numpy().astype(np.float64)
    y = targets.detach().float().reshape(-1).cpu().numpy().astype(np.float64)
    nonzero = y != 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: pearsonr warns and returns nan
        corr = float(pearsonr(p, y)[0]) if len(y) >= 2 else float("nan")
        f1_nz = f1_score(y[nonzero] > 0, p[nonzero] > 0, average="weighted", zero_division=0) if nonzero.any() else 0.0
        out = {
            "mae": float(mean_absolute_error(y, p)),
            "corr": corr if np.isfinite(corr) else 0.0,
            "acc": float(accuracy_score(y >= 0, p >= 0)),
            "acc2_nonzero": float(accuracy_score(y[nonzero] > 0, p[nonzero] > 0)) if nonzero.any() else 0.0,
            "f1": float(f1_score(y >= 0, p >= 0, average="weighted", zero_division=0)),
            "f1_nonzero": float(f1_nz),
            "acc7": float(accuracy_score(np.round(np.clip(y, -3, 3)), np.round(np.clip(p, -3, 3)))),
        }
    return out


def regression_modality_metrics(unimodal: Mapping[str, torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
    """Per modality, from its zero-out prediction: Acc-2 with zeros ``acc_<m>`` and ``mae_<m>``.

    The discrepancy ratio ρ is built on softmax scores of the true class and has no regression
    counterpart, so it is not logged for a regression target.
    """
    out: dict[str, float] = {}
    y = targets.float().reshape(-1)
    for m, pred in unimodal.items():
        pred = pred.float().reshape(-1)
        out[f"acc_{m}"] = float(sign_hits(pred, y).float().mean())
        out[f"mae_{m}"] = float((pred - y).abs().mean())
    return out
