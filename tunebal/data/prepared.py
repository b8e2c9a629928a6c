"""Datasets read from prepared shards: the knobs they share, the validation split, the sample decoder.

Every raw-file dataset (CREMA-D, Kinetics-Sounds, bring-your-own manifest, ...) registers a
:class:`~tunebal.data.base.DatasetSpec` built by :func:`real_dataset_spec`, so they share:

- ``root``: a prepared directory (holding ``manifest.json``), or the raw dataset root. A raw
  root is prepared once (before Ray starts, when searching) into ``prepared`` or, by default,
  ``$TUNEBAL_CACHE/prepared/<dataset>-<hash>``; later runs reuse it.
- the preparer's knobs (audio ``profile``, stored ``frame_size``, ``fps``, ``max_frames``):
  they define the prepared bytes. Loading a preparation made with other values is refused
  with the knob named, never silently mixed.
- load-time knobs: ``frames`` per clip fed to the model, ``image_size``, the validation split
  (``val_fraction``, ``val_seed``, ``val_by_group``) and the augmentation ``seed``.

**Validation split.** Datasets that ship only train and test (CREMA-D, Kinetics-Sounds) get a
seeded validation split carved from train: stratified by class
(``sklearn.model_selection.train_test_split``), or group-disjoint
(``GroupShuffleSplit`` over speakers / videos) with ``val_by_group``. Test is never touched.

**Per-sample decoding** (:class:`ClipDecoder`, in loader workers): ``frames`` frames are chosen
from the stored ones, one per equal segment (seeded random in training, the segment centre in
evaluation), then cropped/flipped (training) or resized (evaluation) with torchvision's v2
transforms; all seeded by (seed, epoch, row), so batches do not depend on the worker count.
Frames stay uint8 and spectrograms float16 until the training device
(:func:`tunebal.data.transforms.normalize_on_device`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from tunebal.data.base import DatasetSpec, MultimodalData
from tunebal.data.prepare import MANIFEST, Preparer, read_manifest, run_prepare
from tunebal.data.shards import ModalitySpec, ShardSet, ShardSource
from tunebal.errors import ConfigError, DataError
from tunebal.knobs import Knob, KnobSet, knobs


def load_knobs(frames: int, group_help: str) -> KnobSet:
    """The knobs every prepared dataset has (the preparer's knobs are added by the spec)."""
    return knobs(
        Knob("root", "str", "", "prepared directory, or the raw dataset root (prepared once, then reused)"),
        Knob("prepared", "str", "", "where a raw root is prepared ('' = $TUNEBAL_CACHE/prepared/<dataset>-<hash>)"),
        Knob("frames", "int", frames, "frames per clip fed to the model (one per equal segment of the stored frames)", low=1, high=64),
        Knob("image_size", "int", 224, "model input frame size (train: RandomResizedCrop, eval: Resize)", low=8, high=1024),
        Knob("val_fraction", "float", 0.1, "fraction of train carved out as validation (datasets without one)", low=0.01, high=0.5),
        Knob("val_seed", "int", 0, "seed of the validation split", low=0),
        Knob("val_by_group", "bool", False, group_help),
        Knob("seed", "int", 0, "seed of the frame choice and augmentation (with the epoch and the sample)", low=0),
        Knob("prepare_workers", "int", 0, "processes for an automatic preparation (0 = all CPUs)", low=0, high=512),
    )


def carve_validation(
    labels: np.ndarray, groups: list[str], fraction: float, seed: int, by_group: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train rows, validation rows) of a train split: stratified, or group-disjoint.

    Stratified whenever sklearn can (every class with >= 2 samples and a validation split with
    room for every class); otherwise, on tiny datasets, a plain seeded random split.
    """
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    rows = np.arange(len(labels))
    try:
        if by_group:
            splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            train, val = next(splitter.split(rows, labels, groups=np.asarray(groups)))
        else:
            try:
                train, val = train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed)
            except ValueError:
                train, val = train_test_split(rows, test_size=fraction, random_state=seed)
    except ValueError as exc:
        raise ConfigError(f"cannot carve a validation split ({' '.join(str(exc).split())})") from None
    return np.sort(train), np.sort(val)


class ClipDecoder:
    """Stored row -> per-sample tensors: frame choice and augmentation seeded by (seed, epoch, row)."""

    def __init__(self, modalities: Mapping[str, ModalitySpec], frames: int, image_size: int, seed: int) -> None:
        self.modalities = dict(modalities)
        self.frames = frames
        self.image_size = image_size
        self.seed = seed
        self._transforms: dict[tuple[bool, bool], Any] = {}

    def _transform(self, train: bool, flow: bool = False):
        if (train, flow) not in self._transforms:
            from tunebal.data.transforms import flow_transform, frame_transform

            self._transforms[train, flow] = (flow_transform if flow else frame_transform)(train, self.image_size)
        return self._transforms[train, flow]

    def __call__(self, row: Mapping[str, np.ndarray], index: int, epoch: int, train: bool) -> dict[str, torch.Tensor]:
        from tunebal.data.video import segment_indices

        out: dict[str, torch.Tensor] = {}
        for m, spec in self.modalities.items():
            x = row[m]
            if spec.kind != "frames":
                out[m] = torch.from_numpy(np.array(x))
                continue
            rng = np.random.default_rng([self.seed, epoch, index]) if train else None
            chosen = segment_indices(int(x.shape[0]), self.frames, train, rng)
            clip = torch.from_numpy(np.ascontiguousarray(x[chosen])).permute(0, 3, 1, 2)  # (T, C, S, S) uint8
            flow = spec.shape[-1] == 2  # stacked (u, v) optical flow
            if train:  # seed torch's CPU generator per sample, and restore it afterwards
                generator = torch.default_generator
                saved = generator.get_state()
                generator.manual_seed(_sample_seed(self.seed, epoch, index))
                try:
                    clip = self._transform(True, flow)(clip)
                finally:
                    generator.set_state(saved)
            else:
                clip = self._transform(False, flow)(clip)
            out[m] = clip.contiguous()
        return out


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def default_prepared_dir(preparer: Preparer, root: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """Where a raw ``root`` is prepared unless told otherwise: ``$TUNEBAL_CACHE/prepared/<dataset>-<hash>``,
    the hash covering the root's absolute path and the preparation knobs."""
    from tunebal.data.synth import cache_dir

    resolved = preparer.knobs.resolve({k: v for k, v in values.items() if k in preparer.knobs.names()})
    key = hashlib.sha256(repr((str(Path(root).expanduser().resolve()), sorted(resolved.items()))).encode()).hexdigest()[:16]
    return cache_dir() / "prepared" / f"{preparer.name}-{key}"


def as_prepared_knobs(preparer: Preparer) -> KnobSet:
    """The preparer's knobs as load-time knobs: strings whose default '' means "as prepared"
    (for a prepared root) or the preparation default (for a raw root). A value that is set is
    checked against the preparer's own declaration when it is used."""
    return knobs(*(
        Knob(k.name, "str", "", f"{k.help} [preparation; default {k.default!r}; '' = as prepared]")
        for k in preparer.knobs
    ))


def requested_preparation(preparer: Preparer, values: Mapping[str, Any]) -> dict[str, Any]:
    """The preparation knobs the user set (typed by the preparer's declarations)."""
    return {
        k.name: k.coerce(values[k.name], where=f"dataset {preparer.name}: ")
        for k in preparer.knobs
        if values.get(k.name, "") != ""
    }


def resolve_prepared(preparer: Preparer, values: Mapping[str, Any]) -> Path:
    """The prepared directory for ``values``: ``root`` itself, or a preparation of the raw ``root`` (made now if needed)."""
    if not values["root"]:
        raise ConfigError(f"dataset {preparer.name} needs --data root=DIR (a prepared directory or the raw dataset root)")
    root = Path(values["root"]).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset {preparer.name}: root {root} is not a directory")
    if (root / MANIFEST).is_file():
        return root
    prep_values = preparer.knobs.resolve(requested_preparation(preparer, values))
    out = Path(values["prepared"]).expanduser() if values["prepared"] else default_prepared_dir(preparer, root, prep_values)
    if not (out / MANIFEST).is_file():
        workers = values["prepare_workers"] or os.cpu_count() or 1
        report = run_prepare(preparer, root, out, prep_values, workers=workers, progress=True)
        print(f"tunebal: {report.line()}")
    return out


def load_prepared(preparer: Preparer, values: Mapping[str, Any]) -> MultimodalData:
    """Build the dataset from its prepared shards (preparing a raw root first when needed)."""
    directory = resolve_prepared(preparer, values)
    manifest = read_manifest(directory)
    params = manifest["params"]
    if params.get("dataset") != preparer.name:
        raise DataError(f"{directory} holds a prepared '{params.get('dataset')}', not '{preparer.name}'")
    for name, want in requested_preparation(preparer, values).items():
        have = params["knobs"].get(name)
        if have != want:
            raise ConfigError(
                f"{directory} was prepared with {name}={have!r}, not {want!r}; "
                f"drop --data {name} or prepare again into another directory"
            )
    modalities = {m: ModalitySpec.from_json(d) for m, d in params["modalities"].items()}
    sets = {s: ShardSet(directory, info["shards"], modalities, manifest["params_hash"]) for s, info in manifest["splits"].items()}
    task = params.get("task", "classification")  # preparations before regression have no "task": classification
    if task not in ("classification", "regression"):
        raise DataError(f"{directory} was prepared for task '{task}', which this tunebal cannot train; upgrade tunebal or prepare again")
    if any((s.targets is not None) != (task == "regression") for s in sets.values()):
        raise DataError(f"{directory}: the shards' regression targets do not match the manifest's task '{task}'; prepare again")
    decoder = ClipDecoder(modalities, values["frames"], values["image_size"], values["seed"])
    if "memberships" in manifest:  # one prepared pool, official splits as id lists (UCF-101)
        sets = _official_split(manifest, sets, values)
    def source(pool, rows) -> ShardSource:
        rows = np.asarray(rows, dtype=np.int64)
        return ShardSource(pool.base, pool.rows[rows], decoder) if isinstance(pool, _RowView) else ShardSource(pool, rows, decoder)

    train_set = sets["train"]
    if "val" in sets:
        train = source(train_set, np.arange(len(train_set)))
        val = source(sets["val"], np.arange(len(sets["val"])))
    else:
        train_rows, val_rows = carve_validation(
            train_set.labels, train_set.groups, values["val_fraction"], values["val_seed"], values["val_by_group"]
        )
        train = source(train_set, train_rows)
        val = source(train_set, val_rows)
    test = source(sets["test"], np.arange(len(sets["test"])))
    shapes, transforms = {}, {}
    from tunebal.data.transforms import normalize_flow_on_device, normalize_on_device

    for m, spec in modalities.items():
        if spec.kind == "frames":
            channels = spec.shape[-1]
            shapes[m] = (values["frames"], channels, values["image_size"], values["image_size"])
            transforms[m] = normalize_flow_on_device if channels == 2 else normalize_on_device
        else:
            shapes[m] = spec.shape
            transforms[m] = _float
    return MultimodalData(
        name=preparer.name,
        modalities=tuple(modalities),
        kinds={m: s.kind for m, s in modalities.items()},
        num_classes=len(params["class_names"]),
        class_names=list(params["class_names"]),
        train=train,
        val=val,
        test=test,
        info={"knobs": dict(values), "prepared": str(directory), "params_hash": manifest["params_hash"], "task": task},
        input_shapes=shapes,
        input_transforms=transforms,
    )


class _RowView:
    """A ShardSet restricted to some of its rows (an official split of a prepared pool)."""

    def __init__(self, shards: ShardSet, rows: np.ndarray) -> None:
        self.base, self.rows = shards, rows
        self.labels = shards.labels[rows]
        self.ids = [shards.ids[int(r)] for r in rows]
        self.groups = [shards.groups[int(r)] for r in rows]

    def __len__(self) -> int:
        return len(self.rows)


def _official_split(manifest: Mapping[str, Any], sets: dict[str, ShardSet], values: Mapping[str, Any]) -> dict[str, Any]:
    key = str(values.get("official_split", 1))
    members = manifest["memberships"].get(key)
    if members is None:
        raise ConfigError(f"official split {key} is not in this preparation; have {', '.join(sorted(manifest['memberships']))}")
    pool = sets["all"]
    where = {clip: i for i, clip in enumerate(pool.ids)}
    return {split: _RowView(pool, np.array(sorted(where[c] for c in ids if c in where), dtype=np.int64))
            for split, ids in members.items()}


def real_dataset_spec(
    preparer: Preparer, description: str, frames: int, group_help: str, extra: KnobSet | None = None
) -> DatasetSpec:
    """The registered spec of a raw-file dataset: shared load knobs (+ ``extra``) + the preparer's knobs."""
    all_knobs = load_knobs(frames, group_help) + (extra or KnobSet()) + as_prepared_knobs(preparer)

    def build(**values: Any) -> MultimodalData:
        return load_prepared(preparer, all_knobs.resolve(values, where=f"dataset {preparer.name}: "))

    return DatasetSpec(name=preparer.name, description=description, knobs=all_knobs, build=build, preparer=preparer)


__all__ = ["ClipDecoder", "carve_validation", "load_prepared", "real_dataset_spec", "resolve_prepared"]
