"""Real searches on a real local Ray cluster (loopback), on tiny synth data."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY
from tunebal.checkpoint import CHECKPOINT_FILENAME, experiment_dataset, load_checkpoint
from tunebal.tune.runner import SearchOptions, run_search

pytestmark = pytest.mark.ray
FAST = {"width": "4", "batch_size": "32"}


def _opts(tmp_path, name, **kw):
    base = dict(
        method="baseline", dataset="synth", num_samples=4, max_epochs=4, storage=str(tmp_path), name=name,
        data_values=dict(TINY), overrides=dict(FAST), verbose=0, cpus_per_trial=1.0,
    )
    base.update(kw)
    return SearchOptions(**base)


def _event_files(root: Path):
    return sorted(root.rglob("events.out.tfevents.*"))


def test_asha_optuna_search_end_to_end(ray_cluster, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = _opts(tmp_path, "asha", num_samples=6, max_concurrent=1)
    from ray import tune

    space = {"lr": tune.choice([1e-5, 0.05]), "width": 4, "batch_size": 32}
    summary = run_search(opts, space=space)
    trials = summary["trials"]
    assert len(trials) == 6
    statuses = {t["status"] for t in trials}
    assert "STOPPED" in statuses, trials  # ASHA stopped at least one trial early
    assert "ERROR" not in statuses
    for t in trials:
        assert 1 <= t["epochs"] <= 4
        assert (t["status"] == "STOPPED") == (t["epochs"] < 4)

    # the best trial is chosen on validation and its best checkpoint evaluated once on test
    best = summary["best"]
    assert best["val"]["val/acc"] == max(t["best_val_acc"] for t in trials)
    assert 0.0 <= best["test"]["test/acc"] <= 1.0 and "test/acc_audio" in best["test"]
    state, meta = load_checkpoint(Path(best["checkpoint"]) / CHECKPOINT_FILENAME)
    assert meta["metrics"]["val/acc"] == best["val"]["val/acc"]
    assert meta["epoch"] == best["test"]["epoch"]

    exp = Path(summary["experiment"])
    assert exp == tmp_path / "asha"
    on_disk = json.loads((exp / "summary.json").read_text())
    assert on_disk["best"]["trial"] == best["trial"]
    assert (exp / "trials.csv").read_text().count("\n") == 7

    # all trials' Arrow checkpoints read as one pyarrow dataset
    ds = experiment_dataset(exp)
    table = ds.to_table(columns=["name", "__filename"])
    files = sorted(set(table.column("__filename").to_pylist()))
    trial_dirs = {Path(f).parent.parent for f in files}
    assert len(trial_dirs) == 6  # every trial's checkpoints are in the one dataset
    one = files[0]
    assert table.filter(pc.equal(table["__filename"], one)).num_rows == len(
        pa.ipc.open_file(one).read_all()
    )

    # TensorBoard: per-trial scalars incl. per-modality curves, and the HParams plugin
    events = _event_files(exp)
    assert len({e.parent for e in events}) == 6
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("val/acc", "val/acc_audio", "val/acc_visual", "val/rho_audio", "val/macro_f1", "val/map", "train/loss"):
        assert f"ray/tune/{tag}" in tags
    assert acc.PluginTagToContent("hparams"), "no HParams summary in the trial's event file"
    hparams_files = [e for e in events if b"_hparams_/experiment" in e.read_bytes()]
    assert len(hparams_files) == 6


def test_crashed_trial_restarts_from_checkpoint_with_identical_metrics(ray_cluster, tmp_path, tiny_data):
    from tunebal.engine import Engine

    opts = _opts(tmp_path, "crash", num_samples=1, max_epochs=3, scheduler="fifo", crash_once_at_epoch=1)
    summary = run_search(opts, space={"lr": 0.05, "width": 4, "batch_size": 32})
    (trial,) = summary["trials"]
    assert trial["status"] == "COMPLETE" and trial["epochs"] == 3
    crash_marker = list(tmp_path.rglob("INJECTED_CRASH_DONE"))
    assert crash_marker, "the worker never crashed"

    engine = Engine(tiny_data, "baseline", {"lr": 0.05, "width": 4, "batch_size": 32, "epochs": 3})
    history = [engine.run_epoch() for _ in range(3)]
    trial_dir = next(p for p in (tmp_path / "crash").iterdir() if p.is_dir())
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    final = rows[-1]
    assert final["epoch"] == 3
    for key in ("val/acc", "val/loss", "train/loss", "val/acc_visual"):
        assert final[key] == history[-1][key], key


def test_nan_trial_ends_once_with_reason_others_finish(ray_cluster, tmp_path):
    """A diverged trial ends once (no FailureConfig retries, no traceback), is reported as
    DIVERGED with the reason, and is never the best trial."""
    from ray import tune

    opts = _opts(tmp_path, "nan", num_samples=1, max_epochs=3, scheduler="fifo", search="random", max_failures=2)
    space = {"lr": tune.grid_search([0.05, 10.0]), "weight_decay": 1.0, "batch_size": 8, "width": 4}
    summary = run_search(opts, space=space)
    by_status = {t["status"]: t for t in summary["trials"]}
    assert set(by_status) == {"DIVERGED", "COMPLETE"}
    assert "loss became" in by_status["DIVERGED"]["error"]
    assert summary["best"] is not None and summary["best"]["config"]["lr"] == 0.05
    diverged_dir = tmp_path / "nan" / by_status["DIVERGED"]["trial"]
    assert not list(diverged_dir.glob("error*")), "the diverged trial was treated as a crash"
    # trained once: one final 'nonfinite_loss' result and no restart (which would repeat it)
    rows = [json.loads(line) for line in (diverged_dir / "result.json").read_text().splitlines()]
    assert [r.get("nonfinite_loss") for r in rows] == [None] * (len(rows) - 1) + [1], rows
    assert rows[-1]["val/acc"] == float("-inf") and "loss became" in rows[-1]["epoch_failed"]
    iterations = [r["training_iteration"] for r in rows]
    assert iterations == list(range(1, len(rows) + 1)), iterations


def test_resume_an_interrupted_experiment(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBAL_STATE_KEY_FILE", str(tmp_path / "state.key"))
    name = "interrupted"
    cmd = [
        sys.executable, "-m", "tunebal", "search", "baseline", "--dataset", "synth", "--num-samples", "2",
        "--max-epochs", "6", "--scheduler", "fifo", "--storage", str(tmp_path), "--name", name,
        "--set", "width=4", "--set", "batch_size=32", "--set", "lr=0.05",
        *[a for k, v in TINY.items() for a in ("--data", f"{k}={v}")],
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    exp = tmp_path / name
    deadline = time.time() + 240
    while time.time() < deadline and not list(exp.rglob(CHECKPOINT_FILENAME)):
        time.sleep(1)
    assert list(exp.rglob(CHECKPOINT_FILENAME)), "no checkpoint before the deadline"
    # SIGTERM (what a scheduler or `kill` sends) is handled like Ctrl+C: Tune's graceful stop
    # saves the experiment state (tunebal/signals.py reinstalls the handler after ray.init)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("SIGTERM did not end the search")
    assert proc.returncode == 130, proc.returncode
    assert f"tunebal: interrupted; continue with --resume --name {name}" in proc.stderr.read().decode()
    before = {p.parent.name: len(p.read_text().splitlines()) for p in exp.glob("*/result.json")}
    assert before and min(before.values()) < 6, before

    # only where and what: the data, budget and scheduler come from the experiment's stored
    # options (a resume with the defaults would score the best checkpoint on another test split)
    opts = SearchOptions(method="baseline", storage=str(tmp_path), name=name, resume=True, verbose=0,
                         explicit=frozenset({"method", "storage", "name", "resume"}))
    summary = run_search(opts)
    assert (opts.max_epochs, opts.scheduler) == (6, "fifo")
    assert {k: opts.data_values[k] for k in TINY} == TINY
    assert len(summary["trials"]) == 2
    assert all(t["status"] == "COMPLETE" and t["epochs"] == 6 for t in summary["trials"])
    for p in exp.glob("*/result.json"):
        epochs = [json.loads(line)["epoch"] for line in p.read_text().splitlines()]
        # continued from a checkpoint, never restarted from epoch 1; Tune may replay the epochs
        # after its last snapshotted checkpoint (at-least-once results), so repeats can occur
        assert epochs.count(1) == 1 and epochs[-1] == 6, epochs


@pytest.mark.parametrize("method", ["ogm", "opm", "opm_ogm", "arl", "amss", "amss_plus", "aim"])
def test_every_method_searches_end_to_end_with_its_space(ray_cluster, tmp_path, method):
    """ASHA + Optuna over the method's shipped YAML space (tiny budget)."""
    opts = _opts(tmp_path, method, method=method, num_samples=2, max_epochs=2)
    if method == "aim":
        opts.overrides["proto_steps"] = "2"
    summary = run_search(opts)
    assert len(summary["trials"]) == 2
    assert all(t["status"] in ("COMPLETE", "STOPPED") for t in summary["trials"]), summary["trials"]
    assert summary["best"] is not None and 0.0 <= summary["best"]["test"]["test/acc"] <= 1.0
    searched = [k for k in summary["trials"][0] if k not in ("trial", "status", "epochs", "best_val_acc", "last_val_acc", "error")]
    assert searched, "the method's space searched nothing"


