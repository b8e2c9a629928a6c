"""Checkpoints as single Arrow IPC files, with no pickle anywhere on the load path.

A checkpoint is ONE Arrow IPC ("Feather v2") file:

* one **row per tensor / ndarray leaf** of the state tree, with columns

  ========  ==================  =================================================
  name      string              tree path joined with ``/``, e.g.
                                ``model/encoders.audio.blocks.0.0.weight`` or
                                ``optimizer/state/0/momentum_buffer``
  dtype     string              ``float32``, ``bfloat16``, ``int64``, ``bool`` ...
  shape     list<int64>         ``[]`` for 0-d tensors
  kind      string              ``torch`` or ``numpy``
  data      large_binary        raw little-endian C-contiguous bytes
  sha256    string              hex digest of ``data``
  ========  ==================  =================================================

* the schema metadata key ``b"tunebal"`` holding JSON
  ``{"format_version": 2, "tree": <skeleton>, "meta": <meta>}``;

* the schema metadata key ``b"tunebal_sha256"``: one sha256 digest over every byte of the file
  (tunebal/sealed.py), checked before anything in the file is used. It covers the tensor
  payloads, the row index (names, dtypes, shapes, kinds), the skeleton, the meta JSON and
  the Arrow footer, so an edited or corrupted file is rejected with one line, never
  half-loaded. (Format version 1 files had only the per-row ``sha256`` column, which left
  the metadata and footer unauthenticated; they are refused.)

The *skeleton* is the state tree with every tensor replaced by a reference to its
row, and with enough type information to rebuild it exactly:

==========================  ===============================================
Python value                skeleton node
==========================  ===============================================
``None``, ``bool``, ``str``  the JSON value itself
``int``                     a JSON integer (arbitrary size)
``float``                   ``{"float": "<16 hex digits>"}`` -- the IEEE-754
                            bits, so nan/inf/-0.0 round-trip bit-exactly
``list`` / ``tuple``        ``{"list": [...]}`` / ``{"tuple": [...]}``
``dict`` (any Mapping)      ``{"dict": [[key_node, value_node], ...]}`` -- keys
                            are nodes too, so ``0`` and ``"0"`` stay distinct
``bytes``                   ``{"bytes": "<hex>"}``
numpy scalar                ``{"npscalar": [dtype, "<hex bytes>"]}``
``torch.Tensor``            ``{"tensor": row}``
``numpy.ndarray``           ``{"ndarray": row}``
==========================  ===============================================

``meta`` (epoch, config, metrics, versions ...) is stored as *plain* JSON so that
any tool can read it without knowing the skeleton encoding; tuples therefore come
back as lists and non-string keys as strings there.  Non-finite floats are
written as the (Python-readable) ``NaN`` / ``Infinity`` tokens.

Loading uses only pyarrow, ``json``, ``numpy.frombuffer`` and ``torch.from_numpy``;
the whole file is checked against its digest, and every payload against its
dtype/shape, before a tensor is built. The per-row ``sha256`` column stays for tools
that read the table directly (:func:`experiment_dataset`).  Any problem with a file raises :class:`CheckpointError` with one
line naming the file.

Limitations: tensors that share storage (tied weights) are stored and loaded as
independent copies; sparse, quantized and meta tensors and object/structured
numpy arrays are refused at save time (``TypeError``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from tunebal import sealed
from tunebal.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.dataset

__all__ = [
    "FORMAT_VERSION",
    "CHECKPOINT_FILENAME",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "experiment_dataset",
]

FORMAT_VERSION: int = 2
CHECKPOINT_FILENAME = "tunebal_checkpoint.arrow"

_META_KEY = b"tunebal"

#: The column schema shared by every checkpoint file (without the per-file metadata).
SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("data", pa.large_binary(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

# torch dtypes accepted on load (a whitelist: the dtype string is never passed to getattr blindly).
_TORCH_DTYPES: dict[str, torch.dtype] = {}
for _name in (
    "float16", "bfloat16", "float32", "float64",
    "complex64", "complex128",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
):
    _dt = getattr(torch, _name, None)
    if isinstance(_dt, torch.dtype):
        _TORCH_DTYPES[_name] = _dt
del _name, _dt

_TORCH_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in _TORCH_DTYPES.items()}

# Tuning of the write/verify path (see _build_batches and _parallel_map).
_OWN_BATCH_BYTES = 1 << 20  # payloads this large are written zero-copy as their own record batch
_SMALL_BATCH_BYTES = 4 << 20  # smaller payloads are packed into record batches of about this size
_PARALLEL_MIN_BYTES = 1 << 18  # payloads this large are hashed/copied on a thread pool
_MAX_WORKERS = 8

# numpy dtypes accepted (kinds: bool, signed/unsigned int, float, complex).
_NUMPY_KINDS = frozenset("biufc")


# --------------------------------------------------------------------------- save


class _Leaf:
    """One tensor/ndarray waiting to be written: its row fields and a flat uint8 view."""

    __slots__ = ("name", "dtype", "shape", "kind", "source", "nbytes")

    def __init__(self, name: str, dtype: str, shape: list[int], kind: str, source: np.ndarray):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.kind = kind
        self.source = source  # flat uint8 ndarray; for CPU tensors a view of the tensor's memory
        self.nbytes = source.size


def _float_node(x: float) -> dict[str, str]:
    return {"float": struct.pack(">d", x).hex()}


def _torch_leaf(name: str, t: torch.Tensor) -> _Leaf:
    if t.layout != torch.strided:
        raise TypeError(f"cannot checkpoint {name!r}: {t.layout} tensors are not supported")
    if t.is_quantized or t.device.type == "meta":
        raise TypeError(f"cannot checkpoint {name!r}: quantized/meta tensors are not supported")
    dtype_name = str(t.dtype).removeprefix("torch.")
    if dtype_name not in _TORCH_DTYPES:
        raise TypeError(f"cannot checkpoint {name!r}: unsupported dtype {t.dtype}")
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    shape = list(t.shape)
    if not t.numel():
        return _Leaf(name, dtype_name, shape, "torch", np.empty(0, dtype=np.uint8))
    # A flat uint8 view of the payload: zero-copy for CPU tensors, one device->host copy otherwise.
    flat = t.reshape(-1).view(torch.uint8)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return _Leaf(name, dtype_name, shape, "torch", flat.numpy())


def _numpy_leaf(name: str, a: np.ndarray) -> _Leaf:
    if a.dtype.kind not in _NUMPY_KINDS or a.dtype.fields is not None:
        raise TypeError(f"cannot checkpoint {name!r}: unsupported numpy dtype {a.dtype}")
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    return _Leaf(name, a.dtype.name, list(a.shape), "numpy", a.reshape(-1).view(np.uint8))


def _encode(obj: Any, path: str, leaves: list[_Leaf]) -> Any:
    """Return the JSON skeleton node for ``obj``; tensors/arrays are appended to ``leaves``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        leaves.append(_torch_leaf(path, obj))
        return {"tensor": len(leaves) - 1}
    if isinstance(obj, np.ndarray):
        leaves.append(_numpy_leaf(path, obj))
        return {"ndarray": len(leaves) - 1}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in _NUMPY_KINDS:
            raise TypeError(f"cannot checkpoint {path!r}: unsupported numpy scalar {obj.dtype}")
        le = np.asarray(obj).astype(obj.dtype.newbyteorder("<"))
        return {"npscalar": [le.dtype.name, le.tobytes().hex()]}
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _float_node(float(obj))
    if isinstance(obj, (bytes, bytearray)):
        return {"bytes": bytes(obj).hex()}
    if isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if isinstance(k, (torch.Tensor, np.ndarray, Mapping, list)):
                raise TypeError(f"cannot checkpoint {path!r}: unsupported dict key type {type(k).__name__}")
            sub = f"{path}/{k}" if path else str(k)
            items.append([_encode(k, sub, leaves), _encode(v, sub, leaves)])
        return {"dict": items}
    if isinstance(obj, (list, tuple)):
        nodes = [_encode(v, f"{path}/{i}" if path else str(i), leaves) for i, v in enumerate(obj)]
        return {"tuple" if isinstance(obj, tuple) else "list": nodes}
    raise TypeError(f"cannot checkpoint {path or '<root>'!r}: unsupported type {type(obj).__name__}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (os.PathLike, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(f"checkpoint meta must be JSON-serialisable; got {type(obj).__name__}")


def _parallel_map(fn: Callable[[int], Any], sizes: Sequence[int]) -> list[Any]:
    """``[fn(i) for i in range(len(sizes))]``, running large items on a thread pool.

    ``fn`` does its heavy work (sha256, memcpy) in C code that releases the GIL.
    Exceptions propagate unchanged.
    """
    n = len(sizes)
    big = [i for i in range(n) if sizes[i] >= _PARALLEL_MIN_BYTES]
    workers = min(_MAX_WORKERS, os.cpu_count() or 1, len(big))
    if workers < 2:
        return [fn(i) for i in range(n)]
    out: list[Any] = [None] * n
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tunebal-ckpt") as pool:
        futures = {i: pool.submit(fn, i) for i in big}
        for i in range(n):
            if i not in futures:
                out[i] = fn(i)
        for i, fut in futures.items():
            out[i] = fut.result()
    return out


def _build_batches(
    state: Mapping[str, Any], meta: Mapping[str, Any]
) -> tuple[pa.Schema, list[pa.RecordBatch], str]:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    leaves: list[_Leaf] = []
    tree = _encode(state, "", leaves)
    header = json.dumps(
        {"format_version": FORMAT_VERSION, "tree": tree, "meta": dict(meta)},
        default=_json_default,
        separators=(",", ":"),
    )
    placeholder = sealed.placeholder()
    schema = SCHEMA.with_metadata({_META_KEY: header.encode("utf-8"), sealed.DIGEST_KEY: placeholder.encode()})

    sizes = [leaf.nbytes for leaf in leaves]
    digests = _parallel_map(lambda i: hashlib.sha256(memoryview(leaves[i].source)).hexdigest(), sizes)
    names = pa.array([leaf.name for leaf in leaves], pa.string())
    dtypes = pa.array([leaf.dtype for leaf in leaves], pa.string())
    shapes = pa.array([leaf.shape for leaf in leaves], pa.list_(pa.int64()))
    kinds = pa.array([leaf.kind for leaf in leaves], pa.string())
    shas = pa.array(digests, pa.string())

    # Large payloads get a record batch of their own whose data buffer IS the tensor's memory
    # (the IPC writer then writes it straight from there); small ones are packed together.
    batches: list[pa.RecordBatch] = []

    def flush(lo: int, hi: int) -> None:
        if hi <= lo:
            return
        parts = [leaves[i].source for i in range(lo, hi)]
        payload = parts[0] if len(parts) == 1 else np.concatenate(parts)
        offsets = np.zeros(hi - lo + 1, dtype=np.int64)
        np.cumsum(sizes[lo:hi], out=offsets[1:])
        data = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), hi - lo, [None, pa.py_buffer(offsets), pa.py_buffer(payload)]
        )
        columns = [names[lo:hi], dtypes[lo:hi], shapes[lo:hi], kinds[lo:hi], data, shas[lo:hi]]
        batches.append(pa.RecordBatch.from_arrays(columns, schema=schema))

    lo, pending = 0, 0
    for i, size in enumerate(sizes):
        if size >= _OWN_BATCH_BYTES:
            flush(lo, i)
            flush(i, i + 1)
            lo, pending = i + 1, 0
        else:
            pending += size
            if pending >= _SMALL_BATCH_BYTES:
                flush(lo, i + 1)
                lo, pending = i + 1, 0
    flush(lo, len(leaves))
    return schema, batches, placeholder


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], meta: Mapping[str, Any]) -> int:
    """Write ``state`` (a nested tree of tensors/arrays/scalars) and JSON ``meta`` to ``path``.

    The file is written to a temporary file in the same directory, fsynced, and moved
    into place with :func:`os.replace`, so a reader never sees a partial checkpoint.
    CUDA tensors are copied to the host.  Returns the number of bytes written.
    Raises ``TypeError`` for values that cannot be stored (a programming error).
    """
    path = Path(path)
    schema, batches, placeholder = _build_batches(state, meta)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        sink = sealed.SealingFile(tmp, placeholder)  # hashes the bytes as they are written
        try:
            with pa.ipc.new_file(sink, schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
        finally:
            sink.close()
        sealed.seal_written(tmp, sink, placeholder)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable; not possible on every platform/filesystem
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return size


# --------------------------------------------------------------------------- load


def _fail(path: Any, why: str) -> CheckpointError:
    return CheckpointError(f"invalid checkpoint {os.fspath(path)}: {why}")


def _parse_header(path: Any, schema: pa.Schema) -> dict[str, Any]:
    for field in SCHEMA:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            raise _fail(path, f"missing column {field.name!r}")
        if schema.field(idx).type != field.type:
            raise _fail(path, f"column {field.name!r} has type {schema.field(idx).type}, expected {field.type}")
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise _fail(path, "no 'tunebal' schema metadata")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"metadata is not valid JSON ({_one_line(exc)})") from None
    if not isinstance(header, dict):
        raise _fail(path, "metadata is not a JSON object")
    version = header.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise _fail(path, f"unsupported format_version {version!r} (this tunebal reads {FORMAT_VERSION})")
    if "tree" not in header or not isinstance(header.get("meta"), dict):
        raise _fail(path, "metadata lacks 'tree' or 'meta'")
    return header


