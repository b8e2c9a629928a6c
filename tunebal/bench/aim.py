"""Evidence for AIM (Adaptive Intra-Network Modulation): the method, its ablations and the baseline under one budget.

Run ``python -m tunebal.bench.aim [--seeds 3 --epochs 8 --data n_train=640 ...] --json out.json``.
Parts (``--parts``, comma-separated; all by default):

* ``timing``: the train-step time of AIM (before and after E), its ablations and its speed
  knobs over the baseline's, timed round-robin on identical batches in this process.
* ``compare``: baseline, AIM and the ablations (w/o PAM, w/o DAM, AIM-label) through
  :func:`tunebal.bench.methods.run` — same data, splits, seeds and epochs; the best-validation
  epoch is evaluated once on test. Test accuracy and macro-F1 (mean ± std over seeds), each
  modality's zero-out accuracy, and each run's median step time over the baseline's.
* ``unimodal``: unimodal-only models — the baseline trained on the dataset restricted to one
  modality, same budget and selection — against each modality's zero-out accuracy inside the
  multimodal models of ``compare`` (the paper's Table I claim: AIM's per-modality accuracy is
  comparable to, or above, the unimodal-only models').
* ``depth``: imbalance per depth per epoch (Fig. 6 shape): after every epoch a *probe* DAP is
  fitted on the frozen model (``probe_steps`` Adam steps of Eq. 5, the same procedure for
  every method) and α_d = CV_m(s^m_d) (Eq. 14) is measured on the validation split, for the
  baseline and AIM. AIM's own per-epoch training-batch α_d (``method/alpha/d*``) is kept too.
* ``start``: test accuracy versus the start epoch E (Fig. 7 shape).
* ``resnet``: ResNet18 at the papers' input sizes (257×299 spectrogram + one 224×224 frame,
  6 classes as CREMA-D), batch ``--resnet-batch`` on CPU: step time of AIM over the
  baseline's (interleaved, same batches, same process), autograd saved-tensor bytes of one
  step (activation memory, exact), peak RSS of a fresh process per method, parameter counts.
* ``params``: decoupler parameter counts against the encoders' for latent sizes 8/16/32.
* ``flops``: training FLOPs per sample of one step (forward + backward + the method's extra
  work), AIM before/after E against the baseline, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (AIM, Fig. 8), on synth and at CREMA-D sizes.
* ``bn``: the BatchNorm part of the post-E collapse: AIM with the raw distance and the literal
  readings (the configuration that collapsed) at a high learning rate of the search space,
  per epoch the validation accuracy in eval mode with the running BatchNorm statistics against
  the same weights after recomputing them (tunebal/bn.py), and the training accuracy.

The machine is shared and slow: budgets are small on purpose and printed with the results.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

import torch

from tunebal.data import build_dataset
from tunebal.data.base import MultimodalData, Split
from tunebal.knobs import parse_assignments

ENTRIES = ["baseline", "aim", "aim:pam_after_start=false:dap_from_mod=true", "aim:pam=false", "aim:dam=false", "aim:target=label"]
PARTS = ("params", "timing", "flops", "bn", "compare", "unimodal", "depth", "start", "resnet")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ms(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


# --------------------------------------------------------------------------- helpers


def restrict(data: MultimodalData, modality: str) -> MultimodalData:
    """The same dataset (same samples and splits) with only ``modality``."""

    def sub(split: Split) -> Split:
        return Split(inputs={modality: split.inputs[modality]}, labels=split.labels)

    return MultimodalData(
        name=data.name,
        modalities=(modality,),
        kinds={modality: data.kinds[modality]},
        num_classes=data.num_classes,
        class_names=list(data.class_names),
        train=sub(data.train),
        val=sub(data.val),
        test=sub(data.test),
        info=dict(data.info),
    )


@torch.no_grad()
def depth_performance(model, dap, split: Split, batch_size: int = 128) -> torch.Tensor:
    """s^m_d (Eq. 9) of every modality and depth on ``split`` (eval mode), shape (M, D)."""
    from tunebal.methods.aim.losses import distance_logits, flat
    from tunebal.methods.aim.prototypes import eval_mode

    k = dap.num_classes
    depths, _ = dap.propagate(model)
    mods = dap.modalities
    n_depth = len(depths[mods[0]])
    total = torch.zeros(len(mods), n_depth)
    with eval_mode(model):
        for start in range(0, len(split), batch_size):
            y = split.labels[start : start + batch_size]
            for i, m in enumerate(mods):
                enc = model.encoders[m]
                h = enc.prepare(split.inputs[m][start : start + batch_size])
                for d, block in enumerate(enc.blocks):
                    h = block(h)
                    p = torch.softmax(distance_logits(flat(h, len(y)), flat(depths[m][d], k)), dim=1)
                    total[i, d] += p.gather(1, y.view(-1, 1)).sum()
    return total / len(split)


def probe_alpha(engine, probe_steps: int, proto_lr: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Fit a fresh probe DAP on the frozen model and return s^m_d and α_d on validation."""
    from tunebal.methods.aim.losses import imbalance
    from tunebal.methods.aim.prototypes import (
        DepthAdaptivePrototypes,
        eval_mode,
        frozen,
    )

    data, model = engine.data, engine.model
    gen = torch.Generator().manual_seed(seed + 104_729)
    shapes = {m: data.input_shape(m) for m in data.modalities}
    dap = DepthAdaptivePrototypes(data.modalities, data.kinds, shapes, data.num_classes, gen)
    means = data.class_means("train")
    opt = torch.optim.Adam(dap.parameters(), lr=proto_lr)
    with eval_mode(model), frozen(model):
        for _ in range(probe_steps):
            _, feats = dap.propagate(model)
            l_cls, acc = dap.classification_loss(model, feats)
            loss = l_cls + dap.reconstruction_loss(means)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    s = depth_performance(model, dap, data.val)
    alphas = [float(imbalance(s[:, d])) for d in range(s.shape[1])]
    return {"s": s.tolist(), "alpha": alphas, "probe_acc": float(acc)}


