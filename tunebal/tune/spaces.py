"""Search spaces: ``search_spaces/<method>.yaml`` -> Ray Tune distributions.

A space file names only declared knobs: the common ones (tunebal/config.py), the method's
own (``KNOBS`` beside its code) and dataset knobs as ``data.<knob>``. Each entry is either a
fixed value or a distribution::

    method: opm
    space:
      lr:        {loguniform: [1.0e-3, 0.1]}
      batch_size: {choice: [32, 64, 128]}
      q_base:    {uniform: [0.1, 0.9]}
      start:     {randint: [0, 0.5*epochs]}   # bounds may scale with --max-epochs
      fusion:    concat                       # fixed

Distributions: ``uniform``, ``loguniform`` (float knobs), ``randint``, ``lograndint``
(int knobs, both bounds inclusive), ``choice`` (any knob). Ray's OptunaSearch converts the
Tune distributions into Optuna's (FloatDistribution, IntDistribution, CategoricalDistribution).
Every value is checked against the knob's declared type and range when the space loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from tunebal.config import COMMON_KNOBS
from tunebal.data import get_dataset_spec
from tunebal.errors import ConfigError
from tunebal.knobs import Knob, KnobSet
from tunebal.methods import get_method_class

def spaces_dir() -> Path:
    """The shipped search spaces: package data ``tunebal/search_spaces/*.yaml`` read with
    importlib.resources (in a checkout, a symlink to the top-level ``search_spaces/``)."""
    from importlib.resources import files

    return Path(str(files("tunebal") / "search_spaces"))


DISTRIBUTIONS = ("uniform", "loguniform", "randint", "lograndint", "choice")
_EPOCH_EXPR = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*\*\s*epochs\s*$")


def space_path(method: str) -> Path:
    """The shipped space of a method (see :func:`spaces_dir`)."""
    return spaces_dir() / f"{method}.yaml"


def _bound(value: Any, max_epochs: int, where: str) -> Any:
    if isinstance(value, str):
        match = _EPOCH_EXPR.match(value)
        if not match:
            raise ConfigError(f"{where}: bound {value!r} is neither a number nor '<factor>*epochs'")
        return float(match.group(1)) * max_epochs
    return value


def knob_lookup(method: str, dataset: str) -> dict[str, Knob]:
    """All knobs a space for (method, dataset) may name."""
    table = {k.name: k for k in COMMON_KNOBS}
    table.update({k.name: k for k in get_method_class(method).KNOBS})
    table.update({f"data.{k.name}": k for k in get_dataset_spec(dataset).knobs})
    return table


def _distribution(knob: Knob, spec: Mapping[str, Any], max_epochs: int, where: str):
    from ray import tune

    if len(spec) != 1:
        raise ConfigError(f"{where}: give exactly one distribution of {', '.join(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution '{kind}'; valid: {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: 'choice' needs a non-empty list")
        return tune.choice([knob.coerce(v, where=f"{where}: ") for v in args])
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: '{kind}' needs [low, high]")
    low, high = (_bound(v, max_epochs, where) for v in args)
    if kind in ("randint", "lograndint"):
        if knob.type != "int":
            raise ConfigError(f"{where}: '{kind}' is for int knobs; '{knob.name}' is {knob.type}")
        low, high = int(low), int(high)
    elif knob.type != "float":
        raise ConfigError(f"{where}: '{kind}' is for float knobs; '{knob.name}' is {knob.type} (use choice)")
    low, high = knob.coerce(low, where=f"{where}: "), knob.coerce(high, where=f"{where}: ")
    if not low < high:
        raise ConfigError(f"{where}: empty or inverted range [{low}, {high}]")
    if kind.startswith("log") and low <= 0:
        raise ConfigError(f"{where}: '{kind}' needs low > 0, got {low}")
    if kind == "uniform":
        return tune.uniform(low, high)
    if kind == "loguniform":
        return tune.loguniform(low, high)
    if kind == "randint":
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive
    return tune.lograndint(low, high + 1)


def parse_space(raw: Mapping[str, Any], method: str, dataset: str, max_epochs: int, source: str) -> dict[str, Any]:
    """Validate a parsed YAML space and turn it into a Tune ``param_space``."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("space", {}), Mapping):
        raise ConfigError(f"{source}: expected a mapping with a 'space' mapping")
    if raw.get("method", method) != method:
        raise ConfigError(f"{source}: space is for method '{raw.get('method')}', not '{method}'")
    unknown_top = set(raw) - {"method", "space", "description"}
    if unknown_top:
        raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown_top)}; valid: method, space, description")
    table = knob_lookup(method, dataset)
    out: dict[str, Any] = {}
    for name, spec in (raw.get("space") or {}).items():
        where = f"{source}: {name}"
        if name not in table:
            raise ConfigError(f"{source}: unknown knob '{name}' for method '{method}'; valid: {', '.join(sorted(table))}")
        if isinstance(spec, Mapping):
            out[name] = _distribution(table[name], spec, max_epochs, where)
        else:
            out[name] = table[name].coerce(spec, where=f"{source}: ")
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""


class _DuplicateKey(yaml.YAMLError):
    pass


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKey(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_space(method: str, dataset: str, max_epochs: int, path: str | Path | None = None) -> dict[str, Any]:
    """Read and validate the YAML space of ``method`` (or the file at ``path``).

    The file must be UTF-8 YAML without duplicate keys and must name at least one knob.
    """
    file = Path(path) if path else space_path(method)
    if not file.is_file():
        raise ConfigError(f"no search space file {file}")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read ({exc.strerror or exc})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except _DuplicateKey as exc:
        raise ConfigError(f"{file}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML ({' '.join(str(exc).split())[:200]})") from None
    if raw is None or (isinstance(raw, Mapping) and not raw.get("space")):
        raise ConfigError(f"{file}: the space is empty; name at least one knob under 'space:'")
    return parse_space(raw, method, dataset, max_epochs, str(file))


def apply_overrides(space: dict[str, Any], overrides: Mapping[str, Any], method: str, dataset: str) -> dict[str, Any]:
    """Fix knobs given with ``--set`` on top of a space (checked like the space)."""
    table = knob_lookup(method, dataset)
    out = dict(space)
    for name, value in overrides.items():
        if name not in table:
            raise ConfigError(f"unknown knob '{name}' for method '{method}'; valid: {', '.join(sorted(table))}")
        out[name] = table[name].coerce(value, where="--set ")
    return out


def searched_knobs(space: Mapping[str, Any]) -> list[str]:
    from ray.tune.search.sample import Domain

    return [k for k, v in space.items() if isinstance(v, Domain)]


__all__ = ["KnobSet", "apply_overrides", "load_space", "parse_space", "searched_knobs", "space_path"]
