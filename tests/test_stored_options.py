"""An experiment stores its search options; --resume reuses them and refuses conflicting ones."""

from __future__ import annotations

import json

import pytest

from tunebal.cli import explicit_search_options
from tunebal.errors import ConfigError
from tunebal.tune import preflight, stored_options
from tunebal.tune.runner import SearchOptions


def _started(tmp_path, **kw):
    opts = SearchOptions(method="baseline", max_epochs=3, scheduler="fifo", data_values={"n_train": 128},
                         overrides={"lr": "0.05"}, seed=7, storage=str(tmp_path), name="e", **kw)
    stored_options.write(opts, tmp_path / "e")
    return tmp_path / "e"


def test_resume_fills_every_option_not_given(tmp_path):
    exp = _started(tmp_path)
    opts = SearchOptions(method="baseline", storage=str(tmp_path), name="e", resume=True)
    taken = stored_options.apply_on_resume(opts, exp, {"method", "storage", "name", "resume"})
    assert (opts.max_epochs, opts.scheduler, opts.seed) == (3, "fifo", 7)
    assert opts.data_values == {"n_train": 128} and opts.overrides == {"lr": "0.05"}
    assert "data_values" in taken and "method" not in taken


def test_resume_refuses_a_conflicting_option_with_one_line(tmp_path):
    exp = _started(tmp_path)
    opts = SearchOptions(method="baseline", max_epochs=8, storage=str(tmp_path), name="e", resume=True)
    with pytest.raises(ConfigError, match=r"--max-epochs 8 \(stored: 3\)") as info:
        stored_options.apply_on_resume(opts, exp, {"method", "max_epochs"})
    assert "\n" not in str(info.value)
    opts = SearchOptions(method="aim", storage=str(tmp_path), name="e", resume=True)
    with pytest.raises(ConfigError, match=r"METHOD aim \(stored: baseline\)"):
        stored_options.apply_on_resume(opts, exp, {"method"})
    opts = SearchOptions(method="baseline", data_values={"n_train": 256}, resume=True)
    with pytest.raises(ConfigError, match=r"--data n_train=256 \(stored: n_train=128\)"):
        stored_options.apply_on_resume(opts, exp, {"method", "data_values"})


def test_repeating_the_same_options_is_fine(tmp_path):
    exp = _started(tmp_path)
    opts = SearchOptions(method="baseline", max_epochs=3, scheduler="fifo", data_values={"n_train": 128}, resume=True)
    stored_options.apply_on_resume(opts, exp, {"method", "max_epochs", "scheduler", "data_values"})
    assert opts.max_epochs == 3


def test_without_explicit_names_values_off_the_defaults_count_as_given(tmp_path):
    exp = _started(tmp_path)
    opts = SearchOptions(method="baseline", num_samples=3, resume=True)  # programmatic use
    with pytest.raises(ConfigError, match=r"--num-samples 3 \(stored: 8\)"):
        stored_options.apply_on_resume(opts, exp, None)


def test_a_started_experiment_keeps_its_options_and_an_older_one_resumes_as_given(tmp_path):
    exp = _started(tmp_path)
    (exp / "tuner.pkl").write_bytes(b"")
    with pytest.raises(ConfigError, match="already started"):
        stored_options.write(SearchOptions(method="aim"), exp)
    assert json.loads((exp / "search_options.json").read_text())["options"]["method"] == "baseline"
    (exp / "search_options.json").unlink()
    assert stored_options.read(exp) is None  # an older experiment: resumed with the options given
    opts = SearchOptions(method="baseline", max_epochs=5, resume=True)
    assert stored_options.apply_on_resume(opts, exp, {"method", "max_epochs"}) == [] and opts.max_epochs == 5


def test_a_directory_holding_only_options_never_started(tmp_path):
    exp = _started(tmp_path)
    preflight.check_experiment_dir(exp, resume=False)  # a failed start can be retried with the same --name
    (exp / "tuner.pkl").write_bytes(b"")
    with pytest.raises(ConfigError, match="already exists"):
        preflight.check_experiment_dir(exp, resume=False)


def test_the_cli_knows_which_options_were_given():
    given = explicit_search_options(["search", "aim", "--resume", "--name", "x", "--max-epochs", "8",
                                     "--data", "n_train=64", "--space", "s.yaml"])
    assert given == {"method", "resume", "name", "max_epochs", "data_values", "space_file"}
    assert explicit_search_options(["search", "aim"]) == {"method"}
