"""Precise BN (tunebal/bn.py): running statistics recomputed as the plain average of batch
statistics, nothing else touched; the engine's ``bn_recalibrate`` knob runs it before validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunebal.bn import recalibrate_batchnorm
from tunebal.data import build_dataset
from tunebal.engine import Engine


def test_running_statistics_are_the_average_of_the_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.3))
    model.eval()
    with torch.no_grad():
        model[1].running_mean.fill_(7.0)  # stale statistics
        model[1].running_var.fill_(0.01)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [torch.randn(8, 5) * (i + 1) + i for i in range(4)]
    used = recalibrate_batchnorm(model, iter(batches), 3, model)  # the 4th batch is not used
    assert used == 3
    with torch.no_grad():  # by hand: the first BN's input is the first Linear's output
        h = [model[0](x) for x in batches[:3]]
        mean = torch.stack([x.mean(0) for x in h]).mean(0)
        var = torch.stack([x.var(0, unbiased=True) for x in h]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 3
    assert not model.training and model[4].momentum == 0.3 and model[1].momentum == 0.1  # restored
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())
    assert recalibrate_batchnorm(model, iter(batches), 0, model) == 0  # off: nothing changes
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)


def test_engine_recalibrates_before_validation(_isolated_cache):
    data = build_dataset("synth", {"n_train": 48, "n_val": 16, "n_test": 16})
    cfg = {"batch_size": 16, "epochs": 1, "lr": 0.05, "seed": 4}
    plain, recal = (Engine(data, "baseline", {**cfg, "bn_recalibrate": n}, device="cpu") for n in (0, 2))
    m_plain, m_recal = plain.run_epoch(), recal.run_epoch()
    assert "bn_recalibrate_batches" not in m_plain and m_recal["bn_recalibrate_batches"] == 2
    # training is untouched; only the running statistics differ
    for (n, a), b in zip(plain.model.named_parameters(), recal.model.parameters()):
        assert torch.equal(a, b), n
    bn = recal.model.encoders["audio"].blocks[0][1]
    with torch.no_grad():  # the average over the first two batches of the next epoch's order
        batches = [x for x, _ in recal.iterate(data.train, shuffle=True)][:2]
        conv = recal.model.encoders["audio"].blocks[0][0]
        means = [conv(recal.model.encoders["audio"].prepare(x["audio"])).mean((0, 2, 3)) for x in batches]
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert not torch.allclose(bn.running_mean, plain.model.encoders["audio"].blocks[0][1].running_mean)
    assert m_recal["val/acc"] == pytest.approx(recal.evaluate("val")["acc"])
