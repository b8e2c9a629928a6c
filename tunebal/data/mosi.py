"""CMU-MOSI: 2,199 opinion utterances with text, audio and visual feature sequences.

Raw input: the commonly distributed feature file, a Python **pickle** (``mosi_data.pkl`` of
the MulT release, aligned, or MMSA's ``aligned_50.pkl`` / ``unaligned_50.pkl``) under ``root``
(the first ``*.pkl`` there, or ``--data pickle_file=NAME``): a dict with ``train``,
``valid`` (or ``val``/``dev``) and ``test`` (1,284 / 229 / 686 utterances), each holding
``text`` (or ``text_bert``), ``audio`` and ``vision`` arrays of shape (N, L, D), sentiment
scores in [-3, 3] (``regression_labels`` or ``labels``) and optionally ``id``.

**Pickles can run code when loaded.** ``tunebal prepare mosi`` therefore refuses the file
unless ``--trust-pickle`` is given, prints a warning when it is, loads it once, converts it
to Arrow shards, and never unpickles anything after that (a prepared directory holds no
pickle). Labels (``labels`` knob): ``binary`` (negative < 0 vs non-negative, the AIM
paper's binary setting, "Acc-2 with zeros"), ``binary_nonzero`` (utterances scored 0
dropped, MulT's protocol), ``3class`` (negative / neutral / positive) or ``regression``: the
continuous score itself, stored as the shards' float32 ``target`` column (the dataset's task
is then ``"regression"``: one model output trained with the L1 loss of MulT and MISA, and
scored with MAE, Pearson correlation, Acc-2 in both conventions, F1 and Acc-7; see
:func:`tunebal.metrics.regression_metrics`). Each modality is a (L, D) float sequence; its
encoder is a 3-layer Transformer whose layers are the blocks AIM modulates.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tunebal.data.prepare import Clip, Preparer, ScanResult
from tunebal.data.prepared import real_dataset_spec
from tunebal.data.shards import ModalitySpec
from tunebal.errors import DataError
from tunebal.knobs import Knob, knobs

SPLITS = {"train": ("train",), "val": ("valid", "val", "dev"), "test": ("test",)}
MODALITIES = {"text": ("text", "text_bert"), "audio": ("audio",), "vision": ("vision",)}
CLASSES = {"binary": ["negative", "non-negative"], "binary_nonzero": ["negative", "positive"],
           "3class": ["negative", "neutral", "positive"], "regression": ["sentiment"]}


def label_names(scores: np.ndarray, mode: str) -> list[str | None]:
    """Class name of each sentiment score; ``None`` for an utterance the mode drops."""
    out: list[str | None] = []
    for s in scores:
        if mode == "regression":  # one "class"; the score is the target
            out.append("sentiment")
        elif mode == "binary":
            out.append("negative" if s < 0 else "non-negative")
        elif mode == "binary_nonzero":
            out.append(None if s == 0 else ("negative" if s < 0 else "positive"))
        else:
            out.append("negative" if s < 0 else ("neutral" if s == 0 else "positive"))
    return out


def _pick(split: Mapping[str, Any], names: tuple[str, ...], what: str, path: Path) -> np.ndarray:
    for name in names:
        if name in split:
            return np.asarray(split[name])
    raise DataError(f"{path}: a split lacks {what} (looked for {', '.join(names)})")


class Mosi(Preparer):
    name = "mosi"
    knobs = knobs(
        Knob("pickle_file", "str", "", "the feature pickle under root ('' = the only *.pkl there)"),
        Knob("labels", "str", "binary", "binary (< 0 vs >= 0), binary_nonzero (zeros dropped), 3class, or regression (the score in [-3, 3])",
             choices=tuple(CLASSES)),
        Knob("spec_dtype", "str", "float32", "stored feature dtype", choices=("float16", "float32")),
    )
    trust_pickle = False  # set on a copy by run_prepare(trust_pickle=True)

    def _file(self, root: Path, values: Mapping[str, Any]) -> Path:
        if values["pickle_file"]:
            path = root / values["pickle_file"]
        else:
            found = sorted(root.glob("*.pkl"))
            if len(found) != 1:
                raise DataError(f"mosi: expected one *.pkl feature file under {root}, found {len(found)}; "
                                "name it with --data pickle_file=NAME")
            path = found[0]
        if not path.is_file():
            raise DataError(f"mosi: feature file {path} does not exist")
        return path

    def _load(self, path: Path) -> dict[str, Any]:
        if not self.trust_pickle:
            raise DataError(
                f"mosi: {path} is a Python pickle, and loading a pickle can run code; "
                "pass --trust-pickle to `tunebal prepare` if you trust this file (it is converted to Arrow once)"
            )
        print(f"tunebal: warning: unpickling {path} (trusted with --trust-pickle); it is converted to Arrow "
              "shards and never unpickled again", file=sys.stderr)
        import pickle

        try:
            with open(path, "rb") as fh:
                data = pickle.load(fh)  # noqa: S301 - explicitly trusted by the user
        except Exception as exc:
            raise DataError(f"mosi: cannot read feature file {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
        if not isinstance(data, dict):
            raise DataError(f"mosi: {path} does not hold a dict of splits")
        return data

    def scan(self, root: Path, values: Mapping[str, Any]) -> ScanResult:
        path = self._file(root, values)
        data = self._load(path)
        clips = []
        for split, keys in SPLITS.items():
            part = next((data[k] for k in keys if k in data), None)
            if part is None:
                raise DataError(f"{path}: no {split} split (looked for {', '.join(keys)})")
            arrays = {m: _pick(part, names, m, path).astype(np.float32) for m, names in MODALITIES.items()}
            scores = _pick(part, ("regression_labels", "labels"), "labels", path).astype(np.float32).reshape(len(arrays["text"]), -1)[:, 0]
            if not np.all(np.isfinite(scores)):
                raise DataError(f"{path}: {split} holds a NaN or infinite sentiment score")
            ids = part.get("id")
            ids = [f"{split}-{i:05d}" for i in range(len(scores))] if ids is None else [
                "_".join(str(v) for v in np.asarray(x).reshape(-1)) for x in ids]
            for m, arr in arrays.items():
                if arr.ndim != 3 or len(arr) != len(scores):
                    raise DataError(f"{path}: {split} {m} has shape {arr.shape}, expected (N={len(scores)}, L, D)")
                arrays[m] = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)  # the released features hold a few inf/nan
            for i, name in enumerate(label_names(scores, values["labels"])):
                if name is None:
                    continue
                sources: dict[str, Any] = {m: arrays[m][i] for m in MODALITIES}
                if values["labels"] == "regression":
                    sources["target"] = float(scores[i])
                clips.append(Clip(f"{split}/{ids[i]}", split, name, ids[i].split("[")[0].rsplit("_", 1)[0], sources))
        shapes = {m: clips[0].sources[m].shape if clips else (0, 0) for m in MODALITIES}
        task = "regression" if values["labels"] == "regression" else "classification"
        return ScanResult(clips, CLASSES[values["labels"]], notes=[f"feature shapes {shapes}"], task=task)

    def modalities(self, values: Mapping[str, Any]) -> dict[str, ModalitySpec]:
        raise NotImplementedError  # shapes come from the file: see modalities_from_scan

    def modalities_from_scan(self, scan: ScanResult, values: Mapping[str, Any]) -> dict[str, ModalitySpec]:
        if not scan.clips:
            raise DataError("mosi: no utterance to prepare")
        return {m: ModalitySpec("sequence", values["spec_dtype"], tuple(scan.clips[0].sources[m].shape)) for m in MODALITIES}

    def decode(self, clip: Clip, values: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {m: np.asarray(clip.sources[m], dtype=values["spec_dtype"]) for m in MODALITIES}
        if "target" in clip.sources:  # labels=regression: the row's float target
            out["target"] = clip.sources["target"]
        return out

    def trusted(self) -> "Mosi":
        out = copy.copy(self)
        out.trust_pickle = True
        return out


SPEC = real_dataset_spec(
    Mosi(),
    "CMU-MOSI: sentiment of 2,199 utterances from text, audio and vision feature sequences (prepare with --trust-pickle)",
    frames=1,
    group_help="carve a video-disjoint validation split (used only when a preparation lacks one)",
)
