"""Fault tolerance with real Ray on loopback: crashed workers, a killed driver, a lost node.

Trials are deterministic per configuration on CPU, so "recovered" is checked as "the same
metrics as a run that never failed", trial by trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray import tune

from tunebal.checkpoint import CHECKPOINT_FILENAME
from tunebal.tune.runner import run_search

from tests.fault_driver import options

DRIVER = Path(__file__).with_name("fault_driver.py")
pytestmark = pytest.mark.ray


def _rows(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


ROW_FIELDS = {"trial", "status", "epochs", "best_val_acc", "last_val_acc", "error"}


def _final_by_config(summary: dict) -> dict[str, dict]:
    """Trials keyed by their searched knob values (the summary's trial rows)."""
    return {json.dumps({k: v for k, v in t.items() if k not in ROW_FIELDS}, sort_keys=True): t
            for t in summary["trials"]}


def test_crashes_injected_into_every_trial_all_recover_with_identical_metrics(ray_cluster, tmp_path, tiny_data):
    """Each of 4 trials' worker dies (os._exit) once after epoch 1, i.e. 100 % >= 20 % of the
    trials; every trial restarts from its Arrow checkpoint and ends with the metrics of an
    uninterrupted in-process run of its configuration."""
    from tunebal.engine import Engine

    lrs = [0.01, 0.02, 0.05, 0.1]
    opts = options(str(tmp_path), "crashes", num_samples=1, max_epochs=3, crash_once_at_epoch=1, max_failures=2)
    summary = run_search(opts, space={"lr": tune.grid_search(lrs), "width": 4, "batch_size": 32})
    configs = {t["trial"]: json.loads((tmp_path / "crashes" / t["trial"] / "params.json").read_text())
               for t in summary["trials"]}
    assert sorted(c["lr"] for c in configs.values()) == lrs  # none lost, none duplicated
    assert all(t["status"] == "COMPLETE" and t["epochs"] == 3 for t in summary["trials"])
    assert len(list((tmp_path / "crashes").rglob("INJECTED_CRASH_DONE"))) == len(lrs)
    for trial in summary["trials"]:
        lr = configs[trial["trial"]]["lr"]
        engine = Engine(tiny_data, "baseline", {"lr": lr, "width": 4, "batch_size": 32, "epochs": 3})
        reference = [engine.run_epoch() for _ in range(3)][-1]
        final = _rows(tmp_path / "crashes" / trial["trial"])[-1]
        assert final["epoch"] == 3
        for key in ("val/acc", "val/loss", "train/loss"):
            assert final[key] == reference[key], (lr, key)


def test_driver_killed_mid_search_then_resume_equals_an_uninterrupted_run(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBAL_STATE_KEY_FILE", str(tmp_path / "state.key"))
    env = {**os.environ, "RAY_ADDRESS": "", "TUNEBAL_STATE_KEY_FILE": str(tmp_path / "state.key")}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(DRIVER), "search", str(tmp_path), "killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    exp = tmp_path / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and not list(exp.rglob(CHECKPOINT_FILENAME)):
        time.sleep(0.5)
    assert list(exp.rglob(CHECKPOINT_FILENAME)), "no checkpoint before the deadline"
    time.sleep(1)  # let Tune snapshot its experiment state
    os.killpg(proc.pid, signal.SIGKILL)  # no graceful stop: the driver and its local Ray die at once
    proc.wait(timeout=30)
    killed_at = time.monotonic() - start
    before = [len(p.read_text().splitlines()) for p in exp.glob("*/result.json")]
    assert sum(n == 8 for n in before) < 3, before  # killed mid-search, not after it

    resumed = run_search(options(str(tmp_path), "killed", resume=True, max_epochs=8))
    reference = run_search(options(str(tmp_path), "reference", max_epochs=8))
    got, want = _final_by_config(resumed), _final_by_config(reference)
    assert len(resumed["trials"]) == 3 and set(got) == set(want)  # no trial lost or duplicated
    for key, trial in got.items():
        assert trial["status"] == "COMPLETE" and trial["epochs"] == 8
        assert trial["best_val_acc"] == want[key]["best_val_acc"], key
        rows = _rows(exp / trial["trial"])
        ref_rows = _rows(tmp_path / "reference" / want[key]["trial"])
        assert rows[-1]["val/loss"] == ref_rows[-1]["val/loss"]
    assert resumed["best"]["test"]["test/acc"] == reference["best"]["test"]["test/acc"]
    print(f"driver killed after {killed_at:.1f} s")


def test_a_lost_worker_node_mid_search_the_trials_finish_from_their_checkpoints(tmp_path):
    """A 2-node ray.cluster_utils.Cluster (its own processes): both trials run on worker A;
    A is removed after their first checkpoints and B joins; both finish on B, continuing from
    their checkpoints: epoch 1 is trained once, and the last run of each trial began after a
    restore (Tune's ``iterations_since_restore`` is below the epoch count)."""
    env = {**os.environ, "RAY_ADDRESS": "", "TUNEBAL_STATE_KEY_FILE": str(tmp_path / "state.key")}
    proc = subprocess.run([sys.executable, str(DRIVER), "lose-node", str(tmp_path), "lost"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert "REMOVED_NODE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "STATUSES [('COMPLETE', 8), ('COMPLETE', 8)]" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    for result in (tmp_path / "lost").glob("*/result.json"):
        epochs = [json.loads(line)["epoch"] for line in result.read_text().splitlines()]
        assert epochs[-1] == 8 and epochs.count(1) == 1, epochs
        restored = [json.loads(line).get("iterations_since_restore") for line in result.read_text().splitlines()]
        assert restored[-1] < 8, restored  # the last run of the trial started from a checkpoint
