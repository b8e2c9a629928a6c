"""Prepared datasets as uncompressed Arrow IPC shards, read through memory maps.

A prepared directory holds, per split, shard files ``<split>-<k>.arrow`` (one row per clip)
and a ``manifest.json`` (tunebal/data/prepare.py writes both). A shard's columns:

=================  =================  ===============================================
``id``             string             clip id (as named by the raw dataset)
``label``          int32              class index (``manifest.json`` has the names)
``group``          string             speaker / video id (for group-disjoint splits)
``target``         float32            regression preparations only: the continuous target
                                      (CMU-MOSI's sentiment score); covered by both digests
``<m>``            large_binary       modality payload: float16/float32 spectrogram
                                      ``(1, F, T)``, uint8 frames ``(n, S, S, 3)``
``<m>.n``          int32              frames modalities only: stored frame count n
``digest``         fixed binary(32)   sha256 of the row's canonical bytes
=================  =================  ===============================================

Nothing here unpickles: payloads are raw little-endian bytes, and every row's digest is
checked when the row is read, before any of it is used (:func:`row_digest`). Opening a shard
checks its size, schema and row count against the manifest, and a digest of its ids, labels
and groups, so a truncated, edited or foreign file is one :class:`DataError` naming it.

Shards are opened lazily in each process (and again after a fork), through
``pyarrow.memory_map``: trials and loader workers on one node share the page cache instead of
holding private copies of the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from tunebal.errors import DataError

SHARD_FORMAT = 1
_DTYPES = {"float16": np.float16, "float32": np.float32, "uint8": np.uint8}


@dataclass(frozen=True)
class ModalitySpec:
    """How one modality is stored in the shards.

    ``shape`` is the stored per-sample shape: ``(1, F, T)`` for spectrograms, ``(S, S, 3)``
    (one frame) for frames, ``(D,)`` for vectors. Frames modalities store 1..``max_frames``
    frames per clip.
    """

    kind: str
    dtype: str
    shape: tuple[int, ...]
    max_frames: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape), "max_frames": self.max_frames}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModalitySpec":
        return cls(str(d["kind"]), str(d["dtype"]), tuple(int(v) for v in d["shape"]), int(d.get("max_frames", 0)))

    def check(self, name: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` as this modality's stored dtype and shape, or a DataError saying what differs."""
        if self.kind == "frames":
            if arr.ndim != 4 or tuple(arr.shape[1:]) != self.shape or not 1 <= arr.shape[0] <= self.max_frames:
                raise DataError(f"{name}: frames of shape {arr.shape}, expected (1..{self.max_frames}, {', '.join(map(str, self.shape))})")
        elif tuple(arr.shape) != self.shape:
            raise DataError(f"{name}: shape {arr.shape}, expected {self.shape}")
        if self.dtype == "uint8" and arr.dtype != np.uint8:
            raise DataError(f"{name}: dtype {arr.dtype}, expected uint8")
        out = np.ascontiguousarray(arr, dtype=_DTYPES[self.dtype])
        if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
            raise DataError(f"{name}: holds NaN or Inf (after conversion to {self.dtype})")
        return out


def shard_schema(modalities: Mapping[str, ModalitySpec], targets: bool = False):
    """The shard schema; ``targets`` adds the float32 ``target`` column of a regression preparation."""
    import pyarrow as pa

    fields = [("id", pa.string()), ("label", pa.int32()), ("group", pa.string())]
    if targets:
        fields.append(("target", pa.float32()))
    for m, spec in modalities.items():
        fields.append((m, pa.large_binary()))
        if spec.kind == "frames":
            fields.append((f"{m}.n", pa.int32()))
    fields.append(("digest", pa.binary(32)))
    return pa.schema(fields)


def row_digest(clip_id: str, label: int, group: str, payloads: Sequence[bytes | memoryview]) -> bytes:
    """sha256 over a row's canonical bytes: id, label, group and each payload, length-prefixed."""
    h = hashlib.sha256()
    for part in (clip_id.encode(), int(label).to_bytes(4, "little", signed=True), group.encode(), *payloads):
        mv = memoryview(part).cast("B")
        h.update(len(mv).to_bytes(8, "little"))
        h.update(mv)
    return h.digest()


def target_bytes(target: float) -> bytes:
    """A regression target's digested bytes (float32, little-endian): the last payload of its row digest."""
    return np.asarray(target, dtype="<f4").tobytes()