# --------------------------------------------------------------------------- parts


def part_params() -> dict[str, Any]:
    from tunebal.methods.aim import num_decoupler_parameters
    from tunebal.models.encoders import (
        mlp_encoder,
        resnet18_encoder,
        small_conv_encoder,
    )

    encoders = {
        "small spectrogram (synth audio)": small_conv_encoder("spectrogram", 1, (16, 32, 64, 128)),
        "small frames (synth visual)": small_conv_encoder("frames", 3, (16, 32, 64, 128)),
        "mlp vector (synth text)": mlp_encoder(32, (64, 64, 128, 128)),
        "resnet18 spectrogram": resnet18_encoder("spectrogram", 1),
        "resnet18 frames": resnet18_encoder("frames", 3),
    }
    out = {}
    for name, enc in encoders.items():
        n_enc = sum(p.numel() for p in enc.parameters())
        row = {"encoder": n_enc}
        for latent in (8, 16, 32, 64):
            row[f"decoupler_L{latent}"] = sum(num_decoupler_parameters(b, latent) for b in enc.blocks)
        out[name] = row
    return out


def part_compare(seeds, epochs, overrides, data_values, timing_steps, entries=ENTRIES) -> list[dict[str, Any]]:
    from tunebal.bench.methods import run

    return run(entries, seeds, epochs, overrides, data_values, timing_steps=timing_steps, log=_log)


def part_unimodal(seeds, epochs, overrides, data_values) -> dict[str, Any]:
    from tunebal.bench.methods import entry_config, train_and_select

    data = build_dataset("synth", dict(data_values))
    out: dict[str, Any] = {}
    for m in data.modalities:
        sub = restrict(data, m)
        accs = []
        for seed in seeds:
            config = entry_config("baseline", {}, {**overrides, "fusion": "concat"}, seed, epochs)
            r = train_and_select(sub, "baseline", config, log=_log, label=f"{m}-only")
            accs.append(r["test"]["acc"])
        out[m] = accs
    return out


