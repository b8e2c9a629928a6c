"""AVE (official three splits, duplicate ids) and VGGSound (csv, missing clips, preparation shared by machines)."""

from __future__ import annotations

import numpy as np
import pytest

from media import write_video
from tunebal.cli import main
from tunebal.data import build_dataset
from tunebal.data.prepare import read_manifest

LOAD = {"image_size": 16}
SMALL = ["--data", "frame_size=24", "--no-progress", "--workers", "1"]


def ave_tree(root, duplicate: bool = True):
    rows = {"trainSet.txt": [], "valSet.txt": [], "testSet.txt": []}
    n = 0
    for name, per_class in (("trainSet.txt", 3), ("valSet.txt", 1), ("testSet.txt", 1)):
        for category in ("Church bell", "Dog barking"):
            for _ in range(per_class):
                video = f"vid{n:03d}"
                write_video(root / "AVE" / f"{video}.mp4", seconds=3.0, fps=2, size_hw=(32, 32), seed=n, with_audio=True)
                rows[name].append(f"{category}&{video}&good&0&3")
                n += 1
    if duplicate:
        rows["testSet.txt"].append("Dog barking&vid000&good&0&3")  # vid000 is a train video too
    for name, lines in rows.items():
        (root / name).write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(lines) + "\n")


def test_ave_uses_its_own_splits_drops_duplicate_ids_and_normalises_each_spectrogram(tmp_path):
    ave_tree(tmp_path / "raw")
    out = tmp_path / "out"
    assert main(["prepare", "ave", "--root", str(tmp_path / "raw"), "--out", str(out), *SMALL]) == 0
    manifest = read_manifest(out)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 6, "val": 2, "test": 2}
    assert manifest["params"]["class_names"] == ["Church bell", "Dog barking"]
    assert len(manifest["notes"]) == 1 and "1 duplicate listings dropped: vid000\ttest" in manifest["notes"][0]
    data = build_dataset("ave", {"root": str(out), **LOAD})
    assert data.val.ids == ["vid006", "vid007"]  # the shipped validation split, nothing carved
    assert data.input_shape("audio") == (1, 257, 1004) and data.input_shape("visual") == (10, 3, 16, 16)
    spec = data.train.shards.row(0)["audio"].astype(np.float64)
    assert abs(spec.mean()) < 1e-2 and abs(spec.std() - 1.0) < 1e-2  # per-sample z-score (float16 storage)


def vgg_tree(root, n: int = 12, missing: int = 2):
    lines = []
    for k in range(n + missing):
        ytid, label = f"y{k:04d}", ("dog, barking", "piano")[k % 2]
        split = "train" if k < n - 4 else "test"
        if k < n:
            write_video(root / "video" / f"{ytid}_{30 + k:06d}.mp4", seconds=2.0, fps=2, size_hw=(32, 32), seed=k, with_audio=True)
        lines.append(f'{ytid},{30 + k},"{label}",{split}')
    (root / "vggsound.csv").write_text("\n".join(lines) + "\n")


def test_vggsound_parts_on_two_machines_then_a_finishing_run_equal_one_preparation(tmp_path, capsys):
    vgg_tree(tmp_path / "raw")
    raw = str(tmp_path / "raw")
    args = ["--shard-size", "3", "--data", "profile=stft16k-5s-256", *SMALL]
    assert main(["prepare", "vggsound", "--root", raw, "--out", str(tmp_path / "one"), *args]) == 0
    shared = tmp_path / "shared"
    for part in ("0/2", "1/2"):
        assert main(["prepare", "vggsound", "--root", raw, "--out", str(shared), "--shard", part, *args]) == 0
        assert not (shared / "manifest.json").exists()
    capsys.readouterr()
    assert main(["prepare", "vggsound", "--root", raw, "--out", str(shared), *args]) == 0
    assert "0 clips decoded" in capsys.readouterr().out  # every shard was already done by a part
    one, two = read_manifest(tmp_path / "one"), read_manifest(shared)
    assert one["params_hash"] == two["params_hash"]
    for split in ("train", "test"):
        assert [e["sha256"] for e in one["splits"][split]["shards"]] == [e["sha256"] for e in two["splits"][split]["shards"]]
    assert two["missing"] == ["y0012_000042", "y0013_000043"]
    assert two["params"]["class_names"] == ["dog, barking", "piano"]
    data = build_dataset("vggsound", {"root": str(shared), **LOAD, "val_fraction": 0.25})
    assert data.input_shape("audio") == (1, 129, 626)


@pytest.mark.parametrize("bad", ["3/2", "x", "-1/2"])
def test_bad_shard_spec_is_one_line(tmp_path, capsys, bad):
    vgg_tree(tmp_path / "raw", n=4, missing=0)
    code = main(["prepare", "vggsound", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o"), "--shard", bad, *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--shard" in err[0]
