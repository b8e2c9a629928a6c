"""CMU-MOSI from a feature pickle (written here): --trust-pickle, conversion to Arrow, sequence encoders."""

from __future__ import annotations

import pickle

import numpy as np

from tunebal.cli import main
from tunebal.data import build_dataset
from tunebal.data.prepare import read_manifest


def mosi_pickle(path, n=(24, 8, 8), lengths=(6, 10, 12), dims=(12, 5, 7), marker=None):
    rng = np.random.default_rng(0)
    data = {}
    for split, count in zip(("train", "valid", "test"), n):
        scores = np.round(rng.uniform(-3, 3, count), 1)
        scores[0] = 0.0  # a neutral utterance
        part = {"labels": scores.reshape(count, 1, 1), "id": np.array([[f"vid{i // 3}[{i % 3}]"] for i in range(count)])}
        for (name, length, dim) in zip(("text", "audio", "vision"), lengths, dims):
            x = rng.standard_normal((count, length, dim)).astype(np.float32)
            x[:, 0, 0] += scores  # the label is visible in every modality's first feature
            part[name] = x
        part["audio"][1, 2, 3] = np.inf  # the released files hold a few of these
        data[split] = part
    path.write_bytes(pickle.dumps(data))
    return data


def test_mosi_needs_trust_pickle_then_never_unpickles_again(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    mosi_pickle(raw / "mosi_data.pkl")
    out = tmp_path / "out"
    code = main(["prepare", "mosi", "--root", str(raw), "--out", str(out), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--trust-pickle" in err[0] and not (out / "manifest.json").exists()
    assert main(["prepare", "mosi", "--root", str(raw), "--out", str(out), "--no-progress", "--workers", "1", "--trust-pickle"]) == 0
    assert "warning: unpickling" in capsys.readouterr().err
    manifest = read_manifest(out)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 24, "val": 8, "test": 8}
    assert manifest["params"]["class_names"] == ["negative", "non-negative"]

    def refuse(*a, **k):
        raise AssertionError("unpickled after preparation")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    data = build_dataset("mosi", {"root": str(out)})
    assert data.kinds == {"text": "sequence", "audio": "sequence", "vision": "sequence"}
    assert data.input_shape("text") == (6, 12) and data.input_shape("vision") == (12, 7)
    inputs, labels = data.test.batch([0, 1])
    assert np.isfinite(inputs["audio"].numpy()).all()
    from tunebal.engine import Engine

    engine = Engine(data, "baseline", {"batch_size": 8, "width": 4, "loader_workers": 0})
    assert np.isfinite(engine.run_epoch()["train/loss"])


def test_mosi_label_modes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    source = mosi_pickle(raw / "f.pkl")
    from tunebal.data.mosi import Mosi
    from tunebal.data.prepare import run_prepare

    run_prepare(Mosi(), raw, tmp_path / "nz", {"labels": "binary_nonzero"}, progress=False, trust_pickle=True)
    run_prepare(Mosi(), raw, tmp_path / "three", {"labels": "3class"}, progress=False, trust_pickle=True)
    nz, three = read_manifest(tmp_path / "nz"), read_manifest(tmp_path / "three")
    zeros = int((source["train"]["labels"] == 0).sum())
    assert nz["splits"]["train"]["count"] == 24 - zeros and three["splits"]["train"]["count"] == 24
    data = build_dataset("mosi", {"root": str(tmp_path / "three")})
    scores = source["test"]["labels"].reshape(-1)
    want = np.where(scores < 0, 0, np.where(scores == 0, 1, 2))
    order = np.argsort([f"test/vid{i // 3}[{i % 3}]" for i in range(8)], kind="stable")
    assert data.test.labels.tolist() == want[order].tolist()
