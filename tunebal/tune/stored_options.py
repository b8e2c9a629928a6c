"""The search options an experiment was started with, stored beside it, so ``--resume`` continues
the same search: same data, budget, scheduler and searcher, and the same test split for the
final evaluation.

``search_options.json`` is written atomically when a fresh search has passed every check, before
Ray starts; once the experiment has started (Tune wrote its state) it is never replaced. On ``--resume`` the stored values fill every
option the user did not give, and a given option that differs from the stored one is refused
with one line (continuing under other options would mix two searches in one experiment).
Where the experiment lives (--storage, --name), how to reach the cluster (--address) and the
console verbosity are not part of the search and may change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from tunebal.errors import ConfigError

OPTIONS_FILE = "search_options.json"
STORED = (
    "method", "dataset", "num_samples", "max_epochs", "scheduler", "search", "cpus_per_trial", "gpus_per_trial",
    "max_concurrent", "seed", "grace_period", "reduction_factor", "max_failures", "space_file", "overrides",
    "data_values",
)
_FLAGS = {name: "--" + name.replace("_", "-") for name in STORED}
_FLAGS.update(method="METHOD", space_file="--space", overrides="--set", data_values="--data")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def write(opts, experiment_dir: Path) -> None:
    """Store the options of a fresh search (never replacing a stored file)."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    path = experiment_dir / OPTIONS_FILE
    if (experiment_dir / "tuner.pkl").exists():  # a started experiment keeps its options
        raise ConfigError(f"experiment {experiment_dir} already started; continue it with --resume")
    record = {"version": 1, "options": {name: _jsonable(getattr(opts, name)) for name in STORED}}
    tmp = path.with_name(f".{OPTIONS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read(experiment_dir: Path) -> dict[str, Any] | None:
    """The stored options; None for an experiment started before options were stored."""
    path = experiment_dir / OPTIONS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        options = record["options"]
        if not isinstance(options, dict) or set(options) != set(STORED):
            raise ValueError("unexpected keys")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc})") from None
    return options


def apply_on_resume(opts, experiment_dir: Path, given: Iterable[str] | None) -> list[str]:
    """Fill ``opts`` from the stored options. ``given``: the option names the user set
    explicitly (None: treat values that differ from the defaults as given). Returns the names
    taken from the store. A given option that differs from the stored one is a ConfigError."""
    from dataclasses import MISSING, fields

    stored = read(experiment_dir)
    if stored is None:
        import sys

        print(f"tunebal: warning: {experiment_dir} has no {OPTIONS_FILE} (started by an older tunebal); "
              "resuming with the options given now, which must repeat the original ones", file=sys.stderr)
        return []
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(opts)}
    if given is None:
        given = [n for n in STORED if _jsonable(getattr(opts, n)) != _jsonable(defaults.get(n))]
    given = set(given) | {"method"}
    conflicts = [n for n in STORED if n in given and _jsonable(getattr(opts, n)) != stored[n]]
    if conflicts:
        parts = [f"{_FLAGS[n]} {_show(getattr(opts, n))} (stored: {_show(stored[n])})" for n in conflicts]
        raise ConfigError(
            f"--resume continues the search as it was started; conflicting options: {'; '.join(parts)}. "
            "Drop them to reuse the stored ones, or start a new experiment with another --name"
        )
    taken = [n for n in STORED if n not in given]
    for name in taken:
        setattr(opts, name, stored[name])
    return taken


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)
