"""The contract every registered method keeps, checked for each one: a new method is tested by
registering it (``@register_method``).

- bit-exact resume: one epoch, Arrow checkpoint, load into a fresh engine, one more epoch equals
  two epochs straight (metrics, model, optimiser and the method's own state);
- state round trip: the method's ``state_dict`` after loading equals the saved one;
- its shipped search space loads and validates;
- its knobs do not clash with the common knobs;
- it trains, or refuses with a ConfigError, for each modality count (2, 3) and fusion it declares.

Method-specific mechanism tests stay in the methods' own test files.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests._builders import tree_equal

from tunebal.config import COMMON_KNOBS
from tunebal.engine import Engine
from tunebal.errors import ConfigError
from tunebal.methods import METHODS, get_method_class
from tunebal.models.fusion import FUSIONS
from tunebal.tune.spaces import load_space

get_method_class("baseline")  # imports every method module
ALL_METHODS = sorted(m for m in METHODS if not m.startswith("_"))
FAST = {"width": 4, "batch_size": 32, "lr": 0.05, "seed": 5}
#: knobs a method needs to show its state in two epochs (AIM: the phase boundary E at epoch 1)
EXTRA = {"unimodal": {"modality": "visual"}, "aim": {"start_epoch": 1}, "opm": {"warmup": 0}}


def _no_times(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_resume_is_bit_exact_and_state_round_trips(data2, tmp_path, method):
    config = {**FAST, "epochs": 2, **EXTRA.get(method, {})}
    straight = Engine(data2, method, config, device="cpu")
    straight.run_epoch()
    second = straight.run_epoch()

    first = Engine(data2, method, config, device="cpu")
    m1 = first.run_epoch()
    path = str(tmp_path / f"{method}.arrow")
    first.save(path, m1)
    saved_state = first.method.state_dict()
    resumed = Engine(data2, method, config, device="cpu")
    resumed.load(path)
    tree_equal(saved_state, resumed.method.state_dict(), "method")
    assert resumed.epoch == 1
    assert _no_times(resumed.run_epoch()) == _no_times(second)
    tree_equal(straight.model.state_dict(), resumed.model.state_dict(), "model")
    tree_equal(straight.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    tree_equal(straight.method.state_dict(), resumed.method.state_dict(), "method")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_shipped_space_validates(method):
    space = load_space(method, "synth", 8)
    assert space, method


@pytest.mark.parametrize("method", ALL_METHODS)
def test_knobs_do_not_clash_with_the_common_knobs(method):
    cls = get_method_class(method)
    assert cls.name == method
    assert not set(cls.KNOBS.names()) & set(COMMON_KNOBS.names())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_declared_modality_counts_and_fusions(method, data2, data3):
    cls = get_method_class(method)
    for data in (data2, data3):
        for fusion in FUSIONS:
            declared = (cls.supported_modalities is None or len(data.modalities) in cls.supported_modalities) and (
                cls.supported_fusions is None or fusion in cls.supported_fusions
            )
            if not declared:
                with pytest.raises(ConfigError, match=f"method '{method}' supports"):
                    cls.check_compatible(len(data.modalities), fusion)
                continue
            cls.check_compatible(len(data.modalities), fusion)
    # the engine accepts the method's first declared fusion on three modalities and trains it
    if cls.supported_modalities is None or 3 in cls.supported_modalities:
        fusion = (cls.supported_fusions or FUSIONS)[0]
        engine = Engine(data3, method, {**FAST, "epochs": 1, "fusion": fusion, **EXTRA.get(method, {})}, device="cpu")
        assert math.isfinite(engine.run_epoch()["train/loss"])
