"""Every bad input of docs/bad-inputs.md: one line on stderr, exit 2, in seconds, nothing lost.

The CLI cases run in-process through ``tunebal.cli.main`` with Ray forbidden (a search that
got past the checks would fail the test instead of starting a cluster); a few run as
subprocesses. ``test_docs_table_matches_the_tests`` keeps the documented table and these
tests in step: every row's id is a case here and every case is a row.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import TINY
from tunebal.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = [a for k, v in TINY.items() for a in ("--data", f"{k}={v}")]
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def no_ray(monkeypatch):
    """A search that gets past the checks would start Ray: make that a test failure."""
    import tunebal.tune.runner as runner

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started: the bad input was not caught before Ray")

    monkeypatch.setattr(runner, "init_ray", forbidden)
    # as in a fresh `tunebal` process, even when this test session runs a Ray cluster
    monkeypatch.setattr(runner, "_ray_initialized", lambda: False)


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "keys" / "state.key"
    monkeypatch.setenv("TUNEBAL_STATE_KEY_FILE", str(path))
    return path


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("tunebal: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- the CLI table
# (id, argv builder(tmp_path) -> list, expected text in the one line). ``S`` is the storage.


def _file(tmp: Path) -> Path:
    f = tmp / "a_file"
    f.write_text("x")
    return f


def _space(tmp: Path, content: bytes) -> str:
    f = tmp / "space.yaml"
    f.write_bytes(content)
    return str(f)


def _existing_experiment(tmp: Path) -> Path:
    exp = tmp / "S" / "taken"
    exp.mkdir(parents=True)
    (exp / "summary.json").write_text("{}")
    return exp


def _search(*extra: str):
    return lambda tmp: ["search", "baseline", "--storage", str(tmp / "S"), *DATA, *extra]


SEARCH_CASES = [
    ("reduction-factor-1", _search("--reduction-factor", "1"), "--reduction-factor must be > 1, got 1"),
    ("reduction-factor-below-1", _search("--reduction-factor", "0.5"), "--reduction-factor must be > 1, got 0.5"),
    ("seed-negative", _search("--seed", "-1"), "--seed must be in [0, 4294967295], got -1"),
    ("seed-beyond-64-bits", _search("--seed", str(2**64)), f"--seed must be in [0, 4294967295], got {2**64}"),
    ("set-seed-beyond-range", _search("--set", f"seed={2**64}"), "--set knob 'seed' must be <= 2147483647"),
    ("max-failures-negative", _search("--max-failures", "-1"), "--max-failures must be >= 0, got -1"),
    (
        "storage-unwritable",
        lambda tmp: ["search", "baseline", "--storage", "/proc/tunebal-x", *DATA],
        "--storage /proc/tunebal-x is not a writable directory",
    ),
    (
        "storage-under-a-file",
        lambda tmp: ["search", "baseline", "--storage", str(_file(tmp) / "x"), *DATA],
        "is a file, not a directory",
    ),
    ("resume-without-name", _search("--resume"), "--resume needs --name of the experiment to resume"),
    ("resume-unknown-name", _search("--resume", "--name", "nosuch"), "no experiment to resume at"),
    ("name-empty", _search("--name", ""), "--name '' must be a single directory name"),
    ("name-dotdot", _search("--name", ".."), "--name '..' must be a single directory name"),
    ("name-traversal", _search("--name", "../../x"), "--name '../../x' must be a single directory name"),
    ("name-absolute", _search("--name", "/tmp/x"), "--name '/tmp/x' must be a single directory name"),
    (
        "name-reused-without-resume",
        lambda tmp: (_existing_experiment(tmp), _search("--name", "taken")(tmp))[1],
        "experiment 'taken' already exists at",
    ),
    ("cpus-per-trial-too-many", _search("--cpus-per-trial", "4096"), "--cpus-per-trial 4096 is more than the"),
    ("address-unreachable", _search("--address", "127.0.0.1:1"), "cannot reach a Ray cluster at 127.0.0.1:1"),
    ("address-malformed", _search("--address", "nonsense"), "--address 'nonsense' must be HOST:PORT"),
    ("data-without-equals", _search("--data", "n_train"), "--data expects knob=value, got 'n_train'"),
    ("set-without-equals", _search("--set", "lr"), "--set expects knob=value, got 'lr'"),
    (
        "space-not-utf8",
        lambda tmp: _search("--space", _space(tmp, b"method: baseline\nspace:\n  lr: \xff\xfe\n"))(tmp),
        "not UTF-8 text",
    ),
    ("space-empty-file", lambda tmp: _search("--space", _space(tmp, b""))(tmp), "the space is empty"),
    (
        "space-no-knobs",
        lambda tmp: _search("--space", _space(tmp, b"method: baseline\nspace:\n"))(tmp),
        "the space is empty",
    ),
    (
        "space-duplicate-key",
        lambda tmp: _search(
            "--space", _space(tmp, b"method: baseline\nspace:\n  lr: 0.1\n  lr: {uniform: [0.01, 0.1]}\n")
        )(tmp),
        "duplicate key 'lr'",
    ),
    ("data-too-large-for-memory", _search("--data", "n_train=400000"), "needs about"),
]
if not HAS_CUDA:
    SEARCH_CASES.append(("gpus-per-trial-without-gpu", _search("--gpus-per-trial", "1"), "but this machine has no GPU"))


def _train(*extra: str):
    return lambda tmp: ["train", "baseline", "--no-progress", *DATA, "--set", "epochs=1", "--set", "width=4", *extra]


def _run_dir(tmp: Path) -> str:
    out = tmp / "run"
    out.mkdir()
    (out / "result.json").write_text("{}")
    (out / "best.arrow").write_bytes(b"previous run")
    return str(out)


TRAIN_CASES = [
    ("train-out-is-a-file", lambda tmp: _train("--out", str(_file(tmp)))(tmp), "is a file, not a directory"),
    ("train-out-under-a-file", lambda tmp: _train("--out", str(_file(tmp) / "x"))(tmp), "is a file, not a directory"),
    ("train-out-holds-a-run", lambda tmp: _train("--out", _run_dir(tmp))(tmp), "already holds a training run"),
    ("train-device-bogus", _train("--device", "bogus"), "--device 'bogus' is not a device"),
    ("train-device-unsupported", _train("--device", "mps"), "--device 'mps' is not supported"),
    ("train-data-without-equals", _train("--data", "n_train"), "--data expects knob=value"),
]
if not HAS_CUDA:
    TRAIN_CASES.append(("train-device-cuda-without-cuda", _train("--device", "cuda"), "CUDA is not available"))


@pytest.mark.parametrize("case_id, argv, message", SEARCH_CASES + TRAIN_CASES, ids=[c[0] for c in SEARCH_CASES + TRAIN_CASES])
def test_bad_cli_input_is_one_line_before_ray(case_id, argv, message, tmp_path, capsys, no_ray, monkeypatch, key_file):
    from tunebal.data import synth

    monkeypatch.setattr(synth, "available_memory", lambda: 8 << 30)  # the same answer on any machine
    if case_id == "data-too-large-for-memory":  # a regression must not really allocate 64 GiB
        monkeypatch.setattr(synth, "generate", lambda v: pytest.fail("generated despite the estimate"))
    args = argv(tmp_path)
    code = main(args)
    _, err = capsys.readouterr()
    line = one_error_line(code, err)
    assert message in line, line
    if case_id == "train-out-holds-a-run":  # nothing of the earlier run was touched
        assert (tmp_path / "run" / "best.arrow").read_bytes() == b"previous run"
    if case_id == "name-reused-without-resume":
        assert (tmp_path / "S" / "taken" / "summary.json").read_text() == "{}"


def test_data_too_large_is_refused_before_allocating(monkeypatch):
    """The estimate is checked against the available memory; a small dataset passes."""
    from tunebal.data import synth
    from tunebal.errors import ConfigError

    values = synth.SYNTH_KNOBS.resolve({"n_train": 400_000})
    final, peak = synth.memory_estimate(values)
    # hand count of the finished arrays: audio 1x129x63 float32, visual 1x3x32x32 float32, int64 label
    assert final == (400_000 + 800 + 1600) * (129 * 63 * 4 + 3 * 32 * 32 * 4 + 8)
    assert peak > final
    monkeypatch.setattr(synth, "available_memory", lambda: peak - 1)
    monkeypatch.setattr(synth, "generate", lambda v: pytest.fail("generated despite the estimate"))
    with pytest.raises(ConfigError, match="needs about"):
        synth.build_synth(use_cache=False, **values)
    monkeypatch.setattr(synth, "available_memory", lambda: peak)
    with pytest.raises(pytest.fail.Exception):
        synth.build_synth(use_cache=False, **values)  # now allowed: reaches generate


@pytest.mark.ray
def test_trial_larger_than_the_connected_cluster_is_refused(ray_cluster, tmp_path):
    """cpus-per-trial-too-many against a running cluster (2 CPUs): refused right after
    connecting, before any trial is queued (Tune would wait for it forever)."""
    from tunebal.errors import ConfigError
    from tunebal.tune.runner import SearchOptions, run_search

    opts = SearchOptions(
        method="baseline", storage=str(tmp_path), name="big", data_values=dict(TINY), cpus_per_trial=3, verbose=0
    )
    with pytest.raises(ConfigError, match="--cpus-per-trial 3 is more than the 2 CPUs of the Ray cluster"):
        run_search(opts)
    assert not (tmp_path / "big").exists()


# --------------------------------------------------------------------------- resume safety


def _planted_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    return pickle.dumps(Evil())


def _experiment(tmp: Path, name: str = "exp") -> Path:
    exp = tmp / "S" / name
    exp.mkdir(parents=True)
    return exp


def _resume(tmp: Path, name: str = "exp"):
    return ["search", "baseline", "--storage", str(tmp / "S"), "--resume", "--name", name, *DATA]


def test_planted_tuner_pkl_is_refused_on_resume_and_never_unpickled(tmp_path, capsys, no_ray, key_file):
    marker = tmp_path / "MARKER"
    exp = _experiment(tmp_path)
    (exp / "tuner.pkl").write_bytes(_planted_pickle(marker))
    pickle.loads(_planted_pickle(tmp_path / "PROBE"))  # the payload is live: unpickling runs it
    assert (tmp_path / "PROBE").exists()
    from tunebal.tune import state_guard

    state_guard.load_key(create=True)
    code = main(_resume(tmp_path))
    line = one_error_line(code, capsys.readouterr()[1])
    assert "has no tunebal_state.json" in line and "refusing to resume" in line
    assert not marker.exists()


def _legit_experiment(tmp: Path) -> tuple[Path, bytes]:
    """An experiment directory as a search leaves it, with a valid manifest."""
    from tunebal.tune import state_guard

    key = state_guard.load_key(create=True)
    exp = _experiment(tmp)
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"fine": 1}))
    (exp / "experiment_state-1.json").write_text("{}")
    (exp / "trial_0").mkdir()
    (exp / "trial_0" / "params.pkl").write_bytes(pickle.dumps({"lr": 0.1}))
    files = {rel: state_guard._mac(key, (exp / rel).read_bytes()) for rel in state_guard.guarded(exp)}
    assert set(files) == {"tuner.pkl", "experiment_state-1.json", "trial_0/params.pkl"}
    state_guard.write_manifest(exp, files, key)
    return exp, key


@pytest.mark.parametrize("attack", ["extra-pkl", "modified-pkl", "replaced-tuner", "forged-manifest", "no-key"])
def test_tampered_experiment_state_is_refused_on_resume(attack, tmp_path, capsys, no_ray, key_file):
    from tunebal.tune import state_guard

    exp, key = _legit_experiment(tmp_path)
    state_guard.verify(exp)  # the untouched experiment passes
    marker = tmp_path / "MARKER"
    if attack == "extra-pkl":
        (exp / "searcher-state-2.pkl").write_bytes(_planted_pickle(marker))
        expected = "searcher-state-2.pkl is not in tunebal_state.json"
    elif attack == "modified-pkl":
        (exp / "trial_0" / "params.pkl").write_bytes(_planted_pickle(marker))
        expected = "params.pkl was modified after tunebal wrote it"
    elif attack == "replaced-tuner":
        (exp / "tuner.pkl").write_bytes(_planted_pickle(marker))
        expected = "tuner.pkl was modified after tunebal wrote it"
    elif attack == "forged-manifest":  # the attacker rewrites the manifest with their own key
        (exp / "tuner.pkl").write_bytes(_planted_pickle(marker))
        files = json.loads((exp / "tunebal_state.json").read_text())["files"]
        files["tuner.pkl"] = state_guard._mac(b"k" * 32, (exp / "tuner.pkl").read_bytes())
        state_guard.write_manifest(exp, files, b"k" * 32)
        expected = "was not written with this user's tunebal state key"
    else:
        key_file.unlink()
        expected = "no tunebal state key at"
    code = main(_resume(tmp_path))
    line = one_error_line(code, capsys.readouterr()[1])
    assert expected in line, line
    assert not marker.exists()


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path, tiny_data):
    from tunebal.engine import Engine

    engine = Engine(tiny_data, "baseline", {"width": 4, "epochs": 1})
    path = tmp_path / "best.arrow"
    engine.save(str(path), {"val/acc": 0.5})
    return path


def _evaluate(path, capsys, *extra):
    code = main(["evaluate", str(path), *extra])
    return code, capsys.readouterr()[1]


def test_checkpoint_bad_inputs_are_one_line(checkpoint, tmp_path, capsys):
    from tunebal.checkpoint import load_checkpoint, save_checkpoint

    code, err = _evaluate(checkpoint, capsys)
    assert code == 0, err  # the untouched checkpoint evaluates

    raw = checkpoint.read_bytes()
    cases = {}
    # checkpoint-edited-meta: the footer edit ("tensor":1 -> "tensor":2) and an edited method
    edited = tmp_path / "edited.arrow"
    assert raw.count(b'{"tensor":1}') == 2
    edited.write_bytes(raw.replace(b'{"tensor":1}', b'{"tensor":2}'))
    cases["checkpoint-edited-tensor-index"] = (edited, "file digest mismatch")
    method = tmp_path / "method.arrow"
    assert raw.count(b'"method":"baseline"') == 2
    method.write_bytes(raw.replace(b'"method":"baseline"', b'"method":"opm_ogm "'))  # same length
    cases["checkpoint-edited-method"] = (method, "file digest mismatch")
    # checkpoint-config-mismatch: a validly sealed file whose config (width) does not match its tensors
    state, meta = load_checkpoint(checkpoint)
    meta["config"]["width"] = 8
    mismatch = tmp_path / "mismatch.arrow"
    save_checkpoint(mismatch, state, meta)
    cases["checkpoint-config-mismatch"] = (mismatch, "does not fit the model and method its config describes")
    truncated = tmp_path / "truncated.arrow"
    truncated.write_bytes(raw[: len(raw) // 2])
    cases["checkpoint-truncated"] = (truncated, "truncated.arrow")
    cases["checkpoint-missing"] = (tmp_path / "nope.arrow", "checkpoint not found")
    notarrow = tmp_path / "notes.arrow"
    notarrow.write_text("hello\n" * 50)
    cases["checkpoint-not-arrow"] = (notarrow, "not a readable Arrow IPC file")
    for case_id, (path, message) in cases.items():
        code, err = _evaluate(path, capsys)
        line = one_error_line(code, err)
        assert message in line and str(path.name) in line, (case_id, line)
    for device, message in (("bogus", "is not a device"), ("mps", "is not supported")):
        line = one_error_line(*_evaluate(checkpoint, capsys, "--device", device))
        assert message in line
    line = one_error_line(*_evaluate(checkpoint, capsys, "--split", "dev"))
    assert "unknown split 'dev'" in line


def test_checkpoint_of_another_method_is_refused(checkpoint, tiny_data):
    """checkpoint-other-method: a valid checkpoint loaded into an engine of another method."""
    from tunebal.engine import Engine
    from tunebal.errors import CheckpointError

    engine = Engine(tiny_data, "ogm", {"width": 4, "epochs": 1})
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="written for method 'baseline', not 'ogm'") as info:
        engine.load(str(checkpoint))
    assert "\n" not in str(info.value)
    after = engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded


def test_checkpoint_bit_flips_in_metadata_never_load(checkpoint, tmp_path, capsys):
    """A real training checkpoint: 250 seeded single-bit flips in the metadata/footer
    region, each one line through `tunebal evaluate` (the library-level test is in
    tests/test_checkpoint.py)."""
    import struct

    raw = checkpoint.read_bytes()
    (footer_len,) = struct.unpack("<i", raw[-10:-6])
    (meta_len,) = struct.unpack("<i", raw[12:16])
    region = list(range(0, 16 + meta_len)) + list(range(len(raw) - 10 - footer_len, len(raw)))
    rng = random.Random(7)
    from tunebal.checkpoint import load_checkpoint
    from tunebal.errors import CheckpointError

    bad = tmp_path / "flipped.arrow"
    for pos in rng.sample(region, 250):
        data = bytearray(raw)
        data[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_checkpoint(bad)
    for pos in rng.sample(region, 5):  # and end to end through the CLI
        data = bytearray(raw)
        data[pos] ^= 0x10
        bad.write_bytes(bytes(data))
        one_error_line(*_evaluate(bad, capsys))


# --------------------------------------------------------------------------- data files


def test_corrupt_synth_cache_is_regenerated_with_one_warning(tmp_path, monkeypatch, caplog):
    """synth-cache-corrupt: one flipped exponent bit in a cached array is detected by the
    file digest; the cache is regenerated (one warning naming the file) and rewritten."""
    import numpy as np

    from tunebal.data import synth

    monkeypatch.setenv("TUNEBAL_CACHE", str(tmp_path / "cache"))
    values = synth.SYNTH_KNOBS.resolve({"n_train": 16, "n_val": 8, "n_test": 8, "image_size": 16})
    first = synth.build_synth(**values)
    path = synth.cache_path(values)
    raw = bytearray(path.read_bytes())
    needle = first.train.inputs["audio"].numpy()[3].tobytes()[:64]
    pos = raw.find(needle)
    assert pos > 0
    raw[pos + 3] ^= 0x40  # an exponent bit of a float32
    path.write_bytes(bytes(raw))
    from tunebal.data.arrays import read_array_file
    from tunebal.errors import DataError

    with pytest.raises(DataError, match="file digest mismatch"):
        read_array_file(path)
    with caplog.at_level("WARNING"):
        again = synth.build_synth(**values)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "regenerating" in warnings[0], warnings
    assert "\n" not in warnings[0]
    for split in ("train", "val", "test"):
        for m in ("audio", "visual"):
            assert torch.equal(getattr(first, split).inputs[m], getattr(again, split).inputs[m])
    read_array_file(path)  # rewritten: verifies again
    np.testing.assert_array_equal(read_array_file(path)[0]["train/labels"], first.train.labels.numpy())


def test_array_file_round_trip_and_every_flip_rejected(tmp_path):
    import numpy as np

    from tunebal.data.arrays import read_array_file, write_array_file
    from tunebal.errors import DataError

    arrays = {
        "a/x": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "a/y": np.array([3, -1], dtype=np.int64),
        "empty": np.zeros((0, 5), dtype=np.float64),
        "strided": np.arange(10, dtype=np.int16)[::2],
    }
    path = tmp_path / "arrays.arrow"
    write_array_file(path, arrays, {"hello": [1, 2]})
    out, meta = read_array_file(path)
    assert meta == {"hello": [1, 2]} and list(out) == list(arrays)
    for name, arr in arrays.items():
        assert out[name].dtype == arr.dtype and np.array_equal(out[name], arr) and out[name].flags.writeable
    raw = path.read_bytes()
    rng = random.Random(3)
    bad = tmp_path / "bad.arrow"
    for pos in rng.sample(range(len(raw)), 200):
        data = bytearray(raw)
        data[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(data))
        with pytest.raises(DataError) as info:
            read_array_file(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)
    with pytest.raises(TypeError):
        write_array_file(tmp_path / "obj.arrow", {"o": np.array([object()])}, {})
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- wrong answers


def _fake_result(path, error, checkpoints):
    return SimpleNamespace(path=str(path), error=error, best_checkpoints=checkpoints, config={}, metrics_dataframe=None)


def test_errored_or_diverged_trial_is_never_the_best(tmp_path):
    """errored-trial-best: a trial that crashed (--max-failures 0) or diverged after a good
    epoch is skipped, even when its val/acc is the highest."""
    from tunebal.tune.report import best_checkpoint
    from tunebal.tune.trainable import NONFINITE_MARKER

    dirs = [tmp_path / n for n in ("crashed", "diverged", "diverged_remote", "ok")]
    for d in dirs:
        d.mkdir()
    (dirs[1] / NONFINITE_MARKER).write_text("training loss became nan at epoch 2")
    crashed = _fake_result(dirs[0], RuntimeError("worker died"), [("c0", {"val/acc": 0.9})])
    diverged = _fake_result(dirs[1], None, [("c1", {"val/acc": 0.8})])
    # on another node the marker file may not reach storage; the last result says it
    remote = _fake_result(dirs[2], None, [("c4", {"val/acc": 0.85})])
    remote.metrics = {"val/acc": float("-inf"), "nonfinite_loss": 1, "epoch_failed": "loss became inf"}
    ok = _fake_result(dirs[3], None, [("c2", {"val/acc": 0.3}), ("c3", {"val/acc": 0.4})])
    result, ckpt, metrics = best_checkpoint([crashed, diverged, remote, ok])
    assert result is ok and ckpt == "c3" and metrics["val/acc"] == 0.4
    assert best_checkpoint([crashed, diverged, remote]) is None


# --------------------------------------------------------------------------- processes


def _cli(*args: str, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunebal", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})}, **kw,
    )


def test_unreachable_address_fails_fast_as_a_process(tmp_path):
    """address-unreachable as a real process: no Ray retry loop, one line, exit 2."""
    proc = _cli("search", "baseline", "--storage", str(tmp_path), "--address", "127.0.0.1:1", *DATA)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().splitlines() == [
        "tunebal: error: cannot reach a Ray cluster at 127.0.0.1:1 (Connection refused)"
    ], err
    assert not (tmp_path / "baseline").exists() and not any(tmp_path.iterdir())


def test_sigterm_ends_a_training_process(tmp_path):
    """sigterm: SIGTERM during `tunebal train` ends the process (the same handler is
    reinstalled after ray.init for searches)."""
    proc = _cli(
        "train", "baseline", "--no-progress", "--out", str(tmp_path / "run"), "--set", "epochs=200", "--set", "width=4", *DATA,
        env={"TUNEBAL_CACHE": os.environ["TUNEBAL_CACHE"]},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "run" / "last.arrow").exists():
        time.sleep(0.2)
    assert (tmp_path / "run" / "last.arrow").exists(), proc.stderr.read() if proc.poll() is not None else ""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # pragma: no cover - the failure this test exists for
        proc.kill()
        pytest.fail("SIGTERM did not end the process")
    assert proc.returncode == 130, proc.returncode
    assert proc.stderr.read().strip().splitlines()[-1] == "tunebal: interrupted"


def test_default_train_out_is_never_overwritten(tmp_path, capsys, monkeypatch):
    """train-default-out-reused: the default directory holding a run moves on to '-2', said on the console."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["train", "baseline", "--no-progress", "--set", "epochs=1", "--set", "width=4", *DATA]
    assert main(args) == 0
    first = tmp_path / "tunebal_runs" / "baseline-synth"
    before = (first / "result.json").read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    second = tmp_path / "tunebal_runs" / "baseline-synth-2"
    assert (second / "result.json").exists() and (first / "result.json").read_bytes() == before
    assert f"{first} holds an earlier run; writing to {second}" in err
    assert f"tensorboard --logdir {second.resolve()}" in out


