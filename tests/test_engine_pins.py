"""Engine behaviour that a one-line change could silently break, pinned against hand computations.

Only the engine's public behaviour is used (``Engine(...)``, ``train_epoch``, ``evaluate``,
``run_epoch``, ``save``/``load``, ``optimizer``, ``scheduler``); which samples an epoch trains
on is observed through a test-only method (tests/_builders.py ``Probe``), not the data path.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests._builders import VEC, capture_step_grads, probe_registered, vector_data
from tunebal.engine import Engine
from tunebal.metrics import discrepancy_ratios, true_class_scores

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


# --------------------------------------------------------------------------- LR schedule on resume


@pytest.mark.parametrize(
    "schedule,expected",
    [
        # StepLR(step=2, γ=0.5) from 0.1: lr used in epochs 0..3 = 0.1, 0.1, 0.05, 0.05; after 4: 0.025
        ({"lr_schedule": "step", "lr_step": 2, "lr_gamma": 0.5}, [0.1, 0.05, 0.05, 0.025]),
        # cosine over 4 epochs: lr after epoch e = 0.1·(1 + cos(π·e/4))/2
        ({"lr_schedule": "cosine"}, [0.05 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3, 4)]),
    ],
)
def test_lr_schedule_is_restored_on_resume(tmp_path, schedule, expected):
    data = vector_data(40, dims={"a": 5, "b": 5}, informative=("a",))
    cfg = {**VEC, "batch_size": 8, "lr": 0.1, "epochs": 4, **schedule}
    straight = Engine(data, "baseline", cfg)
    lrs = [straight.train_epoch()["lr"] for _ in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-9)

    first = Engine(data, "baseline", cfg)
    first.train_epoch()
    path = tmp_path / "ckpt.arrow"
    first.save(str(path))
    resumed = Engine(data, "baseline", cfg)
    resumed.load(str(path))
    assert resumed.scheduler.last_epoch == 1
    assert [resumed.train_epoch()["lr"] for _ in range(3)] == pytest.approx(expected[1:], rel=1e-9)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- which samples an epoch trains


def test_every_epoch_trains_a_new_permutation_including_the_partial_last_batch():
    data = vector_data(37, id_of="a")  # 37 = 4·8 + 5: the last batch holds 5 samples
    with probe_registered() as probe:
        engine = Engine(data, probe.name, {**VEC, "batch_size": 8, "lr": 0.05})
        steps = {"n": 0}
        original = engine.optimizer.step

        def counting_step(*a, **k):
            steps["n"] += 1
            return original(*a, **k)

        engine.optimizer.step = counting_step
        orders, metrics = [], []
        for epoch in range(3):
            metrics.append(engine.train_epoch())
            records = [s for s in engine.method.steps if s["epoch"] == epoch]
            assert [s["n"] for s in records] == [8, 8, 8, 8, 5]
            order = [i for s in records for i in s["ids"]]
            assert sorted(order) == list(range(37))  # every sample exactly once
            orders.append(order)
            # train/loss is the sample-weighted mean of the step losses (a 5-sample batch counts 5)
            weighted = sum(s["loss"] * s["n"] for s in records) / 37
            assert metrics[-1]["train/loss"] == pytest.approx(weighted, rel=1e-6)
        assert steps["n"] == 15  # 5 optimiser steps per epoch, the partial batch included
        assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
        assert orders[0] != list(range(37))  # shuffled


def test_a_single_sample_trailing_batch_is_the_only_thing_skipped():
    data = vector_data(33, id_of="a")  # 33 = 4·8 + 1: BatchNorm cannot train on 1 sample
    with probe_registered() as probe:
        engine = Engine(data, probe.name, {**VEC, "batch_size": 8, "lr": 0.05})
        seen = set()
        for epoch in range(4):
            engine.train_epoch()
            records = [s for s in engine.method.steps if s["epoch"] == epoch]
            assert [s["n"] for s in records] == [8, 8, 8, 8]
            ids = [i for s in records for i in s["ids"]]
            assert len(set(ids)) == 32
            seen |= set(ids)
        # the skipped sample is a different one each epoch (it is the permutation's last)
        assert seen == set(range(33))


# --------------------------------------------------------------------------- gradient clipping order


def _one_step_grads(data, method, cfg):
    engine = Engine(data, method, cfg)
    with capture_step_grads(engine) as seen:
        engine.train_epoch()
    assert len(seen) == 1
    return seen[0]


def _global_norm(grads):
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads.values())))


@pytest.mark.parametrize(
    "method,knobs,off",
    [
        # ARL's release clips at 40: encoder gradients × (1 + a), a in (0, 1)
        ("arl", {"gamma": 2.0, "T": 4.0}, {"modulate": False}),
        # OGM (CVPR form): the dominant encoder × k ≈ 0.3; start=1 puts epoch 0 outside the window
        ("ogm", {"form": "cvpr", "alpha": 0.8, "ge": False}, {"start": 1}),
    ],
)
def test_grad_clip_acts_on_the_gradient_after_the_method_changed_it(method, knobs, off):
    # one batch = the whole training split, so one epoch is one optimiser step
    data = vector_data(32, dims={"a": 6, "b": 6}, informative=("a",))
    cfg = {**VEC, "batch_size": 32, "lr": 0.1, **knobs}
    unmodulated = _one_step_grads(data, method, {**cfg, **off})  # same loss, gradient untouched
    modulated = _one_step_grads(data, method, cfg)  # the method's gradient, unclipped
    norm_raw, norm_mod = _global_norm(unmodulated), _global_norm(modulated)
    # the method changed the norm, so clipping before it would give another gradient
    assert abs(norm_mod / norm_raw - 1) > 0.05, (norm_mod, norm_raw)
    clip = 0.5 * min(norm_mod, norm_raw)
    clipped = _one_step_grads(data, method, {**cfg, "grad_clip": clip})
    for name, g in modulated.items():  # independent: clip the method's gradient by hand
        torch.testing.assert_close(clipped[name], g * (clip / norm_mod), rtol=1e-4, atol=1e-8)
    assert _global_norm(clipped) == pytest.approx(clip, rel=1e-4)


# --------------------------------------------------------------------------- per-modality metrics


def test_evaluate_files_each_modality_metric_under_its_own_name():
    # 'zeta' (first in model order) is pure noise, 'alpha' carries the label: a swap or a
    # sorted-vs-model-order mix-up puts alpha's high accuracy under zeta's name
    data = vector_data(96, n_val=30, n_test=30, dims={"zeta": 6, "alpha": 6}, informative=("alpha",))
    engine = Engine(data, "baseline", {**VEC, "batch_size": 16, "lr": 0.1, "momentum": 0.9})
    for _ in range(6):
        engine.train_epoch()
    m = engine.evaluate("val", batch_size=8)  # 30 = 3·8 + 6: a partial evaluation batch

    model = copy.deepcopy(engine.model).eval()
    x, y = data.val.inputs, data.val.labels
    with torch.no_grad():
        feats = model.encode(x).features
        fused = model.head(feats)
        uni = {}
        for mod in ("zeta", "alpha"):
            only = {j: (z if j == mod else torch.zeros_like(z)) for j, z in feats.items()}
            uni[mod] = model.head(only)
    acc = {mod: float((uni[mod].argmax(1) == y).float().mean()) for mod in uni}
    rho = discrepancy_ratios({mod: true_class_scores(lg, y) for mod, lg in uni.items()})
    assert acc["alpha"] > acc["zeta"] + 0.3  # the informative modality is clearly better
    assert m["acc_alpha"] == pytest.approx(acc["alpha"]) and m["acc_zeta"] == pytest.approx(acc["zeta"])
    assert m["rho_alpha"] == pytest.approx(rho["alpha"], rel=1e-5) and m["rho_zeta"] == pytest.approx(rho["zeta"], rel=1e-5)
    assert m["rho_alpha"] > 1 > m["rho_zeta"]
    assert m["acc"] == pytest.approx(float((fused.argmax(1) == y).float().mean()))
    assert m["loss"] == pytest.approx(float(F.cross_entropy(fused, y)), rel=1e-5)