def _open_reader(path: Any, source: Any) -> pa.ipc.RecordBatchFileReader:
    try:
        return pa.ipc.open_file(source)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _fail(path, f"not a readable Arrow IPC file ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_exists(path: Any) -> None:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {os.fspath(path)}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint is not a file: {os.fspath(path)}")


def _verified_reader(path: Any, whole: pa.Buffer) -> pa.ipc.RecordBatchFileReader:
    """The Arrow reader of the file's bytes ``whole``, after checking the whole-file digest."""
    reader = _open_reader(path, whole)
    try:
        sealed.verify(whole, reader.schema.metadata)
    except ValueError as exc:
        raise _fail(path, str(exc)) from None
    return reader


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Return the ``meta`` dict of a checkpoint (after verifying the whole file's digest)."""
    _check_exists(path)
    try:
        with pa.memory_map(os.fspath(path), "r") as source:
            schema = _verified_reader(path, source.read_buffer()).schema
    except OSError as exc:
        raise _fail(path, _one_line(exc)) from None
    return _parse_header(path, schema)["meta"]


class _Rows:
    """The tensors/arrays of a verified checkpoint table, one per row (dtype/shape-checked)."""

    def __init__(self, path: Any, table: pa.Table, map_location: Any):
        self.path = path
        self.map_location = map_location
        self.n = table.num_rows
        self.names = table.column("name").to_pylist()
        self.dtypes = table.column("dtype").to_pylist()
        self.shapes = table.column("shape").to_pylist()
        self.kinds = table.column("kind").to_pylist()
        self.payloads: list[np.ndarray] = []  # zero-copy views of each row's bytes
        for chunk in table.column("data").chunks:
            _, off_buf, data_buf = chunk.buffers()
            if not len(chunk):
                continue
            offsets = np.frombuffer(off_buf, dtype=np.int64, count=len(chunk) + 1, offset=chunk.offset * 8)
            data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None and data_buf.size else None
            for j in range(len(chunk)):
                start, stop = int(offsets[j]), int(offsets[j + 1])
                self.payloads.append(data[start:stop] if stop > start else np.empty(0, dtype=np.uint8))
        if len(self.payloads) != self.n:  # pragma: no cover - guaranteed by Arrow validation
            raise _fail(path, "data column does not match the row count")
        # Verify and materialise every row (large ones in parallel) while the file is open.
        self.values = _parallel_map(self._materialise, [p.size for p in self.payloads])
        self.payloads = []

    def _materialise(self, row: int) -> torch.Tensor | np.ndarray:
        name, shape, dtype_name, kind = self.names[row], self.shapes[row], self.dtypes[row], self.kinds[row]
        raw = self.payloads[row]  # covered by the whole-file digest checked before this
        if any(d is None or d < 0 for d in shape):
            raise _fail(self.path, f"tensor {name!r} has an invalid shape {shape}")
        if kind == "torch":
            dtype = _TORCH_DTYPES.get(dtype_name)
            if dtype is None:
                raise _fail(self.path, f"tensor {name!r} has unsupported dtype {dtype_name!r}")
            self._check_size(raw, name, shape, dtype_name, _TORCH_ITEMSIZE[dtype_name])
            if dtype == torch.bool and raw.size and raw.max() > 1:
                raise _fail(self.path, f"tensor {name!r}: bool payload holds bytes other than 0/1")
            if not raw.size:
                return torch.empty(shape, dtype=dtype, device=self.map_location)
            # Copy into fresh (aligned, writable) memory, then reinterpret the bytes.
            t = torch.from_numpy(raw.copy()).view(dtype).reshape(shape)
            return t.to(self.map_location)
        if kind == "numpy":
            try:
                np_dtype = np.dtype(dtype_name)
            except TypeError:
                raise _fail(self.path, f"array {name!r} has unsupported dtype {dtype_name!r}") from None
            if np_dtype.kind not in _NUMPY_KINDS or np_dtype.fields is not None:
                raise _fail(self.path, f"array {name!r} has unsupported dtype {dtype_name!r}")
            np_dtype = np_dtype.newbyteorder("<")
            self._check_size(raw, name, shape, dtype_name, np_dtype.itemsize)
            if np_dtype.kind == "b" and raw.size and raw.max() > 1:
                raise _fail(self.path, f"array {name!r}: bool payload holds bytes other than 0/1")
            arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
            return arr.astype(arr.dtype.newbyteorder("="), copy=False)
        raise _fail(self.path, f"row {row} ({name}) has unknown kind {kind!r}")

    def _check_size(self, raw: np.ndarray, name: str, shape: list[int], dtype_name: str, itemsize: int) -> None:
        expected = math.prod(shape) * itemsize
        if raw.size != expected:
            raise _fail(
                self.path,
                f"tensor {name!r}: {raw.size} bytes do not match dtype {dtype_name} and shape {shape} ({expected} bytes)",
            )

    def _get(self, row: Any, kind: str) -> Any:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.n:
            raise _fail(self.path, f"tree references tensor row {row!r} but the file has {self.n} rows")
        if self.kinds[row] != kind:
            raise _fail(self.path, f"row {row} ({self.names[row]}) has kind {self.kinds[row]!r}, expected {kind!r}")
        return self.values[row]

    def tensor(self, row: Any) -> torch.Tensor:
        return self._get(row, "torch")

    def ndarray(self, row: Any) -> np.ndarray:
        return self._get(row, "numpy")


def _decode(node: Any, rows: _Rows) -> Any:
    if node is None or isinstance(node, (bool, int, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((tag, value),) = node.items()
        if tag == "float" and isinstance(value, str) and len(value) == 16:
            return struct.unpack(">d", bytes.fromhex(value))[0]
        if tag == "list" and isinstance(value, list):
            return [_decode(v, rows) for v in value]
        if tag == "tuple" and isinstance(value, list):
            return tuple(_decode(v, rows) for v in value)
        if tag == "dict" and isinstance(value, list):
            out = {}
            for item in value:
                if not (isinstance(item, list) and len(item) == 2):
                    raise _fail(rows.path, "malformed dict entry in tree")
                out[_decode(item[0], rows)] = _decode(item[1], rows)
            return out
        if tag == "tensor":
            return rows.tensor(value)
        if tag == "ndarray":
            return rows.ndarray(value)
        if tag == "bytes" and isinstance(value, str):
            return bytes.fromhex(value)
        if tag == "npscalar" and isinstance(value, list) and len(value) == 2:
            dtype = np.dtype(value[0]).newbyteorder("<")
            if dtype.kind not in _NUMPY_KINDS:
                raise ValueError(f"unsupported numpy scalar dtype {value[0]!r}")
            return np.frombuffer(bytes.fromhex(value[1]), dtype=dtype)[0].astype(dtype.newbyteorder("="))
    raise _fail(rows.path, f"malformed tree node {json.dumps(node)[:80]}")


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; return ``(state, meta)``.

    Tensors come back as writable tensors on ``map_location``; numpy arrays as numpy
    arrays; dict keys keep their types (int vs str) and tuples stay tuples.  The whole
    file is verified against its digest before anything is decoded.  Raises :class:`CheckpointError` (one
    line naming the file) for a missing, truncated, tampered or foreign file.
    """
    _check_exists(path)
    try:
        with pa.memory_map(os.fspath(path), "r") as source:
            whole = source.read_buffer()
            reader = _verified_reader(path, whole)
            header = _parse_header(path, reader.schema)
            try:
                table = reader.read_all()
                table.validate(full=True)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise _fail(path, f"corrupt Arrow data ({_one_line(exc)})") from None
            for field in SCHEMA:
                if table.column(field.name).null_count:
                    raise _fail(path, f"column {field.name!r} contains nulls")
            rows = _Rows(path, table, map_location)
            try:
                state = _decode(header["tree"], rows)
            except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
                raise _fail(path, f"malformed tree ({_one_line(exc)})") from None
            del rows, table, reader, whole
    except OSError as exc:
        raise _fail(path, _one_line(exc)) from None
    if not isinstance(state, dict):
        raise _fail(path, "the state tree is not a dict")
    return state, header["meta"]


def one_line(exc: BaseException) -> str:
    """The first informative line of an exception's message (for one-line errors): a
    heading that ends with ':' is joined with the line after it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


def check_checkpoint_matches(path: str | os.PathLike, meta: Mapping[str, Any], method: str, dataset: str) -> None:
    """Refuse a (verified) checkpoint written for another method or dataset than the one it is loaded into."""
    for key, want in (("method", method), ("dataset", dataset)):
        got = meta.get(key)
        if got is not None and got != want:
            raise _fail(path, f"written for {key} {got!r}, not {want!r}")


# --------------------------------------------------------------------------- dataset


def experiment_dataset(root: str | os.PathLike) -> "pyarrow.dataset.Dataset":
    """All checkpoint files below ``root`` (any depth, named ``CHECKPOINT_FILENAME``) as one dataset.

    Every checkpoint has the same column schema (:data:`SCHEMA`), so files from
    different trials -- holding different tensors -- read as one table.  The special
    ``__filename`` field tells which file each row came from::

        ds = experiment_dataset("~/ray_results/my_experiment")
        t = ds.to_table(columns=["name", "dtype", "shape", "__filename"])
        # t["__filename"][i] is the absolute path of row i's checkpoint file
        fc = ds.to_table(columns=["shape", "__filename"],
                         filter=pyarrow.dataset.field("name") == "model/fc.weight")

    ``ds.files`` lists the files (sorted).  Note that the ``data`` column holds the
    raw payloads: leave it out of ``columns=`` when only the index is wanted.  The
    payloads read this way are **not** sha256-verified; use :func:`load_checkpoint`
    to get tensors.  Raises :class:`CheckpointError` if there are no checkpoints.
    """
    import pyarrow.dataset as pads

    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise CheckpointError(f"checkpoint root is not a directory: {os.fspath(root)}")
    files = sorted(str(p.resolve()) for p in root_path.rglob(CHECKPOINT_FILENAME) if p.is_file())
    if not files:
        raise CheckpointError(f"no {CHECKPOINT_FILENAME} files below {os.fspath(root)}")
    try:
        return pads.dataset(files, schema=SCHEMA, format="arrow")
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot open checkpoints below {os.fspath(root)}: {_one_line(exc)}") from None