# --------------------------------------------------------------------------- docs


OTHER_ROWS = {
    # id in docs/bad-inputs.md -> the test that covers it
    "resume-planted-tuner-pkl": test_planted_tuner_pkl_is_refused_on_resume_and_never_unpickled,
    "resume-extra-pkl": test_tampered_experiment_state_is_refused_on_resume,
    "resume-modified-pkl": test_tampered_experiment_state_is_refused_on_resume,
    "resume-replaced-tuner-pkl": test_tampered_experiment_state_is_refused_on_resume,
    "resume-forged-manifest": test_tampered_experiment_state_is_refused_on_resume,
    "resume-no-key": test_tampered_experiment_state_is_refused_on_resume,
    "checkpoint-edited-tensor-index": test_checkpoint_bad_inputs_are_one_line,
    "checkpoint-edited-method": test_checkpoint_bad_inputs_are_one_line,
    "checkpoint-config-mismatch": test_checkpoint_bad_inputs_are_one_line,
    "checkpoint-truncated": test_checkpoint_bad_inputs_are_one_line,
    "checkpoint-missing": test_checkpoint_bad_inputs_are_one_line,
    "checkpoint-not-arrow": test_checkpoint_bad_inputs_are_one_line,
    "evaluate-device-bogus": test_checkpoint_bad_inputs_are_one_line,
    "evaluate-split-unknown": test_checkpoint_bad_inputs_are_one_line,
    "checkpoint-bit-flips": test_checkpoint_bit_flips_in_metadata_never_load,
    "checkpoint-other-method": test_checkpoint_of_another_method_is_refused,
    "synth-cache-corrupt": test_corrupt_synth_cache_is_regenerated_with_one_warning,
    "array-file-bit-flips": test_array_file_round_trip_and_every_flip_rejected,
    "errored-trial-best": test_errored_or_diverged_trial_is_never_the_best,
    "nan-loss": "tests/test_tune_integration.py::test_nan_trial_ends_once_with_reason_others_finish",
    "sigterm": test_sigterm_ends_a_training_process,
    "train-default-out-reused": test_default_train_out_is_never_overwritten,
}


def test_docs_table_matches_the_tests():
    text = (ROOT / "docs" / "bad-inputs.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M)
    assert len(rows) == len(set(rows)), "duplicate ids in docs/bad-inputs.md"
    cli_ids = [c[0] for c in SEARCH_CASES + TRAIN_CASES]
    cli_ids += ["gpus-per-trial-without-gpu", "train-device-cuda-without-cuda"]  # skipped on a GPU machine
    assert set(rows) == set(cli_ids) | set(OTHER_ROWS), (set(rows) ^ (set(cli_ids) | set(OTHER_ROWS)))
    for case_id, _, message in SEARCH_CASES + TRAIN_CASES:  # the documented line is the tested one
        row = next(line for line in text.splitlines() if line.startswith(f"| `{case_id}` |"))
        assert message.replace("|", "\\|") in row, (case_id, message)
