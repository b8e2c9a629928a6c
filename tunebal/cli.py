"""The ``tunebal`` command: search, train, methods, datasets, bench.

Bad input (unknown method, dataset or knob, a bad range, corrupt data or checkpoint) is one
line on stderr and exit code 2; a diverged loss in ``train`` exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from tunebal.errors import ConfigError, TunebalError
from tunebal.tune.submit import DEFAULT_CLUSTER_PYTHON


class _Parser(argparse.ArgumentParser):
    """One line and exit 2 on a usage error; ``--help`` shows every option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise ConfigError(f"{self.prog}: {message}")


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", help="balancing method (see `tunebal methods`)")
    p.add_argument("--dataset", default="synth", help="dataset (see `tunebal datasets`); default synth")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KNOB=VALUE",
                   help="fix a common or method knob (repeatable), e.g. --set lr=0.01")
    p.add_argument("--data", dest="data_values", action="append", default=[], metavar="KNOB=VALUE",
                   help="dataset knob (repeatable), e.g. --data n_train=1600")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunebal", description="Ray Tune hyperparameter search for balanced multimodal learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="hyperparameter search with Ray Tune (ASHA + Optuna)")
    _add_common_run_args(s)
    s.add_argument("--num-samples", type=int, default=8)
    s.add_argument("--max-epochs", type=int, default=8, help="training epochs of a trial that ASHA never stops")
    s.add_argument("--scheduler", default="asha", help="asha (default) or fifo")
    s.add_argument("--search", default="optuna", help="optuna (TPE, seeded; default) or random")
    s.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    s.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: halving rate")
    s.add_argument("--cpus-per-trial", type=float, default=1.0)
    s.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractional values pack trials on one GPU")
    s.add_argument("--max-concurrent", type=int, default=None)
    s.add_argument("--max-failures", type=int, default=2, help="restarts of a crashed trial from its checkpoint")
    s.add_argument("-v", "--verbose", action="store_true", help="Ray's status tables instead of one line per trial-epoch")
    s.add_argument("--storage", default="~/tunebal_results", help="persistent experiment root")
    s.add_argument("--name", default=None,
                   help="experiment name, one directory under --storage (default METHOD-DATASET-TIMESTAMP); "
                        "an existing experiment is only continued with --resume")
    s.add_argument("--resume", action="store_true",
                   help="resume the experiment --name (Tuner.restore, after verifying its tunebal_state.json)")
    s.add_argument("--address", default=None, help="address of an existing Ray cluster")
    s.add_argument("--space", default=None, help="a YAML search space instead of search_spaces/METHOD.yaml")
    s.add_argument("--seed", type=int, default=0, help="seed of the searcher")

    j = sub.add_parser("submit", help="run a search on a Ray cluster as a Ray job (see docs/cluster.md)")
    j.add_argument("--dashboard", required=True, metavar="URL", help="the head's dashboard, e.g. http://HEAD:8265")
    j.add_argument("--python", default=DEFAULT_CLUSTER_PYTHON,
                   help="absolute path of the cluster's Python with tunebal installed (the launch/ configs' venv)")
    j.add_argument("--install", action="store_true",
                   help="upload this tunebal and install its requirements with Ray's pip runtime env instead")
    j.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the job")
    j.add_argument("--wait-timeout", type=float, default=24 * 3600.0, help="seconds to follow the job")
    j.add_argument("search_args", nargs=argparse.REMAINDER, metavar="METHOD [search options]",
                   help="what `tunebal search` gets on the cluster, e.g. aim --dataset ks --num-samples 64")

    t = sub.add_parser("train", help="train one configuration without Ray")
    _add_common_run_args(t)
    t.add_argument("--out", default=None,
                   help="output directory, refused if it holds a run (default ~/tunebal_runs/METHOD-DATASET, "
                        "or METHOD-DATASET-2, -3 ... when that holds one)")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("evaluate", help="evaluate an Arrow checkpoint on a split (default test)")
    e.add_argument("checkpoint", help="a tunebal_checkpoint.arrow / best.arrow file")
    e.add_argument("--split", default="test", help="train, val or test")
    e.add_argument("--device", default="auto")

    pr = sub.add_parser("prepare", help="decode a raw dataset once into Arrow shards (resumable)")
    pr.add_argument("dataset", help="dataset with raw files (see `tunebal datasets`)")
    pr.add_argument("--root", default=None, help="raw dataset root (manifest: defaults to the CSV's folder)")
    pr.add_argument("--out", default=None,
                    help="directory of the prepared shards and manifest.json (default: where --data root=RAW looks, "
                         "$TUNEBAL_CACHE/prepared/DATASET-HASH)")
    pr.add_argument("--data", dest="data_values", action="append", default=[], metavar="KNOB=VALUE",
                    help="preparation knob (repeatable), e.g. --data profile=ogm22k")
    pr.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all CPUs)")
    pr.add_argument("--shard-size", type=int, default=256, help="clips per shard file")
    pr.add_argument("--skip-bad", action="store_true", help="skip absent or undecodable clips and list them in skipped.txt")
    pr.add_argument("--verify", action="store_true", help="also check every shard's sha256 when already prepared")
    pr.add_argument("--shard", default=None, metavar="I/N",
                    help="prepare only part I of N (machines sharing --out); finish with a run without --shard")
    pr.add_argument("--trust-pickle", action="store_true",
                    help="allow loading a dataset distributed as a Python pickle (CMU-MOSI); it can run code")
    pr.add_argument("--no-progress", action="store_true")

    sub.add_parser("methods", help="list methods and their knobs")
    sub.add_parser("datasets", help="list datasets and their knobs")

    b = sub.add_parser("bench", help="measured benchmarks (ratios in one process)")
    b.add_argument("what", help="checkpoint | imbalance | data (methods: python -m tunebal.bench.methods; AIM: python -m tunebal.bench.aim)")
    b.add_argument("--seeds", type=int, default=3)
    b.add_argument("--epochs", type=int, default=None)
    return parser


