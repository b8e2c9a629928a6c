"""Metrics against values computed by hand."""

import math

import pytest
import torch

from tunebal.metrics import classification_metrics, discrepancy_ratios, modality_metrics, true_class_scores


def test_accuracy_and_macro_f1_by_hand():
    # labels 0,0,1,1,2 ; predictions 0,1,1,1,0
    labels = torch.tensor([0, 0, 1, 1, 2])
    pred = [0, 1, 1, 1, 0]
    logits = torch.full((5, 3), -5.0)
    for i, p in enumerate(pred):
        logits[i, p] = 5.0
    m = classification_metrics(logits, labels, 3)
    assert m["acc"] == pytest.approx(3 / 5)
    # class 0: tp=1 fp=1 fn=1 -> f1 .5 ; class 1: tp=2 fp=1 fn=0 -> f1 .8 ; class 2: tp=0 -> 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_map_by_hand():
    # two classes, scores for class 1 ranked; AP computed by hand
    labels = torch.tensor([1, 0, 1, 0])
    p1 = torch.tensor([0.9, 0.8, 0.7, 0.1])  # ranking: pos, neg, pos, neg
    logits = torch.stack([torch.log(1 - p1), torch.log(p1)], dim=1)
    m = classification_metrics(logits, labels, 2)
    ap1 = (1 / 1 + 2 / 3) / 2  # precision at each positive
    # class 0 scores = 1 - p1: 0.1,0.2,0.3,0.9 -> ranking: idx3(neg? label0 -> pos), idx2(label1), idx1(label0), idx0(label1)
    ap0 = (1 / 1 + 2 / 3) / 2
    assert m["map"] == pytest.approx((ap0 + ap1) / 2)


def test_map_ignores_absent_classes_and_scores_every_sample():
    labels = torch.tensor([0, 0, 1])
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    m = classification_metrics(logits, labels, 3)
    assert m["map"] == pytest.approx(1.0)
    assert m["acc"] == pytest.approx(1.0)


def test_discrepancy_ratio_eq7_two_and_three_modalities():
    s = {"a": torch.tensor([0.9, 0.7]), "v": torch.tensor([0.3, 0.5])}
    rho = discrepancy_ratios(s)
    assert rho["a"] == pytest.approx(1.6 / 0.8)
    assert rho["v"] == pytest.approx(0.8 / 1.6)
    s["t"] = torch.tensor([0.2, 0.2])
    rho = discrepancy_ratios(s)
    assert rho["a"] == pytest.approx(0.5 * (1.6 / 0.8 + 1.6 / 0.4))
    assert rho["t"] == pytest.approx(0.5 * (0.4 / 1.6 + 0.4 / 0.8))


def test_true_class_scores_and_modality_metrics():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    labels = torch.tensor([1, 0])
    assert torch.allclose(true_class_scores(logits, labels), torch.tensor([0.75, 0.5]))
    uni = {"a": logits, "v": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    m = modality_metrics(uni, labels)
    assert m["acc_a"] == pytest.approx(1.0)
    assert m["acc_v"] == pytest.approx(0.5)
    s_v = torch.softmax(uni["v"], 1)[[0, 1], [1, 0]]
    assert m["rho_a"] == pytest.approx(1.25 / float(s_v.sum()))


def test_macro_f1_averages_over_the_classes_present_in_the_labels():
    # 5 classes; labels use 0, 1, 3. Class 2 is absent but predicted once, class 4 absent and
    # never predicted. Hand computation per present class:
    #   class 0: tp 1, fp 1, fn 1 -> F1 0.5 ; class 1: tp 2, fp 0, fn 1 -> F1 0.8 ; class 3: F1 1
    # macro-F1 over the present classes = (0.5 + 0.8 + 1) / 3. Averaging over all 5 classes
    # (0.46) or over labels ∪ predictions (sklearn's default, 0.575) would differ.
    from sklearn.metrics import f1_score

    labels = torch.tensor([0, 0, 1, 1, 1, 3])
    pred = [0, 2, 1, 1, 0, 3]
    logits = torch.full((6, 5), -4.0)
    for i, p in enumerate(pred):
        logits[i, p] = 4.0
    m = classification_metrics(logits, labels, 5)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 1.0) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(labels.numpy(), pred, labels=[0, 1, 3], average="macro"))
    assert m["acc"] == pytest.approx(4 / 6)
    # mAP follows the same rule: the mean AP of classes 0, 1 and 3 only
    from sklearn.metrics import average_precision_score

    probs = torch.softmax(logits, 1).numpy()
    aps = [average_precision_score((labels == c).numpy(), probs[:, c]) for c in (0, 1, 3)]
    assert m["map"] == pytest.approx(sum(aps) / 3)
