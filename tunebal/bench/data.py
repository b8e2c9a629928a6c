"""Data-layer benchmarks: ``tunebal bench data`` / ``python -m tunebal.bench.data``.

On a generated CREMA-D-shaped raw tree (real wav files and real JPEG frame folders, written
here with soundfile and Pillow; CREMA-D's sizes: 3 s of 16 kHz audio, 3 frames of 480 x 360
per clip) it measures, in one process:

1. **Preparation throughput**: ``tunebal prepare cremad`` with 1 and with all CPUs (clips/s).
2. **Loading throughput**: samples/s of a training epoch's batches read from the prepared
   shards against the same batches decoded from the raw files every epoch (the same frame
   choice, crop and flip, the same batch size, the same loader workers), with no model, and
   an epoch of the same small model on both (the ratio a CPU trial sees; on a GPU the model's
   share shrinks and the data ratio dominates).
3. **Memory**: two processes reading every sample of the same prepared shards; each
   reports its resident set (``/proc/self/smaps_rollup``: Rss, shared and private pages).
   The second reader's private memory does not grow by the dataset's size: the shards are
   memory maps over one page cache.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunebal.data.cremad import CLASSES


def write_cremad_tree(root: Path, n_train: int, n_test: int, frame_hw: tuple[int, int] = (360, 480), seed: int = 0) -> None:
    """A CREMA-D raw layout with real wav and JPEG files (AudioWAV/, Image-01-FPS/, train.csv, test.csv)."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        label = CLASSES[i % len(CLASSES)]
        clip = f"{1001 + i % 91}_S{i:04d}_{label}_XX"
        t = np.arange(int(16000 * 2.6)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * (i % 6)) * t) + 0.05 * rng.standard_normal(t.shape)
        sf.write(root / "AudioWAV" / f"{clip}.wav", wave.astype(np.float32), 16000)
        folder = root / "Image-01-FPS" / clip
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(3):
            img = rng.integers(0, 255, (*frame_hw, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"frame_{k:05d}.jpg", quality=90)
        lines[split].append(f"{clip},{label}")
    for split, name in (("train", "train.csv"), ("test", "test.csv")):
        (root / name).write_text("\n".join(lines[split]) + "\n")


class RawSource:
    """The same split as a ShardSource, but every sample decoded from the raw files (for comparison only)."""

    streaming = True

    def __init__(self, shard_source, clips: dict[str, Any], values: dict[str, Any]) -> None:
        from tunebal.data.cremad import CremaD

        self.shard_source, self.clips, self.values = shard_source, clips, values
        self.preparer = CremaD()

    @property
    def labels(self) -> torch.Tensor:
        return self.shard_source.labels

    def __len__(self) -> int:
        return len(self.shard_source)

    def batch(self, indices, *, epoch: int = 0, train: bool = False):
        src, samples = self.shard_source, []
        for i in torch.as_tensor(indices).tolist():
            row = int(src.rows[i])
            arrays = self.preparer.decode(self.clips[src.shards.ids[row]], self.values)
            samples.append(src.decode(arrays, row, epoch, train))
        inputs = {m: torch.stack([s[m] for s in samples]) for m in samples[0]}
        return inputs, self.labels[torch.as_tensor(indices)]


def _smaps() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key.strip()] = int(value.split()[0])  # kB
    return out


def _read_all(prepared: str, queue, hold: float) -> None:
    from tunebal.data import build_dataset

    data = build_dataset("cremad", {"root": prepared, "image_size": 112})
    before = _smaps()
    total = 0
    for source in (data.train, data.val, data.test):
        for i in range(len(source)):
            row = source.shards.row(int(source.rows[i]))
            total += sum(int(np.asarray(v).sum(dtype=np.float64) != 0) for v in row.values())
    after = _smaps()
    queue.put({"before": before, "after": after, "rows": total})
    time.sleep(hold)


