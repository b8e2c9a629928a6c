"""``tunebal train``: one configuration, no Ray, with a progress bar and TensorBoard.

Saves ``last.arrow`` every epoch and ``best.arrow`` whenever validation accuracy improves;
at the end the best checkpoint is evaluated once on test.

Nothing is overwritten: an explicit ``--out`` that already holds a run is refused, and the
default directory moves on to a fresh ``-2``, ``-3`` ... suffix (printed). ``--device`` and
``--out`` are checked before any data is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tunebal.data import build_dataset
from tunebal.engine import Engine


def write_scalars(writer, metrics: Mapping[str, Any], step: int) -> None:
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and key != "epoch":
            writer.add_scalar(key, value, global_step=step)


def train_once(
    method: str,
    dataset: str,
    overrides: Mapping[str, Any],
    data_values: Mapping[str, Any],
    out: Path,
    device: str = "auto",
    progress: bool = True,
    out_explicit: bool = True,
) -> dict[str, Any]:
    """Train one configuration into ``out``; returns the result (also written as result.json)
    with ``out``, the directory actually used."""
    import sys

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from tunebal.tune.preflight import check_device, check_train_out, make_out_dir

    from tunebal.data import get_dataset_spec
    from tunebal.methods import get_method_class

    from tunebal.tune.spaces import apply_overrides

    get_method_class(method)  # unknown names and knobs fail before any data is generated
    get_dataset_spec(dataset).knobs.resolve(dict(data_values), where="--data ")
    apply_overrides({}, overrides, method, dataset)
    check_device(device)
    chosen = check_train_out(out, explicit=out_explicit)
    if chosen != out:
        print(f"tunebal: {out} holds an earlier run; writing to {chosen}", file=sys.stderr)
    out = chosen
    data = build_dataset(dataset, data_values)
    engine = Engine(data, method, overrides, device=device)
    make_out_dir(out)
    epochs = engine.common["epochs"]
    best_acc, history = -1.0, []
    with SummaryWriter(str(out)) as writer:
        bar = tqdm(total=epochs, desc=f"{method} on {dataset}", disable=not progress, unit="epoch")
        while engine.epoch < epochs:
            metrics = engine.run_epoch()
            history.append(metrics)
            write_scalars(writer, metrics, engine.epoch)
            engine.save(str(out / "last.arrow"), metrics)
            if metrics["val/acc"] > best_acc:
                best_acc = metrics["val/acc"]
                engine.save(str(out / "best.arrow"), metrics)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", val_acc=f"{metrics['val/acc']:.3f}")
            bar.update(1)
        bar.close()
        best_meta = engine.load(str(out / "best.arrow"))
        test = {f"test/{k}": v for k, v in engine.evaluate("test").items()}
        hparams = {k: v for k, v in engine.config.items() if isinstance(v, (int, float, str, bool))}
        writer.add_hparams(hparams, {"hparam/val_acc": best_acc, "hparam/test_acc": test["test/acc"]}, run_name="hparams")
    result = {"method": method, "dataset": dataset, "config": engine.config, "best_epoch": best_meta["epoch"],
              "best_val_acc": best_acc, **test}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return {**result, "out": str(out)}
