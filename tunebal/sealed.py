"""Sealed Arrow IPC files: one sha256 digest over every byte of the file, stored inside it.

tunebal's checkpoints (tunebal/checkpoint.py) and array files (tunebal/data/arrays.py) are
Arrow IPC ("Feather v2") files. Each carries the schema-metadata key ``tunebal_sha256``:
a sha256 of the *whole file* computed with that 64-character value itself replaced by 64
ASCII zeros. To use every core, the file is hashed in 1 MiB blocks (on a thread pool;
hashlib releases the GIL) and the digest is the sha256 of the file length and the blocks'
sha256 digests in order (a two-level hash tree; any changed byte changes its block's digest
and so the root). The Arrow file format stores the schema twice (the stream's first
message and the footer), so the value occurs exactly twice, once in each of those two
regions, and nowhere else is searched.

Why the whole file rather than the decoded content: every byte that can influence loading
(the tensor payloads, the row index, the JSON skeleton and meta, the flatbuffer footer with
its block offsets, even padding) is covered, so a reader either gets exactly the bytes the
writer wrote or a one-line error; nothing is half-loaded, and no single flipped bit goes
unnoticed. The digest is checked before anything from the file is used.

What it is not: a signature. Anyone who can write the file can recompute the digest; the
trust model (docs/bad-inputs.md) relies on the loaders never running code (no pickle) and on
checking decoded content against the model it is loaded into.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

DIGEST_KEY = b"tunebal_sha256"
_ZERO = b"0" * 64
_MAGIC = b"ARROW1"
BLOCK = 1 << 20
_TREE_TAG = b"tunebal-sealed-v1"
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="tunebal-seal")
    return _POOL


def _sha(block: Any) -> bytes:
    return hashlib.sha256(block).digest()


def _block_digests(view: memoryview) -> list[bytes]:
    """sha256 of each BLOCK-sized piece of ``view`` (the last may be shorter), in parallel."""
    blocks = [view[i:i + BLOCK] for i in range(0, len(view), BLOCK)]
    if len(blocks) < 4 or (os.cpu_count() or 1) < 2:
        return [_sha(b) for b in blocks]
    return list(_pool().map(_sha, blocks))


def _root(length: int, digests: list[bytes]) -> str:
    return hashlib.sha256(_TREE_TAG + length.to_bytes(8, "little") + b"".join(digests)).hexdigest()


def placeholder() -> str:
    """A random 64-hex-digit value to write as ``DIGEST_KEY`` before :func:`seal` fixes it."""
    return secrets.token_hex(32)


def _regions(buf: Any) -> list[tuple[int, int]]:
    """Byte ranges of the two serialised schemas: the first IPC message and the footer."""
    n = len(buf)
    if n < 24 or bytes(buf[:6]) != _MAGIC or bytes(buf[n - 6:]) != _MAGIC:
        raise ValueError("not an Arrow IPC file (no ARROW1 magic at both ends)")
    (footer_len,) = struct.unpack("<i", bytes(buf[n - 10:n - 6]))
    if not 0 < footer_len <= n - 18:
        raise ValueError("invalid Arrow footer length")
    regions = []
    if bytes(buf[8:12]) == b"\xff\xff\xff\xff":  # continuation marker, then the message length
        (meta_len,) = struct.unpack("<i", bytes(buf[12:16]))
        start = 16
    else:  # legacy framing: the length comes first
        (meta_len,) = struct.unpack("<i", bytes(buf[8:12]))
        start = 12
    if not 0 < meta_len <= n - start:
        raise ValueError("invalid Arrow schema message length")
    regions.append((start, start + meta_len))
    regions.append((n - 10 - footer_len, n - 10))
    return regions


def _positions(buf: Any, value: bytes) -> list[int]:
    """Offsets of ``value`` in the two schema regions; exactly one per region or ValueError."""
    found = []
    for lo, hi in _regions(buf):
        region = bytes(buf[lo:hi])
        first = region.find(value)
        if first < 0 or region.find(value, first + 1) >= 0:
            raise ValueError("the digest does not occur exactly once in each schema copy")
        found.append(lo + first)
    if found[0] + len(value) > found[1]:
        raise ValueError("overlapping schema copies")
    return found


def _digest(buf: Any, positions: list[int]) -> str:
    """The tree digest of ``buf`` with 64 zeros in place of the digest at ``positions``."""
    view = memoryview(buf).cast("B")
    n = len(view)
    digests = _block_digests(view)
    for b in sorted({pos // BLOCK for pos in positions} | {(pos + 63) // BLOCK for pos in positions}):
        block = bytearray(view[b * BLOCK:(b + 1) * BLOCK])
        for pos in positions:
            for i in range(64):
                if b * BLOCK <= pos + i < (b + 1) * BLOCK:
                    block[pos + i - b * BLOCK] = _ZERO[i]
        digests[b] = _sha(block)
    view.release()
    return _root(n, digests)


def seal(path: str | os.PathLike, value: str) -> str:
    """Replace the placeholder ``value`` in the freshly written file at ``path`` by the file's digest."""
    with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        positions = _positions(mm, value.encode("ascii"))
        digest = _digest(mm, positions)
        for pos in positions:
            mm[pos:pos + 64] = digest.encode("ascii")
        mm.flush()
    return digest


