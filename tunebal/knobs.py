"""Declared hyperparameters ("knobs"): name, type, default and search range.

Every method and dataset declares its knobs beside its code as a tuple of `Knob`. The
CLI's ``--set`` values and the YAML search spaces are validated against these
declarations, so a typo or an out-of-range value is a clear error, not a silent default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from tunebal.errors import ConfigError

_TYPES = {"float": float, "int": int, "bool": bool, "str": str}


@dataclass(frozen=True)
class Knob:
    """One hyperparameter.

    ``low``/``high`` bound the values a search may use (inclusive); ``choices`` lists the
    allowed values of a categorical knob; ``log`` marks a knob searched on a log scale.
    """

    name: str
    type: str
    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    log: bool = False

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"knob {self.name}: unknown type {self.type!r}")

    def coerce(self, value: Any, *, where: str = "") -> Any:
        """Check ``value`` against this knob's type, range and choices; return it typed."""
        prefix = f"{where}knob '{self.name}'"
        if self.type == "bool":
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
                out = value.lower() in {"true", "1", "yes", "on"}
            else:
                raise ConfigError(f"{prefix} expects a bool (true/false), got {value!r}")
        elif self.type == "int":
            if isinstance(value, bool):
                raise ConfigError(f"{prefix} expects an int, got {value!r}")
            try:
                out = int(value) if isinstance(value, str) else value
            except ValueError:
                raise ConfigError(f"{prefix} expects an int, got {value!r}") from None
            if isinstance(out, float) and out.is_integer():
                out = int(out)
            if not isinstance(out, int):
                raise ConfigError(f"{prefix} expects an int, got {value!r}")
        elif self.type == "float":
            if isinstance(value, bool):
                raise ConfigError(f"{prefix} expects a number, got {value!r}")
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{prefix} expects a number, got {value!r}") from None
            if not math.isfinite(out):
                raise ConfigError(f"{prefix} must be finite, got {value!r}")
        else:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and self.choices is None:
                value = str(value)  # a free-form string knob given a number (e.g. a preparation knob)
            if not isinstance(value, str):
                raise ConfigError(f"{prefix} expects a string, got {value!r}")
            out = value
        if self.choices is not None and out not in self.choices:
            raise ConfigError(f"{prefix} must be one of {list(self.choices)}, got {value!r}")
        if self.low is not None and out < self.low:
            raise ConfigError(f"{prefix} must be >= {self.low}, got {value!r}")
        if self.high is not None and out > self.high:
            raise ConfigError(f"{prefix} must be <= {self.high}, got {value!r}")
        return out

    def describe(self) -> str:
        """One line for `tunebal methods`: type, default and range or choices."""
        if self.choices is not None:
            rng = "{" + ", ".join(map(str, self.choices)) + "}"
        elif self.low is not None or self.high is not None:
            rng = f"[{'' if self.low is None else self.low}, {'' if self.high is None else self.high}]"
            rng += " log" if self.log else ""
        else:
            rng = ""
        return f"{self.name:<18} {self.type:<5} default={self.default!r:<10} {rng:<22} {self.help}"


@dataclass(frozen=True)
class KnobSet:
    """An ordered collection of knobs with lookup and validation of whole configs."""

    knobs: tuple[Knob, ...] = field(default_factory=tuple)

    def __iter__(self):
        return iter(self.knobs)

    def names(self) -> list[str]:
        return [k.name for k in self.knobs]

    def get(self, name: str) -> Knob:
        for knob in self.knobs:
            if knob.name == name:
                return knob
        raise ConfigError(f"unknown knob '{name}'; valid knobs: {', '.join(self.names()) or '(none)'}")

    def defaults(self) -> dict[str, Any]:
        return {k.name: k.default for k in self.knobs}

    def resolve(self, values: Mapping[str, Any], *, where: str = "") -> dict[str, Any]:
        """Defaults overridden by ``values``; every value checked. Unknown names are errors."""
        out = self.defaults()
        for name, value in values.items():
            out[name] = self.get(name).coerce(value, where=where)
        return out

    def __add__(self, other: "KnobSet | Iterable[Knob]") -> "KnobSet":
        extra = tuple(other.knobs if isinstance(other, KnobSet) else other)
        clash = set(self.names()) & {k.name for k in extra}
        if clash:
            raise ValueError(f"duplicate knobs: {sorted(clash)}")
        return KnobSet(self.knobs + extra)


def knobs(*items: Knob) -> KnobSet:
    return KnobSet(tuple(items))


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """Parse ``["lr=0.1", "alpha=0.5"]`` from ``--set`` into a dict (values stay strings)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects knob=value, got {item!r}")
        name, value = item.split("=", 1)
        out[name.strip()] = value.strip()
    return out
