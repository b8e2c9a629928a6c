"""Dataset registry: every dataset registers a ``DatasetSpec`` (name, knobs, builder).

``build_dataset(name, values)`` checks ``values`` against the dataset's declared knobs
(unknown names and ill-typed or out-of-range values are ``ConfigError``) and builds a
``MultimodalData``. Real datasets plug in by calling ``register_dataset`` with their spec.
"""

from __future__ import annotations

from typing import Any, Mapping

from tunebal.data.base import KINDS, SPLITS, DatasetSpec, MultimodalData, Split
from tunebal.errors import ConfigError

DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to the registry; registering another spec under a taken name needs ``replace``."""
    current = DATASETS.get(spec.name)
    if current is not None and current is not spec and not replace:
        raise ValueError(f"dataset '{spec.name}' is already registered")
    DATASETS[spec.name] = spec
    return spec


def get_dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown dataset '{name}'; valid datasets: {', '.join(sorted(DATASETS))}") from None


def build_dataset(name: str, values: Mapping[str, Any] | None = None) -> MultimodalData:
    """Resolve ``values`` against the dataset's knobs (defaults for the rest) and build it."""
    spec = get_dataset_spec(name)
    resolved = spec.knobs.resolve(dict(values or {}), where=f"dataset {name}: ")
    return spec.build(**resolved)


def _register_builtin() -> None:
    from tunebal.data import ave, cremad, kinetics_sounds, manifest_csv, mosi, synth, ucf101, vggsound

    for module in (synth, cremad, kinetics_sounds, ave, ucf101, vggsound, mosi, manifest_csv):
        register_dataset(module.SPEC)


_register_builtin()

__all__ = [
    "DATASETS",
    "KINDS",
    "SPLITS",
    "DatasetSpec",
    "MultimodalData",
    "Split",
    "build_dataset",
    "get_dataset_spec",
    "register_dataset",
]
