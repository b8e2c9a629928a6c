"""Sealed Arrow IPC files: one sha256 over every byte of the file, stored inside it.

tunebal's checkpoints (tunebal/checkpoint.py) and array files (tunebal/data/arrays.py) are
Arrow IPC ("Feather v2") files. Each carries the schema-metadata key ``tunebal_sha256``:
the hex sha256 of the *whole file* computed with that 64-character value itself replaced
by 64 ASCII zeros. The Arrow file format stores the schema twice (the stream's first
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
from typing import Any

DIGEST_KEY = b"tunebal_sha256"
_ZERO = b"0" * 64
_MAGIC = b"ARROW1"


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
    view = memoryview(buf)
    h = hashlib.sha256()
    start = 0
    for pos in positions:
        h.update(view[start:pos])
        h.update(_ZERO)
        start = pos + len(_ZERO)
    h.update(view[start:])
    view.release()
    return h.hexdigest()


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
