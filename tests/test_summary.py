"""The search summary's test block is the selected checkpoint evaluated on the test split.

One real search on the session's local Ray cluster (2 trials × 2 epochs, tiny synth), then an
independent load + evaluate of the checkpoint the summary selected.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from tunebal.checkpoint import CHECKPOINT_FILENAME, read_checkpoint_meta
from tunebal.engine import Engine
from tunebal.tune.runner import SearchOptions, run_search

pytestmark = pytest.mark.ray


def test_summary_test_block_is_the_selected_checkpoint_on_test(ray_cluster, tmp_path, tiny_data):
    from ray import tune

    opts = SearchOptions(
        method="baseline", dataset="synth", num_samples=1, max_epochs=2, storage=str(tmp_path), name="pin",
        data_values=dict(TINY), scheduler="fifo", search="random", verbose=0, cpus_per_trial=1.0,
    )
    space = {"lr": tune.grid_search([0.05, 0.002]), "width": 4, "batch_size": 32}
    summary = run_search(opts, space=space)
    assert len(summary["trials"]) == 2
    best = summary["best"]
    path = Path(best["checkpoint"]) / CHECKPOINT_FILENAME
    meta = read_checkpoint_meta(path)

    # selection on validation: the selected checkpoint holds the best val/acc of any trial
    assert best["val"]["val/acc"] == max(t["best_val_acc"] for t in summary["trials"])
    assert meta["metrics"]["val/acc"] == best["val"]["val/acc"]

    engine = Engine(tiny_data, "baseline", {k: v for k, v in best["config"].items() if not k.startswith("data.")})
    engine.load(str(path))
    test = engine.evaluate("test")
    val = engine.evaluate("val")
    assert best["test"]["epoch"] == meta["epoch"] == engine.epoch
    got = {k[len("test/"):]: v for k, v in best["test"].items() if k.startswith("test/")}
    assert set(got) == set(test)
    for key, value in test.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # the validation metrics of the selected epoch are reproduced by the same checkpoint ...
    assert best["val"]["val/loss"] == pytest.approx(val["loss"], rel=1e-6)
    # ... and the test block is not them: the two splits give different numbers
    assert got["loss"] != pytest.approx(val["loss"], rel=1e-4)
    assert not torch.equal(tiny_data.test.labels, tiny_data.val.labels[: len(tiny_data.test)])
