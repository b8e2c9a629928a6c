"""Checks that run before Ray starts: options, names, paths, resources and the cluster address.

Each failure is one ``ConfigError`` line (exit 2) within seconds; nothing here starts Ray,
creates an experiment or waits without a bound. ``run_search`` calls these in order; the
train and evaluate commands use :func:`check_device` and :func:`check_train_out`.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tunebal.errors import ConfigError

#: Largest searcher seed: Optuna's TPESampler and Tune's random search seed numpy's legacy
#: RandomState, which takes 32-bit seeds.
MAX_SEED = 2**32 - 1
#: Seconds the TCP probe of ``--address`` waits for a connection.
PROBE_TIMEOUT_S = 5.0
#: Files by which a directory is recognised as a previous ``tunebal train`` run.
TRAIN_RUN_FILES = ("result.json", "best.arrow", "last.arrow")


def check_name(name: str) -> None:
    """An experiment name must be one safe path component below ``--storage``."""
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
        or name != name.strip()
    )
    if bad:
        raise ConfigError(
            f"--name {name!r} must be a single directory name (no '/', not empty, '.' or '..', no surrounding spaces)"
        )


def check_numbers(opts: Any) -> None:
    """Ranges of the numeric search options that Ray would otherwise reject late."""
    if not 0 <= opts.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {opts.seed}")
    if not opts.reduction_factor > 1:
        raise ConfigError(f"--reduction-factor must be > 1, got {opts.reduction_factor:g}")
    if opts.max_failures < 0:
        raise ConfigError(f"--max-failures must be >= 0, got {opts.max_failures}")


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_storage(storage: str) -> Path:
    """``--storage`` resolved; it must be (or become) a writable directory. Creates it."""
    root = Path(storage).expanduser()
    existing = _first_existing(root.absolute())
    if not existing.is_dir():
        raise ConfigError(f"--storage {storage}: {existing} is a file, not a directory")
    make_writable_dir(root, f"--storage {storage}")
    return root.resolve()


def check_experiment_dir(path: Path, resume: bool) -> None:
    """A fresh search never writes into an existing experiment; ``--resume`` needs one."""
    exists = path.exists()
    if exists and not path.is_dir():
        raise ConfigError(f"experiment path {path} is a file")
    if resume:
        if not exists or not (path / "tuner.pkl").exists():
            raise ConfigError(f"no experiment to resume at {path}")
    elif exists and any(p.name != "search_options.json" for p in path.iterdir()):  # only options: never started
        raise ConfigError(
            f"experiment {path.name!r} already exists at {path}; pass --resume to continue it or choose another --name"
        )


def local_cpus() -> float:
    """CPUs a local Ray cluster started here would have (cgroup/affinity aware, like Ray)."""
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except Exception:  # pragma: no cover - fallback for other Ray versions
        return float(len(os.sched_getaffinity(0)))


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


def check_resources(cpus_per_trial: float, gpus_per_trial: float, cpus: float, gpus: float, where: str) -> None:
    """A trial must fit the cluster, or Tune would wait for it forever."""
    if cpus_per_trial > cpus:
        raise ConfigError(f"--cpus-per-trial {cpus_per_trial:g} is more than the {cpus:g} CPUs of {where}")
    if gpus_per_trial > 0 and gpus <= 0:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} but {where} has no GPU")
    if gpus_per_trial > gpus:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} is more than the {gpus:g} GPUs of {where}")


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for ``--address``; None for 'auto'/'local' (nothing to probe)."""
    if address in ("auto", "local"):
        return None
    text = address if "://" in address else f"tcp://{address}"
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ConfigError(f"--address {address!r} must be HOST:PORT (or ray://HOST:PORT, http://HOST:PORT, auto)")
    return host, port


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when nothing listens at ``address`` (Ray would retry forever),
    or when the cluster there rejects this client's token authentication (Ray would fail after
    about two minutes with a traceback; tunebal/tune/cluster_auth.py)."""
    from tunebal.tune.cluster_auth import check_auth

    target = parse_address(address)
    if target is None:
        return
    host, port = target
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
        check_auth(address, host, port, timeout)
        return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, socket.timeout):
            reason = f"no answer in {time.monotonic() - start:.0f} s"
        raise ConfigError(f"cannot reach a Ray cluster at {address} ({reason})") from None


def check_device(device: str) -> None:
    """``--device``: auto, cpu, cuda or cuda:N (N an existing GPU)."""
    if device in ("auto", "cpu"):
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ConfigError(f"--device {device!r} is not supported; valid: auto, cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s)")


def check_train_out(out: Path, explicit: bool) -> Path:
    """The directory ``tunebal train`` will write (not created yet). An explicit ``--out``
    holding a previous run is refused; the default directory moves on to a fresh ``-2``,
    ``-3`` ... suffix instead."""
    existing = _first_existing(out.absolute())
    if existing == out.absolute() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a directory")

    def holds_run(p: Path) -> bool:
        return p.is_dir() and any((p / f).exists() for f in TRAIN_RUN_FILES)

    if holds_run(out):
        if explicit:
            raise ConfigError(f"--out {out} already holds a training run; choose another --out or remove it")
        n = 2
        while holds_run(out.with_name(f"{out.name}-{n}")) or out.with_name(f"{out.name}-{n}").is_file():
            n += 1
        out = out.with_name(f"{out.name}-{n}")
    return out


def make_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` and check, by writing a probe file, that it is writable; ``what`` names it in the error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tunebal-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} is not a writable directory ({exc.strerror or exc})") from None


def make_out_dir(out: Path) -> None:
    """Create the ``train`` output directory and check that it is writable."""
    make_writable_dir(out, f"--out {out}")
