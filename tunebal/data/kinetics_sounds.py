"""Kinetics-Sounds (``ks``): the audio-visual subset of Kinetics, as listed by the OGM-GE split files.

Raw layout under ``root``::

    my_train.txt, my_test.txt      lines ``<ytid>_<start>_<end>,10,<label>`` (14,799 / 2,597 in the
                                   OGM-GE lists; the label is the last field)
    videos/<clip>.mp4              decoded at ``fps`` (1 frame per second) with the audio track, or
    frames/<clip>/frame_00001.jpg  pre-extracted frames ...
    audio/<clip>.wav               ... with the audio as wav (used when both exist for a clip)

The class list is the sorted set of labels in the two split files (31 classes in the OGM-GE
lists; other papers use 32-34). Public copies miss many clips: missing ones are counted,
listed by name in ``missing.txt`` beside the manifest, and the rest is prepared. The YouTube
id is each clip's group (``val_by_group`` keeps a video's clips on one side). Audio defaults
to the papers' 10 s profile (16 kHz, STFT window 512, hop 159 -> 257 x 1004); up to 10 frames
are stored per clip and ``frames`` (default 3) are fed to the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tunebal.data.clips import AudioVisualPreparer, preparation_knobs, read_split_lines
from tunebal.data.prepare import Clip, ScanResult
from tunebal.data.prepared import real_dataset_spec
from tunebal.errors import DataError

SPLIT_FILES = {"train": "my_train.txt", "test": "my_test.txt"}


class KineticsSounds(AudioVisualPreparer):
    name = "ks"
    knobs = preparation_knobs("stft16k-10s", max_frames=10)
    missing_ok = True

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        listed: list[tuple[str, str, str]] = []
        for split, filename in SPLIT_FILES.items():
            for number, fields in read_split_lines(root / filename):
                if len(fields) < 2 or not fields[0] or not fields[-1]:
                    raise DataError(f"{root / filename} line {number}: expected '<clip>,10,<label>', got {','.join(fields)!r}")
                listed.append((split, fields[0], fields[-1]))
        classes = sorted({label for _, _, label in listed})
        clips, missing = [], []
        for split, clip_id, label in listed:
            frames, wav, mp4 = root / "frames" / clip_id, root / "audio" / f"{clip_id}.wav", root / "videos" / f"{clip_id}.mp4"
            if frames.is_dir() and wav.is_file():
                sources = {"audio": wav, "visual": frames}
            elif mp4.is_file():
                sources = {"audio": mp4, "visual": mp4}
            else:
                missing.append(clip_id)
                continue
            group = clip_id.rsplit("_", 2)[0] if clip_id.count("_") >= 2 else clip_id
            clips.append(Clip(clip_id, split, label, group, sources))
        notes = [f"{len(missing)} of {len(listed)} listed clips are missing"] if missing else []
        return ScanResult(clips, classes, missing, notes)




SPEC = real_dataset_spec(
    KineticsSounds(),
    "Kinetics-Sounds: audio + frames of YouTube clips (mp4, or frame folders + wav; OGM-GE split lists)",
    frames=3,
    group_help="carve a video-disjoint validation split (YouTube ids as groups)",
)
