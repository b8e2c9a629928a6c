"""Frames for preparation: frame folders (naturally sorted), single images and video files.

- :func:`list_frame_files` sorts a frame folder in **natural** order (``frame_2`` before
  ``frame_10``); peers read unsorted ``os.listdir`` output, whose order is arbitrary.
- :func:`load_image_uint8` decodes one image with Pillow and resizes it to ``size x size``
  (bilinear, antialiased; the aspect ratio is not kept, like the peers' ``Resize((224, 224))``).
- :func:`decode_video_frames` decodes an mp4/flv with PyAV at ``fps`` frames per second: frame
  ``i`` is the decoded frame nearest to ``t = (i + 0.5) / fps`` (the middle of each second at
  1 fps), so a 3 s clip gives frames at 0.5, 1.5 and 2.5 s and a 10 s clip gives 10 frames.
  :func:`probe_video` reads duration, frame rate and stream counts from the header only.
- :func:`segment_indices` chooses ``n`` frames out of the stored ones: one per equal segment,
  a seeded random index in training, the segment's centre in evaluation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

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


class VideoInfo(NamedTuple):
    """What :func:`probe_video` reads from a container's header (nothing is decoded)."""

    duration: float  # seconds; 0.0 where the container does not say
    fps: float  # the first video stream's average frame rate; 0.0 where unknown
    n_video: int
    n_audio: int
    width: int
    height: int


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Header facts of a video file (duration, frame rate, stream counts, size); DataError if unreadable."""
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"cannot decode video {path}: no such file")
    try:
        with av.open(path) as container:
            videos, audios = container.streams.video, container.streams.audio
            duration = container.duration / 1e6 if container.duration else 0.0  # microseconds (av.time_base)
            if not duration and videos and videos[0].duration and videos[0].time_base:
                duration = float(videos[0].duration * videos[0].time_base)
            rate = videos[0].average_rate if videos else None
            width = videos[0].codec_context.width if videos else 0
            height = videos[0].codec_context.height if videos else 0
            return VideoInfo(float(duration), float(rate) if rate else 0.0, len(videos), len(audios), width, height)
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise DataError(f"cannot decode video {path}: {_one_line(exc)}") from None


def _frame_time(frame, index: int, rate: float) -> float:
    if frame.time is not None:
        return float(frame.time)
    return index / rate if rate else float(index)


def decode_video_frames(path: str | os.PathLike, fps: float, size: int, max_frames: int | None = None) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 frames of a video at ``fps`` frames per second.

    Frame ``i`` is the decoded frame nearest to ``t_i = (i + 0.5) / fps`` seconds after the
    first frame (ties go to the earlier frame); ``N`` counts the ``t_i`` before the end of the
    stream (last frame time + one frame duration), so a 10 s clip gives 10 frames at 1 fps,
    taken at 0.5, 1.5, ..., 9.5 s, and a 3 s clip gives 3. Every frame is decoded (inter-coded
    streams need it) but only the chosen ones are converted and resized. A missing, corrupt or
    truncated-to-nothing file, or one without a video stream, is a one-line DataError naming it.
    """
    import av

    if fps <= 0:
        raise DataError(f"cannot decode video {os.fspath(path)}: fps must be positive, got {fps}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"cannot decode video {path}: no such file")
    frames: list[np.ndarray] = []
    limit = max_frames if max_frames is not None else 1 << 30
    cache: dict[str, object] = {"frame": None, "image": None}

    def convert(frame) -> np.ndarray:
        if cache["frame"] is not frame:
            cache["frame"], cache["image"] = frame, _resize(frame.to_image(), size)
        return cache["image"]  # type: ignore[return-value]

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"cannot decode video {path}: no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else 0.0
            t0: float | None = None
            prev, prev_t, step = None, 0.0, (1.0 / rate if rate else 0.0)
            for index, frame in enumerate(container.decode(stream)):
                t = _frame_time(frame, index, rate)
                t0 = t if t0 is None else t0
                t -= t0
                while len(frames) < limit and (len(frames) + 0.5) / fps <= t:
                    target = (len(frames) + 0.5) / fps
                    nearer = prev if prev is not None and target - prev_t <= t - target else frame
                    frames.append(convert(nearer))
                if len(frames) >= limit:
                    break
                if prev is not None and not rate:
                    step = t - prev_t
                prev, prev_t = frame, t
            if prev is not None:  # targets after the last frame's start, before the stream's end
                while len(frames) < limit and (len(frames) + 0.5) / fps < prev_t + step:
                    frames.append(convert(prev))
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
