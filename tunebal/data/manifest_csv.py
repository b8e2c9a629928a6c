"""Bring your own data: ``--dataset manifest --data manifest=FILE.csv``.

A CSV with a header naming the columns ``id``, ``split`` (train / val / test; val is optional:
without it a validation split is carved from train), ``label`` (any string), an optional
``group``, and one path column per modality whose header declares the modality's kind as
``name:kind``::

    id,split,label,audio:audio,visual:video
    clip1,train,dog,wav/clip1.wav,mp4/clip1.mp4
    clip2,test,cat,mp4/clip2.mp4,mp4/clip2.mp4

Kinds: ``audio`` (a wav or any file with an audio track, including video containers: turned
into the ``profile``'s spectrogram), ``video`` (a video file: frames at ``fps``), ``frames`` (a
folder of frame images, sorted naturally) and ``image`` (one image: a 1-frame clip). Relative
paths are relative to the CSV's folder. Classes are the sorted set of labels. Every method
works on the result with no code, like on the built-in datasets.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tunebal.data.clips import (
    audio_spec,
    frames_from_folder,
    frames_from_image,
    frames_from_video,
    frames_spec,
    preparation_knobs,
    spectrogram,
)
from tunebal.data.prepare import Clip, Preparer, ScanResult
from tunebal.data.prepared import as_prepared_knobs, load_knobs, load_prepared
from tunebal.data.base import DatasetSpec, MultimodalData
from tunebal.data.shards import ModalitySpec
from tunebal.errors import ConfigError, DataError
from tunebal.knobs import Knob, knobs

KINDS = {"audio": "spectrogram", "video": "frames", "frames": "frames", "image": "frames"}
SPLITS = ("train", "val", "test")


def read_manifest_csv(path: Path) -> tuple[dict[str, str], list[tuple[int, dict[str, str]]]]:
    """(modality -> declared kind, [(line, row)]) of a manifest CSV, with its header checked."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = [(i + 2, row) for i, row in enumerate(reader)]
    except FileNotFoundError:
        raise DataError(f"manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {' '.join(str(exc).split())}") from None
    missing = [c for c in ("id", "split", "label") if c not in header]
    if missing:
        raise DataError(f"manifest {path}: header lacks column(s) {', '.join(missing)} (have: {', '.join(header)})")
    modalities = {}
    for column in header:
        if column in ("id", "split", "label", "group"):
            continue
        name, _, kind = column.partition(":")
        if not name or kind not in KINDS:
            raise DataError(
                f"manifest {path}: column {column!r} must be 'modality:kind' with kind one of {', '.join(KINDS)}"
            )
        modalities[name] = kind
    if not modalities:
        raise DataError(f"manifest {path}: no modality column ('name:kind')")
    return modalities, rows


class ManifestCsv(Preparer):
    name = "manifest"
    knobs = knobs(Knob("manifest", "str", "", "the CSV file (id, split, label[, group], modality:kind columns)")) + preparation_knobs(
        "stft16k", max_frames=3
    )

    def _csv(self, values: Mapping[str, Any]) -> Path:
        if not values["manifest"]:
            raise ConfigError("dataset manifest needs --data manifest=FILE.csv")
        return Path(values["manifest"]).expanduser().resolve()

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        path = self._csv(values)
        modalities, rows = read_manifest_csv(path)
        clips, missing, seen = [], [], set()
        for line, row in rows:
            clip_id, split, label = ((row.get(k) or "").strip() for k in ("id", "split", "label"))
            if not clip_id or not label:
                raise DataError(f"manifest {path} line {line}: empty id or label")
            if split not in SPLITS:
                raise DataError(f"manifest {path} line {line}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
            if clip_id in seen:
                raise DataError(f"manifest {path} line {line}: duplicate id {clip_id!r}")
            seen.add(clip_id)
            sources = {}
            for m, kind in modalities.items():
                value = (row.get(f"{m}:{kind}") or "").strip()
                file = (path.parent / value) if value else None
                if file is None or not file.exists():
                    break
                sources[m] = file
            if len(sources) != len(modalities):
                missing.append(clip_id)
                continue
            clips.append(Clip(clip_id, split, label, (row.get("group") or "").strip() or clip_id, sources))
        classes = sorted({c.label for c in clips})
        return ScanResult(clips, classes, missing)

    def modalities(self, values: Mapping[str, Any]) -> dict[str, ModalitySpec]:
        kinds, _ = read_manifest_csv(self._csv(values))
        return {m: audio_spec(values) if kind == "audio" else frames_spec(values) for m, kind in kinds.items()}

    def decode(self, clip: Clip, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        kinds, _ = read_manifest_csv(self._csv(values))
        out = {}
        for m, kind in kinds.items():
            path = clip.sources[m]
            if kind == "audio":
                out[m] = spectrogram(path, values)
            elif kind == "video":
                out[m] = frames_from_video(path, values)
            elif kind == "frames":
                out[m] = frames_from_folder(path, values)
            else:
                out[m] = frames_from_image(path, values)
        return out


_PREPARER = ManifestCsv()
_KNOBS = load_knobs(3, "carve a group-disjoint validation split (the 'group' column)") + as_prepared_knobs(_PREPARER)


def _build(**values: Any) -> MultimodalData:
    values = _KNOBS.resolve(values, where="dataset manifest: ")
    if not values["manifest"] and not values["root"]:
        raise ConfigError("dataset manifest needs --data manifest=FILE.csv (or root= a prepared directory)")
    if values["manifest"]:
        values["manifest"] = str(Path(values["manifest"]).expanduser().resolve())
        if not values["root"]:
            values["root"] = str(Path(values["manifest"]).parent)
    return load_prepared(_PREPARER, values)


SPEC = DatasetSpec(
    name="manifest",
    description="bring your own: a CSV of clips (id, split, label, one 'modality:kind' path column per modality)",
    knobs=_KNOBS,
    build=_build,
    preparer=_PREPARER,
)
