"""VGGSound: about 200k ten-second YouTube clips in 309 classes, from ``vggsound.csv``.

Raw layout under ``root``::

    vggsound.csv                  lines ``<ytid>,<start second>,<label>,<train|test>`` (no header;
                                  labels with commas are quoted)
    video/<ytid>_<start:06d>.mp4  one clip per line (also looked up in videos/)

Public copies miss many clips: missing ones are counted and named in ``missing.txt`` and the
rest is prepared. About 180k clips take hours to decode, so preparation is parallel
(``--workers``), resumable (shard by shard) and shardable across machines sharing ``--out``
(``--shard i/n`` on each, then one run without ``--shard`` to verify and write the manifest).
Audio: 16 kHz, 5 s, STFT 256 / hop 128 (129 x 626, profile ``stft16k-5s-256``), or the 10 s
profile ``stft16k-10s``; frames at 1 fps, 3 fed to the model.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

from tunebal.data.clips import AudioVisualPreparer, preparation_knobs
from tunebal.data.prepare import Clip, ScanResult
from tunebal.data.prepared import real_dataset_spec
from tunebal.errors import DataError

VIDEO_DIRS = ("video", "videos")


def read_vggsound_csv(path: Path) -> list[tuple[int, str, str, str]]:
    """(line, clip id ``<ytid>_<start:06d>``, label, split) of ``vggsound.csv``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    out = []
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 4 or row[3].strip() not in ("train", "test"):
            raise DataError(f"{path} line {number}: expected 'ytid,start,label,train|test', got {','.join(row)!r}")
        try:
            start = int(float(row[1]))
        except ValueError:
            raise DataError(f"{path} line {number}: start second {row[1]!r} is not a number") from None
        out.append((number, f"{row[0].strip()}_{start:06d}", row[2].strip(), row[3].strip()))
    return out


class VggSound(AudioVisualPreparer):
    name = "vggsound"
    knobs = preparation_knobs("stft16k-5s-256", max_frames=10)
    missing_ok = True

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        video_dir = next((root / d for d in VIDEO_DIRS if (root / d).is_dir()), root / VIDEO_DIRS[0])
        listed = read_vggsound_csv(root / "vggsound.csv")
        clips, missing = [], []
        for _, clip_id, label, split in listed:
            path = video_dir / f"{clip_id}.mp4"
            if not path.is_file():
                missing.append(clip_id)
                continue
            clips.append(Clip(clip_id, split, label, clip_id.rsplit("_", 1)[0], {"audio": path, "visual": path}))
        notes = [f"{len(missing)} of {len(listed)} listed clips are missing"] if missing else []
        return ScanResult(clips, sorted({label for _, _, label, _ in listed}), missing, notes)




SPEC = real_dataset_spec(
    VggSound(),
    "VGGSound: 309 classes of YouTube clips (vggsound.csv + video/<ytid>_<start>.mp4); shardable preparation",
    frames=3,
    group_help="carve a video-disjoint validation split (YouTube ids as groups)",
)
