"""The Ray Tune function trainable: one trial = one ``Engine`` trained epoch by epoch.

Every epoch it reports the metrics (ASHA decides on ``val/acc``) with an Arrow checkpoint
(tunebal/checkpoint.py). On a restart after a crash (FailureConfig) it resumes from the
last checkpoint via ``tune.get_checkpoint``.

A NaN/Inf loss ends the trial once: the reason goes to a marker file in the trial
directory, a last result with ``val/acc = -inf`` and ``nonfinite_loss = 1`` is reported
(the worst value for ASHA and for Optuna's TPE, which accepts infinite values), and the
function returns normally, so Tune neither retries it (FailureConfig restarts only trials
that raise) nor prints tracebacks. The summary reports such a trial
as DIVERGED and never picks it as the best (tunebal/tune/report.py).
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

NONFINITE_MARKER = "NONFINITE_LOSS"
_CRASH_MARKER = "INJECTED_CRASH_DONE"


def split_data_knobs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dataset knobs without the ``data.`` prefix, everything else)."""
    data = {k[len("data."):]: v for k, v in config.items() if k.startswith("data.")}
    rest = {k: v for k, v in config.items() if not k.startswith("data.")}
    return data, rest


def diverged_result(reason: str) -> dict[str, Any]:
    """The last result of a trial whose loss became NaN/Inf."""
    return {"val/acc": float("-inf"), "nonfinite_loss": 1, "epoch_failed": reason[:200]}


def run_trial(
    config: dict[str, Any],
    *,
    method: str,
    dataset: str,
    data_values: Mapping[str, Any],
    max_epochs: int,
    threads: int,
    device: str = "cpu",
    crash_once_at_epoch: int | None = None,
) -> None:
    """Train one configuration under Tune on ``device`` (:func:`trial_device`).

    ``crash_once_at_epoch`` is a test hook that kills the worker process once, after that
    epoch's checkpoint is reported."""
    import torch
    from ray import tune

    from tunebal.checkpoint import CHECKPOINT_FILENAME
    from tunebal.data import build_dataset
    from tunebal.engine import Engine
    from tunebal.errors import NonFiniteLossError

    trial_dir = Path(tune.get_context().get_trial_dir())
    marker = trial_dir / NONFINITE_MARKER
    if marker.exists():  # a restored trial whose loss diverged: no point training again
        tune.report(diverged_result(marker.read_text().strip()))
        return
    torch.set_num_threads(max(1, threads))
    data_knobs, engine_config = split_data_knobs(config)
    data = build_dataset(dataset, {**data_values, **data_knobs})
    engine_config["epochs"] = max_epochs
    engine = Engine(data, method, engine_config, device=device)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load(os.path.join(ckpt_dir, CHECKPOINT_FILENAME))
    while engine.epoch < max_epochs:
        try:
            metrics = engine.run_epoch()
        except NonFiniteLossError as exc:
            marker.write_text(str(exc))
            tune.report(diverged_result(str(exc)))
            return
        with tempfile.TemporaryDirectory() as tmp:
            engine.save(os.path.join(tmp, CHECKPOINT_FILENAME), metrics)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        if crash_once_at_epoch is not None and engine.epoch == crash_once_at_epoch:
            done = trial_dir / _CRASH_MARKER
            if not done.exists():
                done.write_text("crashed once")
                os._exit(17)  # a hard crash: the worker dies without cleanup


def trial_device(gpus_per_trial: float) -> str:
    """The device a trial trains on: ``cuda`` only when Ray reserved a GPU (share) for it.

    Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` unset for 0-GPU workers, so on a GPU node a trial
    choosing its device by ``torch.cuda.is_available()`` would train on ``cuda:0`` uncounted
    by Ray; a 0-GPU trial therefore always trains on the CPU.
    """
    return "cuda" if gpus_per_trial > 0 else "cpu"


def make_trainable(
    method: str,
    dataset: str,
    data_values: Mapping[str, Any],
    max_epochs: int,
    cpus_per_trial: float,
    gpus_per_trial: float,
    crash_once_at_epoch: int | None = None,
) -> Callable:
    """The trainable with its resources attached (fractional GPUs pack trials on one GPU)."""
    from ray import tune

    fn = partial(
        run_trial,
        method=method,
        dataset=dataset,
        data_values=dict(data_values),
        max_epochs=max_epochs,
        threads=max(1, int(cpus_per_trial)),
        device=trial_device(gpus_per_trial),
        crash_once_at_epoch=crash_once_at_epoch,
    )
    fn.__name__ = f"tunebal_{method}"  # type: ignore[attr-defined]
    return tune.with_resources(fn, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