def index_digest(ids: Sequence[str], labels: Sequence[int], groups: Sequence[str], targets: Sequence[float] | None = None) -> str:
    """Digest of a shard's ids, labels and groups, and targets if it has them (recorded in the manifest, checked at open)."""
    parts: list[Any] = [list(ids), [int(v) for v in labels], list(groups)]
    if targets is not None:
        parts.append([float(np.float32(v)) for v in targets])
    blob = json.dumps(parts, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(
    path: Path,
    modalities: Mapping[str, ModalitySpec],
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    targets: bool = False,
) -> dict[str, Any]:
    """Write ``rows`` (dicts with id, label, group and one array per modality; ``target`` with
    ``targets``) as one shard, atomically.

    Returns the shard's manifest entry: file name, row count, bytes, file sha256, index digest.
    """
    import pyarrow as pa

    schema = shard_schema(modalities, targets).with_metadata({"tunebal_shard": json.dumps(dict(meta), sort_keys=True)})
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        payloads = []
        for m, spec in modalities.items():
            arr = spec.check(f"clip {row['id']} modality {m}", np.asarray(row[m]))
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            payloads.append(data)
            cols[m].append(data)
            if spec.kind == "frames":
                cols[f"{m}.n"].append(int(arr.shape[0]))
        cols["id"].append(str(row["id"]))
        cols["label"].append(int(row["label"]))
        cols["group"].append(str(row.get("group", "")))
        if targets:
            target = float(np.float32(row["target"]))
            if not np.isfinite(target):
                raise DataError(f"clip {row['id']}: regression target {row['target']!r} is not finite")
            cols["target"].append(target)
            payloads.append(target_bytes(target))
        cols["digest"].append(row_digest(str(row["id"]), int(row["label"]), str(row.get("group", "")), payloads))
    table = pa.table({name: pa.array(cols[name], type=schema.field(name).type) for name in schema.names}, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table, max_chunksize=max(1, len(rows)))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "file": path.name,
        "rows": len(rows),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "index": index_digest(cols["id"], cols["label"], cols["group"], cols["target"] if targets else None),
    }


