"""The `tunebal` command: listings, one-line errors with exit code 2, and a real `train` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY
from tunebal.cli import main


def _run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_and_datasets_list_knobs(capsys):
    code, out, _ = _run(["methods"], capsys)
    assert code == 0 and "baseline" in out and "lr " in out and "fusion" in out
    code, out, _ = _run(["datasets"], capsys)
    assert code == 0 and "synth" in out and "--data NAME=VALUE" in out and "n_train" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "ogx"], "unknown method 'ogx'; valid methods: "),
        (["train", "baseline", "--dataset", "kss"], "unknown dataset 'kss'"),
        (["train", "baseline", "--set", "lrr=0.1"], "unknown knob 'lrr'"),
        (["train", "baseline", "--set", "lr=fast"], "knob 'lr' expects a number"),
        (["train", "baseline", "--set", "lr"], "--set expects knob=value"),
        (["train", "baseline", "--data", "n_trains=5"], "unknown knob 'n_trains'"),
        (["search", "ogx"], "unknown method 'ogx'"),
        (["search", "baseline", "--scheduler", "hyperband"], "unknown scheduler 'hyperband'"),
        (["search", "baseline", "--max-epochs", "0"], "--max-epochs must be >= 1"),
        (["search", "baseline", "--num-samples", "four"], "invalid int value"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    code, out, err = _run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tunebal: error: ") and message in lines[0]


def test_bad_space_file_is_one_line(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("method: baseline\nspace:\n  lr: {uniform: [0.5, 0.1]}\n")
    code, _, err = _run(["search", "baseline", "--space", str(space)], capsys)
    assert code == 2 and "empty or inverted range" in err and len(err.strip().splitlines()) == 1


def test_train_writes_checkpoints_tensorboard_and_evaluates_test(tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = ["train", "baseline", "--out", str(out_dir), "--no-progress", "--set", "epochs=2", "--set", "width=4"]
    args += [a for k, v in TINY.items() for a in ("--data", f"{k}={v}")]
    code, out, _ = _run(args, capsys)
    assert code == 0
    result = json.loads((out_dir / "result.json").read_text())
    assert 0.0 <= result["test/acc"] <= 1.0 and result["best_epoch"] in (1, 2)
    assert (out_dir / "best.arrow").exists() and (out_dir / "last.arrow").exists()
    assert list(out_dir.rglob("events.out.tfevents.*"))
    assert f"tensorboard --logdir {out_dir.resolve()}" in out

    # `tunebal evaluate` rebuilds the dataset from the checkpoint and scores the same test accuracy
    code, out, _ = _run(["evaluate", str(out_dir / "best.arrow")], capsys)
    assert code == 0
    assert json.loads(out)["test/acc"] == result["test/acc"]

    # a truncated checkpoint is one line and exit 2
    broken = tmp_path / "broken.arrow"
    broken.write_bytes((out_dir / "best.arrow").read_bytes()[:5000])
    code, _, err = _run(["evaluate", str(broken)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "broken.arrow" in err


def test_console_script_runs_as_a_process():
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-m", "tunebal", "train", "nope"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "Traceback" not in proc.stderr
