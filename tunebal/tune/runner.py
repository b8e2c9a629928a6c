"""Run a search: Tuner with ASHA/FIFO and Optuna/random search, restore, and the summary.

``run_search`` validates everything before Ray starts (options, --name, --storage, the
experiment directory, resources, the --address, the space, knobs and dataset, and on
--resume the experiment's saved state; tunebal/tune/preflight.py), so bad input is one line
and exit 2 within seconds, never a half-started cluster or a wait without end. After ``Tuner.fit`` the best trial by
*validation* accuracy (over all its epochs) has its best checkpoint evaluated once on
*test* (as a Ray task with the trial's resources), and the summary is printed and written
as ``summary.json`` and ``trials.csv`` in the experiment directory.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunebal.errors import ConfigError
from tunebal.tune import preflight
from tunebal.tune.spaces import apply_overrides, load_space, searched_knobs

METRIC, MODE = "val/acc", "max"
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("optuna", "random")


@dataclass
class SearchOptions:
    method: str
    dataset: str = "synth"
    num_samples: int = 8
    max_epochs: int = 8
    scheduler: str = "asha"
    search: str = "optuna"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    storage: str = "~/tunebal_results"
    name: str | None = None
    resume: bool = False
    address: str | None = None
    seed: int = 0
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_failures: int = 2
    space_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    data_values: dict[str, Any] = field(default_factory=dict)
    verbose: int = 1
    crash_once_at_epoch: int | None = None  # test hook: kill the worker once after this epoch
    #: the option names given explicitly (the CLI sets it); on --resume the others come from the
    #: experiment's stored options (tunebal/tune/stored_options.py). None: values != defaults.
    explicit: frozenset[str] | None = None

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler '{self.scheduler}'; valid: {', '.join(SCHEDULERS)}")
        if self.search not in SEARCHERS:
            raise ConfigError(f"unknown search '{self.search}'; valid: {', '.join(SEARCHERS)}")
        for name, value, low in (
            ("--num-samples", self.num_samples, 1),
            ("--max-epochs", self.max_epochs, 1),
            ("--grace-period", self.grace_period, 1),
        ):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if self.grace_period > self.max_epochs:
            raise ConfigError(f"--grace-period ({self.grace_period}) must be <= --max-epochs ({self.max_epochs})")
        if self.gpus_per_trial > 1:
            raise ConfigError(
                f"--gpus-per-trial {self.gpus_per_trial:g}: a trial trains on one device (no data-parallel training "
                "inside a trial); use at most 1, and more trials (or fractions to pack several on one GPU)"
            )
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        preflight.check_numbers(self)
        if self.resume and self.name is None:
            raise ConfigError("--resume needs --name of the experiment to resume")
        if self.name is not None:
            preflight.check_name(self.name)

    @property
    def experiment_dir(self) -> Path:
        assert self.name is not None
        return Path(self.storage).expanduser().resolve() / self.name


def check_before_ray(opts: SearchOptions) -> None:
    """Options, name, storage, experiment directory, local resources and the address: all
    checked in seconds, before anything is generated or Ray starts."""
    import datetime as dt

    from tunebal.data import get_dataset_spec
    from tunebal.methods import get_method_class

    opts.validate()
    get_method_class(opts.method)  # unknown names fail before anything is created
    get_dataset_spec(opts.dataset)
    preflight.check_storage(opts.storage)
    if opts.name is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        opts.name = f"{opts.method}-{opts.dataset}-{stamp}"
    preflight.check_experiment_dir(opts.experiment_dir, opts.resume)
    if not opts.resume:
        from tunebal.tune import state_guard

        state_guard.load_key(create=True)  # the key the resume manifest is written with
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        preflight.probe_address(address)
    elif not _ray_initialized():
        preflight.check_resources(
            opts.cpus_per_trial, opts.gpus_per_trial, preflight.local_cpus(), preflight.local_gpus(), "this machine"
        )


def _ray_initialized() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def check_cluster(opts: SearchOptions) -> None:
    """After connecting: a trial must fit the cluster's resources (Tune would wait forever)."""
    import ray

    total = ray.cluster_resources()
    preflight.check_resources(
        opts.cpus_per_trial, opts.gpus_per_trial, float(total.get("CPU", 0)), float(total.get("GPU", 0)), "the Ray cluster"
    )


def prepare(opts: SearchOptions) -> dict[str, Any]:
    """Validate options, space and data knobs; warm the dataset cache. Returns the param space."""
    from tunebal.data import build_dataset, get_dataset_spec
    from tunebal.methods import get_method_class

    opts.validate()
    method_cls = get_method_class(opts.method)
    spec = get_dataset_spec(opts.dataset)
    opts.data_values = spec.knobs.resolve(opts.data_values, where="--data ")
    space = load_space(opts.method, opts.dataset, opts.max_epochs, opts.space_file)
    space = apply_overrides(space, opts.overrides, opts.method, opts.dataset)
    if "epochs" in space:
        raise ConfigError("set the training budget with --max-epochs, not an 'epochs' knob in the space")
    data = build_dataset(opts.dataset, opts.data_values)  # fails fast on bad data; caches synth, prepares raw roots
    if data.info.get("prepared"):  # trials on every node read the prepared shards, never the raw files
        opts.data_values["root"] = data.info["prepared"]
    fusion = space.get("fusion", "concat")
    for choice in getattr(fusion, "categories", [fusion]):
        method_cls.check_compatible(len(data.modalities), choice)
    method_cls.check_task(data.task, data.name)  # e.g. a balancing method on a regression target
    if opts.name is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        opts.name = f"{opts.method}-{opts.dataset}-{stamp}"
    return space


