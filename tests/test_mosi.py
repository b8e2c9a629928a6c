"""CMU-MOSI from a feature pickle (written here): --trust-pickle, conversion to Arrow, sequence encoders;
labels=regression: float targets, L1 training, the MOSI regression metrics, methods that refuse it."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from tunebal.cli import main
from tunebal.data import build_dataset
from tunebal.data.prepare import read_manifest
from tunebal.errors import ConfigError, DataError
from tunebal.metrics import regression_metrics


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
    # a classification preparation has no "task" (its params hash is what it was) and int64 labels
    assert "task" not in three["params"] and data.task == "classification" and data.test.labels.dtype == torch.int64


# --------------------------------------------------------------------------- regression (labels=regression)

REG_CFG = {"batch_size": 8, "width": 4, "loader_workers": 0, "lr": 0.01}
SUPPORTS_REGRESSION = {"baseline": {}, "unimodal": {"modality": "text"}, "ensemble": {}}
REFUSES_REGRESSION = ("ogm", "opm", "opm_ogm", "arl", "aim", "amss", "amss_plus")


def test_regression_metrics_against_hand_computation():
    # targets with a zero; predictions with a 0, halves (round to even) and one beyond 3 (clipped)
    y = torch.tensor([-2.2, -0.4, 0.0, 0.6, 1.4, 2.6, -1.0, 0.2])
    p = torch.tensor([-1.6, 0.3, 0.5, 0.0, 2.5, 3.8, -0.6, -0.1])
    got = regression_metrics(p, y)
    err = [0.6, 0.7, 0.5, 0.6, 1.1, 1.2, 0.4, 0.3]
    assert got["mae"] == pytest.approx(sum(err) / 8, rel=1e-6)
    # Pearson by hand
    yy, pp = y.double().tolist(), p.double().tolist()
    my, mp = sum(yy) / 8, sum(pp) / 8
    cov = sum((a - my) * (b - mp) for a, b in zip(yy, pp))
    corr = cov / math.sqrt(sum((a - my) ** 2 for a in yy) * sum((b - mp) ** 2 for b in pp))
    assert got["corr"] == pytest.approx(corr, rel=1e-6)
    # Acc-2 with zeros (< 0 vs >= 0): truth [0,0,1,1,1,1,0,1], pred [0,1,1,1,1,1,0,0] -> 6 of 8
    # (negative vs positive over all samples would give 4 of 8: the 0 target and the 0 prediction differ)
    assert got["acc"] == pytest.approx(6 / 8)
    # weighted F1, with zeros: class 1: tp 4, fp 1, fn 1 -> 8/10; class 0: tp 2, fp 1, fn 1 -> 4/6; supports 5, 3
    assert got["f1"] == pytest.approx((5 * 8 / 10 + 3 * 4 / 6) / 8)
    # without zeros (index 2 dropped): y > 0 and p > 0 (a prediction of exactly 0 counts as negative)
    t_nz = [0, 0, 1, 1, 1, 0, 1]  # y: -2.2 -0.4 0.6 1.4 2.6 -1.0 0.2
    p_nz = [0, 1, 0, 1, 1, 0, 0]  # p: -1.6 0.3 0.0 2.5 3.8 -0.6 -0.1 (0.0 is not positive)
    assert got["acc2_nonzero"] == pytest.approx(4 / 7)

    def f1(c):
        tp = sum(a == c and b == c for a, b in zip(t_nz, p_nz))
        fp = sum(a != c and b == c for a, b in zip(t_nz, p_nz))
        fn = sum(a == c and b != c for a, b in zip(t_nz, p_nz))
        return 2 * tp / (2 * tp + fp + fn)

    assert got["f1_nonzero"] == pytest.approx((t_nz.count(1) * f1(1) + t_nz.count(0) * f1(0)) / 7)
    # Acc-7: round(clip): y -> -2 0 0 1 1 3 -1 0 ; p -> -2 0 0 0 2 3 -1 0 (0.5 -> 0 and 2.5 -> 2: half to even; 3.8 -> 3)
    assert got["acc7"] == pytest.approx(6 / 8)


def test_regression_modality_metrics_against_hand_computation():
    from tunebal.metrics import regression_modality_metrics

    y = torch.tensor([-1.0, 0.0, 0.0, 2.0])
    got = regression_modality_metrics({"text": torch.tensor([-0.5, 0.0, -0.1, 1.0]), "audio": torch.tensor([0.5, 0.5, 0.5, 0.5])}, y)
    # Acc-2 with zeros: text -,+,-,+ vs -,+,+,+ -> 3/4; audio +,+,+,+ -> 3/4 wrong on the first only
    assert got == pytest.approx({"acc_text": 3 / 4, "mae_text": (0.5 + 0 + 0.1 + 1) / 4,
                                 "acc_audio": 3 / 4, "mae_audio": (1.5 + 0.5 + 0.5 + 1.5) / 4})
    assert not any(k.startswith("rho_") for k in got)


def test_regression_metrics_constant_prediction_and_all_zero_targets():
    got = regression_metrics(torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 0.0]))
    assert got["corr"] == 0.0 and got["acc2_nonzero"] == 0.0 and got["acc"] == 1.0 and got["mae"] == 0.0


@pytest.fixture(scope="module")
def regression_dir(tmp_path_factory):
    from tunebal.data.mosi import Mosi
    from tunebal.data.prepare import run_prepare

    tmp = tmp_path_factory.mktemp("mosi_reg")
    (tmp / "raw").mkdir()
    source = mosi_pickle(tmp / "raw" / "f.pkl")
    run_prepare(Mosi(), tmp / "raw", tmp / "reg", {"labels": "regression"}, progress=False, trust_pickle=True)
    return tmp / "reg", source


def _sorted_scores(source, split, n):
    order = np.argsort([f"{split}/vid{i // 3}[{i % 3}]" for i in range(n)], kind="stable")
    return source[{"val": "valid"}.get(split, split)]["labels"].reshape(-1)[order]


def test_regression_preparation_stores_float_scores(regression_dir):
    out, source = regression_dir
    manifest = read_manifest(out)
    assert manifest["params"]["task"] == "regression" and manifest["params"]["class_names"] == ["sentiment"]
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 24, "val": 8, "test": 8}  # zeros kept
    data = build_dataset("mosi", {"root": str(out)})
    assert data.task == "regression" and data.num_classes == 1
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        labels = getattr(data, split).labels
        assert labels.dtype == torch.float32
        np.testing.assert_array_equal(labels.numpy(), _sorted_scores(source, split, n).astype(np.float32))
    _, batch_labels = data.val.batch([0, 3])
    assert batch_labels.dtype == torch.float32 and batch_labels.tolist() == data.val.labels[[0, 3]].tolist()


def test_regression_target_is_covered_by_the_shard_digests(regression_dir, tmp_path):
    import shutil

    import pyarrow as pa

    out, _ = regression_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = next(copy.glob("test-*.arrow"))
    table = pa.ipc.open_file(pa.BufferReader(shard.read_bytes())).read_all()  # a copy, not a map of the file
    targets = table.column("target").to_numpy().copy()
    targets[1] = targets[1] + 1.0  # same size, another score
    table = table.set_column(table.schema.get_field_index("target"), "target", pa.array(targets, type=pa.float32()))
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=table.num_rows)
    with pytest.raises(DataError, match="differ from the manifest"):
        build_dataset("mosi", {"root": str(copy)})


@pytest.mark.parametrize("method", sorted(SUPPORTS_REGRESSION))
def test_regression_trains_with_l1_and_scores_every_sample(regression_dir, method):
    out, source = regression_dir
    data = build_dataset("mosi", {"root": str(out)})
    from tunebal.engine import Engine
    from tunebal.methods import StepContext

    engine = Engine(data, method, {**REG_CFG, **SUPPORTS_REGRESSION[method]})
    assert engine.model.classifier.out_features == 1
    # the training loss is the L1 of the single output against the float score
    inputs, labels = next(engine.iterate(data.train, shuffle=True))
    assert labels.dtype == torch.float32
    ctx = StepContext(model=engine.model, inputs=inputs, labels=labels, epoch=0, step=0)
    ctx.encoded = engine.model.encode(inputs)
    ctx.features = engine.method.before_fusion(ctx)
    ctx.logits = engine.model.head(ctx.features)
    want = (ctx.logits[:, 0] - labels).abs().mean()
    if method == "ensemble":
        want = sum((lg[:, 0] - labels).abs().mean() for lg in ctx.unimodal_logits().values())
    torch.testing.assert_close(engine.method.loss(ctx), want)
    metrics = engine.run_epoch()
    assert math.isfinite(metrics["train/loss"])
    # evaluation scores every validation sample; its numbers are the metrics of the model's predictions
    engine.model.eval()
    with torch.no_grad():
        x, y = data.val.batch(list(range(len(data.val))))
        feats = engine.model.encode({m: data.to_model_input(m, v) for m, v in x.items()}).features
        if method == "baseline":
            pred = engine.model.head(feats)[:, 0]
        elif method == "unimodal":  # the other modalities zeroed
            pred = engine.model.head({m: z if m == "text" else torch.zeros_like(z) for m, z in feats.items()})[:, 0]
        else:  # ensemble: the mean of the modalities' zero-out outputs
            pred = torch.stack([lg[:, 0] for lg in engine.model.unimodal_logits(feats).values()]).mean(0)
    assert y.tolist() == pytest.approx(_sorted_scores(source, "val", 8).tolist())
    ref = regression_metrics(pred, y)
    for key in ("mae", "corr", "acc", "acc2_nonzero", "f1", "f1_nonzero", "acc7"):
        assert metrics[f"val/{key}"] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert metrics["val/loss"] == pytest.approx(float((pred - y).abs().mean()), rel=1e-5)
    assert {f"val/acc_{m}" for m in data.modalities} <= set(metrics) and not any(k.startswith("val/rho_") for k in metrics)


def test_regression_l1_training_reduces_the_error(regression_dir):
    out, _ = regression_dir
    from tunebal.engine import Engine

    data = build_dataset("mosi", {"root": str(out)})
    engine = Engine(data, "baseline", {**REG_CFG, "lr": 0.003, "optimizer": "adam"})
    first = engine.evaluate("train")["mae"]
    for _ in range(6):
        engine.train_epoch()
    assert engine.evaluate("train")["mae"] < first - 0.1


@pytest.mark.parametrize("method", REFUSES_REGRESSION)
def test_methods_built_on_class_scores_refuse_regression(regression_dir, method):
    out, _ = regression_dir
    from tunebal.engine import Engine

    data = build_dataset("mosi", {"root": str(out)})
    with pytest.raises(ConfigError) as err:
        Engine(data, method, REG_CFG)
    line = str(err.value)
    assert "\n" not in line and f"method '{method}' cannot train mosi's regression target" in line


def test_cli_refuses_and_evaluates_regression(regression_dir, tmp_path, capsys):
    out, _ = regression_dir
    run = tmp_path / "run"
    code = main(["train", "ogm", "--dataset", "mosi", "--data", f"root={out}", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tunebal: error: method 'ogm' cannot train")
    # a search is refused before Ray starts (no trial runs to find out)
    code = main(["search", "amss", "--dataset", "mosi", "--data", f"root={out}", "--storage", str(tmp_path / "s"), "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tunebal: error: method 'amss' cannot train")
    assert not (tmp_path / "s" / "x").exists()
    args = ["train", "baseline", "--dataset", "mosi", "--data", f"root={out}", "--out", str(run), "--no-progress",
            "--set", "epochs=1", "--set", "width=4", "--set", "batch_size=8", "--set", "loader_workers=0"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run / "best.arrow"), "--split", "test"]) == 0
    shown = json.loads(capsys.readouterr().out)
    for key in ("test/mae", "test/corr", "test/acc", "test/acc2_nonzero", "test/f1", "test/f1_nonzero", "test/acc7"):
        assert isinstance(shown[key], float), key
    result = json.loads((run / "result.json").read_text())
    assert shown["test/mae"] == result["test/mae"]


def test_search_summary_prints_the_regression_metrics(capsys):
    from tunebal.tune.report import print_summary

    test = {"epoch": 3, "test/acc": 0.75, "test/acc2_nonzero": 0.8, "test/f1": 0.74, "test/acc7": 0.3,
            "test/mae": 0.9, "test/corr": 0.6, "test/acc_text": 0.7}
    summary = {"method": "baseline", "dataset": "mosi", "num_trials": 1, "trials": [{"trial": "t0"}],
               "best": {"trial": "t0", "val": {"val/acc": 0.7}, "test": test}, "experiment": "/x"}
    print_summary(summary, ["trial"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("best trial"))
    assert "val acc 0.7000" in line and "test Acc-2 0.7500 (non-zero 0.8000)" in line
    assert "Acc-7 0.3000" in line and "MAE 0.9000" in line and "corr 0.6000" in line and "acc_text=0.7000" in line
