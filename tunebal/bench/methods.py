"""Benchmark: balancing methods against the baseline with the same budget, splits and seeds.

For every seed and every method entry (seed-major, so drifting machine load hits every method
alike) the engine trains on the dataset (``synth`` by default) for ``epochs`` epochs,
evaluating validation after each epoch. The epoch with the best validation accuracy is kept
in memory (ties keep the earlier epoch) and evaluated **once** on test. Nothing is selected
on test.

Reported per method (mean ± std over seeds where marked):

* test accuracy and macro-F1 (mean ± std);
* each modality's zero-out accuracy on test (mean) -- the weak branch's share of the model;
* ρ of the dominant modality on test (OPM/OGM (TPAMI 2024), Eq. 7 over the whole split; mean) -- 1 is balanced;
* the selected epoch (mean);
* the mean train step time divided by the baseline's, both measured in this process
  (``torch.set_num_threads(1)``; the per-run step time is the median over epochs of the
  engine's ``time/step_ms``). ``timing_steps > 0`` adds an interleaved micro-benchmark: one
  engine per method, the same batches, ``train_step`` timed round-robin so that every method
  sees the same machine load; its medians give a second, less noisy ratio.

A method entry may carry knob overrides: ``ogm:alpha=0.8:form=cvpr`` (the entry's label is the
whole string, so variants of one method can be compared in one table). ``--set knob=value``
applies to every entry whose method declares the knob (common knobs apply to all); ``--data
knob=value`` sets dataset knobs. ``baseline`` is added first when missing (it is the timing
reference).

Usage::

    python -m tunebal.bench.methods --methods baseline,ogm,opm,opm_ogm,arl --seeds 3 --epochs 12 \
        --data n_train=1600 [--set lr=0.01] [--timing-steps 30] [--json out.json]

``run(methods, seeds, epochs, overrides, data_values)`` returns one dict per entry (with its
per-seed ``runs``) for reuse by other benchmarks.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from tunebal.config import COMMON_KNOBS
from tunebal.data import build_dataset
from tunebal.data.base import MultimodalData
from tunebal.errors import ConfigError
from tunebal.knobs import parse_assignments
from tunebal.methods import get_method_class

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_entry(entry: str) -> tuple[str, str, dict[str, str]]:
    """``"ogm:alpha=0.8:form=cvpr"`` -> (label, method, {"alpha": "0.8", "form": "cvpr"})."""
    parts = [p.strip() for p in entry.strip().split(":")]
    if not parts[0]:
        raise ConfigError(f"empty method in benchmark entry {entry!r}")
    get_method_class(parts[0])
    return entry.strip(), parts[0], parse_assignments(parts[1:])


def entry_config(method: str, entry_knobs: Mapping[str, Any], overrides: Mapping[str, Any], seed: int, epochs: int) -> dict[str, Any]:
    """The flat engine config of one run: common ``overrides``, the method's own overrides, the
    entry's knobs (highest priority), the seed and the epoch budget."""
    declared = set(COMMON_KNOBS.names()) | set(get_method_class(method).KNOBS.names())
    config = {k: v for k, v in overrides.items() if k in declared}
    config.update(entry_knobs)
    config.update({"seed": seed, "epochs": epochs})
    return config


def _check_overrides(entries: Sequence[tuple[str, str, dict]], overrides: Mapping[str, Any]) -> None:
    known = set(COMMON_KNOBS.names())
    for _, method, _ in entries:
        known |= set(get_method_class(method).KNOBS.names())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"--set {', '.join(unknown)}: no benchmarked method declares it")


