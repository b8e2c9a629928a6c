"""``tunebal prepare``: decode a raw dataset once, in a process pool, into Arrow shards.

A dataset that reads raw files has a :class:`Preparer` (one per dataset module): ``scan``
lists the clips named by the dataset's split files (with their labels, groups and source
files), ``modalities`` says how each modality is stored, ``decode`` turns one clip into
arrays. :func:`run_prepare` does the rest, the same way for every dataset:

1. **Check** the raw root and the split files (one line and exit 2 on a missing root, an
   unknown label, an empty split, clips named but absent unless the dataset tolerates it or
   ``--skip-bad`` is given).
2. **Plan** each split as fixed chunks of ``shard_size`` clips in sorted-id order.
3. **Decode** each chunk in a process pool with a progress bar and write it as one shard
   (tunebal/data/shards.py), atomically, with a sidecar ``<shard>.json`` recording its digest.
   An interrupted preparation resumes at the first shard without a verified sidecar.
4. **Finish** with ``manifest.json``: the preprocessing parameters and their hash, class names,
   per-split counts and shards, and the lists of missing and skipped clips (also written as
   ``missing.txt`` / ``skipped.txt``). Re-running a finished preparation verifies it (counts,
   shapes, sizes, index digests; the full file digests with ``--verify``) and does nothing else.

Nothing already prepared is deleted: a directory prepared with other parameters is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from tunebal.data.shards import SHARD_FORMAT, ModalitySpec, _OpenShard, file_sha256, write_shard
from tunebal.errors import ConfigError, DataError
from tunebal.knobs import KnobSet

MANIFEST = "manifest.json"
PREPARED_FORMAT = "tunebal-prepared"


@dataclass
class Clip:
    """One raw clip: where its modalities come from and what it is."""

    id: str
    split: str
    label: str
    group: str = ""
    sources: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    """What a preparer found under a raw root."""

    clips: list[Clip]
    class_names: list[str]
    missing: list[str] = field(default_factory=list)  # named by a split file, absent on disk
    notes: list[str] = field(default_factory=list)
    #: official splits as id lists over one prepared pool "all" (split -> ids, per split name)
    memberships: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: "regression": every decoded clip also returns a float ``target`` (stored in the shards' target column)
    task: str = "classification"


class Preparer:
    """The dataset-specific part of preparation. Subclasses are stateless (they cross to pool workers)."""

    name: str = ""
    #: knobs that change the prepared bytes (they are hashed into the manifest)
    knobs: KnobSet = KnobSet()
    #: clips named by the split files but absent are reported and skipped (KS) instead of an error (CREMA-D)
    missing_ok: bool = False

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        raise NotImplementedError

    def modalities(self, values: Mapping[str, Any]) -> dict[str, ModalitySpec]:
        raise NotImplementedError

    def decode(self, clip: Clip, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError


@dataclass
class PrepareReport:
    out: Path
    counts: dict[str, int]
    missing: list[str]
    skipped: list[str]
    decoded: int
    seconds: float
    already: bool
    part: tuple[int, int] | None = None

    def line(self) -> str:
        counts = ", ".join(f"{s} {n}" for s, n in self.counts.items())
        if self.part is not None:
            return (
                f"prepared part {self.part[0]}/{self.part[1]} of {self.out} ({counts}; {self.decoded} clips decoded in "
                f"{self.seconds:.1f} s); when every part is done, run once more without --shard to verify and finish"
            )
        if self.already:
            return f"already prepared and verified: {self.out} ({counts})"
        rate = self.decoded / self.seconds if self.seconds > 0 else 0.0
        return (
            f"prepared {self.out} ({counts}); {len(self.missing)} missing, {len(self.skipped)} skipped; "
            f"{self.decoded} clips decoded in {self.seconds:.1f} s ({rate:.1f} clips/s)"
        )


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a prepared directory, with its parameter hash checked."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{directory} is not a prepared dataset (no {MANIFEST}); run `tunebal prepare`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        raise DataError(f"{path} is not a tunebal preparation manifest")
    if params_hash(manifest.get("params", {})) != manifest.get("params_hash"):
        raise DataError(f"{path}: the parameter hash does not match the parameters (edited manifest?); re-run `tunebal prepare`")
    return manifest


class _Lock:
    """An exclusive lock on a preparation directory, so two processes never write the same shards."""

    def __init__(self, out: Path, part: tuple[int, int] | None = None) -> None:
        self.path = out / (".prepare.lock" if part is None else f".prepare.{part[0]}-of-{part[1]}.lock")

    def __enter__(self) -> "_Lock":
        self.fh = open(self.path, "a")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise DataError(f"another `tunebal prepare` is writing {self.path.parent}; wait for it to finish") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _decode_task(args: tuple[Preparer, Clip, Mapping[str, Any]]) -> tuple[str, Any]:
    preparer, clip, values = args
    try:
        return "ok", preparer.decode(clip, values)
    except DataError as exc:
        return "bad", str(exc)
    except Exception as exc:  # a decoder bug or a codec failure we did not anticipate: still one line
        return "bad", f"clip {clip.id}: {type(exc).__name__}: {' '.join(str(exc).split())}"


def _pool_init() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _plan(clips: Sequence[Clip], shard_size: int) -> dict[str, list[list[Clip]]]:
    by_split: dict[str, list[Clip]] = {}
    for clip in sorted(clips, key=lambda c: (c.split, c.id)):
        by_split.setdefault(clip.split, []).append(clip)
    return {s: [cs[i : i + shard_size] for i in range(0, len(cs), shard_size)] for s, cs in by_split.items()}


def _shard_done(out: Path, name: str, planned: list[str], phash: str) -> dict[str, Any] | None:
    """The sidecar of a finished shard whose plan, parameters and file digest still match."""
    side = out / f"{name}.json"
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    path = out / info.get("entry", {}).get("file", "")
    if info.get("params_hash") != phash or info.get("planned") != planned or not path.is_file():
        return None
    if path.stat().st_size != info["entry"]["bytes"] or file_sha256(path) != info["entry"]["sha256"]:
        return None
    return info


def verify_prepared(out: Path, manifest: Mapping[str, Any], full: bool = False) -> None:
    """Open every shard (size, schema, row count, index digest; ``full``: file sha256 too) and check counts."""
    modalities = {m: ModalitySpec.from_json(d) for m, d in manifest["params"]["modalities"].items()}
    for split, info in manifest["splits"].items():
        rows = 0
        for entry in info["shards"]:
            shard = _OpenShard(out / entry["file"], entry, modalities, manifest["params_hash"])
            rows += len(shard.ids)
            if full and file_sha256(out / entry["file"]) != entry["sha256"]:
                raise DataError(f"prepared shard {out / entry['file']} fails its sha256 (corrupt or edited)")
        if rows != info["count"]:
            raise DataError(f"{out}: split {split} has {rows} clips, the manifest says {info['count']}")


def run_prepare(
    preparer: Preparer,
    root: str | os.PathLike,
    out: str | os.PathLike,
    values: Mapping[str, Any],
    *,
    workers: int = 1,
    skip_bad: bool = False,
    shard_size: int = 256,
    verify: bool = False,
    progress: bool = True,
    part: tuple[int, int] | None = None,
    trust_pickle: bool = False,
) -> PrepareReport:
    """Prepare ``root`` into ``out`` (resuming, or verifying a finished preparation).

    ``part=(i, n)`` prepares only the shards whose global index is ``i`` mod ``n``, so ``n``
    machines can share one preparation directory; a final run without ``part`` finds their
    verified shards, decodes whatever is left and writes the manifest.
    """
    start = time.perf_counter()
    root, out = Path(root).expanduser(), Path(out).expanduser()
    if not root.is_dir():
        raise DataError(f"raw dataset root {root} is not a directory")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {part[0]}/{part[1]}")
    values = preparer.knobs.resolve(dict(values), where=f"{preparer.name}: ")
    if trust_pickle and hasattr(preparer, "trusted"):  # a dataset distributed as a pickle (CMU-MOSI)
        preparer = preparer.trusted()
    scan = preparer.scan(root, values)
    if scan.missing and not (preparer.missing_ok or skip_bad):
        raise DataError(
            f"{len(scan.missing)} clips named by the split files are absent under {root} (first: {scan.missing[0]}); "
            "pass --skip-bad to prepare the rest"
        )
    counts_planned = {s: sum(1 for c in scan.clips if c.split == s) for s in sorted({c.split for c in scan.clips})}
    for split in ("all",) if scan.memberships else ("train", "test"):
        if not counts_planned.get(split):
            raise DataError(f"{preparer.name}: split '{split}' is empty under {root}")
    modalities = (
        preparer.modalities_from_scan(scan, values) if hasattr(preparer, "modalities_from_scan") else preparer.modalities(values)
    )
    params = {
        "dataset": preparer.name,
        "knobs": dict(values),
        "modalities": {m: s.to_json() for m, s in modalities.items()},
        "class_names": list(scan.class_names),
        "shard_format": SHARD_FORMAT,
        "shard_size": shard_size,
        "memberships": scan.memberships,
        **({"task": scan.task} if scan.task != "classification" else {}),  # old hashes unchanged
    }
    phash = params_hash(params)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out, part):
        if (out / MANIFEST).exists():
            manifest = read_manifest(out)
            if manifest["params_hash"] != phash:
                raise DataError(
                    f"{out} already holds a {manifest['params'].get('dataset')} preparation with other parameters; "
                    "choose another --out (nothing was changed)"
                )
            verify_prepared(out, manifest, full=verify)
            counts = {s: info["count"] for s, info in manifest["splits"].items()}
            return PrepareReport(out, counts, manifest.get("missing", []), manifest.get("skipped", []), 0,
                                 time.perf_counter() - start, already=True)
        plan = _plan(scan.clips, shard_size)
        order = [(split, k) for split, chunks in plan.items() for k in range(len(chunks))]
        mine = {key for g, key in enumerate(order) if part is None or g % part[1] == part[0]}
        total = sum(len(plan[split][k]) for split, k in mine)
        splits: dict[str, dict[str, Any]] = {}
        skipped: list[str] = []
        decoded = 0
        bar = _progress(total, f"prepare {preparer.name}", progress)
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_pool_init) if workers > 1 else None
        try:
            for split, chunks in plan.items():
                entries = []
                for k, chunk in enumerate(chunks):
                    if (split, k) not in mine:
                        continue
                    name = f"{split}-{k:05d}"
                    planned = [c.id for c in chunk]
                    done = _shard_done(out, name, planned, phash)
                    if done is None:
                        rows, bad = [], []
                        for clip, (status, result) in zip(chunk, _decode_all(pool, workers, preparer, chunk, values)):
                            if status == "bad":
                                if not skip_bad:
                                    raise DataError(result)
                                bad.append(f"{clip.id}\t{result}")
                                continue
                            rows.append({"id": clip.id, "label": scan.class_names.index(clip.label),
                                         "group": clip.group, **result})
                        decoded += len(chunk)
                        meta = {"dataset": preparer.name, "split": split, "shard": k, "params_hash": phash}
                        entry = write_shard(out / f"{name}.arrow", modalities, rows, meta, targets=params.get("task") == "regression")
                        done = {"entry": entry, "planned": planned, "skipped": bad, "params_hash": phash}
                        _atomic_write_text(out / f"{name}.json", json.dumps(done, indent=1))
                    entries.append(done["entry"])
                    skipped.extend(done["skipped"])
                    bar.update(len(chunk))
                splits[split] = {"count": sum(e["rows"] for e in entries), "shards": entries}
                if part is None and not splits[split]["count"]:
                    raise DataError(f"{preparer.name}: every clip of split '{split}' was skipped (e.g. {skipped[-1] if skipped else 'no clip'})")
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if part is not None:
            counts = {s: info["count"] for s, info in splits.items()}
            return PrepareReport(out, counts, sorted(scan.missing), skipped, decoded, time.perf_counter() - start,
                                 already=False, part=part)
        manifest = {
            "format": PREPARED_FORMAT,
            "params": params,
            "params_hash": phash,
            "source_root": str(root.resolve()),
            "splits": splits,
            "missing": sorted(scan.missing),
            "skipped": skipped,
            "notes": scan.notes,
        }
        if scan.memberships:
            manifest["memberships"] = scan.memberships
        _atomic_write_text(out / "missing.txt", "".join(f"{c}\n" for c in sorted(scan.missing)))
        _atomic_write_text(out / "skipped.txt", "".join(f"{c}\n" for c in skipped))
        _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
        verify_prepared(out, manifest)
    counts = {s: info["count"] for s, info in splits.items()}
    return PrepareReport(out, counts, manifest["missing"], skipped, decoded, time.perf_counter() - start, already=False)


def _decode_all(
    pool, workers: int, preparer: Preparer, chunk: Sequence[Clip], values: Mapping[str, Any]
) -> Iterator[tuple[str, Any]]:
    tasks = [(preparer, clip, values) for clip in chunk]
    if pool is None:
        return map(_decode_task, tasks)
    return pool.map(_decode_task, tasks, chunksize=max(1, len(tasks) // (4 * workers)))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="clip", file=sys.stderr)
