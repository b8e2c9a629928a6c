"""CREMA-D (6 emotions, 7,442 clips of 91 actors) from its raw files.

Raw layout under ``root`` (as distributed, plus the OGM-GE split files)::

    AudioWAV/<clip>.wav                 e.g. AudioWAV/1001_DFA_ANG_XX.wav
    VideoFlash/<clip>.flv               decoded at ``fps`` (1 frame per second by default), or
    <frames_dir>/<clip>/*.jpg           pre-extracted frames (OGM-GE's scripts write
                                        Image-01-FPS/<clip>/); looked up as ``frames_dir``,
                                        then Image-01-FPS, visual, frames
    train.csv, test.csv                 OGM-GE split: lines ``clip,LABEL``, no header, maybe a BOM
                                        (6,698 / 744 clips)

Classes are OGM-GE's order: NEU, HAP, SAD, FEA, DIS, ANG. The actor id (the clip name's first
field) is each clip's group: ``--data val_by_group=true`` carves a speaker-disjoint validation
split (the public train/test split itself puts all 91 actors in both).

A clip named by a split file but absent (no wav, or no video/frames) is an error, or skipped
and listed with ``--skip-bad``. Audio defaults to the AIM/OPM papers' profile (16 kHz, STFT
window 512, hop 159, 3 s -> 257 x 299); frames are stored at most 3 per clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tunebal.data.clips import AudioVisualPreparer, first_existing, preparation_knobs, read_split_lines
from tunebal.data.prepare import Clip, ScanResult
from tunebal.data.prepared import real_dataset_spec
from tunebal.errors import DataError
from tunebal.knobs import Knob, knobs

CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
SPLIT_FILES = {"train": "train.csv", "test": "test.csv"}
FRAME_DIRS = ("Image-01-FPS", "visual", "frames")


class CremaD(AudioVisualPreparer):
    name = "cremad"
    knobs = preparation_knobs("stft16k", max_frames=3) + knobs(
        Knob("frames_dir", "str", "", "folder of pre-extracted frame folders under root ('' = auto; VideoFlash/*.flv otherwise)"),
    )

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        frames_root = first_existing(root, (values["frames_dir"], *FRAME_DIRS))
        if values["frames_dir"] and frames_root != root / values["frames_dir"]:
            raise DataError(f"cremad: frames_dir {root / values['frames_dir']} is not a directory")
        video_root = root / "VideoFlash"
        if frames_root is None and not video_root.is_dir():
            raise DataError(f"cremad: {root} has neither VideoFlash/ nor a frames folder ({', '.join(FRAME_DIRS)})")
        if not (root / "AudioWAV").is_dir():
            raise DataError(f"cremad: {root} has no AudioWAV/ folder")
        clips, missing = [], []
        for split, filename in SPLIT_FILES.items():
            for number, fields in read_split_lines(root / filename):
                if len(fields) < 2:
                    raise DataError(f"{root / filename} line {number}: expected 'clip,LABEL', got {','.join(fields)!r}")
                clip_id, label = fields[0], fields[1]
                if label not in CLASSES:
                    raise DataError(f"{root / filename} line {number}: unknown label {label!r}; valid: {', '.join(CLASSES)}")
                wav = root / "AudioWAV" / f"{clip_id}.wav"
                visual = frames_root / clip_id if frames_root is not None else video_root / f"{clip_id}.flv"
                if not wav.is_file() or not visual.exists():
                    missing.append(clip_id)
                    continue
                clips.append(Clip(clip_id, split, label, clip_id.split("_")[0], {"audio": wav, "visual": visual}))
        return ScanResult(clips, list(CLASSES), missing)




SPEC = real_dataset_spec(
    CremaD(),
    "CREMA-D: 6 emotions, audio + face frames (AudioWAV + VideoFlash or frame folders, OGM-GE split files)",
    frames=1,
    group_help="carve a speaker-disjoint validation split (actors as groups)",
)
