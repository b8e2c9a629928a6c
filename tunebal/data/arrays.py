"""Verified Arrow array files: named numeric arrays plus JSON metadata, no pickle.

Computed inputs (the synth cache, spectrograms, frames) are stored once as Arrow IPC files:
one row per array (name, dtype, shape, raw bytes) and JSON metadata under the schema key
``tunebal``. Every file is sealed (tunebal/sealed.py): one sha256 digest over all of its bytes (the
array data, the row index and the metadata), checked before anything is used, so a flipped
bit or an edited file is one ``DataError`` naming the file, never silently wrong data.
Reading uses only pyarrow, ``json`` and ``numpy.frombuffer``: opening a file cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tunebal import sealed
from tunebal.errors import DataError

__all__ = ["read_array_file", "write_array_file"]

_META_KEY = b"tunebal"
_NUMERIC_KINDS = frozenset("biufc")


def _schema(metadata: Mapping[bytes, bytes] | None = None):
    import pyarrow as pa

    return pa.schema(
        [("name", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())), ("data", pa.large_binary())],
        metadata=metadata,
    )


def write_array_file(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write ``arrays`` (name -> numeric array) and JSON ``meta`` to a sealed Arrow IPC file, atomically.

    The file is written under a unique temporary name in the same directory, sealed with its
    digest and renamed over ``path``, so concurrent writers and readers (parallel trials)
    never see a partial file. Arrays are written zero-copy, one record batch each.
    Raises ``TypeError`` for object or structured arrays (a programming error).
    """
    import pyarrow as pa

    path = Path(path)
    placeholder = sealed.placeholder()
    schema = _schema({_META_KEY: json.dumps(meta, sort_keys=True).encode(), sealed.DIGEST_KEY: placeholder.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        sink = sealed.SealingFile(tmp, placeholder)  # hashes the bytes as they are written
        with sink, pa.ipc.new_file(sink, schema) as writer:
            for name, arr in arrays.items():
                arr = np.ascontiguousarray(arr)
                if arr.dtype.kind not in _NUMERIC_KINDS or arr.dtype.fields is not None:
                    raise TypeError(f"array {name}: {arr.dtype} arrays cannot be stored (numeric only)")
                offsets = pa.py_buffer(np.array([0, arr.nbytes], dtype=np.int64))
                data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(arr)])
                columns = [
                    pa.array([name], pa.string()),
                    pa.array([arr.dtype.str], pa.string()),
                    pa.array([list(arr.shape)], pa.list_(pa.int64())),
                    data,
                ]
                writer.write_batch(pa.record_batch(columns, schema=schema))
        sealed.seal_written(tmp, sink, placeholder)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _array(name: Any, dtype_str: Any, shape: Any, buf) -> np.ndarray:
    if not isinstance(name, str) or not isinstance(dtype_str, str) or not isinstance(shape, list):
        raise ValueError("malformed row")
    dtype = np.dtype(dtype_str)
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise ValueError(f"array {name}: unsupported dtype {dtype_str!r}")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"array {name}: invalid shape {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if buf.size != expected:
        raise ValueError(f"array {name}: {buf.size} bytes do not match dtype {dtype_str} and shape {shape}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def read_array_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`write_array_file`: (name -> array, metadata).

    The whole file is checked against its digest first; the arrays own their memory
    (copied out of the memory map). A missing, truncated, foreign or tampered file raises a
    one-line ``DataError`` naming the file.
    """
    import pyarrow as pa

    path = os.fspath(path)
    try:
        arrays: dict[str, np.ndarray] = {}
        with pa.memory_map(path, "r") as source:
            whole = source.read_buffer()
            reader = pa.ipc.open_file(whole)
            sealed.verify(whole, reader.schema.metadata)
            if not reader.schema.equals(_schema(), check_metadata=False):
                raise ValueError("not a tunebal array file (unexpected schema)")
            meta = json.loads(reader.schema.metadata[_META_KEY])
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a JSON object")
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                for row in range(batch.num_rows):
                    name = batch.column(0)[row].as_py()
                    if name in arrays:
                        raise ValueError(f"array {name} stored twice")
                    arrays[name] = _array(
                        name, batch.column(1)[row].as_py(), batch.column(2)[row].as_py(), batch.column(3)[row].as_buffer()
                    )
            del reader, whole
    except Exception as exc:  # ArrowInvalid, OSError, ValueError, KeyError, JSON errors
        raise DataError(f"cannot read array file {path}: {' '.join(str(exc).split())}") from None
    return arrays, meta
