"""Decoding one raw clip for preparation: the pieces every audio-visual preparer shares.

- the preparation knobs (audio ``profile``, spectrogram dtype, stored ``frame_size``,
  ``fps`` for video files, ``max_frames`` kept per clip) and the stored modality specs;
- frames from a folder of images (sorted in natural order), a single image or a video file,
  thinned to ``max_frames`` by taking segment centres (deterministic);
- the spectrogram of a wav file or of a video file's audio track;
- reading split files (UTF-8 with or without BOM, blank lines ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tunebal.data.prepare import Clip, Preparer
from tunebal.data.shards import ModalitySpec
from tunebal.errors import DataError
from tunebal.knobs import Knob, KnobSet, knobs


def preparation_knobs(profile: str, max_frames: int, spec_norm: str = "none") -> KnobSet:
    """Knobs that change the prepared bytes; ``profile`` names one of ``AUDIO_PROFILES``."""
    from tunebal.data.audio import AUDIO_PROFILES

    return knobs(
        Knob("profile", "str", profile, f"audio preprocessing profile: {', '.join(AUDIO_PROFILES)}", choices=tuple(AUDIO_PROFILES)),
        Knob("spec_dtype", "str", "float16", "stored spectrogram dtype", choices=("float16", "float32")),
        Knob("spec_norm", "str", spec_norm, "per_sample: z-score each spectrogram (the AVE pipelines); none: raw log-magnitudes",
             choices=("none", "per_sample")),
        Knob("frame_size", "int", 256, "stored frame size S (frames are stored S x S uint8, then cropped to image_size)", low=8, high=1024),
        Knob("fps", "float", 1.0, "frames per second decoded from video files", low=0.05, high=60.0),
        Knob("max_frames", "int", max_frames, "frames stored per clip at most (segment centres when there are more)", low=1, high=256),
    )


def audio_spec(values: Mapping[str, Any]) -> ModalitySpec:
    from tunebal.data.audio import AUDIO_PROFILES

    return ModalitySpec("spectrogram", values["spec_dtype"], AUDIO_PROFILES[values["profile"]].shape)


def frames_spec(values: Mapping[str, Any]) -> ModalitySpec:
    size = values["frame_size"]
    return ModalitySpec("frames", "uint8", (size, size, 3), max_frames=values["max_frames"])


def spectrogram(path: Path, values: Mapping[str, Any]) -> np.ndarray:
    """The stored spectrogram of a wav file or a video file's audio track."""
    from tunebal.data.audio import AUDIO_PROFILES, load_clip_audio

    spec = load_clip_audio(path, AUDIO_PROFILES[values["profile"]])
    if values["spec_norm"] == "per_sample":
        spec = (spec - spec.mean()) / (spec.std() + 1e-9)
    return spec.astype(values["spec_dtype"])


def _thin(frames: list[Any] | np.ndarray, max_frames: int) -> list[int]:
    from tunebal.data.video import segment_indices

    n = len(frames)
    return list(range(n)) if n <= max_frames else segment_indices(n, max_frames, False, None)


def frames_from_folder(folder: Path, values: Mapping[str, Any]) -> np.ndarray:
    """(n, S, S, 3) uint8 from a folder of frame images, sorted naturally, at most ``max_frames``."""
    from tunebal.data.video import list_frame_files, load_image_uint8

    files = list_frame_files(folder)
    return np.stack([load_image_uint8(files[i], values["frame_size"]) for i in _thin(files, values["max_frames"])])


def frames_from_image(path: Path, values: Mapping[str, Any]) -> np.ndarray:
    from tunebal.data.video import load_image_uint8

    return load_image_uint8(path, values["frame_size"])[None]


def frames_from_video(path: Path, values: Mapping[str, Any]) -> np.ndarray:
    """(n, S, S, 3) uint8 decoded at ``fps``, at most ``max_frames`` (segment centres)."""
    from tunebal.data.video import decode_video_frames

    frames = decode_video_frames(path, values["fps"], values["frame_size"])
    if len(frames) == 0:
        raise DataError(f"cannot decode video {path}: no frames")
    return frames[_thin(frames, values["max_frames"])]


def read_split_text(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines of a split file; UTF-8 with an optional BOM."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split file {path}: {' '.join(str(exc).split())}") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def read_split_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, comma-separated fields) of a split file."""
    return [(number, [field.strip() for field in line.split(",")]) for number, line in read_split_text(path)]


class AudioVisualPreparer(Preparer):
    """A clip with an ``audio`` source (wav, or a video's audio track) and a ``visual`` source
    (a frame folder, or a video file decoded at ``fps``): CREMA-D, Kinetics-Sounds, AVE, VGGSound."""

    def modalities(self, values: Mapping[str, Any]) -> dict[str, ModalitySpec]:
        return {"audio": audio_spec(values), "visual": frames_spec(values)}

    def decode(self, clip: Clip, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        visual = clip.sources["visual"]
        frames = frames_from_folder(visual, values) if visual.is_dir() else frames_from_video(visual, values)
        return {"audio": spectrogram(clip.sources["audio"], values), "visual": frames}


def first_existing(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if name and (root / name).is_dir():
            return root / name
    return None