def part_depth(seeds, epochs, overrides, data_values, probe_steps, entries=("baseline", "aim")) -> dict[str, Any]:
    from tunebal.bench.methods import entry_config, parse_entry
    from tunebal.engine import Engine

    data = build_dataset("synth", dict(data_values))
    out: dict[str, Any] = {}
    for entry in entries:
        label, method, knobs = parse_entry(entry)
        per_seed = []
        for seed in seeds:
            engine = Engine(data, method, entry_config(method, knobs, overrides, seed, epochs), device="cpu")
            hist = []
            for _ in range(epochs):
                metrics = engine.run_epoch()
                probe = probe_alpha(engine, probe_steps, seed=seed)
                own = {k[len("method/"):]: v for k, v in metrics.items() if k.startswith("method/alpha/")}
                hist.append({"epoch": int(metrics["epoch"]), "val_acc": metrics["val/acc"], **probe, "own_alpha": own})
                _log(f"  depth {label} seed {seed} epoch {hist[-1]['epoch']}: probe alpha "
                     + " ".join(f"{a:.3f}" for a in probe["alpha"]) + f" (probe acc {probe['probe_acc']:.2f})")
            per_seed.append(hist)
        out[label] = per_seed
    return out


def part_start(seeds, epochs, overrides, data_values, starts, compare=None) -> list[dict[str, Any]]:
    """AIM for each E; the default E's runs are reused from ``compare`` when it ran."""
    from tunebal.bench.methods import run
    from tunebal.methods.aim import AIM

    default = AIM.KNOBS.get("start_epoch").default
    reuse = next((r for r in compare or [] if r["label"] == "aim"), None)
    entries = [f"aim:start_epoch={e}" for e in starts if not (reuse is not None and e == default)]
    out = run(entries, seeds, epochs, overrides, data_values, log=_log)
    if reuse is not None and default in starts:
        out.append({**reuse, "label": f"aim:start_epoch={default}", "knobs": {"start_epoch": default}})
        out.sort(key=lambda r: -1 if r["method"] == "baseline" else int(r["knobs"]["start_epoch"]))
    return out


TIMED = {
    "baseline": ("baseline", {}),
    "aim (epoch < E: CE + L_pam)": ("aim", {"start_epoch": 1}),
    "aim (epoch >= E, defaults)": ("aim", {"start_epoch": 0}),
    "aim (epoch >= E, aux_form=direct)": ("aim", {"start_epoch": 0, "aux_form": "direct"}),
    "aim (epoch >= E, proto_refresh=4)": ("aim", {"start_epoch": 0, "proto_refresh": 4}),
    "aim (epoch >= E, pam_after_start=false)": ("aim", {"start_epoch": 0, "pam_after_start": False}),
    "aim (epoch >= E, pam_after_start=false, proto_refresh=4)": ("aim", {"start_epoch": 0, "pam_after_start": False, "proto_refresh": 4}),
    "aim w/o PAM": ("aim", {"start_epoch": 0, "pam": False}),
    "aim w/o DAM": ("aim", {"start_epoch": 0, "dam": False}),
    "aim-label": ("aim", {"start_epoch": 0, "target": "label"}),
    "aim branch_fraction=0.25": ("aim", {"start_epoch": 0, "branch_fraction": 0.25}),
    "aim branch_fraction=0.1": ("aim", {"start_epoch": 0, "branch_fraction": 0.1}),
}


def part_timing(overrides, data_values, steps: int) -> dict[str, Any]:
    """Median train-step time of each variant over the baseline's, round-robin on the same batches."""
    from tunebal.bench.methods import entry_config
    from tunebal.engine import Engine

    data = build_dataset("synth", dict(data_values))
    engines = {}
    for label, (method, knobs) in TIMED.items():
        engine = Engine(data, method, entry_config(method, knobs, overrides, 0, 2), device="cpu")
        if method == "aim":
            engine.method.dap_fitted = True  # the one-off fit is not a step
            engine.method.on_epoch_start(engine)
        engine.model.train()
        engines[label] = engine
    batches = list(engines["baseline"].iterate(data.train, shuffle=True))
    for engine in engines.values():
        engine.train_step(*batches[0])
    times: dict[str, list[float]] = {label: [] for label in engines}
    for i in range(steps):
        for label, engine in engines.items():
            t0 = time.perf_counter()
            engine.train_step(*batches[i % len(batches)])
            times[label].append(1000.0 * (time.perf_counter() - t0))
    base = statistics.median(times["baseline"])
    return {label: {"step_ms": statistics.median(v), "ratio": statistics.median(v) / base} for label, v in times.items()}


