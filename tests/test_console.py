"""The default search console: one line per trial-epoch with val/acc and per-modality accuracy,
short trial names, and no Ray status tables or second TensorBoard command."""

from __future__ import annotations

import re
from types import SimpleNamespace

from tunebal.tune.console import format_epoch, trial_name
from tunebal.tune.runner import SearchOptions, run_search

TINY = {"n_train": 256, "n_val": 128, "n_test": 128}


def test_one_line_per_epoch_with_every_modality():
    result = {"epoch": 3, "val/acc": 0.64123, "val/acc_visual": 0.3125, "val/acc_audio": 0.58301,
              "val/loss": 1.0, "train/loss": 0.81234, "time_this_iter_s": 1.94}
    assert format_epoch("aim_3f2a1_00002", result, 8) == (
        "aim_3f2a1_00002  epoch  3/8  val/acc 0.6412  acc_audio 0.5830  acc_visual 0.3125  train/loss 0.8123  1.9 s"
    )


def test_trial_names_are_method_and_trial_id():
    assert trial_name("opm")(SimpleNamespace(trial_id="a1b2c_00007")) == "opm_a1b2c_00007"


def test_a_search_prints_epoch_lines_and_uses_short_names(ray_cluster, tmp_path, capsys):
    opts = SearchOptions(method="baseline", num_samples=2, max_epochs=2, scheduler="fifo", storage=str(tmp_path),
                         name="console", data_values=dict(TINY), overrides={"width": "4", "batch_size": "32"},
                         verbose=1)
    summary = run_search(opts)
    out = capsys.readouterr().out
    for trial in summary["trials"]:
        assert re.fullmatch(r"baseline_[0-9a-f]+(_\d+)?", trial["trial"]), trial["trial"]
        lines = [line for line in out.splitlines() if line.startswith(trial["trial"] + "  epoch")]
        assert len(lines) == 2 and all("val/acc " in line and "acc_audio " in line and "acc_visual " in line
                                       for line in lines), out
    assert "Trial status" not in out and "╭" not in out
    assert out.count("tensorboard --logdir") == 1
