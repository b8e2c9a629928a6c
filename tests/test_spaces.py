"""Search-space validation: every YAML error is a ConfigError naming the problem."""

from pathlib import Path

import pytest
import yaml
from ray.tune.search.sample import Categorical, Float, Integer

from tunebal.errors import ConfigError
from tunebal.methods import METHODS
from tunebal.tune.spaces import apply_overrides, spaces_dir, load_space, parse_space


def _parse(space, method="baseline", max_epochs=10):
    return parse_space({"method": method, "space": space}, method, "synth", max_epochs, "test.yaml")


def test_distributions_become_tune_domains_with_declared_bounds():
    out = _parse({
        "lr": {"loguniform": [1e-3, 0.1]},
        "batch_size": {"choice": [32, 64]},
        "width": {"randint": [4, 8]},
        "fusion": "sum",
        "data.n_train": 512,
    })
    assert isinstance(out["lr"], Float) and out["lr"].lower == pytest.approx(1e-3)
    assert isinstance(out["batch_size"], Categorical) and out["batch_size"].categories == [32, 64]
    assert isinstance(out["width"], Integer) and (out["width"].lower, out["width"].upper) == (4, 9)  # inclusive 8
    assert out["fusion"] == "sum" and out["data.n_train"] == 512


def test_bounds_can_scale_with_max_epochs():
    out = _parse({"lr_step": {"randint": [1, "0.5*epochs"]}}, max_epochs=12)
    assert out["lr_step"].upper == 7


@pytest.mark.parametrize(
    "space, message",
    [
        ({"lrr": {"uniform": [0.1, 0.2]}}, "unknown knob 'lrr'"),
        ({"lr": {"uniform": [0.2, 0.1]}}, "empty or inverted range"),
        ({"lr": {"uniform": [0.1, 0.1]}}, "empty or inverted range"),
        ({"lr": {"choice": []}}, "non-empty list"),
        ({"lr": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
        ({"lr": {"loguniform": [0.0, 0.1]}}, "must be >= 1e-06"),
        ({"batch_size": {"uniform": [8, 64]}}, "for float knobs"),
        ({"lr": {"randint": [1, 3]}}, "for int knobs"),
        ({"batch_size": {"choice": [32, "big"]}}, "expects an int"),
        ({"fusion": {"choice": ["concat", "attention"]}}, "must be one of"),
        ({"momentum": {"uniform": [0.5, 2.0]}}, "must be <= 0.999"),
        ({"data.n_trains": 100}, "unknown knob 'data.n_trains'"),
        ({"lr_step": {"randint": [1, "half"]}}, "neither a number"),
    ],
)
def test_bad_spaces_are_clear_errors(space, message):
    with pytest.raises(ConfigError, match=message):
        _parse(space)


def test_space_for_another_method_or_unknown_keys_rejected():
    with pytest.raises(ConfigError, match="not 'baseline'"):
        parse_space({"method": "opm", "space": {}}, "baseline", "synth", 10, "x.yaml")
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        parse_space({"space": {}, "spaces": {}}, "baseline", "synth", 10, "x.yaml")


def test_invalid_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {lr: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_space("baseline", "synth", 10, bad)
    with pytest.raises(ConfigError, match="no search space file"):
        load_space("baseline", "synth", 10, tmp_path / "none.yaml")


def test_overrides_are_checked_like_the_space():
    space = _parse({"lr": {"uniform": [0.01, 0.1]}})
    out = apply_overrides(space, {"lr": "0.05", "batch_size": "16"}, "baseline", "synth")
    assert out["lr"] == 0.05 and out["batch_size"] == 16
    with pytest.raises(ConfigError, match="unknown knob 'foo'"):
        apply_overrides(space, {"foo": "1"}, "baseline", "synth")


def test_every_shipped_space_loads_and_names_a_registered_method():
    files = sorted(spaces_dir().glob("*.yaml"))
    assert files, "no search spaces shipped"
    for file in files:
        method = yaml.safe_load(file.read_text())["method"]
        assert method == file.stem and method in METHODS or method == file.stem
        space = load_space(method, "synth", 10)
        assert space, file