def test_optuna_study_is_a_journal_file_in_the_experiment(ray_cluster, tmp_path):
    """optuna-dashboard and Optuna's analysis read the study; ASHA-stopped trials carry their stopping epoch."""
    import optuna

    from tunebal.tune.runner import STUDY_FILE, study_storage

    opts = _opts(tmp_path, "study", num_samples=4, max_epochs=3)
    summary = run_search(opts)
    exp = Path(summary["experiment"])
    assert (exp / STUDY_FILE).is_file()
    study = optuna.load_study(study_name="study", storage=study_storage(exp))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4
    by_state = {t.state.name for t in trials}
    assert by_state <= {"COMPLETE", "PRUNED"}
    rows = {r["status"]: r for r in summary["trials"]}
    for t in trials:
        if t.state.name == "PRUNED":  # ASHA stopped it: the epoch is recorded, no final value is claimed
            assert 1 <= t.user_attrs["stopped_at_epoch"] < 3 and t.value is None
            assert max(t.intermediate_values, default=0) <= t.user_attrs["stopped_at_epoch"]
        else:  # ran the full budget: per-epoch values, then the final one as the trial's value
            assert t.value is not None and set(t.intermediate_values) <= {1, 2, 3}
    assert sum(t.state.name == "PRUNED" for t in trials) == sum(r["status"] == "STOPPED" for r in summary["trials"])
    assert rows