def init_ray(address: str | None, include_dashboard: bool | None = None) -> None:
    """Connect to ``address``, or to the cluster of a submitted job (RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if address:
        preflight.probe_address(address)
        ray.init(address=address, log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=include_dashboard, log_to_driver=False)


STUDY_FILE = "optuna.journal"


def study_storage(experiment_dir: Path):
    """The Optuna study as a journal file in the experiment directory, so ``optuna-dashboard``
    and Optuna's analysis read it: ``optuna.load_study(study_name=NAME, storage=study_storage(DIR))``."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    experiment_dir.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(experiment_dir / STUDY_FILE)))


def build_tuner(opts: SearchOptions, space: dict[str, Any]):
    """The Tuner for a fresh experiment."""
    # Tune warns whenever short epochs force frequent experiment snapshots (num_to_keep=1);
    # that is expected for small datasets and not actionable, so keep the console readable.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tunebal.tune import state_guard
    from tunebal.tune.trainable import make_trainable

    trainable = make_trainable(
        opts.method, opts.dataset, opts.data_values, opts.max_epochs, opts.cpus_per_trial, opts.gpus_per_trial,
        opts.crash_once_at_epoch,
    )
    if opts.scheduler == "asha":
        scheduler = ASHAScheduler(
            max_t=opts.max_epochs, grace_period=opts.grace_period, reduction_factor=opts.reduction_factor
        )
    else:
        scheduler = FIFOScheduler()
    if opts.search == "optuna" and searched_knobs(space):
        import optuna

        from tunebal.tune.optuna_asha import AshaAwareOptunaSearch

        searcher = AshaAwareOptunaSearch(
            metric=METRIC, mode=MODE, sampler=optuna.samplers.TPESampler(seed=opts.seed), max_epochs=opts.max_epochs,
            study_name=opts.name, storage=study_storage(opts.experiment_dir),
        )
        if opts.max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=opts.max_concurrent)
    else:
        searcher = BasicVariantGenerator(random_state=opts.seed, max_concurrent=opts.max_concurrent or 0)
    from tunebal.tune import console

    tune_config = tune.TuneConfig(
        metric=METRIC,
        mode=MODE,
        scheduler=scheduler,
        search_alg=searcher,
        num_samples=opts.num_samples,
        max_concurrent_trials=opts.max_concurrent,
        trial_name_creator=console.trial_name(opts.method),  # e.g. aim_3f2a1_00002, not ~150 characters
        trial_dirname_creator=console.trial_name(opts.method),
    )
    callbacks = [state_guard.make_callback(opts.experiment_dir)]
    if opts.verbose == 1:  # the default: one line per trial-epoch; 2 gives Ray's status tables
        callbacks.append(console.make_callback(opts.max_epochs))
    run_config = tune.RunConfig(
        name=opts.name,
        storage_path=str(Path(opts.storage).expanduser().resolve()),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
        ),
        verbose=0 if opts.verbose <= 1 else 2,
        callbacks=callbacks,
    )
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def restore_tuner(opts: SearchOptions):
    """Tuner.restore of an interrupted experiment (its pickled state verified by
    ``state_guard.verify`` before Ray started): unfinished and errored trials resume from
    their last checkpoints."""
    from ray import tune

    from tunebal.tune.trainable import make_trainable

    path = opts.experiment_dir
    if not tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"no experiment to resume at {path}")
    trainable = make_trainable(
        opts.method, opts.dataset, opts.data_values, opts.max_epochs, opts.cpus_per_trial, opts.gpus_per_trial,
        opts.crash_once_at_epoch,
    )
    return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)


def run_search(
    opts: SearchOptions, include_dashboard: bool | None = None, space: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Validate, run (or resume) the search, evaluate the best trial on test, write the summary.

    ``space`` replaces the YAML space with a ready Tune param space (programmatic use).
    """
    from tunebal import signals
    from tunebal.tune import state_guard, stored_options
    from tunebal.tune.report import summarize

    check_before_ray(opts)
    if opts.resume:
        state_guard.verify(opts.experiment_dir)  # before Ray unpickles anything in it
        # the search continues as it was started (data, budget, test split)
        stored_options.apply_on_resume(opts, opts.experiment_dir, opts.explicit)
    requested = replace(opts, data_values=dict(opts.data_values), overrides=dict(opts.overrides))
    yaml_space = prepare(opts)
    space = yaml_space if space is None else space
    init_ray(opts.address, include_dashboard)
    signals.install()  # ray.init replaced the SIGTERM handler
    check_cluster(opts)
    if not opts.resume:  # every check passed: the experiment directory is created now
        stored_options.write(requested, opts.experiment_dir)
    # Tune's legacy output engine prints nothing at verbose 0, so the console is tunebal's one
    # line per trial-epoch (tunebal/tune/console.py); verbose 2 (`search -v`): Ray's status tables.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if opts.verbose >= 2 else "0"
    tuner = restore_tuner(opts) if opts.resume else build_tuner(opts, space)
    results = tuner.fit()
    return summarize(results, opts, searched_knobs(space))