def train_flops(engine, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    """FLOPs of one training step (forward, backward, the method's extra passes) per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # per-module attribution trips on the frozen prototype path
    with counter:
        engine.train_step(inputs, labels)
    return counter.get_total_flops() / labels.shape[0]


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP is counted under "Global"."""

    parents: ClassVar[frozenset[str]] = frozenset({"Global"})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *args: object) -> None:
        return None


FLOPS_VARIANTS = {
    "baseline": ("baseline", {}),
    "aim (epoch < E)": ("aim", {"start_epoch": 1}),
    "aim (epoch >= E, defaults)": ("aim", {"start_epoch": 0}),
    "aim (epoch >= E, aux_form=direct)": ("aim", {"start_epoch": 0, "aux_form": "direct"}),
    "aim (epoch >= E, pam_after_start=false, proto_refresh=4)": ("aim", {"start_epoch": 0, "pam_after_start": False, "proto_refresh": 4}),
}


def part_flops(overrides, data_values, resnet_batch: int) -> dict[str, Any]:
    """Training FLOPs per sample over the baseline's (AIM, Fig. 8), synth and CREMA-D sizes."""
    from tunebal.bench.methods import entry_config
    from tunebal.engine import Engine

    out: dict[str, Any] = {}
    data = build_dataset("synth", dict(data_values))
    for where in ("synth", "resnet18 CREMA-D sizes"):
        rows = {}
        for label, (method, knobs) in FLOPS_VARIANTS.items():
            if where == "synth":
                engine = Engine(data, method, entry_config(method, knobs, overrides, 0, 2), device="cpu")
                if method == "aim":
                    engine.method.dap_fitted = True
                    engine.method.on_epoch_start(engine)
                engine.model.train()
            else:
                engine = _resnet_engine(method, resnet_batch, knobs)
            inputs, labels = next(engine.iterate(engine.data.train, shuffle=True))
            engine.train_step(inputs, labels)  # past the first step (prototype cache filled)
            # proto_refresh > 1: average over one refresh period
            period = engine.config.get("proto_refresh", 1) if method == "aim" else 1
            rows[label] = statistics.fmean(train_flops(engine, inputs, labels) for _ in range(period))
            _log(f"  flops {where} {label}: {rows[label] / 1e9:.3f} GFLOP/sample")
        base = rows["baseline"]
        out[where] = {label: {"gflop_per_sample": v / 1e9, "ratio": v / base} for label, v in rows.items()}
    return out


def part_bn(overrides, data_values, epochs: int) -> list[dict[str, Any]]:
    """Val accuracy in eval mode vs after recomputing the BN statistics, per epoch (see tunebal/bn.py)."""
    import copy

    from tunebal.bn import recalibrate_batchnorm
    from tunebal.engine import Engine

    data = build_dataset("synth", dict(data_values))
    # the configuration that collapsed before: the paper's raw distance, the literal readings
    config = {"lr": 0.071, "start_epoch": 2, "grad_clip": 1.0, "epochs": epochs, "distance": "euclidean",
              "pam_after_start": False, "dap_from_mod": True, **overrides}
    engine = Engine(data, "aim", config, device="cpu")
    rows = []
    for _ in range(epochs):
        metrics = engine.run_epoch()
        saved = engine.model
        engine.model = copy.deepcopy(saved)
        recalibrate_batchnorm(engine.model, (x for x, _ in engine.iterate(data.train, shuffle=True)), 10**9, engine.model.encode)
        recal = engine.evaluate("val")["acc"]
        engine.model = saved
        rows.append({"epoch": int(metrics["epoch"]), "phase": metrics["method/phase"], "train_acc": metrics["train/acc"],
                     "val_acc": metrics["val/acc"], "val_acc_recalibrated": recal})
        _log(f"  bn epoch {rows[-1]['epoch']}: train {metrics['train/acc']:.3f} val {metrics['val/acc']:.3f} recalibrated {recal:.3f}")
    return rows


