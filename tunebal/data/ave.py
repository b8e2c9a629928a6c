"""AVE (Audio-Visual Event dataset): 28 event categories, 4,143 ten-second videos, official splits.

Raw layout under ``root``::

    AVE/<VideoID>.mp4                   the dataset's videos (also looked up in videos/)
    trainSet.txt, valSet.txt, testSet.txt
                                        lines ``Category&VideoID&Quality&Start&End``
                                        (3,339 / 402 / 402; a header line is skipped)

AVE ships its own validation split, so none is carved from train. Some video ids are listed
more than once: the first listing wins (in train, val, test order, then line order), the
others are dropped deterministically and listed (with the listing that was kept) in the
manifest's ``notes``. Audio: 10 s at 16 kHz, STFT window 512 / hop 159 (257 x 1004),
each spectrogram z-scored on its own (the per-sample normalisation of the AVE pipelines;
``spec_norm``). Frames: 1 per second, all ten used (OPM/OGM, TPAMI 2024, §4.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tunebal.data.clips import AudioVisualPreparer, preparation_knobs, read_split_text
from tunebal.data.prepare import Clip, ScanResult
from tunebal.data.prepared import real_dataset_spec
from tunebal.errors import DataError

SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
VIDEO_DIRS = ("AVE", "videos")


def read_ave_list(path: Path) -> list[tuple[int, str, str]]:
    """(line, category, video id) of an AVE split file."""
    out = []
    for number, line in read_split_text(path):
        fields = line.split("&")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise DataError(f"{path} line {number}: expected 'Category&VideoID&Quality&Start&End', got {line!r}")
        if number == 1 and fields[0] == "Category":
            continue
        out.append((number, fields[0], fields[1]))
    return out


class Ave(AudioVisualPreparer):
    name = "ave"
    knobs = preparation_knobs("stft16k-10s", max_frames=10, spec_norm="per_sample")
    missing_ok = False

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        video_dir = next((root / d for d in VIDEO_DIRS if (root / d).is_dir()), None)
        if video_dir is None:
            raise DataError(f"ave: {root} has no AVE/ (or videos/) folder of mp4 files")
        listed = [(split, *row) for split, name in SPLIT_FILES.items() for row in read_ave_list(root / name)]
        seen: dict[str, str] = {}
        clips, missing, duplicates = [], [], []
        for split, number, category, video in listed:
            if video in seen:
                duplicates.append(f"{video}\t{split} line {number} ({category}); kept the {seen[video]} listing")
                continue
            seen[video] = f"{split} line {number}"
            path = video_dir / f"{video}.mp4"
            if not path.is_file():
                missing.append(video)
                continue
            clips.append(Clip(video, split, category, video, {"audio": path, "visual": path}))
        classes = sorted({category for _, _, category, _ in listed})
        notes = [f"{len(duplicates)} duplicate listings dropped: " + "; ".join(duplicates)] if duplicates else []
        return ScanResult(clips, classes, missing, notes)




SPEC = real_dataset_spec(
    Ave(),
    "AVE: 28 audio-visual event categories, 10 s videos (AVE/*.mp4, official train/val/test lists)",
    frames=10,
    group_help="(AVE has its own validation split; used only when a preparation lacks one)",
)
