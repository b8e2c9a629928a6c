"""What every dataset is built into: info plus one *source* per split, and the spec a dataset registers.

A dataset (``MultimodalData``) is **info** (modalities, their kinds and input shapes, classes)
plus one **source** per split (train/val/test). A source is anything with the small protocol
of :class:`Source`: a length, the labels, and ``batch(indices, epoch=, train=)`` returning CPU
tensors in the source's storage dtype. Two sources exist:

- :class:`Split`: tensors in memory (``synth``), gathered with ``index_select``;
- :class:`tunebal.data.shards.ShardSource`: prepared Arrow shards read through memory maps, so
  concurrent trials on one node share the page cache; decoded and augmented per sample inside
  data-loader workers (``streaming = True``).

Conversion to the model's float input happens on the training device
(:meth:`MultimodalData.to_model_input`): uint8 frames are normalised there, float16
spectrograms widened there, so the loader moves as few bytes as possible.

Input kinds (``MultimodalData.kinds``):

- ``"spectrogram"``: one log-magnitude STFT per sample, input shape ``(1, F, T)``;
- ``"frames"``: a clip of ``T`` images, input shape ``(T, C, H, W)``;
- ``"vector"``: a feature vector, input shape ``(D,)``;
- ``"sequence"``: a sequence of feature vectors (e.g. CMU-MOSI's text, audio and visual
  features), input shape ``(L, D)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from tunebal.errors import ConfigError, DataError
from tunebal.knobs import KnobSet

KINDS = ("spectrogram", "frames", "vector", "sequence")
_RANKS = {"spectrogram": 3, "frames": 4, "vector": 1, "sequence": 2}
SPLITS = ("train", "val", "test")

Indices = Sequence[int] | torch.Tensor
InputTransform = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class Source(Protocol):
    """One split of a dataset, as the engine sees it.

    ``batch`` must be a pure function of ``(indices, epoch, train)`` (augmentation seeded by the
    dataset seed, the epoch and each sample's index), so a resumed run sees the same batches
    whatever the number of loader workers.
    """

    streaming: bool

    @property
    def labels(self) -> torch.Tensor: ...

    def __len__(self) -> int: ...

    def batch(self, indices: Indices, *, epoch: int, train: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...


@dataclass
class Split:
    """An in-memory source: ``inputs[modality]`` is ``(N, *input_shape)`` float32; ``labels`` is ``(N,)`` int64."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    streaming: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"labels must be a 1-D int64 tensor, got {self.labels.dtype} {tuple(self.labels.shape)}")
        n = self.labels.shape[0]
        for name, x in self.inputs.items():
            if x.dtype != torch.float32:
                raise DataError(f"modality '{name}' must be float32, got {x.dtype}")
            if x.shape[0] != n:
                raise DataError(f"modality '{name}' has {x.shape[0]} samples but there are {n} labels")
            if not x.is_contiguous():
                self.inputs[name] = x.contiguous()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: Indices, *, epoch: int = 0, train: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gather ``indices`` (no augmentation: synth samples are drawn fresh per index already)."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.labels.device)
        return {m: x.index_select(0, idx) for m, x in self.inputs.items()}, self.labels.index_select(0, idx)

    def slice(self, start: int, stop: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Contiguous samples ``[start, stop)`` as views (evaluation's fast path)."""
        return {m: x[start:stop] for m, x in self.inputs.items()}, self.labels[start:stop]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


@dataclass
class MultimodalData:
    """A dataset with train/val/test sources. Validation is for model selection; test is scored once.

    ``input_shapes`` (per modality, without the batch dimension) is derived from in-memory
    splits; streaming sources must give it. ``input_transforms`` maps a modality to the
    function that turns a stored batch (on the training device) into the model's float input;
    modalities without one are cast to float32.
    """

    name: str
    modalities: tuple[str, ...]
    kinds: dict[str, str]
    num_classes: int
    class_names: list[str]
    train: Source
    val: Source
    test: Source
    info: dict[str, Any] = field(default_factory=dict)  # free-form provenance (knob values, sample rate, ...)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_transforms: dict[str, InputTransform] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if set(self.kinds) != set(self.modalities):
            raise DataError(f"dataset {self.name}: kinds {sorted(self.kinds)} do not match modalities {list(self.modalities)}")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"dataset {self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        for m in self.modalities:
            kind = self.kinds[m]
            if kind not in KINDS:
                raise DataError(f"dataset {self.name}: modality '{m}' has unknown kind '{kind}' (valid: {', '.join(KINDS)})")
        if not self.input_shapes:
            if not isinstance(self.train, Split):
                raise DataError(f"dataset {self.name}: a streaming dataset must declare its input shapes")
            self.input_shapes = {m: tuple(self.train.inputs[m].shape[1:]) for m in self.modalities if m in self.train.inputs}
        self.input_shapes = {m: tuple(int(v) for v in s) for m, s in self.input_shapes.items()}
        for m in self.modalities:
            shape = self.input_shapes.get(m)
            if shape is None or len(shape) != _RANKS[self.kinds[m]]:
                raise DataError(f"dataset {self.name}: modality '{m}' ({self.kinds[m]}) has input shape {shape}")
        for split_name in SPLITS:
            split = getattr(self, split_name)
            if isinstance(split, Split):
                self._check_in_memory(split_name, split)
            labels = split.labels
            if self.task == "regression":
                if not labels.dtype.is_floating_point or self.num_classes != 1:
                    raise DataError(f"dataset {self.name}: a regression target needs float labels and one output, "
                                    f"got {labels.dtype} and {self.num_classes}")
            elif len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise DataError(f"dataset {self.name}: {split_name} labels outside [0, {self.num_classes})")

    def _check_in_memory(self, split_name: str, split: Split) -> None:
        if set(split.inputs) != set(self.modalities):
            raise DataError(
                f"dataset {self.name}: {split_name} split has modalities {sorted(split.inputs)}, expected {list(self.modalities)}"
            )
        for m in self.modalities:
            if tuple(split.inputs[m].shape[1:]) != self.input_shapes[m]:
                raise DataError(f"dataset {self.name}: modality '{m}' input shape differs between train and {split_name}")

    @property
    def task(self) -> str:
        """``"classification"`` (int64 class labels) or ``"regression"`` (float32 targets, one model
        output; ``info["task"]``, e.g. CMU-MOSI's sentiment score)."""
        return str(self.info.get("task", "classification"))

    @property
    def streaming(self) -> bool:
        """True when any split is read from prepared shards (batches go through loader workers)."""
        return any(getattr(getattr(self, s), "streaming", False) for s in SPLITS)

    def split(self, name: str) -> Source:
        if name not in SPLITS:
            raise ConfigError(f"unknown split '{name}'; valid splits: {', '.join(SPLITS)}")
        return getattr(self, name)

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """Shape of one sample of ``modality`` as the model sees it (without the batch dimension)."""
        if modality not in self.kinds:
            raise ConfigError(f"dataset {self.name} has no modality '{modality}'; valid: {', '.join(self.modalities)}")
        return self.input_shapes[modality]

    def to_model_input(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """A stored batch of ``modality`` (already on the training device) as the model's float input."""
        return self.input_transforms.get(modality, _identity)(x)

    def class_means(self, split: str = "train", chunk: int = 256) -> dict[str, torch.Tensor]:
        """Per modality, the mean model input of each class: ``(K, *input_shape)`` float32.

        Used for AIM's prototype reconstruction target X̄^{m,k} (AIM, Eq. 4). Streaming sources
        are read in evaluation mode (no augmentation) through the same input transform as
        training. A class with no sample in the split gets a zero mean.
        """
        source = self.split(split)
        k = self.num_classes
        counts = torch.bincount(source.labels, minlength=k).to(torch.float64)
        sums = {m: torch.zeros(k, int(np.prod(self.input_shapes[m])), dtype=torch.float64) for m in self.modalities}
        for start in range(0, len(source), chunk):
            stop = min(start + chunk, len(source))
            inputs, labels = source.batch(list(range(start, stop)), epoch=0, train=False)
            for m in self.modalities:
                x = self.to_model_input(m, inputs[m])
                sums[m].index_add_(0, labels, x.reshape(x.shape[0], -1).to(torch.float64))
        denom = counts.clamp(min=1.0).unsqueeze(1)
        return {m: (sums[m] / denom).to(torch.float32).reshape(k, *self.input_shapes[m]).contiguous() for m in self.modalities}

    def summary(self) -> str:
        """One line: name, sizes, modalities with kinds and shapes."""
        mods = ", ".join(f"{m}:{self.kinds[m]}{list(self.input_shape(m))}" for m in self.modalities)
        return (
            f"{self.name}: {'regression' if self.task == 'regression' else f'{self.num_classes} classes'}, train/val/test {len(self.train)}/{len(self.val)}/{len(self.test)}, {mods}"
        )


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its knobs and a builder ``build(**resolved_knob_values)``.

    ``preparer`` is set for datasets read from raw files: ``tunebal prepare NAME`` runs it
    (tunebal/data/prepare.py).
    """

    name: str
    description: str
    knobs: KnobSet
    build: Callable[..., MultimodalData]
    preparer: Any = None