def memory(prepared: str) -> dict[str, Any]:
    """Two concurrent readers of the same shards: resident, shared and private memory of each (MiB)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    first = ctx.Process(target=_read_all, args=(prepared, queue, 20.0))
    first.start()
    a = queue.get(timeout=600)
    second = ctx.Process(target=_read_all, args=(prepared, queue, 0.0))
    second.start()
    b = queue.get(timeout=600)
    second.join()
    first.terminate()
    first.join()

    def mib(d: dict[str, int], key: str) -> float:
        return round(d.get(key, 0) / 1024, 1)

    rows = {}
    for name, r in (("first reader", a), ("second reader", b)):
        rows[name] = {
            "rss_before": mib(r["before"], "Rss"),
            "rss_after": mib(r["after"], "Rss"),
            "shared_after": mib(r["after"], "Shared_Clean") + mib(r["after"], "Shared_Dirty"),
            "anonymous_growth": round((r["after"].get("Anonymous", 0) - r["before"].get("Anonymous", 0)) / 1024, 1),
            "private_growth": round(
                (r["after"].get("Private_Clean", 0) + r["after"].get("Private_Dirty", 0)
                 - r["before"].get("Private_Clean", 0) - r["before"].get("Private_Dirty", 0)) / 1024, 1),
        }
    return rows


def run(n_train: int = 120, n_test: int = 24, batch: int = 16, workers: int = 1, epochs: int = 2) -> dict[str, Any]:
    from tunebal.data import build_dataset
    from tunebal.data.cremad import CremaD
    from tunebal.data.prepare import run_prepare, read_manifest
    from tunebal.engine import Engine

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tunebal-bench-data-") as tmp:
        root, prepared = Path(tmp) / "raw", Path(tmp) / "prepared"
        write_cremad_tree(root, n_train, n_test)
        preparer = CremaD()
        for n_workers in sorted({1, os.cpu_count() or 1}):
            target = prepared if n_workers == (os.cpu_count() or 1) else Path(tmp) / f"prep{n_workers}"
            report = run_prepare(preparer, root, target, {}, workers=n_workers, progress=False)
            out[f"prepare_clips_per_s_{n_workers}_workers"] = round(report.decoded / report.seconds, 1)
        manifest = read_manifest(prepared)
        out["prepared_mib"] = round(sum(e["bytes"] for s in manifest["splits"].values() for e in s["shards"]) / 2**20, 1)
        values = {"root": str(prepared), "image_size": 112, "loader_workers": workers}
        data = build_dataset("cremad", {k: v for k, v in values.items() if k != "loader_workers"})
        scan = preparer.scan(root, preparer.knobs.resolve({}))
        clips = {c.id: c for c in scan.clips}
        prep_values = preparer.knobs.resolve({})
        raw_train = RawSource(data.train, clips, prep_values)
        engine = Engine(data, "baseline", {"batch_size": batch, "backbone": "small", "loader_workers": workers})
        plan_len = len(engine.batch_plan(len(data.train), True))

        def drain(source) -> float:
            start = time.perf_counter()
            for _ in engine.iterate(source, shuffle=True):
                pass
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"shards": [], "raw": []}
        for _ in range(epochs):  # interleaved on the same batches
            times["shards"].append(drain(data.train))
            times["raw"].append(drain(raw_train))
        n = sum(len(b) for b in engine.batch_plan(len(data.train), True))
        out["load_samples_per_s_shards"] = round(n / min(times["shards"]), 1)
        out["load_samples_per_s_raw"] = round(n / min(times["raw"]), 1)
        out["load_ratio"] = round(min(times["raw"]) / min(times["shards"]), 2)
        epoch_times: dict[str, list[float]] = {"shards": [], "raw": []}
        for _ in range(epochs):
            for name, source in (("shards", data.train), ("raw", raw_train)):
                engine.data.train = source
                start = time.perf_counter()
                engine.train_epoch()
                epoch_times[name].append(time.perf_counter() - start)
        engine.data.train = data.train
        out["epoch_s_small_model_shards"] = round(min(epoch_times["shards"]), 2)
        out["epoch_s_small_model_raw"] = round(min(epoch_times["raw"]), 2)
        out["epoch_ratio_small_model"] = round(min(epoch_times["raw"]) / min(epoch_times["shards"]), 2)
        out["batches_per_epoch"] = plan_len
        out["memory_mib"] = memory(str(prepared))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=120)
    parser.add_argument("--n-test", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.n_train, args.n_test, args.batch, args.workers, args.epochs), indent=2))


if __name__ == "__main__":
    main()
