"""Frames for preparation: frame folders (naturally sorted), single images and video files.

- :func:`list_frame_files` sorts a frame folder in **natural** order (``frame_2`` before
  ``frame_10``); peers read unsorted ``os.listdir`` output, whose order is arbitrary.
- :func:`load_image_uint8` decodes one image with Pillow and resizes it to ``size x size``
  (bilinear, antialiased; the aspect ratio is not kept, like the peers' ``Resize((224, 224))``).
- :func:`decode_video_frames` decodes an mp4/flv with PyAV at ``fps`` frames per second: frame
  ``i`` is the first decoded frame at or after ``t = (i + 0.5) / fps`` (the middle of each
  second at 1 fps), so a 3 s clip gives frames at 0.5, 1.5 and 2.5 s.
- :func:`segment_indices` chooses ``n`` frames out of the stored ones: one per equal segment,
  a seeded random index in training, the segment's centre in evaluation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from tunebal.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_frame_files(directory: str | os.PathLike) -> list[Path]:
    """The image files of a frame folder in natural order; DataError if missing or empty."""
    folder = Path(directory)
    if not folder.is_dir():
        raise DataError(f"frame folder {folder} does not exist")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise DataError(f"frame folder {folder} holds no .jpg/.jpeg/.png file")
    return sorted(files, key=_natural_key)


def _resize(image, size: int) -> np.ndarray:
    from PIL import Image

    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def load_image_uint8(path: str | os.PathLike, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB of an image file; a missing or corrupt file is a DataError naming it."""
    from PIL import Image

    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            return _resize(image.convert("RGB"), size)
    except FileNotFoundError:
        raise DataError(f"cannot decode image {path}: no such file") from None
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated), ...
        raise DataError(f"cannot decode image {path}: {_one_line(exc)}") from None


def decode_video_frames(path: str | os.PathLike, fps: float, size: int, max_frames: int | None = None) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 frames of a video at ``fps`` (see the module docstring)."""
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"cannot decode video {path}: no such file")
    frames: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"cannot decode video {path}: no video stream")
            stream = container.streams.video[0]
            next_t = 0.5 / fps
            for frame in container.decode(stream):
                if frame.time is None or frame.time + 1e-6 < next_t:
                    continue
                frames.append(_resize(frame.to_image(), size))
                next_t += 1.0 / fps
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except DataError:
        raise
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise DataError(f"cannot decode video {path}: {_one_line(exc)}") from None
    if not frames:
        raise DataError(f"cannot decode video {path}: no frames")
    return np.stack(frames)


def segment_indices(n_available: int, n_frames: int, train: bool, rng: np.random.Generator | None) -> list[int]:
    """``n_frames`` indices into ``n_available`` frames, one per equal segment.

    Segment ``k`` covers ``[k * n / T, (k + 1) * n / T)``. Evaluation takes its centre
    (``floor((k + 0.5) * n / T)``); training draws one index uniformly inside it with ``rng``.
    With fewer stored frames than requested, segments shorter than one frame repeat frames.
    """
    if n_available < 1 or n_frames < 1:
        raise DataError(f"cannot choose {n_frames} frames out of {n_available}")
    width = n_available / n_frames
    out = []
    for k in range(n_frames):
        if train:
            if rng is None:
                raise ValueError("training frame choice needs a seeded generator")
            lo = int(np.floor(k * width))
            hi = max(lo + 1, int(np.floor((k + 1) * width)))
            out.append(int(rng.integers(lo, hi)))
        else:
            out.append(min(n_available - 1, int(np.floor((k + 0.5) * width))))
    return out
