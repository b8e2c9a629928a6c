"""UCF-101 as two modalities: RGB frames and TV-L1 optical flow (101 actions, 13,320 videos).

Raw layout under ``root`` (the usual TSN-style extraction)::

    ucfTrainTestlist/classInd.txt          "1 ApplyEyeMakeup" ... (1-based)
    ucfTrainTestlist/trainlist0{1,2,3}.txt "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    ucfTrainTestlist/testlist0{1,2,3}.txt  "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
    rgb/<v_name>/*.jpg                     RGB frames (also frames/), or the videos
                                           UCF-101/<Class>/<v_name>.avi, decoded at ``fps``
    flow/u/<v_name>/*.jpg, flow/v/<v_name>/*.jpg
                                           TV-L1 flow, horizontal and vertical, as grey JPEGs

Every video is prepared once into one pool; the three official splits (9,537 / 3,783 for
split 1) are stored as id lists and chosen at load time with ``official_split`` (1, 2 or 3),
so switching splits re-reads nothing. The group (``g08``) is the recording group, for a
group-disjoint validation split. The flow modality stores (u, v) as a 2-channel frame
(OPM/OGM, TPAMI 2024, §4.2: "we stack the horizontal vector and vertical vector as one
frame"); its encoder's first convolution takes 2 channels, initialised from the ImageNet RGB
weights by averaging (``--set pretrained=PATH``, which the paper uses for UCF-101), and its
training flip mirrors the horizontal motion (u -> 255 - u). A video without flow folders is
an error naming them (or skipped with ``--skip-bad``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tunebal.data.clips import first_existing, frames_from_folder, frames_from_video, frames_spec, read_split_text
from tunebal.data.prepare import Clip, Preparer, ScanResult
from tunebal.data.prepared import real_dataset_spec
from tunebal.data.shards import ModalitySpec
from tunebal.errors import DataError
from tunebal.knobs import Knob, knobs

LISTS = "ucfTrainTestlist"


def _read(path: Path) -> list[tuple[int, list[str]]]:
    return [(number, line.split()) for number, line in read_split_text(path)]


def video_name(entry: str) -> str:
    """``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi`` -> ``v_ApplyEyeMakeup_g08_c01``."""
    return Path(entry.replace("\\", "/")).stem


class Ucf101(Preparer):
    name = "ucf101"
    knobs = knobs(
        Knob("frame_size", "int", 256, "stored frame size S (RGB and flow frames are stored S x S uint8)", low=8, high=1024),
        Knob("fps", "float", 1.0, "frames per second decoded when RGB comes from .avi videos", low=0.05, high=60.0),
        Knob("max_frames", "int", 10, "frames stored per video and modality (segment centres)", low=1, high=256),
    )

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        lists = root / LISTS
        classes = [fields[1] for _, fields in sorted(_read(lists / "classInd.txt"), key=lambda r: int(r[1][0]))]
        if not classes:
            raise DataError(f"{lists / 'classInd.txt'} lists no class")
        memberships: dict[str, dict[str, list[str]]] = {}
        label_of: dict[str, str] = {}
        for k in ("1", "2", "3"):
            if not (lists / f"trainlist0{k}.txt").is_file():
                continue
            members = {}
            for split in ("train", "test"):
                ids = []
                for number, fields in _read(lists / f"{split}list0{k}.txt"):
                    name, cls = video_name(fields[0]), fields[0].replace("\\", "/").split("/")[0]
                    if cls not in classes:
                        raise DataError(f"{lists / f'{split}list0{k}.txt'} line {number}: unknown class {cls!r}")
                    label_of[name] = cls
                    ids.append(name)
                members[split] = sorted(ids)
            memberships[k] = members
        if not memberships:
            raise DataError(f"{lists} has no trainlist01.txt")
        rgb_root = first_existing(root, ("rgb", "frames"))
        video_root = root / "UCF-101"
        clips, missing = [], []
        for name in sorted(label_of):
            rgb = rgb_root / name if rgb_root is not None else video_root / label_of[name] / f"{name}.avi"
            u, v = root / "flow" / "u" / name, root / "flow" / "v" / name
            if not rgb.exists() or not u.is_dir() or not v.is_dir():
                missing.append(name)
                continue
            group = name.rsplit("_", 2)[-2] if name.count("_") >= 3 else name
            clips.append(Clip(name, "all", label_of[name], group, {"rgb": rgb, "flow_u": u, "flow_v": v}))
        if missing and rgb_root is not None and not (root / "flow").is_dir():
            raise DataError(f"ucf101: {root / 'flow'} is missing (TV-L1 flow folders flow/u/<video>, flow/v/<video>)")
        return ScanResult(clips, classes, missing, memberships=memberships)

    def modalities(self, values: Mapping[str, Any]) -> dict[str, ModalitySpec]:
        size = values["frame_size"]
        return {
            "rgb": frames_spec({**values, "frame_size": size}),
            "flow": ModalitySpec("frames", "uint8", (size, size, 2), max_frames=values["max_frames"]),
        }

    def decode(self, clip: Clip, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        rgb = clip.sources["rgb"]
        frames = frames_from_folder(rgb, values) if rgb.is_dir() else frames_from_video(rgb, values)
        u = frames_from_folder(clip.sources["flow_u"], values)[..., 0]  # grey JPEGs: one channel carries the value
        v = frames_from_folder(clip.sources["flow_v"], values)[..., 0]
        n = min(len(u), len(v))
        return {"rgb": frames, "flow": np.ascontiguousarray(np.stack([u[:n], v[:n]], axis=-1))}


def _knobs_with_split():
    return knobs(Knob("official_split", "int", 1, "official train/test split (1, 2 or 3)", choices=(1, 2, 3)))


SPEC = real_dataset_spec(
    Ucf101(),
    "UCF-101: 101 actions, RGB frames + TV-L1 optical flow as two modalities (official splits 1-3)",
    frames=3,
    group_help="carve a group-disjoint validation split (UCF recording groups g01-g25)",
    extra=_knobs_with_split(),
)
