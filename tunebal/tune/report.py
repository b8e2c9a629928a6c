"""After a search: the trial table, the best trial's test evaluation, summary.json/trials.csv."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping

from tunebal.tune.runner import METRIC, MODE, SearchOptions
from tunebal.tune.trainable import trial_device


def evaluate_checkpoint_on_test(
    checkpoint_dir: str,
    method: str,
    dataset: str,
    data_values: Mapping[str, Any],
    config: Mapping[str, Any],
    device: str = "cpu",
) -> dict[str, Any]:
    """Load a trial's Arrow checkpoint and evaluate it once on the test split (on ``device``)."""
    from tunebal.checkpoint import CHECKPOINT_FILENAME
    from tunebal.data import build_dataset
    from tunebal.engine import Engine
    from tunebal.tune.trainable import split_data_knobs

    data_knobs, engine_config = split_data_knobs(config)
    data = build_dataset(dataset, {**data_values, **data_knobs})
    engine = Engine(data, method, engine_config, device=device)
    meta = engine.load(os.path.join(checkpoint_dir, CHECKPOINT_FILENAME))
    return {"epoch": meta["epoch"], **{f"test/{k}": v for k, v in engine.evaluate("test").items()}}


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    cause = [line for line in text if "Error" in line or "error" in line]
    return (cause[-1] if cause else (text[-1] if text else type(error).__name__))[:300]


def diverged(result) -> str | None:
    """The reason a trial's loss became NaN/Inf, or None: from its last result (reported by
    the trainable on any node) or else its marker file."""
    from tunebal.tune.trainable import NONFINITE_MARKER

    last = getattr(result, "metrics", None) or {}
    if last.get("nonfinite_loss") == 1:
        return str(last.get("epoch_failed") or "non-finite loss")

    marker = os.path.join(result.path, NONFINITE_MARKER)
    try:
        with open(marker, encoding="utf-8", errors="replace") as fh:
            return fh.read().strip() or "non-finite loss"
    except OSError:
        return None


def failed(result) -> bool:
    """An errored or diverged trial: never a candidate for the best trial."""
    return result.error is not None or diverged(result) is not None


def trial_rows(results, max_epochs: int, searched: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        df = result.metrics_dataframe
        if df is not None and "nonfinite_loss" in df:  # drop the diverged epoch's -inf marker row
            df = df[df["nonfinite_loss"] != 1]
        history = df[METRIC].tolist() if df is not None and METRIC in df else []
        config = result.config or {}
        epochs = int(df["training_iteration"].max()) if history else 0
        reason = diverged(result)
        if result.error:
            status = "ERROR"
        elif reason is not None:
            status = "DIVERGED"
        else:
            status = "STOPPED" if epochs < max_epochs else "COMPLETE"
        row = {
            "trial": os.path.basename(result.path),
            "status": status,
            "epochs": epochs,
            "best_val_acc": max(history) if history else math.nan,
            "last_val_acc": history[-1] if history else math.nan,
        }
        row.update({k: config.get(k) for k in searched})
        row["error"] = _one_line(result.error) if result.error else (reason or "")[:300]
        rows.append(row)
    return rows


def best_checkpoint(results):
    """(result, checkpoint, metrics) of the best epoch of any trial, by validation accuracy.

    Errored and diverged trials are skipped: a trial that crashed (and was not recovered)
    or whose loss became NaN/Inf is never reported as the best, whatever its earlier epochs scored.
    """
    best = None
    for result in results:
        if failed(result):
            continue
        for checkpoint, metrics in result.best_checkpoints or []:
            value = metrics.get(METRIC)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if best is None or value > best[2][METRIC]:
                best = (result, checkpoint, metrics)
    return best


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def summarize(results, opts: SearchOptions, searched: list[str]) -> dict[str, Any]:
    import ray

    exp_dir = opts.experiment_dir
    rows = trial_rows(results, opts.max_epochs, searched)
    summary: dict[str, Any] = {
        "experiment": str(exp_dir),
        "method": opts.method,
        "dataset": opts.dataset,
        "metric": METRIC,
        "mode": MODE,
        "max_epochs": opts.max_epochs,
        "num_trials": len(rows),
        "trials": rows,
        "best": None,
    }
    best = best_checkpoint(results)
    if best is not None:
        result, checkpoint, metrics = best
        evaluate = ray.remote(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial)(evaluate_checkpoint_on_test)
        test = ray.get(
            evaluate.remote(checkpoint.path, opts.method, opts.dataset, opts.data_values, result.config,
                            trial_device(opts.gpus_per_trial))
        )
        summary["best"] = {
            "trial": os.path.basename(result.path),
            "config": result.config,
            "checkpoint": checkpoint.path,
            "val": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k.startswith("val/")},
            "test": test,
        }
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    columns = ["trial", "status", "epochs", "best_val_acc", "last_val_acc", *searched, "error"]
    with open(exp_dir / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print_summary(summary, columns)
    return summary


def print_summary(summary: Mapping[str, Any], columns: list[str]) -> None:
    print()
    print(f"tunebal: {summary['method']} on {summary['dataset']}: {summary['num_trials']} trials")
    print(format_table(summary["trials"], columns))
    best = summary["best"]
    if best is None:
        print("no trial produced a checkpoint without erroring or diverging")
    else:
        test = best["test"]
        per_mod = "  ".join(f"{k[len('test/'):]}={v:.4f}" for k, v in test.items() if k.startswith("test/acc_"))
        if "test/mae" in test:  # a regression target (CMU-MOSI's score): acc is Acc-2 with zeros
            scores = (f"test Acc-2 {test['test/acc']:.4f} (non-zero {test['test/acc2_nonzero']:.4f})  F1 {test['test/f1']:.4f}  "
                      f"Acc-7 {test['test/acc7']:.4f}  MAE {test['test/mae']:.4f}  corr {test['test/corr']:.4f}")
        else:
            scores = f"test acc {test['test/acc']:.4f}  macro-F1 {test['test/macro_f1']:.4f}  mAP {test['test/map']:.4f}"
        print(
            f"best trial {best['trial']} (epoch {test['epoch']}, val acc {best['val'].get(METRIC, float('nan')):.4f}): "
            f"{scores}  {per_mod}"
        )
    print(f"experiment: {summary['experiment']}")
    print(f"summary:    {summary['experiment']}/summary.json, trials.csv")
    print(f"tensorboard --logdir {summary['experiment']}")
