"""Resume only what this user's tunebal wrote: an HMAC manifest of Ray's pickled state.

``Tuner.restore`` unpickles ``tuner.pkl``, the experiment state (JSON with pickled parts),
the searcher state and trial error files, and unpickling runs code. A file planted in an
experiment directory (shared storage is the common case) would run on ``--resume``.

So while a search runs, :class:`StateGuard` (a Tune callback) writes
``tunebal_state.json``: an HMAC-SHA256, keyed with a per-user secret, of every file Ray
may unpickle. Tune calls the callback's ``get_state`` right after it has written its state
to the driver's staging directory and before that directory is synced to the experiment
directory, so the manifest travels with exactly the bytes it describes. Before ``--resume``
starts Ray, :func:`verify` requires every such file in the experiment directory to be
listed with a matching HMAC, and the manifest's own HMAC to match; anything else is one
line and exit 2, and nothing has been unpickled.

The key is 32 random bytes in ``~/.config/tunebal/state.key`` (mode 0600, created on first
use; ``$TUNEBAL_STATE_KEY_FILE`` names another file). Someone without the key cannot forge
a manifest; resuming on another machine needs the same key file there. See
docs/bad-inputs.md for the whole trust model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from tunebal.errors import ConfigError

MANIFEST = "tunebal_state.json"
KEY_ENV = "TUNEBAL_STATE_KEY_FILE"
#: Files tunebal itself writes into the experiment directory, read only as plain JSON/CSV
#: (the Optuna study's journal is JSON lines, replayed by Optuna without unpickling).
OWN_FILES = frozenset({MANIFEST, "summary.json", "trials.csv", "optuna.journal", "optuna.journal.lock", "search_options.json"})


def key_path() -> Path:
    env = os.environ.get(KEY_ENV)
    return Path(env).expanduser() if env else Path.home() / ".config" / "tunebal" / "state.key"


def load_key(create: bool) -> bytes:
    """The per-user HMAC key; created (0600) when ``create`` and absent."""
    path = key_path()
    if not path.exists() and create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"cannot create the tunebal state key {path} ({exc.strerror or exc}); set {KEY_ENV} to a writable file"
            ) from None
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the tunebal state key {path} ({exc.strerror or exc})") from None
    if len(key) < 32:
        raise ConfigError(f"the tunebal state key {path} is shorter than 32 bytes")
    return key


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def guarded(root: Path) -> list[str]:
    """Files below ``root`` that Ray may unpickle on restore: every ``*.pkl`` at any depth and
    every top-level file tunebal did not write itself (experiment and searcher state)."""
    out = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        top = "/" not in rel
        if path.suffix == ".pkl" or (top and rel not in OWN_FILES and not rel.startswith(".")):
            out.append(rel)
    return out


def _body_bytes(files: dict[str, str]) -> bytes:
    return json.dumps({"version": 1, "files": files}, sort_keys=True, separators=(",", ":")).encode()


def read_manifest(root: Path, key: bytes) -> dict[str, str]:
    """The verified ``files`` table of ``root``'s manifest ({} when absent)."""
    path = root / MANIFEST
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files, mac = doc["files"], doc["mac"]
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError("malformed")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not a valid tunebal state manifest; refusing to resume") from None
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, _body_bytes(files))):
        raise ConfigError(
            f"{path} was not written with this user's tunebal state key ({key_path()}); refusing to resume"
        )
    return files


def write_manifest(dest: Path, files: dict[str, str], key: bytes) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files, "mac": _mac(key, _body_bytes(files))}, indent=1))
    os.replace(tmp, dest / MANIFEST)


def verify(experiment_dir: Path) -> None:
    """Before ``Tuner.restore``: every file Ray may unpickle is listed with a matching HMAC."""
    key = load_key(create=False) if key_path().exists() else None
    if key is None:
        raise ConfigError(f"no tunebal state key at {key_path()}: cannot verify {experiment_dir} for --resume")
    files = read_manifest(experiment_dir, key)
    if not files:
        raise ConfigError(f"{experiment_dir} has no {MANIFEST} (not written by tunebal); refusing to resume")
    for rel in guarded(experiment_dir):
        want = files.get(rel)
        if want is None:
            raise ConfigError(f"{experiment_dir / rel} is not in {MANIFEST} (planted or foreign); refusing to resume")
        if not hmac.compare_digest(want, _mac(key, (experiment_dir / rel).read_bytes())):
            raise ConfigError(f"{experiment_dir / rel} was modified after tunebal wrote it; refusing to resume")


def _make_callback_class():
    from ray.tune import Callback

    class StateGuard(Callback):
        """Writes the HMAC manifest each time Tune saves its experiment state."""

        def __init__(self, experiment_dir: str) -> None:
            self.experiment_dir = experiment_dir
            self._staging: str | None = None

        def _note(self, trials: list[Any]) -> None:
            if self._staging is None:
                for trial in trials or []:
                    storage = getattr(trial, "storage", None)
                    if storage is not None:
                        self._staging = storage.experiment_driver_staging_path
                        break

        def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
            self._note(trials)

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._note(trials)

        def get_state(self) -> None:  # called by Tune after writing its state, before syncing
            if self._staging is None:
                return None
            try:
                self._write()
            except (OSError, ConfigError) as exc:  # the search goes on; only --resume will refuse
                logging.getLogger(__name__).warning("tunebal: could not write %s (%s)", MANIFEST, exc)
            return None

        def _write(self) -> None:
            key = load_key(create=True)
            root, staging = Path(self.experiment_dir), Path(self._staging)
            try:
                files = read_manifest(staging, key) or read_manifest(root, key)
            except ConfigError:
                files = {}
            # Earlier sessions' files stay as verified; of the experiment directory only
            # tuner.pkl (written there by the Tuner itself) is added; the rest comes from staging.
            if (root / "tuner.pkl").is_file():
                files["tuner.pkl"] = _mac(key, (root / "tuner.pkl").read_bytes())
            for rel in guarded(staging) if staging.is_dir() else []:
                files[rel] = _mac(key, (staging / rel).read_bytes())
            write_manifest(staging, files, key)

        def __getstate__(self) -> dict[str, Any]:
            return {"experiment_dir": self.experiment_dir, "_staging": None}

    return StateGuard


def make_callback(experiment_dir: Path):
    """The Tune callback that keeps ``tunebal_state.json`` up to date."""
    load_key(create=True)
    return _make_callback_class()(str(experiment_dir))