def train_and_select(data: MultimodalData, method: str, config: Mapping[str, Any], device: str = "cpu", log: Log | None = None, label: str = "") -> dict[str, Any]:
    """Train ``epochs`` epochs, keep the best-validation state, evaluate it once on test."""
    from tunebal.engine import Engine

    engine = Engine(data, method, config, device=device)
    epochs = engine.common["epochs"]
    best_val, best_epoch, best_state = -math.inf, 0, None
    step_ms: list[float] = []
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for _ in range(epochs):
        metrics = engine.run_epoch()
        history.append(metrics)
        step_ms.append(metrics["time/step_ms"])
        if metrics["val/acc"] > best_val:
            best_val, best_epoch = metrics["val/acc"], int(metrics["epoch"])
            best_state = copy.deepcopy(engine.model.state_dict())
        if log:
            log(
                f"  {label or method} seed {config.get('seed')} epoch {int(metrics['epoch'])}: "
                f"val acc {metrics['val/acc']:.3f} "
                + " ".join(f"{m} {metrics[f'val/acc_{m}']:.3f}" for m in data.modalities)
                + f" | {metrics['time/step_ms']:.0f} ms/step"
            )
    assert best_state is not None
    engine.model.load_state_dict(best_state)
    test = engine.evaluate("test")
    rhos = {m: test[f"rho_{m}"] for m in data.modalities}
    dominant = max(rhos, key=rhos.get)
    return {
        "method": method,
        "seed": int(engine.common["seed"]),
        "best_epoch": best_epoch,
        "val_acc": best_val,
        "test": test,
        "dominant": dominant,
        "rho_dominant": rhos[dominant],
        "step_ms": statistics.median(step_ms),
        "train_s": time.perf_counter() - start,
        "last_method_metrics": {k: v for k, v in history[-1].items() if k.startswith("method/")},
        "history": [
            {k: v for k, v in h.items() if k == "epoch" or k.startswith(("method/", "val/acc", "val/rho", "train/loss"))}
            for h in history
        ],
        "config": dict(engine.config),
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def interleaved_step_times(
    data: MultimodalData, entries: Sequence[tuple[str, str, dict]], overrides: Mapping[str, Any], steps: int, device: str = "cpu"
) -> dict[str, float]:
    """Median ``train_step`` time (ms) per entry, timed round-robin on identical batches."""
    from tunebal.engine import Engine

    engines = {label: Engine(data, method, entry_config(method, knobs, overrides, 0, 1), device=device) for label, method, knobs in entries}
    first = next(iter(engines.values()))
    batches = list(first.iterate(data.train, shuffle=True))
    times: dict[str, list[float]] = {label: [] for label in engines}
    for engine in engines.values():  # warm-up step each
        engine.model.train()
        engine.train_step(*batches[0])
    for i in range(steps):
        inputs, labels = batches[i % len(batches)]
        for label, engine in engines.items():
            t0 = time.perf_counter()
            engine.train_step(inputs, labels)
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            times[label].append(1000.0 * (time.perf_counter() - t0))
    return {label: statistics.median(v) for label, v in times.items()}


def run(
    methods: Iterable[str],
    seeds: int | Sequence[int],
    epochs: int,
    overrides: Mapping[str, Any] | None = None,
    data_values: Mapping[str, Any] | None = None,
    *,
    dataset: str = "synth",
    device: str = "cpu",
    timing_steps: int = 0,
    log: Log | None = _stderr,
) -> list[dict[str, Any]]:
    """Benchmark ``methods`` (entries like ``"ogm:alpha=0.8"``) over ``seeds`` (a count or a list).

    Returns one summary dict per entry, baseline first: ``label``, ``method``, ``test_acc`` /
    ``test_f1`` (mean, std), ``acc_<m>`` (mean test zero-out accuracy), ``rho_dominant`` (mean),
    ``dominant`` (the modality most often dominant), ``best_epoch`` (mean), ``step_ms``,
    ``step_ratio`` (over the baseline's), ``step_ratio_interleaved`` (when ``timing_steps``)
    and ``runs`` (the per-seed dicts of :func:`train_and_select`).
    """
    torch.set_num_threads(1)
    overrides = dict(overrides or {})
    entries = [parse_entry(e) for e in methods if e.strip()]
    if not any(method == "baseline" and not knobs for _, method, knobs in entries):
        entries.insert(0, ("baseline", "baseline", {}))
    labels = [e[0] for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"duplicate benchmark entries: {labels}")
    _check_overrides(entries, overrides)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    data = build_dataset(dataset, dict(data_values or {}))
    for _, method, _ in entries:
        get_method_class(method).check_compatible(len(data.modalities), overrides.get("fusion", "concat"))

    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for seed in seed_list:
        for label, method, knobs in entries:
            config = entry_config(method, knobs, overrides, seed, epochs)
            runs[label].append(train_and_select(data, method, config, device=device, log=log, label=label))

    interleaved = interleaved_step_times(data, entries, overrides, timing_steps, device) if timing_steps > 0 else {}
    base_step = statistics.fmean(r["step_ms"] for r in runs["baseline"])
    out = []
    for label, method, knobs in entries:
        rs = runs[label]
        summary: dict[str, Any] = {
            "label": label,
            "method": method,
            "knobs": knobs,
            "seeds": seed_list,
            "epochs": epochs,
            "test_acc": _mean_std([r["test"]["acc"] for r in rs]),
            "test_f1": _mean_std([r["test"]["macro_f1"] for r in rs]),
            "rho_dominant": statistics.fmean(r["rho_dominant"] for r in rs),
            "dominant": statistics.mode(r["dominant"] for r in rs),
            "best_epoch": statistics.fmean(r["best_epoch"] for r in rs),
            "step_ms": statistics.fmean(r["step_ms"] for r in rs),
            "runs": rs,
        }
        for m in data.modalities:
            summary[f"acc_{m}"] = statistics.fmean(r["test"][f"acc_{m}"] for r in rs)
        summary["step_ratio"] = summary["step_ms"] / base_step
        if interleaved:
            summary["step_ms_interleaved"] = interleaved[label]
            summary["step_ratio_interleaved"] = interleaved[label] / interleaved["baseline"]
        out.append(summary)
    return out


def markdown_table(results: Sequence[Mapping[str, Any]], modalities: Sequence[str] | None = None) -> str:
    """The results of :func:`run` as a markdown table (accuracies in %)."""
    if not results:
        return ""
    if modalities is None:
        modalities = [k[4:] for k in results[0] if k.startswith("acc_")]
    interleaved = "step_ratio_interleaved" in results[0]
    head = ["method", "test acc", "macro-F1"] + [f"acc {m} (zero-out)" for m in modalities]
    head += ["ρ dominant", "best epoch", "step time ÷ baseline"]
    if interleaved:
        head.append("interleaved step ÷ baseline")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in results:
        cells = [
            f"`{r['label']}`",
            f"{100 * r['test_acc'][0]:.1f} ± {100 * r['test_acc'][1]:.1f}",
            f"{100 * r['test_f1'][0]:.1f} ± {100 * r['test_f1'][1]:.1f}",
        ]
        cells += [f"{100 * r[f'acc_{m}']:.1f}" for m in modalities]
        cells += [f"{r['rho_dominant']:.2f} ({r['dominant']})", f"{r['best_epoch']:.1f}", f"{r['step_ratio']:.2f}×"]
        if interleaved:
            cells.append(f"{r['step_ratio_interleaved']:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunebal.bench.methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="baseline,ogm,opm,opm_ogm,arl", help="comma-separated entries, e.g. ogm:alpha=0.8:form=cvpr")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KNOB=VALUE")
    parser.add_argument("--data", dest="data_values", action="append", default=[], metavar="KNOB=VALUE")
    parser.add_argument("--dataset", default="synth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timing-steps", type=int, default=0, help="interleaved step-time rounds (0: off)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    overrides = parse_assignments(args.overrides)
    data_values = parse_assignments(args.data_values)
    start = time.perf_counter()
    results = run(
        args.methods.split(","), args.seeds, args.epochs, overrides, data_values,
        dataset=args.dataset, device=args.device, timing_steps=args.timing_steps,
    )
    print(
        f"{args.dataset} {data_values or '(defaults)'}; {args.epochs} epochs; seeds 0..{args.seeds - 1}; "
        f"--set {overrides or '(none)'}; selection on validation accuracy; test evaluated once; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(markdown_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
