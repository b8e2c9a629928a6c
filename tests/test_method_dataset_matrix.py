"""Every registered method trains one short epoch on every kind of dataset, or refuses it with one clear line.

A new method or dataset is covered by registering it: the matrix is built from the registries.
"""

from __future__ import annotations

import math

import pytest

from tunebal.data import build_dataset
from tunebal.engine import Engine
from tunebal.errors import ConfigError
from tunebal.methods import METHODS, get_method_class

get_method_class("baseline")  # imports every method module
ALL_METHODS = sorted(m for m in METHODS if not m.startswith("_"))
EXTRA = {"unimodal": lambda data: {"modality": data.modalities[-1]}, "aim": lambda data: {"start_epoch": 0}}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from test_datasets_av import ucf_tree
    from test_mosi import mosi_pickle

    from tunebal.data.mosi import Mosi
    from tunebal.data.prepare import run_prepare
    from tunebal.data.ucf101 import Ucf101

    root = tmp_path_factory.mktemp("matrix")
    (root / "mosi").mkdir()
    mosi_pickle(root / "mosi" / "m.pkl")
    run_prepare(Mosi(), root / "mosi", root / "mosi-prep", {}, progress=False, trust_pickle=True)
    ucf_tree(root / "ucf")
    run_prepare(Ucf101(), root / "ucf", root / "ucf-prep", {"frame_size": 24}, progress=False)
    return {
        "synth3": build_dataset("synth", {"n_train": 64, "n_val": 16, "n_test": 16, "image_size": 16, "modalities": 3}),
        "mosi": build_dataset("mosi", {"root": str(root / "mosi-prep")}),
        "ucf101": build_dataset("ucf101", {"root": str(root / "ucf-prep"), "image_size": 16, "val_fraction": 0.34}),
    }


@pytest.mark.parametrize("dataset", ["synth3", "mosi", "ucf101"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_on_every_dataset_kind_or_says_why_not(fixtures, method, dataset):
    data = fixtures[dataset]
    config = {"batch_size": 8, "width": 4, "backbone": "small", "loader_workers": 0, **EXTRA.get(method, lambda d: {})(data)}
    try:
        engine = Engine(data, method, config)
    except ConfigError as exc:  # a documented refusal: one line naming the method
        assert method in str(exc) and "\n" not in str(exc)
        pytest.skip(f"refused: {exc}")
    metrics = engine.run_epoch()
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/acc"] <= 1.0
    for m in data.modalities:
        assert f"val/acc_{m}" in metrics