class _OpenShard:
    """One memory-mapped shard: the record batch and zero-copy views of its columns."""

    def __init__(
        self, path: Path, entry: Mapping[str, Any], modalities: Mapping[str, ModalitySpec], params_hash: str
    ) -> None:
        import pyarrow as pa

        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"prepared shard {path} is missing; re-run `tunebal prepare`") from None
        if size != int(entry["bytes"]):
            raise DataError(f"prepared shard {path} has {size} bytes, the manifest says {entry['bytes']}; re-run `tunebal prepare`")
        try:
            self._mmap = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_file(self._mmap)
            has_targets = "target" in reader.schema.names  # a regression preparation
            if not reader.schema.equals(shard_schema(modalities, has_targets), check_metadata=False):
                raise ValueError("unexpected schema")
            meta = json.loads((reader.schema.metadata or {}).get(b"tunebal_shard", b"{}"))
            if meta.get("params_hash") != params_hash:
                raise DataError(f"prepared shard {path} was written with other parameters than its manifest's")
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            table = pa.Table.from_batches(batches, schema=reader.schema).combine_chunks()
        except DataError:
            raise
        except Exception as exc:  # ArrowInvalid, OSError, ValueError
            raise DataError(f"cannot read prepared shard {path}: {' '.join(str(exc).split())}") from None
        if table.num_rows != int(entry["rows"]):
            raise DataError(f"prepared shard {path} has {table.num_rows} rows, the manifest says {entry['rows']}")
        self.path = path
        self.ids = table.column("id").to_pylist()
        self.labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
        self.groups = table.column("group").to_pylist()
        #: float32 regression targets, or None for a classification preparation
        self.targets = np.asarray(table.column("target").to_numpy(), dtype=np.float32) if has_targets else None
        if index_digest(self.ids, self.labels, self.groups, self.targets) != entry["index"]:
            raise DataError(f"prepared shard {path}: ids/labels differ from the manifest (edited file?)")
        self._payload: dict[str, tuple[np.ndarray, Any]] = {}
        for m in modalities:
            if not table.num_rows:  # every clip of the shard was skipped
                break
            chunk = table.column(m).chunk(0)
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
            self._payload[m] = (offsets, chunk.buffers()[2])
        self._counts = {
            m: np.asarray(table.column(f"{m}.n").to_numpy(), dtype=np.int64)
            for m, spec in modalities.items()
            if spec.kind == "frames"
        }
        self._digests = table.column("digest")
        self._modalities = modalities
        self._verified = np.zeros(table.num_rows, dtype=bool)

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i``'s payloads as read-only arrays over the memory map.

        The row's digest is checked the first time this process reads it (the map is read-only
        and the file's size and index were checked at open), so every byte is verified before
        it is first used without re-hashing the data every epoch.
        """
        views: dict[str, memoryview] = {}
        for m in self._modalities:
            offsets, buf = self._payload[m]
            views[m] = memoryview(buf)[int(offsets[i]) : int(offsets[i + 1])]
        if not self._verified[i]:
            payloads: list[bytes | memoryview] = list(views.values())
            if self.targets is not None:
                payloads.append(target_bytes(self.targets[i]))
            digest = row_digest(self.ids[i], int(self.labels[i]), self.groups[i], payloads)
            if digest != self._digests[i].as_py():
                raise DataError(f"prepared shard {self.path}: row {i} (clip {self.ids[i]}) fails its digest (corrupt or edited)")
            self._verified[i] = True
        out = {}
        for m, spec in self._modalities.items():
            arr = np.frombuffer(views[m], dtype=np.dtype(_DTYPES[spec.dtype]).newbyteorder("<"))
            shape = (int(self._counts[m][i]), *spec.shape) if spec.kind == "frames" else spec.shape
            out[m] = arr.reshape(shape)
        return out


class ShardSet:
    """All shards of one prepared split: global row index -> (shard, row), opened lazily per process."""

    def __init__(
        self,
        directory: Path,
        entries: Sequence[Mapping[str, Any]],
        modalities: Mapping[str, ModalitySpec],
        params_hash: str,
    ) -> None:
        self.directory = Path(directory)
        self.params_hash = params_hash
        self.entries = list(entries)
        self.modalities = dict(modalities)
        self._open: dict[int, _OpenShard] = {}
        self._pid = os.getpid()
        starts = np.cumsum([0] + [int(e["rows"]) for e in self.entries])
        self._starts = starts
        shards = [self._shard(k) for k in range(len(self.entries))]
        self.ids = [i for s in shards for i in s.ids]
        self.labels = np.concatenate([s.labels for s in shards]) if shards else np.zeros(0, dtype=np.int64)
        self.groups = [g for s in shards for g in s.groups]
        has = {s.targets is not None for s in shards}
        if len(has) > 1:
            raise DataError(f"prepared split in {self.directory} mixes shards with and without regression targets")
        #: float32 regression targets of every row, or None (classification)
        self.targets = (np.concatenate([s.targets for s in shards]) if shards else None) if has == {True} else None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, k: int) -> _OpenShard:
        if os.getpid() != self._pid:  # a forked loader worker opens its own memory maps
            self._open, self._pid = {}, os.getpid()
        shard = self._open.get(k)
        if shard is None:
            shard = self._open[k] = _OpenShard(
                self.directory / self.entries[k]["file"], self.entries[k], self.modalities, self.params_hash
            )
        return shard

    def row(self, index: int) -> dict[str, np.ndarray]:
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._shard(k).row(index - int(self._starts[k]))

    def __getstate__(self) -> dict[str, Any]:  # spawned workers reopen the maps themselves
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


SampleDecoder = Callable[[dict[str, np.ndarray], int, int, bool], dict[str, torch.Tensor]]


class ShardSource:
    """A split read from prepared shards: ``rows`` (indices into the :class:`ShardSet`) and a decoder.

    ``decode(row_arrays, row_index, epoch, train)`` turns one stored row into the per-sample
    tensors (frame choice, crop, flip) and must be seeded by (dataset seed, epoch, row index)
    only, so a batch does not depend on which worker decodes it. Batches stay in the stored
    dtypes (uint8 frames, float16 spectrograms); the engine converts them on the device.
    The labels are the int64 class indices, or the float32 targets of a regression preparation.
    """

    streaming = True

    def __init__(self, shards: ShardSet, rows: Sequence[int] | np.ndarray, decode: SampleDecoder) -> None:
        self.shards = shards
        self.rows = np.asarray(rows, dtype=np.int64)
        self.decode = decode
        stored = shards.labels if shards.targets is None else shards.targets
        self._labels = torch.from_numpy(stored[self.rows].copy())

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    @property
    def ids(self) -> list[str]:
        return [self.shards.ids[int(r)] for r in self.rows]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def batch(self, indices, *, epoch: int = 0, train: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        samples = []
        for i in torch.as_tensor(indices, dtype=torch.int64).tolist():
            row = int(self.rows[i])
            samples.append(self.decode(self.shards.row(row), row, epoch, train))
        inputs = {m: torch.stack([s[m] for s in samples]) for m in samples[0]} if samples else {}
        return inputs, self._labels[torch.as_tensor(indices, dtype=torch.int64)]