def _assignments(items: Sequence[str], flag: str = "--set") -> dict[str, str]:
    from tunebal.knobs import parse_assignments

    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} expects knob=value, got {item!r}")
    return parse_assignments(items)


def cmd_methods() -> None:
    from tunebal.config import COMMON_KNOBS
    from tunebal.methods import METHODS, get_method_class

    get_method_class("baseline")
    print("common knobs (every method):")
    for knob in COMMON_KNOBS:
        print("  " + knob.describe())
    for name in sorted(METHODS):
        cls = METHODS[name]
        print(f"\n{name}: {cls.description}")
        for knob in cls.KNOBS:
            print("  " + knob.describe())


def cmd_prepare(args: argparse.Namespace) -> int:
    from tunebal.data import get_dataset_spec
    from tunebal.data.prepare import run_prepare

    spec = get_dataset_spec(args.dataset)
    if spec.preparer is None:
        raise ConfigError(f"dataset '{args.dataset}' has nothing to prepare (it is generated in memory)")
    values = _assignments(args.data_values, "--data")
    unknown = sorted(set(values) - set(spec.preparer.knobs.names()))
    if unknown:
        raise ConfigError(
            f"unknown preparation knob(s) {', '.join(unknown)} for {args.dataset}; valid: {', '.join(spec.preparer.knobs.names())}"
        )
    if "manifest" in values:
        values["manifest"] = str(Path(values["manifest"]).expanduser().resolve())
    root = args.root
    if root is None:
        if args.dataset != "manifest" or "manifest" not in values:
            raise ConfigError("prepare needs --root RAW (the raw dataset's folder)")
        root = str(Path(values["manifest"]).expanduser().resolve().parent)
    out = args.out
    if out is None:
        from tunebal.data.prepared import default_prepared_dir

        out = str(default_prepared_dir(spec.preparer, root, values))
    part = None
    if args.shard is not None:
        try:
            i, n = (int(v) for v in args.shard.split("/"))
        except ValueError:
            raise ConfigError(f"--shard expects I/N (e.g. 0/4), got {args.shard!r}") from None
        part = (i, n)
    report = run_prepare(
        spec.preparer, root, out, values, workers=args.workers, skip_bad=args.skip_bad,
        shard_size=args.shard_size, verify=args.verify, progress=not args.no_progress, part=part,
        trust_pickle=args.trust_pickle,
    )
    print(f"tunebal: {report.line()}")
    if report.missing:
        print(f"tunebal: {len(report.missing)} missing clips listed in {Path(out) / 'missing.txt'}")
    if report.skipped:
        print(f"tunebal: {len(report.skipped)} skipped clips listed in {Path(out) / 'skipped.txt'}")
    if report.part is None:
        print(f"tunebal: use it with --dataset {args.dataset} --data root={out}")
    return 0


def cmd_datasets() -> None:
    from tunebal.data import DATASETS

    for name, spec in sorted(DATASETS.items()):
        print(f"{name}: {spec.description}")
        print("  knobs (--data NAME=VALUE):")
        for knob in spec.knobs:
            print("    " + knob.describe())


