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


def ucf_tree(root, flow_for_all: bool = True):
    from PIL import Image

    from media import write_jpg

    classes = ["ApplyEyeMakeup", "Basketball", "Biking"]
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    names = []
    for c, cls in enumerate(classes):
        for g in range(1, 5):
            name = f"v_{cls}_g{g:02d}_c01"
            names.append((cls, name, g))
            for f in range(1, 4):
                write_jpg(root / "rgb" / name / f"img_{f:05d}.jpg", size_hw=(24, 32), seed=100 * len(names) + f)
            if flow_for_all or len(names) > 1:
                for axis, level in (("u", 100 + 10 * c), ("v", 150)):
                    folder = root / "flow" / axis / name
                    folder.mkdir(parents=True)
                    for f in range(1, 3):
                        Image.fromarray(np.full((24, 32), level, dtype=np.uint8)).save(folder / f"frame{f:06d}.jpg", quality=100)
    for k, test_groups in (("1", {1}), ("2", {2})):
        train = [f"{cls}/{name}.avi {classes.index(cls) + 1}" for cls, name, g in names if g not in test_groups]
        test = [f"{cls}/{name}.avi" for cls, name, g in names if g in test_groups]
        (lists / f"trainlist0{k}.txt").write_text("\n".join(train) + "\n")
        (lists / f"testlist0{k}.txt").write_text("\n".join(test) + "\n")
    return classes


def test_ucf101_rgb_and_flow_one_pool_official_splits_chosen_at_load(tmp_path):
    classes = ucf_tree(tmp_path / "raw")
    out = tmp_path / "out"
    assert main(["prepare", "ucf101", "--root", str(tmp_path / "raw"), "--out", str(out), *SMALL]) == 0
    manifest = read_manifest(out)
    assert manifest["splits"]["all"]["count"] == 12 and sorted(manifest["memberships"]) == ["1", "2"]
    one = build_dataset("ucf101", {"root": str(out), **LOAD, "val_fraction": 0.34})
    two = build_dataset("ucf101", {"root": str(out), **LOAD, "val_fraction": 0.34, "official_split": 2})
    assert one.class_names == classes and one.modalities == ("rgb", "flow")
    assert one.input_shape("flow") == (3, 2, 16, 16) and one.input_shape("rgb") == (3, 3, 16, 16)
    assert all("_g01_" in i for i in one.test.ids) and all("_g02_" in i for i in two.test.ids)
    assert len(one.train) + len(one.val) == 9
    row = one.test.shards.row(int(one.test.rows[0]))["flow"]
    assert row.shape == (2, 24, 24, 2)
    cls = classes.index(one.test.ids[0].split("_")[1])
    assert abs(int(row[..., 0].mean()) - (100 + 10 * cls)) <= 2 and abs(int(row[..., 1].mean()) - 150) <= 2
    with pytest.raises(Exception, match="official split 3"):
        build_dataset("ucf101", {"root": str(out), **LOAD, "official_split": 3})


def test_flow_flip_mirrors_horizontal_motion():
    import torch

    from tunebal.data.transforms import _FlowFlip

    x = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    x[:, 0] = torch.tensor([[10, 20, 30], [10, 20, 30]], dtype=torch.uint8)
    x[:, 1] = 77
    flips = []
    for seed in range(20):
        torch.manual_seed(seed)
        y = _FlowFlip()(x.clone())
        flips.append(not torch.equal(y, x))
        if flips[-1]:
            assert y[0, 0, 0].tolist() == [225, 235, 245] and int(y[0, 1].unique()) == 77
    assert any(flips) and not all(flips)


def test_ucf101_missing_flow_is_one_line_or_skipped(tmp_path, capsys):
    ucf_tree(tmp_path / "raw", flow_for_all=False)
    code = main(["prepare", "ucf101", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o"), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "1 clips named by the split files are absent" in err[0]
    assert main(["prepare", "ucf101", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o"), "--skip-bad", *SMALL]) == 0
    assert read_manifest(tmp_path / "o")["missing"] == ["v_ApplyEyeMakeup_g01_c01"]
