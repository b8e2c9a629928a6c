"""The search's console: one line per trial-epoch instead of Ray's status boxes.

    aim_3f2a1_00002  epoch  4/8  val/acc 0.6412  acc_audio 0.5830  acc_visual 0.3120  train/loss 0.8123  1.9 s

plus a line when a trial ends, errors or is restarted. Ray's own progress tables come back with
``tunebal search -v`` (Tune ``verbose=2``). Trial names are short (``METHOD_TRIALID``, e.g.
``aim_3f2a1_00002``); their knobs are in ``params.json``, the summary table and TensorBoard.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def trial_name(method: str):
    """Tune's trial_name_creator / trial_dirname_creator: ``METHOD_TRIALID``."""

    def name(trial: Any) -> str:
        return f"{method}_{trial.trial_id}"

    return name


def format_epoch(trial: str, result: dict[str, Any], max_epochs: int) -> str:
    """One line for one reported epoch (val/acc first, then per-modality accuracies)."""
    parts = [f"{trial}  epoch {int(result.get('epoch', result.get('training_iteration', 0))):>2}/{max_epochs}"]
    for key in ("val/acc",):
        if isinstance(result.get(key), (int, float)):
            parts.append(f"{key} {result[key]:.4f}")
    for key in sorted(k for k in result if k.startswith("val/acc_")):
        if isinstance(result[key], (int, float)):
            parts.append(f"{key[len('val/'):]} {result[key]:.4f}")
    if isinstance(result.get("train/loss"), (int, float)):
        parts.append(f"train/loss {result['train/loss']:.4f}")
    if isinstance(result.get("time_this_iter_s"), (int, float)):
        parts.append(f"{result['time_this_iter_s']:.1f} s")
    return "  ".join(parts)


def _make_callback_class():
    from ray.tune import Callback

    class ConciseConsole(Callback):
        """Prints :func:`format_epoch` for every result and a line per trial event."""

        def __init__(self, max_epochs: int, stream: TextIO | None = None) -> None:
            self.max_epochs = max_epochs
            self.stream = stream

        def _print(self, line: str) -> None:
            print(line, file=self.stream or sys.stdout, flush=True)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if result.get("nonfinite_loss") == 1:
                self._print(f"{trial}  diverged: {result.get('epoch_failed', 'non-finite loss')}")
            else:
                self._print(format_epoch(str(trial), result, self.max_epochs))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._print(f"{trial}  done")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._print(f"{trial}  failed (restarted from its checkpoint while --max-failures allows)")

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._print(f"{trial}  worker lost; restarting from its last checkpoint")

    return ConciseConsole


def make_callback(max_epochs: int, stream: TextIO | None = None):
    return _make_callback_class()(max_epochs, stream)