def _resnet_data(batch: int, classes: int = 6) -> MultimodalData:
    g = torch.Generator().manual_seed(0)
    n = 2 * batch

    def split(count: int) -> Split:
        return Split(
            inputs={
                "audio": torch.randn(count, 1, 257, 299, generator=g),
                "visual": torch.randn(count, 1, 3, 224, 224, generator=g),
            },
            labels=torch.arange(count) % classes,
        )

    return MultimodalData(
        name="cremad-shaped",
        modalities=("audio", "visual"),
        kinds={"audio": "spectrogram", "visual": "frames"},
        num_classes=classes,
        class_names=[str(i) for i in range(classes)],
        train=split(n),
        val=split(batch),
        test=split(batch),
    )


def _resnet_engine(method: str, batch: int, knobs: Mapping[str, Any]):
    from tunebal.engine import Engine

    data = _resnet_data(batch)
    config = {"batch_size": batch, "backbone": "resnet18", "lr": 1e-3, "epochs": 2, **knobs}
    engine = Engine(data, method, config, device="cpu")
    if method == "aim":
        engine.method.dap_fitted = True  # time the modulation step, not the one-off DAP fit
        engine.method.on_epoch_start(engine)
    engine.model.train()
    return engine


def saved_tensor_bytes(engine, inputs, labels) -> int:
    """Bytes of the tensors autograd saves for backward in one training step (activations)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.train_step(inputs, labels)
    return sum(seen.values())


def resnet_child(method: str, batch: int, steps: int, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: ``steps`` steps, then the process's peak RSS."""
    torch.set_num_threads(1)
    engine = _resnet_engine(method, batch, knobs)
    inputs, labels = next(engine.iterate(engine.data.train, shuffle=True))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.train_step(inputs, labels)
        times.append(time.perf_counter() - t0)
    return {"method": method, "peak_rss_mb": _vm_hwm_mb(), "step_s": times}


def _vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it starts afresh at exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RESNET_VARIANTS = {
    "aim": {"start_epoch": 0},
    "aim pam_after_start=false, proto_refresh=4": {"start_epoch": 0, "pam_after_start": False, "proto_refresh": 4},
    "aim aux_form=direct": {"start_epoch": 0, "aux_form": "direct"},
}