def verify(buf: Any, metadata: dict[bytes, bytes] | None) -> None:
    """Check the whole-file digest of ``buf`` (the file's bytes); ValueError with the reason."""
    stored = (metadata or {}).get(DIGEST_KEY)
    if stored is None:
        raise ValueError("no tunebal_sha256 digest (written by another tool, or an older tunebal)")
    if len(stored) != 64 or stored.strip(b"0123456789abcdef"):
        raise ValueError("malformed tunebal_sha256 digest")
    actual = _digest(buf, _positions(buf, stored))
    if actual.encode("ascii") != stored:
        raise ValueError("file digest mismatch: the file was edited or corrupted after it was written")


class SealingFile:
    """A write-only binary file that hashes what is written, for :func:`seal_written`.

    It hashes every byte as it passes (the placeholder digest value counted as 64 zeros,
    as :func:`verify` does), so sealing needs no second pass over the file. The placeholder
    is only looked for in writes of at most 1 MiB: the two serialised schemas are small
    writes of their own, tensor payloads are not.
    """

    _SEARCH_MAX = 1 << 20

    def __init__(self, path: str | os.PathLike, value: str) -> None:
        self._fh = open(path, "wb")
        self._needle = value.encode("ascii")
        self._digests: list[bytes] = []
        self._partial = bytearray()
        self._pos = 0
        self.positions: list[int] = []

    # the file-object protocol pyarrow's PythonFile uses
    closed = property(lambda self: self._fh.closed)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._fh.flush()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n <= self._SEARCH_MAX:
            chunk = view.tobytes()
            at = chunk.find(self._needle)
            while at >= 0:
                self.positions.append(self._pos + at)
                at = chunk.find(self._needle, at + 1)
            self._feed(memoryview(chunk.replace(self._needle, _ZERO) if self._needle in chunk else chunk))
        else:
            self._feed(view)
        self._fh.write(view)
        self._pos += n
        return n

    def _feed(self, view: memoryview) -> None:
        """Hash ``view`` as the next bytes of the file, block by block (full blocks in parallel)."""
        if self._partial:
            take = min(BLOCK - len(self._partial), len(view))
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) == BLOCK:
                self._digests.append(_sha(self._partial))
                self._partial = bytearray()
        full = len(view) // BLOCK * BLOCK
        if full:
            self._digests.extend(_block_digests(view[:full]))
        self._partial += view[full:]

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "SealingFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def digest(self) -> str:
        digests = self._digests + ([_sha(self._partial)] if self._partial else [])
        return _root(self._pos, digests)


def seal_written(path: str | os.PathLike, sink: SealingFile, value: str) -> str:
    """Seal a file written through ``sink`` (closed): patch the digest in place without
    reading the file again; falls back to :func:`seal` if the placeholder was not seen in
    exactly the two schema copies."""
    if len(sink.positions) != 2:
        return seal(path, value)
    with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        try:
            expected = _positions(mm, value.encode("ascii"))
        except ValueError:
            expected = []
        if expected != sink.positions:
            mm.close()
            return seal(path, value)
        digest = sink.digest()
        for pos in expected:
            mm[pos:pos + 64] = digest.encode("ascii")
        mm.flush()
    return digest
