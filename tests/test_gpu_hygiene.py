"""A trial trains on the CPU unless Ray reserved a GPU for it, and more than one GPU per trial is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunebal.cli import main
from tunebal.tune.trainable import run_trial, trial_device


def test_trial_device_follows_the_reserved_gpus():
    assert trial_device(0) == "cpu" and trial_device(0.0) == "cpu"
    assert trial_device(0.25) == "cuda" and trial_device(1) == "cuda"


def test_a_zero_gpu_trial_trains_on_cpu_even_where_cuda_is_visible(monkeypatch, tmp_path, _isolated_cache):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES unset for 0-GPU workers: the trial must not pick cuda:0 by itself."""
    import ray.tune as tune

    import tunebal.engine as engine_module

    seen = []

    class Recording(engine_module.Engine):
        def __init__(self, *args, **kwargs):
            kwargs_device = kwargs.get("device")
            seen.append(kwargs_device)
            super().__init__(*args, **{**kwargs, "device": "cpu"})  # this machine has no GPU to run on

    class Context:
        def get_trial_dir(self) -> str:
            return str(tmp_path)

    reports = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine_module, "Engine", Recording)
    monkeypatch.setattr(tune, "get_context", lambda: Context())
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    run_trial({"batch_size": 32, "width": 4}, method="baseline", dataset="synth",
              data_values={"n_train": 64, "n_val": 16, "n_test": 16, "image_size": 16}, max_epochs=1, threads=1,
              device=trial_device(0))
    assert seen == ["cpu"] and len(reports) == 1


def test_more_than_one_gpu_per_trial_is_refused_before_ray(capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    code = main(["search", "baseline", "--gpus-per-trial", "2", "--data", "n_train=64", "--storage", "/tmp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "a trial trains on one device" in err[0]
