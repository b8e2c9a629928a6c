"""CREMA-D, Kinetics-Sounds and bring-your-own manifests, from raw fixture trees written with real codecs.

Every fixture file is encoded here by a real encoder (wav: soundfile, jpg: Pillow, mp4/flv:
PyAV; tests/media.py), in the layouts the README documents. Checked: counts, shapes, labels,
the deterministic frame choice, the validation split (stratified or group-disjoint, disjoint
from train, test untouched), bad inputs as one line, bit-exact resume of training from the
prepared shards, and `tunebal search` end to end on each dataset under ASHA + Optuna.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from media import corrupt_file, write_jpg, write_video, write_wav
from tunebal.cli import main
from tunebal.data import build_dataset
from tunebal.data.cremad import CLASSES
from tunebal.data.prepare import read_manifest, run_prepare
from tunebal.errors import ConfigError

SMALL = {"frame_size": 24}
LOAD = {"image_size": 16}


def cremad_tree(root: Path, per_class_train: int = 4, per_class_test: int = 1, video: bool = False, bom: bool = True) -> dict[str, list[str]]:
    """AudioWAV/*.wav + Image-01-FPS/<clip>/frame_<k>.jpg (or VideoFlash/*.flv) + train.csv/test.csv."""
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "test": []}
    n = 0
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        for c, label in enumerate(CLASSES):
            for k in range(per_class):
                actor = 1001 + (n % 5)
                clip = f"{actor}_S{n:03d}_{label}_XX"
                write_wav(root / "AudioWAV" / f"{clip}.wav", seconds=1.0, sr=16000, seed=n, freq=200.0 + 50 * c)
                if video:
                    (root / "VideoFlash").mkdir(exist_ok=True)
                    write_video(root / "VideoFlash" / f"{clip}.flv", seconds=3.0, fps=5, size_hw=(36, 48), seed=n,
                                with_audio=False, container="flv")
                else:
                    folder = root / "Image-01-FPS" / clip
                    folder.mkdir(parents=True, exist_ok=True)
                    for f in (1, 2, 10):  # natural order: 1, 2, 10 (a plain sort would give 1, 10, 2)
                        write_jpg(folder / f"frame_{f}.jpg", size_hw=(30, 40), seed=1000 * n + f)
                splits[split].append(f"{clip},{label}")
                n += 1
    prefix = "\ufeff" if bom else ""
    (root / "train.csv").write_text(prefix + "\n".join(splits["train"]) + "\n\n", encoding="utf-8")
    (root / "test.csv").write_text("\n".join(splits["test"]) + "\n", encoding="utf-8")
    return splits


def ks_tree(root: Path, labels=("dog", "drum", "piano"), per_class_train: int = 3, per_class_test: int = 1, missing: int = 2) -> None:
    """my_train.txt/my_test.txt; half the clips as videos/<clip>.mp4, half as frames/<clip>/ + audio/<clip>.wav."""
    lines = {"my_train.txt": [], "my_test.txt": []}
    n = 0
    for name, per_class in (("my_train.txt", per_class_train), ("my_test.txt", per_class_test)):
        for label in labels:
            for k in range(per_class):
                clip = f"yt{n:04d}abc_{k * 10:06d}_{k * 10 + 10:06d}"
                if n % 2:
                    write_video(root / "videos" / f"{clip}.mp4", seconds=3.0, fps=4, size_hw=(32, 32), seed=n,
                                with_audio=True, container="mp4")
                else:
                    for f in range(1, 4):
                        write_jpg(root / "frames" / clip / f"frame_{f:05d}.jpg", size_hw=(32, 32), seed=100 * n + f)
                    write_wav(root / "audio" / f"{clip}.wav", seconds=2.0, sr=16000, seed=n, freq=300.0)
                lines[name].append(f"{clip},10,{label}")
                n += 1
    for k in range(missing):
        lines["my_train.txt"].append(f"gone{k:03d}_000000_000010,10,{labels[0]}")
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")


def manifest_tree(root: Path) -> Path:
    rows = ["id,split,label,group,audio:audio,visual:video,still:image"]
    for n in range(18):
        split = "train" if n < 12 else ("val" if n < 15 else "test")
        label = ("cat", "dog", "owl")[n % 3]
        write_video(root / "clips" / f"c{n}.mp4", seconds=2.0, fps=4, size_hw=(32, 32), seed=n, with_audio=True, container="mp4")
        write_jpg(root / "stills" / f"c{n}.jpg", size_hw=(20, 20), seed=n)
        rows.append(f"c{n},{split},{label},g{n // 2},clips/c{n}.mp4,clips/c{n}.mp4,stills/c{n}.jpg")
    path = root / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def cremad_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cremad-raw")
    splits = cremad_tree(root)
    out = tmp_path_factory.mktemp("cremad-prep")
    report = run_prepare(build_spec("cremad").preparer, root, out, SMALL, workers=2, progress=False)
    return root, out, splits, report


def build_spec(name: str):
    from tunebal.data import get_dataset_spec

    return get_dataset_spec(name)


def test_cremad_prepares_counts_shapes_labels_and_groups(cremad_prepared):
    root, out, splits, report = cremad_prepared
    assert report.counts == {"test": 6, "train": 24} and not report.missing and not report.skipped
    manifest = read_manifest(out)
    assert manifest["params"]["class_names"] == list(CLASSES)
    assert manifest["params"]["modalities"]["audio"]["shape"] == [1, 257, 299]  # AIM/OPM papers: 16 kHz, hop 159, 3 s
    assert manifest["params"]["modalities"]["visual"]["shape"] == [24, 24, 3]
    data = build_dataset("cremad", {"root": str(out), **LOAD, "val_fraction": 0.25})
    assert (data.num_classes, data.modalities) == (6, ("audio", "visual"))
    assert data.input_shape("audio") == (1, 257, 299) and data.input_shape("visual") == (1, 3, 16, 16)
    test_ids = [line.split(",")[0].lstrip("\ufeff") for line in splits["test"]]
    assert data.test.ids == sorted(test_ids)  # test untouched: every clip of test.csv, in id order
    want = {line.split(",")[0].lstrip("\ufeff"): CLASSES.index(line.split(",")[1]) for line in splits["train"]}
    ids = data.train.ids + data.val.ids
    assert sorted(ids) == sorted(want) and not set(data.train.ids) & set(data.val.ids)
    got = torch.cat([data.train.labels, data.val.labels]).tolist()
    assert got == [want[i] for i in ids]
    inputs, labels = data.val.batch([0, 1], epoch=0, train=False)
    assert inputs["audio"].dtype == torch.float16 and inputs["visual"].dtype == torch.uint8
    assert tuple(inputs["visual"].shape) == (2, 1, 3, 16, 16)


def test_validation_split_is_stratified_seeded_and_can_be_speaker_disjoint(cremad_prepared):
    _, out, _, _ = cremad_prepared
    data = build_dataset("cremad", {"root": str(out), **LOAD, "val_fraction": 0.25})
    assert torch.bincount(data.val.labels, minlength=6).tolist() == [1] * 6  # stratified: one of each class
    again = build_dataset("cremad", {"root": str(out), **LOAD, "val_fraction": 0.25})
    other = build_dataset("cremad", {"root": str(out), **LOAD, "val_fraction": 0.25, "val_seed": 1})
    assert data.val.ids == again.val.ids and data.val.ids != other.val.ids
    by_actor = build_dataset("cremad", {"root": str(out), **LOAD, "val_fraction": 0.25, "val_by_group": True})
    actors = lambda ids: {i.split("_")[0] for i in ids}  # noqa: E731
    assert actors(by_actor.val.ids) and not actors(by_actor.val.ids) & actors(by_actor.train.ids)
    assert len(by_actor.test) == 6


def test_frames_are_stored_in_natural_order_and_chosen_deterministically(cremad_prepared):
    from media import jpg_colour

    _, out, splits, _ = cremad_prepared
    data = build_dataset("cremad", {"root": str(out), **LOAD, "frames": 2, "val_fraction": 0.25})
    row_index = int(data.test.rows[0])
    stored = data.test.shards.row(row_index)["visual"]
    assert stored.shape == (3, 24, 24, 3)
    clip_no = int(data.test.ids[0].split("_")[1][1:])
    means = [stored[k].reshape(-1, 3).mean(axis=0) for k in range(3)]
    for k, f in enumerate((1, 2, 10)):  # frame_1, frame_2, frame_10 in this order
        np.testing.assert_allclose(means[k], jpg_colour(1000 * clip_no + f), atol=12)
    decode = data.test.decode
    ev = [decode(data.test.shards.row(row_index), row_index, epoch, False)["visual"] for epoch in (0, 1)]
    assert torch.equal(ev[0], ev[1])  # evaluation: segment centres, no randomness
    tr = [decode(data.test.shards.row(row_index), row_index, 3, True)["visual"] for _ in range(2)]
    assert torch.equal(tr[0], tr[1])  # training: seeded by (seed, epoch, row)
    epochs = {decode(data.test.shards.row(row_index), row_index, e, True)["visual"].float().sum().item() for e in range(6)}
    assert len(epochs) > 1  # and differs across epochs


def test_cremad_from_flash_video_decodes_frames_at_one_fps(tmp_path):
    root = tmp_path / "raw"
    cremad_tree(root, per_class_train=2, per_class_test=1, video=True, bom=False)
    report = run_prepare(build_spec("cremad").preparer, root, tmp_path / "out", SMALL, workers=1, progress=False)
    assert report.counts == {"test": 6, "train": 12}
    data = build_dataset("cremad", {"root": str(tmp_path / "out"), **LOAD, "val_fraction": 0.5})
    counts = {int(data.train.shards.row(i)["visual"].shape[0]) for i in range(len(data.train.shards))}
    assert counts == {3}  # 3 s at 1 fps: frames at 0.5, 1.5, 2.5 s (max_frames 3)


def test_ks_mixed_layouts_missing_clips_reported_and_prepared(tmp_path):
    root = tmp_path / "raw"
    ks_tree(root)
    out = tmp_path / "out"
    code = main(["prepare", "ks", "--root", str(root), "--out", str(out), "--workers", "2", "--no-progress",
                 "--data", "frame_size=24", "--data", "profile=ogm22k"])
    assert code == 0
    manifest = read_manifest(out)
    assert manifest["params"]["class_names"] == ["dog", "drum", "piano"]
    assert manifest["splits"]["train"]["count"] == 9 and manifest["splits"]["test"]["count"] == 3
    assert (out / "missing.txt").read_text().split() == ["gone000_000000_000010", "gone001_000000_000010"]
    assert manifest["params"]["modalities"]["audio"]["shape"] == [1, 257, 188]  # OGM-GE loader: 22.05 kHz, hop 353
    data = build_dataset("ks", {"root": str(out), **LOAD, "profile": "ogm22k", "frame_size": 24, "val_fraction": 0.34})
    assert data.input_shape("visual") == (3, 3, 16, 16)
    frames = {int(data.train.shards.row(i)["visual"].shape[0]) for i in range(len(data.train.shards))}
    assert frames == {3}  # 3 jpgs, or a 3 s mp4 at 1 fps
    as_prepared = build_dataset("ks", {"root": str(out), **LOAD, "val_fraction": 0.34})  # '' = as prepared
    assert as_prepared.input_shape("audio") == (1, 257, 188)
    with pytest.raises(ConfigError, match="prepared with profile='ogm22k', not 'stft16k-10s'"):
        build_dataset("ks", {"root": str(out), **LOAD, "profile": "stft16k-10s"})


def test_manifest_csv_brings_three_modalities_and_its_own_validation_split(tmp_path):
    csv = manifest_tree(tmp_path)
    data = build_dataset("manifest", {"manifest": str(csv), **LOAD, "frame_size": 24, "profile": "ogm22k"})
    assert data.modalities == ("audio", "visual", "still")
    assert data.kinds == {"audio": "spectrogram", "visual": "frames", "still": "frames"}
    assert (len(data.train), len(data.val), len(data.test)) == (12, 3, 3)
    assert data.val.ids == ["c12", "c13", "c14"] and data.class_names == ["cat", "dog", "owl"]
    assert data.input_shape("still") == (3, 3, 16, 16)  # a 1-frame clip repeated to `frames`


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_root", "is not a directory"),
        ("absent_clip", "clips named by the split files are absent"),
        ("unknown_label", "unknown label 'XYZ'"),
        ("empty_test", "split 'test' is empty"),
        ("corrupt_wav", "AudioWAV/"),
        ("corrupt_jpg", "Image-01-FPS/"),
    ],
)
def test_bad_raw_inputs_are_one_line_and_exit_2(tmp_path, capsys, case, message):
    root = tmp_path / "raw"
    splits = cremad_tree(root, per_class_train=1, per_class_test=1, bom=False)
    first = splits["train"][0].split(",")[0]
    if case == "missing_root":
        root = tmp_path / "nope"
    elif case == "absent_clip":
        (root / "AudioWAV" / f"{first}.wav").unlink()
    elif case == "unknown_label":
        (root / "train.csv").write_text(f"{first},XYZ\n")
    elif case == "empty_test":
        (root / "test.csv").write_text("\n")
    elif case == "corrupt_wav":
        corrupt_file(root / "AudioWAV" / f"{first}.wav")
    elif case == "corrupt_jpg":
        corrupt_file(root / "Image-01-FPS" / first / "frame_2.jpg")
    code = main(["prepare", "cremad", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress",
                 "--data", "frame_size=24"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tunebal: error:") and message in err[0], err


def test_skip_bad_prepares_the_rest_and_lists_what_was_skipped(tmp_path, capsys):
    root = tmp_path / "raw"
    splits = cremad_tree(root, per_class_train=2, per_class_test=1, bom=False)
    first = splits["train"][0].split(",")[0]
    corrupt_file(root / "AudioWAV" / f"{first}.wav")
    code = main(["prepare", "cremad", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--no-progress", "--skip-bad", "--data", "frame_size=24"])
    assert code == 0
    skipped = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(first) and "AudioWAV" in skipped[0]
    assert read_manifest(tmp_path / "out")["splits"]["train"]["count"] == 11


def test_corrupt_mp4_names_the_file(tmp_path, capsys):
    root = tmp_path / "raw"
    ks_tree(root, per_class_train=1, per_class_test=1, missing=0)
    video = sorted((root / "videos").glob("*.mp4"))[0]
    corrupt_file(video)
    code = main(["prepare", "ks", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and video.name in err[0], err


def _engine(data, workers: int):
    from tunebal.engine import Engine

    return Engine(data, "baseline", {"backbone": "small", "width": 4, "batch_size": 5, "lr": 0.05,
                                     "loader_workers": workers, "lr_schedule": "step", "lr_step": 1, "lr_gamma": 0.5})


def test_training_from_shards_resumes_bit_exactly_whatever_the_worker_count(cremad_prepared, tmp_path):
    _, out, _, _ = cremad_prepared
    data = build_dataset("cremad", {"root": str(out), **LOAD, "val_fraction": 0.25})
    straight = _engine(data, 2)
    for _ in range(2):
        last = straight.run_epoch()
    first = _engine(data, 0)
    first.run_epoch()
    first.save(str(tmp_path / "e1.arrow"))
    resumed = _engine(data, 1)
    resumed.load(str(tmp_path / "e1.arrow"))
    again = resumed.run_epoch()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert last["val/acc"] == again["val/acc"] and last["train/loss"] == again["train/loss"]


@pytest.mark.ray
@pytest.mark.parametrize("dataset", ["ks", "cremad", "manifest", "ave", "ucf101", "vggsound", "mosi"])
def test_search_end_to_end_on_each_real_dataset(ray_cluster, tmp_path, dataset):
    from tunebal.tune.runner import SearchOptions, run_search

    raw = tmp_path / "raw"
    media = {"frame_size": 24, "profile": "ogm22k"}
    if dataset == "ks":
        ks_tree(raw, per_class_train=4, per_class_test=1, missing=1)
        data_values = {"root": str(raw), "val_fraction": 0.25, **media}
    elif dataset == "cremad":
        cremad_tree(raw, per_class_train=4, per_class_test=1)
        data_values = {"root": str(raw), "val_fraction": 0.25, **media}
    elif dataset == "manifest":
        data_values = {"manifest": str(manifest_tree(raw)), **media}
    elif dataset == "ave":
        from test_datasets_av import ave_tree

        ave_tree(raw)
        data_values = {"root": str(raw), **media}
    elif dataset == "ucf101":
        from test_datasets_av import ucf_tree

        ucf_tree(raw)
        data_values = {"root": str(raw), "frame_size": 24, "val_fraction": 0.34}
    elif dataset == "vggsound":
        from test_datasets_av import vgg_tree

        vgg_tree(raw)
        data_values = {"root": str(raw), "val_fraction": 0.25, **media}
    else:  # a pickle is prepared explicitly (--trust-pickle), then searched from its shards
        from test_mosi import mosi_pickle

        raw.mkdir()
        mosi_pickle(raw / "m.pkl")
        run_prepare(build_spec("mosi").preparer, raw, tmp_path / "prep", {}, progress=False, trust_pickle=True)
        data_values = {"root": str(tmp_path / "prep")}
    data_values.update({"image_size": 16, "frames": 1})
    opts = SearchOptions(
        method="aim", dataset=dataset, num_samples=2, max_epochs=2, storage=str(tmp_path / "results"),
        name=f"{dataset}-e2e", data_values=data_values,
        overrides={"backbone": "small", "width": 4, "batch_size": 32, "start_epoch": 1}, verbose=0,
    )
    summary = run_search(opts)
    assert summary["num_trials"] == 2 and summary["best"] is not None
    test = summary["best"]["test"]
    modalities = build_dataset(dataset, opts.data_values).modalities
    assert 0.0 <= test["test/acc"] <= 1.0 and all(f"test/acc_{m}" in test for m in modalities)
    saved = json.loads((Path(summary["experiment"]) / "summary.json").read_text())
    assert saved["dataset"] == dataset and saved["best"]["trial"] == summary["best"]["trial"]
