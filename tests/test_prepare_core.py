"""The shard format, the preparation driver and the streaming path of the engine, on generated clips.

The preparer here makes its arrays from the clip id (no media codecs; those are exercised by
tests/test_datasets.py), so these tests pin the machinery: resume, verification, refusal to mix
parameters, digests, worker-independent batches and bit-exact resume from shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
import torch

from tunebal.data.base import MultimodalData, Split
from tunebal.data.prepare import Clip, Preparer, ScanResult, read_manifest, run_prepare
from tunebal.data.shards import ModalitySpec, ShardSet, ShardSource
from tunebal.errors import DataError
from tunebal.knobs import Knob, knobs

CLASSES = ["a", "b", "c"]


def _clip_arrays(clip_id: str, scale: float) -> dict[str, np.ndarray]:
    seed = int(clip_id.split("-")[1])
    rng = np.random.default_rng(seed)
    label = seed % 3
    spec = rng.standard_normal((1, 8, 6)).astype(np.float32) + scale * label
    frames = rng.standard_normal((4, 5)).astype(np.float32) + label
    return {"audio": spec, "vec": frames.reshape(-1)[:12].copy()}


class GeneratedPreparer(Preparer):
    """Clips 'c-<n>'; label n % 3; 'c-<bad>' fail to decode; 'gone-*' are named but absent."""

    name = "generated"
    knobs = knobs(Knob("scale", "float", 1.0, "class offset of the spectrogram"))

    def __init__(self, n_train: int = 40, n_test: int = 13, bad: tuple[int, ...] = (), absent: int = 0) -> None:
        self.n_train, self.n_test, self.bad, self.absent = n_train, n_test, bad, absent

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        clips = [Clip(f"c-{i:03d}", "train", CLASSES[i % 3], f"g{i // 4}") for i in range(self.n_train)]
        clips += [Clip(f"c-{i:03d}", "test", CLASSES[i % 3], f"g{i // 4}") for i in range(500, 500 + self.n_test)]
        return ScanResult(clips, CLASSES, [f"gone-{i}" for i in range(self.absent)])

    def modalities(self, values: Mapping[str, Any]) -> dict[str, ModalitySpec]:
        return {"audio": ModalitySpec("spectrogram", "float32", (1, 8, 6)), "vec": ModalitySpec("vector", "float32", (12,))}

    def decode(self, clip: Clip, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if int(clip.id.split("-")[1]) in self.bad:
            raise DataError(f"cannot decode audio file /raw/{clip.id}.wav: garbage")
        return _clip_arrays(clip.id, values["scale"])


def _prepare(tmp_path: Path, preparer: Preparer | None = None, **kw: Any):
    root = tmp_path / "raw"
    root.mkdir(exist_ok=True)
    return run_prepare(preparer or GeneratedPreparer(), root, tmp_path / "out", kw.pop("values", {}), progress=False, **kw)


def _identity_decoder(row, index, epoch, train):
    return {m: torch.from_numpy(np.array(x)) for m, x in row.items()}


def _streaming_data(out: Path) -> MultimodalData:
    manifest = read_manifest(out)
    mods = {m: ModalitySpec.from_json(d) for m, d in manifest["params"]["modalities"].items()}
    train = ShardSet(out, manifest["splits"]["train"]["shards"], mods, manifest["params_hash"])
    test = ShardSet(out, manifest["splits"]["test"]["shards"], mods, manifest["params_hash"])
    n = len(train)
    return MultimodalData(
        name="generated", modalities=("audio", "vec"), kinds={"audio": "spectrogram", "vec": "vector"},
        num_classes=3, class_names=CLASSES,
        train=ShardSource(train, np.arange(0, n - 8), _identity_decoder),
        val=ShardSource(train, np.arange(n - 8, n), _identity_decoder),
        test=ShardSource(test, np.arange(len(test)), _identity_decoder),
        input_shapes={"audio": (1, 8, 6), "vec": (12,)},
    )


def _in_memory_twin(data: MultimodalData) -> MultimodalData:
    def split(src: ShardSource) -> Split:
        inputs, labels = src.batch(list(range(len(src))))
        return Split({m: x.float() for m, x in inputs.items()}, labels)

    return MultimodalData(
        name="generated", modalities=data.modalities, kinds=data.kinds, num_classes=3, class_names=CLASSES,
        train=split(data.train), val=split(data.val), test=split(data.test),
    )


def test_prepare_writes_counts_labels_and_round_trips_every_array(tmp_path):
    report = _prepare(tmp_path, shard_size=16)
    assert report.counts == {"test": 13, "train": 40} and not report.already
    manifest = read_manifest(tmp_path / "out")
    assert [e["rows"] for e in manifest["splits"]["train"]["shards"]] == [16, 16, 8]
    assert manifest["params"]["class_names"] == CLASSES
    mods = {m: ModalitySpec.from_json(d) for m, d in manifest["params"]["modalities"].items()}
    shards = ShardSet(tmp_path / "out", manifest["splits"]["train"]["shards"], mods, manifest["params_hash"])
    assert shards.ids == [f"c-{i:03d}" for i in range(40)]
    assert shards.labels.tolist() == [i % 3 for i in range(40)]
    for i in (0, 17, 39):
        row, want = shards.row(i), _clip_arrays(f"c-{i:03d}", 1.0)
        assert set(row) == {"audio", "vec"}
        np.testing.assert_array_equal(row["audio"], want["audio"])
        np.testing.assert_array_equal(row["vec"], want["vec"])


def test_finished_preparation_is_verified_not_redone_and_other_params_are_refused(tmp_path):
    _prepare(tmp_path, shard_size=16)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.arrow")}
    again = _prepare(tmp_path, shard_size=16)
    assert again.already and again.decoded == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.arrow")}
    with pytest.raises(DataError, match="other parameters"):
        _prepare(tmp_path, shard_size=16, values={"scale": 2.0})
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.arrow")}


def test_interrupted_preparation_resumes_at_the_first_unfinished_shard(tmp_path):
    _prepare(tmp_path, shard_size=16)
    out = tmp_path / "out"
    (out / "manifest.json").unlink()
    (out / "train-00001.json").unlink()  # shard 1 was being written when the run died
    kept = (out / "train-00000.arrow").stat().st_mtime_ns
    report = _prepare(tmp_path, shard_size=16)
    assert report.decoded == 16  # only shard 1 again
    assert (out / "train-00000.arrow").stat().st_mtime_ns == kept
    assert report.counts == {"test": 13, "train": 40}


def test_a_corrupt_shard_is_redone_on_resume_and_rejected_on_load(tmp_path):
    _prepare(tmp_path, shard_size=16)
    out = tmp_path / "out"
    path = out / "train-00001.arrow"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="train-00001"):
        data = _streaming_data(out)
        for i in range(len(data.train)):
            data.train.batch([i])
    (out / "manifest.json").unlink()
    report = _prepare(tmp_path, shard_size=16)
    assert report.decoded == 16  # the sidecar's sha256 no longer matches: shard 1 is decoded again


def test_row_digest_rejects_an_edited_payload_and_a_manifest_edit_is_caught(tmp_path):
    _prepare(tmp_path, shard_size=64)
    out = tmp_path / "out"
    path = out / "train-00000.arrow"
    blob = bytearray(path.read_bytes())
    want = _clip_arrays("c-005", 1.0)["audio"].tobytes()
    at = bytes(blob).find(want)
    assert at > 0
    blob[at + 3] ^= 0x01  # one bit of clip c-005's spectrogram
    path.write_bytes(bytes(blob))
    data = _streaming_data(out)
    data.train.batch([4])  # other rows still read
    with pytest.raises(DataError, match=r"row 5 \(clip c-005\) fails its digest"):
        data.train.batch([5])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["params"]["knobs"]["scale"] = 3.0
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="parameter hash does not match"):
        read_manifest(out)


def test_bad_clips_fail_with_the_path_or_are_skipped_and_listed(tmp_path):
    with pytest.raises(DataError, match=r"/raw/c-007\.wav"):
        _prepare(tmp_path, GeneratedPreparer(bad=(7,)), shard_size=16)
    report = _prepare(tmp_path, GeneratedPreparer(bad=(7,)), shard_size=16, skip_bad=True)
    assert report.counts["train"] == 39 and [s.split("\t")[0] for s in report.skipped] == ["c-007"]
    assert (tmp_path / "out" / "skipped.txt").read_text().startswith("c-007\t")


def test_absent_clips_are_an_error_unless_skip_bad(tmp_path):
    with pytest.raises(DataError, match="3 clips named by the split files are absent"):
        _prepare(tmp_path, GeneratedPreparer(absent=3))
    report = _prepare(tmp_path, GeneratedPreparer(absent=3), skip_bad=True)
    assert report.missing == ["gone-0", "gone-1", "gone-2"]
    assert (tmp_path / "out" / "missing.txt").read_text().split() == report.missing


def test_empty_split_and_missing_root_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="split 'test' is empty"):
        _prepare(tmp_path, GeneratedPreparer(n_test=0))
    with pytest.raises(DataError, match="is not a directory"):
        run_prepare(GeneratedPreparer(), tmp_path / "nope", tmp_path / "out", {}, progress=False)


def test_a_pool_of_workers_writes_the_same_bytes_as_one_process(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    run_prepare(GeneratedPreparer(), root, tmp_path / "one", {}, workers=1, shard_size=16, progress=False)
    run_prepare(GeneratedPreparer(), root, tmp_path / "two", {}, workers=2, shard_size=16, progress=False)
    a, b = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert [e["sha256"] for e in a["splits"]["train"]["shards"]] == [e["sha256"] for e in b["splits"]["train"]["shards"]]


def _train(data: MultimodalData, epochs: int, workers: int, state_from: Path | None = None, save_to: Path | None = None):
    from tunebal.engine import Engine

    engine = Engine(data, "baseline", {"epochs": 4, "batch_size": 6, "lr": 0.05, "loader_workers": workers,
                                       "lr_schedule": "step", "lr_step": 1, "lr_gamma": 0.5})
    if state_from is not None:
        engine.load(str(state_from))
    metrics = None
    for _ in range(epochs):
        metrics = engine.run_epoch()
    if save_to is not None:
        engine.save(str(save_to))
    return engine, metrics


def _same_state(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_streaming_training_equals_in_memory_training_whatever_the_worker_count(tmp_path):
    _prepare(tmp_path, shard_size=16)
    data = _streaming_data(tmp_path / "out")
    assert data.streaming
    memory, m_metrics = _train(_in_memory_twin(data), 2, 0)
    inline, i_metrics = _train(data, 2, 0)
    pooled, p_metrics = _train(data, 2, 2)
    assert _same_state(memory, inline) and _same_state(inline, pooled)
    assert m_metrics["val/acc"] == i_metrics["val/acc"] == p_metrics["val/acc"]
    assert m_metrics["train/loss"] == p_metrics["train/loss"]


def test_evaluation_from_shards_scores_every_test_sample(tmp_path):
    from tunebal.engine import Engine

    _prepare(tmp_path, shard_size=5)
    data = _streaming_data(tmp_path / "out")
    engine = Engine(data, "baseline", {"batch_size": 4, "loader_workers": 1})
    seen = [labels for _, labels in engine.iterate(data.test, shuffle=False, batch_size=4)]
    assert sum(len(x) for x in seen) == 13
    assert torch.equal(torch.cat(seen), data.test.labels)


def test_resume_from_shards_is_bit_exact(tmp_path):
    _prepare(tmp_path, shard_size=16)
    data = _streaming_data(tmp_path / "out")
    straight, straight_metrics = _train(data, 3, 1)
    _train(data, 1, 1, save_to=tmp_path / "e1.arrow")
    resumed, resumed_metrics = _train(data, 2, 1, state_from=tmp_path / "e1.arrow")
    assert _same_state(straight, resumed)
    assert straight_metrics["val/acc"] == resumed_metrics["val/acc"]
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"] == 0.05 * 0.5**3


def test_second_reader_maps_the_same_pages(tmp_path):
    """Shards are memory maps: a second reader's rows are views over the file, not private copies."""
    _prepare(tmp_path, shard_size=64)
    manifest = read_manifest(tmp_path / "out")
    mods = {m: ModalitySpec.from_json(d) for m, d in manifest["params"]["modalities"].items()}
    shards = ShardSet(tmp_path / "out", manifest["splits"]["train"]["shards"], mods, manifest["params_hash"])
    row = shards.row(3)
    assert not row["audio"].flags.owndata and not row["audio"].flags.writeable
    assert os.path.exists(tmp_path / "out" / "train-00000.arrow")
