"""The embedded `synth` dataset and the dataset registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunebal.data import DATASETS, build_dataset, get_dataset_spec, register_dataset, synth
from tunebal.data.base import DatasetSpec, MultimodalData, Split
from tunebal.errors import ConfigError, DataError
from tunebal.knobs import knobs

SMALL = {"n_train": 48, "n_val": 16, "n_test": 24}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBAL_CACHE", str(tmp_path / "cache"))


def _resolved(**values):
    return synth.SYNTH_KNOBS.resolve({**SMALL, **values})


def _assert_same(a: MultimodalData, b: MultimodalData) -> None:
    assert a.modalities == b.modalities
    for split in ("train", "val", "test"):
        sa, sb = a.split(split), b.split(split)
        assert torch.equal(sa.labels, sb.labels)
        for m in a.modalities:
            assert torch.equal(sa.inputs[m], sb.inputs[m])


# ------------------------------------------------------------------ registry


def test_registry_has_synth_and_rejects_unknown_names():
    assert "synth" in DATASETS and get_dataset_spec("synth") is synth.SPEC
    with pytest.raises(ConfigError) as exc_info:
        get_dataset_spec("cremad-typo")
    msg = str(exc_info.value)
    assert "cremad-typo" in msg and "synth" in msg and "\n" not in msg
    with pytest.raises(ConfigError):
        build_dataset("nope")


def test_register_dataset_plugs_in_a_new_dataset():
    def build(size):
        def split(n):
            return Split({"x": torch.zeros(n, 3)}, torch.arange(n) % 2)

        return MultimodalData("toy", ("x",), {"x": "vector"}, 2, ["a", "b"], split(size), split(2), split(2))

    from tunebal.knobs import Knob

    spec = DatasetSpec("toy-test", "a toy", knobs(Knob("size", "int", 4, low=2)), build)
    register_dataset(spec)
    try:
        assert len(build_dataset("toy-test", {"size": "6"}).train) == 6
        with pytest.raises(ValueError):
            register_dataset(DatasetSpec("toy-test", "other", spec.knobs, build))
    finally:
        DATASETS.pop("toy-test")


@pytest.mark.parametrize(
    "values",
    [
        {"n_trian": 10},  # unknown knob
        {"num_classes": 7},  # odd
        {"num_classes": 18},  # beyond the 16 sound groups x registers
        {"modalities": 4},
        {"n_train": "many"},
        {"seed": -1},
        {"audio_snr_db": float("nan")},
        {"frames": 0},
        {"n_train": 5, "num_classes": 8},  # fewer samples than classes
    ],
)
def test_bad_knobs_are_config_errors(values):
    with pytest.raises(ConfigError) as exc_info:
        build_dataset("synth", {**SMALL, **values})
    assert "\n" not in str(exc_info.value)


# ------------------------------------------------------------------ generation


def test_same_seed_is_bit_identical_and_other_seed_differs():
    values = _resolved(seed=3, modalities=3)
    a, b = synth.generate(values), synth.generate(dict(values))
    for split in a:
        for key in a[split]:
            assert a[split][key].dtype == b[split][key].dtype
            assert np.array_equal(a[split][key], b[split][key]), (split, key)
    c = synth.generate(_resolved(seed=4, modalities=3))
    for key in ("audio", "visual", "text"):
        assert not np.array_equal(a["train"][key], c["train"][key])
    assert not np.array_equal(a["train"]["labels"], c["train"]["labels"])


def test_streams_are_independent_of_other_knobs():
    base = synth.generate(_resolved())
    more = synth.generate(_resolved(n_test=40, modalities=3))
    for key in ("labels", "audio", "visual"):
        assert np.array_equal(base["train"][key], more["train"][key])
        assert np.array_equal(base["val"][key], more["val"][key])


def test_split_sizes_and_label_balance():
    data = build_dataset("synth", {"n_train": 64, "n_val": 16, "n_test": 40, "num_classes": 8})
    assert (len(data.train), len(data.val), len(data.test)) == (64, 16, 40)
    assert torch.bincount(data.train.labels, minlength=8).tolist() == [8] * 8
    assert torch.bincount(data.val.labels, minlength=8).tolist() == [2] * 8
    assert torch.bincount(data.test.labels, minlength=8).tolist() == [5] * 8
    assert data.train.labels.dtype == torch.int64
    assert not torch.equal(data.train.labels[:8], torch.arange(8))  # shuffled


def test_two_modalities_shapes_and_kinds():
    data = build_dataset("synth", SMALL)
    assert data.name == "synth" and data.num_classes == 8 and len(data.class_names) == 8
    assert data.modalities == ("audio", "visual")
    assert data.kinds == {"audio": "spectrogram", "visual": "frames"}
    assert data.input_shape("audio") == (1, 129, 63)  # n_fft 256 -> 129 bins; 4000 samples / hop 64 -> 63 frames
    assert data.input_shape("visual") == (1, 3, 32, 32)
    for split in (data.train, data.val, data.test):
        for m in data.modalities:
            x = split.inputs[m]
            assert x.dtype == torch.float32 and x.is_contiguous() and x.shape[0] == len(split)
            assert torch.isfinite(x).all()
    with pytest.raises(ConfigError):
        data.input_shape("text")


def test_three_modalities_and_other_sizes():
    data = build_dataset(
        "synth", {**SMALL, "modalities": 3, "frames": 2, "image_size": 24, "text_dim": 12, "num_classes": 16}
    )
    assert data.modalities == ("audio", "visual", "text")
    assert data.kinds["text"] == "vector"
    assert data.input_shape("visual") == (2, 3, 24, 24)
    assert data.input_shape("text") == (12,)
    assert data.num_classes == 16 and len(set(data.class_names)) == 16
    assert int(data.train.labels.max()) <= 15
    # 16 classes = 8 sound groups: 4 families x 2 pitch registers
    layout = synth.class_layout(16)
    assert {(c["family"], c["register"]) for c in layout} == {(f, r) for f in synth.FAMILIES for r in (0, 1)}


def test_spectrogram_is_log_spectrogram_of_the_generators_waveform():
    import librosa

    values = _resolved()
    data = build_dataset("synth", SMALL)
    labels, waves = synth.split_waveforms(values, "train")
    assert np.array_equal(labels, data.train.labels.numpy())
    assert waves.shape == (len(labels), synth.SAMPLE_RATE // 2) and waves.dtype == np.float32
    for i in (0, 7):
        ref = np.log(np.abs(librosa.stft(waves[i], n_fft=256, hop_length=64)) + 1e-7)
        np.testing.assert_allclose(data.train.inputs["audio"][i, 0].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_audio_snr_sets_the_noise_power():
    labels = np.arange(8)
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    clean = synth.waveforms(labels, rng(), 8, snr_db=200.0).astype(np.float64)
    noisy = synth.waveforms(labels, rng(), 8, snr_db=0.0).astype(np.float64)
    assert np.allclose(np.mean(clean**2, axis=1), 1.0, atol=1e-3)  # unit-power sounds
    assert np.mean((noisy - clean) ** 2) == pytest.approx(1.0, rel=0.05)  # 0 dB: noise power = signal power


def _ncm_predict(train_x, train_y, test_x, k):
    means = np.stack([train_x[train_y == c].mean(0) for c in range(k)])
    return ((test_x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)


def test_audio_identifies_the_pair_and_vision_the_member():
    """Nearest-class-mean checks: audio separates the K/2 groups but not c from c + K/2; vision does."""
    k, g = 8, 4
    values = _resolved(n_train=160, n_val=8, n_test=160)
    arrays = synth.generate(values)
    tr, te = arrays["train"], arrays["test"]
    y = te["labels"]

    audio_pred = _ncm_predict(tr["audio"].reshape(160, -1), tr["labels"], te["audio"].reshape(160, -1), k)
    same_group = audio_pred % g == y % g
    assert same_group.mean() > 0.95
    assert 0.3 < (audio_pred[same_group] == y[same_group]).mean() < 0.7  # a coin flip within the pair

    def power_spectrum(x):  # phase- and position-invariant orientation energy, averaged over frames and colours
        return (np.abs(np.fft.fft2(x)) ** 2).mean(axis=(1, 2)).reshape(len(x), -1)

    means = np.stack([power_spectrum(tr["visual"])[tr["labels"] == c].mean(0) for c in range(k)])
    feat = power_spectrum(te["visual"])
    grp = y % g
    first = ((feat - means[grp]) ** 2).sum(1) < ((feat - means[grp + g]) ** 2).sum(1)
    assert (np.where(first, grp, grp + g) == y).mean() > 0.9  # vision tells the pair apart


def test_class_means_match_a_hand_computed_mean():
    data = build_dataset("synth", {**SMALL, "modalities": 3})
    means = data.class_means()
    assert set(means) == set(data.modalities)
    for m in data.modalities:
        assert means[m].shape == (8, *data.input_shape(m)) and means[m].dtype == torch.float32
        x, y = data.train.inputs[m].double(), data.train.labels
        for c in (0, 5):
            torch.testing.assert_close(means[m][c], x[y == c].mean(0).float(), rtol=1e-5, atol=1e-5)
    val_means = data.class_means("val")
    torch.testing.assert_close(val_means["text"][2], data.val.inputs["text"][data.val.labels == 2].mean(0))
    with pytest.raises(ConfigError):
        data.class_means("holdout")


def test_split_rejects_mismatched_lengths():
    with pytest.raises(DataError):
        Split({"x": torch.zeros(3, 2)}, torch.zeros(4, dtype=torch.int64))


# ------------------------------------------------------------------ cache


def test_cache_hit_returns_identical_data_without_regenerating(monkeypatch, tmp_path):
    first = build_dataset("synth", SMALL)
    path = synth.cache_path(_resolved())
    assert first.info["cache"] == str(path) and path.is_file()
    assert str(path).startswith(str(tmp_path / "cache"))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    def fail(values):
        raise AssertionError("regenerated despite a cache hit")

    monkeypatch.setattr(synth, "generate", fail)
    second = build_dataset("synth", SMALL)
    _assert_same(first, second)
    assert first.class_names == second.class_names and first.kinds == second.kinds


def test_cache_is_arrow_and_keyed_by_knobs():
    import pyarrow as pa

    build_dataset("synth", SMALL)
    path = synth.cache_path(_resolved())
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_file(src).read_all()
    assert b"tunebal" in table.schema.metadata
    assert {"train/audio", "train/visual", "train/labels", "test/labels"} <= set(table["name"].to_pylist())
    assert synth.cache_path(_resolved(seed=1)) != path
    assert synth.cache_path(_resolved(visual_noise=1.0)) != path


def test_corrupt_cache_is_regenerated():
    first = build_dataset("synth", SMALL)
    path = synth.cache_path(_resolved())
    path.write_bytes(b"not an arrow file")
    again = build_dataset("synth", SMALL)
    _assert_same(first, again)
    assert path.stat().st_size > 1000  # rewritten