def part_resnet(batch: int, steps: int, aim_knobs: Mapping[str, Any], rss: bool = True) -> dict[str, Any]:
    torch.set_num_threads(1)
    engines = {"baseline": _resnet_engine("baseline", batch, {})}
    for name, knobs in RESNET_VARIANTS.items():
        engines[name] = _resnet_engine("aim", batch, {**knobs, **aim_knobs})
    inputs, labels = next(engines["baseline"].iterate(engines["baseline"].data.train, shuffle=True))
    out: dict[str, Any] = {"batch": batch, "steps": steps, "aim_knobs": dict(aim_knobs)}
    for name, engine in engines.items():  # warm-up + activation memory
        out[f"{name}_saved_tensor_mb"] = saved_tensor_bytes(engine, inputs, labels) / 2**20
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(steps):  # interleaved on the same batch
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.train_step(inputs, labels)
            times[name].append(time.perf_counter() - t0)
            _log(f"  resnet {name}: {times[name][-1]:.2f} s")
    for name in engines:
        out[f"{name}_step_s"] = statistics.median(times[name])
        out[f"{name}_step_ratio"] = out[f"{name}_step_s"] / statistics.median(times["baseline"])
    out["step_ratio"] = out["aim_step_s"] / out["baseline_step_s"]
    counts = engines["aim"].method.parameter_counts(engines["aim"].model)
    out["params"] = counts
    del engines
    if not rss:
        return out
    for name, knobs in (("baseline", {}), ("aim", {"start_epoch": 0, **aim_knobs})):
        cmd = [sys.executable, "-m", "tunebal.bench.aim", "--resnet-child", name, "--resnet-batch", str(batch),
               "--resnet-steps", "2", "--child-knobs", json.dumps(knobs)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[f"{name}_peak_rss_mb"] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


# --------------------------------------------------------------------------- report


def report(results: Mapping[str, Any]) -> str:
    lines = [f"budget: {json.dumps(results['budget'])}", ""]
    if "params" in results:
        lines += ["## parameters (decoupler vs encoder)", "", "| encoder | encoder params | L=8 | L=16 | L=32 | L=64 |", "|---|---|---|---|---|---|"]
        for name, row in results["params"].items():
            cells = [f"{row[f'decoupler_L{l}']:,} ({row[f'decoupler_L{l}'] / row['encoder']:.2f}×)" for l in (8, 16, 32, 64)]
            lines.append(f"| {name} | {row['encoder']:,} | " + " | ".join(cells) + " |")
        lines.append("")
    if "timing" in results:
        lines += ["## train-step time over the baseline's (interleaved, same batches, this process)", "",
                  "| variant | ms/step | ratio |", "|---|---|---|"]
        for label, row in results["timing"].items():
            lines.append(f"| {label} | {row['step_ms']:.0f} | {row['ratio']:.2f}× |")
        lines.append("")
    if "compare" in results:
        from tunebal.bench.methods import markdown_table

        lines += ["## AIM, ablations and baseline", "", markdown_table(results["compare"]), ""]
    if "unimodal" in results:
        lines += ["## per-modality accuracy vs unimodal-only models (test, %)", ""]
        mods = list(results["unimodal"])
        lines += ["| model | " + " | ".join(mods) + " |", "|---|" + "---|" * len(mods)]
        lines.append("| unimodal-only baseline | " + " | ".join(_ms(results["unimodal"][m]) for m in mods) + " |")
        for r in results.get("compare", []):
            cells = [_ms([run["test"][f"acc_{m}"] for run in r["runs"]]) for m in mods]
            lines.append(f"| `{r['label']}` (zero-out) | " + " | ".join(cells) + " |")
        lines.append("")
    if "depth" in results:
        lines += ["## imbalance α_d per depth per epoch (probe DAP on validation; mean over seeds)", ""]
        for label, per_seed in results["depth"].items():
            n_d = len(per_seed[0][0]["alpha"])
            lines += [f"`{label}`", "", "| epoch | " + " | ".join(f"α_{d + 1}" for d in range(n_d)) + " | val acc |", "|---|" + "---|" * (n_d + 1)]
            for e in range(len(per_seed[0])):
                al = [statistics.fmean(h[e]["alpha"][d] for h in per_seed) for d in range(n_d)]
                acc = statistics.fmean(h[e]["val_acc"] for h in per_seed)
                lines.append(f"| {per_seed[0][e]['epoch']} | " + " | ".join(f"{a:.3f}" for a in al) + f" | {100 * acc:.1f} |")
            lines.append("")
    if "start" in results:
        lines += ["## test accuracy vs start epoch E", "", "| E | test acc | macro-F1 |", "|---|---|---|"]
        for r in results["start"]:
            if r["method"] != "aim":
                lines.append(f"| baseline | {_ms([x['test']['acc'] for x in r['runs']])} | {_ms([x['test']['macro_f1'] for x in r['runs']])} |")
                continue
            lines.append(f"| {r['knobs']['start_epoch']} | {_ms([x['test']['acc'] for x in r['runs']])} | {_ms([x['test']['macro_f1'] for x in r['runs']])} |")
        lines.append("")
    if "resnet" in results:
        r = results["resnet"]
        lines += ["## ResNet18, 257×299 spectrogram + 224×224 frame, CPU", "",
                  f"batch {r['batch']}, {r['steps']} interleaved steps (median), one thread", "",
                  "| variant | s/step | ratio | saved activations (MB) |", "|---|---|---|---|"]
        for name in ["baseline", *RESNET_VARIANTS]:
            if f"{name}_step_s" in r:
                lines.append(f"| {name} | {r[f'{name}_step_s']:.2f} | {r[f'{name}_step_ratio']:.2f}× | {r[f'{name}_saved_tensor_mb']:.0f} |")
        if "aim_peak_rss_mb" in r:
            lines.append(f"\npeak RSS {r['baseline_peak_rss_mb']:.0f} MB (baseline) vs {r['aim_peak_rss_mb']:.0f} MB (aim); params {r['params']}")
        lines.append("")
    if "flops" in results:
        lines += ["## training FLOPs per sample over the baseline's (FlopCounterMode, AIM Fig. 8)", "", "| setting | variant | GFLOP/sample | ratio |", "|---|---|---|---|"]
        for where, rows in results["flops"].items():
            for label, row in rows.items():
                lines.append(f"| {where} | {label} | {row['gflop_per_sample']:.3f} | {row['ratio']:.2f}× |")
        lines.append("")
    if "bn" in results:
        lines += ["## validation accuracy: running BN statistics vs recomputed (lr 0.071, E = 2, grad_clip 1)", "",
                  "| epoch | phase | train acc | val (eval mode) | val (BN recomputed) |", "|---|---|---|---|---|"]
        for row in results["bn"]:
            lines.append(f"| {row['epoch']} | {'mod' if row['phase'] else 'pre'} | {100 * row['train_acc']:.1f} | {100 * row['val_acc']:.1f} | {100 * row['val_acc_recalibrated']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunebal.bench.aim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KNOB=VALUE")
    parser.add_argument("--data", dest="data_values", action="append", default=[], metavar="KNOB=VALUE")
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--probe-steps", type=int, default=30)
    parser.add_argument("--depth-seeds", type=int, default=None, help="seeds of the depth part (default: --seeds)")
    parser.add_argument("--starts", default="0,1,2,4,6")
    parser.add_argument("--resnet-batch", type=int, default=16)
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak-RSS runs of the resnet part")
    parser.add_argument("--entries", default=",".join(ENTRIES), help="comma-separated entries of the compare part")
    parser.add_argument("--resnet-steps", type=int, default=3)
    parser.add_argument("--resnet-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-knobs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.resnet_child:
        print(json.dumps(resnet_child(args.resnet_child, args.resnet_batch, args.resnet_steps, json.loads(args.child_knobs))))
        return 0
    torch.set_num_threads(1)
    overrides = parse_assignments(args.overrides)
    data_values = parse_assignments(args.data_values)
    seeds = list(range(args.seeds))
    parts = [p for p in args.parts.split(",") if p]
    results: dict[str, Any] = {
        "budget": {"seeds": seeds, "epochs": args.epochs, "set": overrides, "data": data_values, "threads": 1,
                   "probe_steps": args.probe_steps, "timing_steps": args.timing_steps}
    }
    start = time.perf_counter()

    def save() -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1, default=str)

    for part in parts:
        t0 = time.perf_counter()
        _log(f"== {part}")
        if part == "params":
            results["params"] = part_params()
        elif part == "timing":
            results["timing"] = part_timing(overrides, data_values, args.timing_steps)
        elif part == "compare":
            results["compare"] = part_compare(seeds, args.epochs, overrides, data_values, 0, args.entries.split(","))
        elif part == "unimodal":
            results["unimodal"] = part_unimodal(seeds, args.epochs, overrides, data_values)
        elif part == "depth":
            dseeds = list(range(args.depth_seeds)) if args.depth_seeds is not None else seeds
            results["depth"] = part_depth(dseeds, args.epochs, overrides, data_values, args.probe_steps)
        elif part == "start":
            starts = [int(x) for x in args.starts.split(",")]
            results["start"] = part_start(seeds, args.epochs, overrides, data_values, starts, results.get("compare"))
        elif part == "resnet":
            results["resnet"] = part_resnet(args.resnet_batch, args.resnet_steps, {}, rss=not args.no_rss)
        elif part == "flops":
            results["flops"] = part_flops(overrides, data_values, args.resnet_batch)
        elif part == "bn":
            results["bn"] = part_bn(overrides, data_values, args.epochs)
        else:
            raise SystemExit(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
        results["budget"][f"{part}_s"] = time.perf_counter() - t0
        save()
    results["budget"]["total_s"] = time.perf_counter() - start
    save()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