def search_options(args: argparse.Namespace):
    """The SearchOptions of a parsed ``tunebal search`` command line."""
    from tunebal.tune.runner import SearchOptions

    return SearchOptions(
        method=args.method, dataset=args.dataset, num_samples=args.num_samples, max_epochs=args.max_epochs,
        scheduler=args.scheduler, search=args.search, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, storage=args.storage,
        name=args.name, resume=args.resume, address=args.address, seed=args.seed,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor, max_failures=args.max_failures,
        space_file=args.space, overrides=_assignments(args.overrides), data_values=_assignments(args.data_values, "--data"),
        verbose=2 if getattr(args, "verbose", False) else 1,
    )


_SEARCH_DESTS = {"space": "space_file"}  # argparse dest -> SearchOptions field, where they differ


def explicit_search_options(argv: Sequence[str]) -> frozenset[str]:
    """The SearchOptions fields given on a ``tunebal search`` command line (not defaulted):
    on --resume only those are compared with, the others taken from, the stored options."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    search = sub.choices["search"]
    for action in search._actions:
        if action.dest not in ("help", "method"):
            action.default = None
    namespace = parser.parse_args(list(argv))
    given = {k for k, v in vars(namespace).items() if v is not None and k != "command"}
    return frozenset(_SEARCH_DESTS.get(k, k) for k in given)


def cmd_search(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from tunebal.tune.runner import run_search

    opts = search_options(args)
    opts.explicit = explicit_search_options(argv)
    summary = run_search(opts)
    from tunebal import signals

    if signals.interrupted():  # Tune stopped gracefully and saved the experiment
        print(f"tunebal: interrupted; continue with --resume --name {opts.name} --storage {args.storage}", file=sys.stderr)
        return 130
    return 0 if summary["best"] is not None else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from tunebal.tune.submit import SubmitOptions, submit

    return submit(SubmitOptions(
        dashboard=args.dashboard, search_args=list(args.search_args), python=args.python, install=args.install,
        wait=not args.no_wait, wait_timeout_s=args.wait_timeout,
    ))


def cmd_train(args: argparse.Namespace) -> int:
    from tunebal.train import train_once

    out = Path(args.out or f"~/tunebal_runs/{args.method}-{args.dataset}").expanduser()
    result = train_once(
        args.method, args.dataset, _assignments(args.overrides), _assignments(args.data_values, "--data"), out,
        device=args.device, progress=not args.no_progress, out_explicit=args.out is not None,
    )
    out = Path(result["out"])
    print(json.dumps(result, indent=2))
    print(f"tensorboard --logdir {out.resolve()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tunebal.checkpoint import read_checkpoint_meta
    from tunebal.data import build_dataset
    from tunebal.engine import Engine
    from tunebal.tune.preflight import check_device

    if args.split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split '{args.split}'; valid: train, val, test")
    check_device(args.device)
    if os.path.isdir(args.checkpoint):  # a Tune checkpoint directory, as summary.json records it
        from tunebal.checkpoint import CHECKPOINT_FILENAME

        args.checkpoint = os.path.join(args.checkpoint, CHECKPOINT_FILENAME)
    meta = read_checkpoint_meta(args.checkpoint)
    try:
        method, dataset, config = meta["method"], meta["dataset"], meta["config"]
    except (KeyError, TypeError):
        raise ConfigError(f"{args.checkpoint} is not a tunebal training checkpoint (no method/dataset/config)") from None
    data = build_dataset(dataset, meta.get("data", {}))
    engine = Engine(data, method, config, device=args.device)
    engine.load(args.checkpoint)
    metrics = {f"{args.split}/{k}": v for k, v in engine.evaluate(args.split).items()}
    print(json.dumps({"checkpoint": args.checkpoint, "epoch": meta.get("epoch"), **metrics}, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "checkpoint":
        from tunebal.bench.checkpoint_io import format_table, run

        print(format_table(run()))
        return 0
    if args.what == "imbalance":
        from tunebal.bench.imbalance import run

        run(seeds=args.seeds, epochs=args.epochs)
        return 0
    if args.what == "data":
        from tunebal.bench.data import main as data_main

        data_main([])
        return 0
    raise ConfigError(f"unknown benchmark '{args.what}'; valid: checkpoint, imbalance, data")


def main(argv: Sequence[str] | None = None) -> int:
    from tunebal import signals

    signals.install()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        if args.command == "methods":
            cmd_methods()
            return 0
        if args.command == "datasets":
            cmd_datasets()
            return 0
        if args.command == "search":
            return cmd_search(args, argv)
        if args.command == "submit":
            return cmd_submit(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "prepare":
            return cmd_prepare(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return cmd_bench(args)
    except TunebalError as exc:
        print(f"tunebal: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tunebal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
