"""The one training loop and evaluation. Imports no Ray.

``Engine`` builds the model, optimiser, schedule and method from a flat config (common knobs
+ the method's knobs), trains one epoch at a time calling the method's hooks
(tunebal/methods/base.py), evaluates any split without dropping samples, and saves/loads its
complete state as an Arrow checkpoint so that a resumed run continues bit-exactly on CPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from tunebal import __version__
from tunebal.bn import recalibrate_batchnorm
from tunebal.checkpoint import check_checkpoint_matches, load_checkpoint, one_line, save_checkpoint
from tunebal.config import COMMON_KNOBS
from tunebal.data.base import MultimodalData, Source, Split
from tunebal.errors import CheckpointError, ConfigError, NonFiniteLossError
from tunebal.methods import Method, StepContext, get_method_class
from tunebal.metrics import (
    classification_metrics,
    modality_metrics,
    regression_metrics,
    regression_modality_metrics,
    sign_hits,
)
from tunebal.models import MultimodalModel, build_model

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def split_config(method_cls: type[Method], config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat config into (common knobs, method knobs), both validated and defaulted.

    Keys starting with ``data.`` belong to the dataset and are ignored here.
    """
    common_in, method_in = {}, {}
    common_names, method_names = set(COMMON_KNOBS.names()), set(method_cls.KNOBS.names())
    for key, value in config.items():
        if key.startswith("data."):
            continue
        if key in common_names:
            common_in[key] = value
        elif key in method_names:
            method_in[key] = value
        else:
            valid = sorted(common_names | method_names)
            raise ConfigError(f"unknown knob '{key}' for method '{method_cls.name}'; valid knobs: {', '.join(valid)}")
    return COMMON_KNOBS.resolve(common_in), method_cls.KNOBS.resolve(method_in, where=f"{method_cls.name}: ")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Plan:
    """The sampler of a persistent loader: the batches of the current pass, replaced before each pass."""

    def __init__(self) -> None:
        self.items: list[tuple[int, bool, list[int]]] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _PlannedBatches:
    """A map-style dataset whose items are whole batches: ``(epoch, train, indices)`` -> batch.

    The engine's plan (seeded order, no dropped evaluation samples) is the sampler, so the
    loader's workers only decode; ``batch_size=None`` turns off the loader's own batching.
    """

    def __init__(self, source: Source) -> None:
        self.source = source

    def __getitem__(self, item: tuple[int, bool, list[int]]):
        epoch, train, indices = item
        return self.source.batch(indices, epoch=epoch, train=train)

    def __len__(self) -> int:
        return len(self.source)


class Engine:
    """Trains and evaluates one configuration; ``epoch`` counts completed epochs."""

    def __init__(
        self,
        data: MultimodalData,
        method: str,
        config: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        method_cls = get_method_class(method)
        self.common, self.method_knobs = split_config(method_cls, config or {})
        self.config = {**self.common, **self.method_knobs}
        method_cls.check_compatible(len(data.modalities), self.common["fusion"])
        method_cls.check_task(data.task, data.name)
        self.regression = data.task == "regression"  # float targets, one output, L1 (e.g. CMU-MOSI's score)
        self.data = data
        self.method_name = method
        self.device = pick_device(device)
        self.epoch = 0
        self.global_step = 0
        self.use_amp = self.common["amp"] and self.device.type == "cuda"
        if self.use_amp and not torch.cuda.is_bf16_supported():
            warnings.warn(f"tunebal: {torch.cuda.get_device_name(self.device)} has no bf16; training in fp32", RuntimeWarning)
            self.use_amp = False
        seed_everything(self.common["seed"])

        backbone = self.common["backbone"]
        if backbone == "auto":
            backbone = "small" if data.name == "synth" else "resnet18"
        if self.common["pretrained"] and backbone != "resnet18":
            raise ConfigError(f"knob 'pretrained' loads ResNet18 ImageNet weights; backbone is '{backbone}'")
        self.model: MultimodalModel = build_model(
            data.modalities,
            data.kinds,
            {m: data.input_shape(m) for m in data.modalities},
            data.num_classes,
            backbone=backbone,
            fusion=self.common["fusion"],
            width=self.common["width"],
            pretrained=self.common["pretrained"],
        ).to(self.device)
        if self.use_amp:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._resident = self._place_data()
        self._loaders: dict[int, tuple[_Plan, Any]] = {}
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.method: Method = method_cls(self.method_knobs, data.modalities, data.num_classes, self.common["seed"])
        self.method.regression = self.regression
        self.method.setup(self)

    # --- construction ----------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.common
        params = list(self.model.parameters())
        if c["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"])
        if c["optimizer"] == "adam":
            return torch.optim.Adam(params, lr=c["lr"], weight_decay=c["weight_decay"])
        return torch.optim.AdamW(params, lr=c["lr"], weight_decay=c["weight_decay"])

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        c = self.common
        if c["lr_schedule"] == "step":
            return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=c["lr_step"], gamma=c["lr_gamma"])
        if c["lr_schedule"] == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=c["epochs"])
        return torch.optim.lr_scheduler.ConstantLR(self.optimizer, factor=1.0, total_iters=0)

    # --- data ------------------------------------------------------------------------------
    RESIDENT_BYTES = 2 << 30

    def _place_data(self) -> dict[int, Split]:
        """On CUDA, an in-memory dataset smaller than 2 GiB is copied to the GPU once, so batches
        are gathered on the device; larger ones are gathered on the CPU into pinned memory and
        copied asynchronously. Streaming (sharded) datasets always go through loader workers.
        Keyed by ``id`` of the CPU split."""
        splits = [self.data.train, self.data.val, self.data.test]
        if self.device.type != "cuda" or not all(isinstance(s, Split) for s in splits):
            return {}
        size = sum(x.numel() * x.element_size() for s in splits for x in s.inputs.values())
        if size > self.RESIDENT_BYTES:
            return {}
        return {
            id(s): Split({m: x.to(self.device) for m, x in s.inputs.items()}, s.labels.to(self.device)) for s in splits
        }

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when ``amp`` is on; a no-op on CPU."""
        if self.use_amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        x = self.data.to_model_input(modality, x.to(self.device, non_blocking=True))
        if self.use_amp and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def batch_plan(self, n: int, shuffle: bool, batch_size: int | None = None) -> list[torch.Tensor]:
        """The index batches of one pass over ``n`` samples.

        Training order is a permutation seeded by (seed, epoch), so a resumed run sees the same
        batches. Evaluation visits every sample in order; nothing is dropped. In training a
        trailing batch of a single sample is skipped (BatchNorm cannot train on it).
        """
        bs = batch_size or self.common["batch_size"]
        if shuffle:
            gen = torch.Generator().manual_seed(self.common["seed"] * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        plan = [order[start : start + bs] for start in range(0, n, bs)]
        if shuffle and n > 1 and len(plan[-1]) == 1:
            plan.pop()
        return plan

    def loader_workers(self) -> int:
        """Loader worker processes for a streaming dataset (``loader_workers`` knob; -1: one per
        CPU thread this process may use, at most 8)."""
        workers = self.common["loader_workers"]
        return min(8, torch.get_num_threads()) if workers < 0 else workers

    def iterate(self, split: Source, shuffle: bool, batch_size: int | None = None) -> Iterator[Batch]:
        """Mini-batches of ``split`` on the device, in the order of :meth:`batch_plan`.

        In-memory splits are gathered directly (on the GPU when resident). Streaming splits are
        read, decoded and augmented by a ``torch.utils.data.DataLoader`` with
        :meth:`loader_workers` workers; augmentation is seeded by (dataset seed, epoch, sample
        index) inside the source, so the batches do not depend on the worker count.
        """
        plan = self.batch_plan(len(split), shuffle, batch_size)
        if getattr(split, "streaming", False):
            yield from self._iterate_streaming(split, plan, train=shuffle)
            return
        source = self._resident.get(id(split), split)
        pin = self.device.type == "cuda" and source is split
        for idx in plan:
            if shuffle:
                inputs, labels = source.batch(idx.to(source.labels.device))
            else:
                inputs, labels = source.slice(int(idx[0]), int(idx[-1]) + 1)
            if pin:
                inputs = {m: x.pin_memory() for m, x in inputs.items()}
            yield {m: self._to_device(m, x) for m, x in inputs.items()}, labels.to(self.device, non_blocking=True)

    def _loader(self, split: Source) -> tuple["_Plan", Any]:
        """One DataLoader per streaming split, its workers kept for the engine's lifetime
        (``persistent_workers``), so memory maps stay open and rows stay verified across epochs;
        its sampler is the plan of the current pass."""
        from torch.utils.data import DataLoader

        entry = self._loaders.get(id(split))
        if entry is None:
            plan, workers = _Plan(), self.loader_workers()
            loader = DataLoader(
                _PlannedBatches(split),
                sampler=plan,
                batch_size=None,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                prefetch_factor=2 if workers else None,
            )
            entry = self._loaders[id(split)] = (plan, loader)
        return entry

    def _iterate_streaming(self, split: Source, plan: list[torch.Tensor], train: bool) -> Iterator[Batch]:
        items, loader = self._loader(split)
        items.items = [(self.epoch, train, idx.tolist()) for idx in plan]
        for inputs, labels in loader:
            yield {m: self._to_device(m, x) for m, x in inputs.items()}, labels.to(self.device, non_blocking=True)

    # --- training --------------------------------------------------------------------------
    def train_step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> StepContext:
        """One optimisation step: the method's ``train_step`` (by default :meth:`joint_step`)."""
        return self.method.train_step(self, inputs, labels)

    def joint_step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> StepContext:
        """The standard step with every method hook in place (one forward, one backward, one update)."""
        method, model = self.method, self.model
        ctx = StepContext(model=model, inputs=inputs, labels=labels, epoch=self.epoch, step=self.global_step)
        with self.autocast():
            ctx.encoded = model.encode(inputs, keep_block_inputs=method.needs_block_inputs)
            ctx.features = method.before_fusion(ctx)
            ctx.logits = model.head(ctx.features)
            ctx.loss = method.loss(ctx)
        if not torch.isfinite(ctx.loss.detach()):
            raise NonFiniteLossError(
                f"training loss became {float(ctx.loss.detach())} at epoch {self.epoch}, step {self.global_step} "
                f"(method {self.method_name}, lr {self.common['lr']:g})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        ctx.loss.backward()
        method.after_backward(ctx)
        if self.common["grad_clip"] > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.common["grad_clip"])
        self.optimizer.step()
        method.after_step(ctx)
        self.global_step += 1
        return ctx

    def train_epoch(self, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """Train one epoch; returns train loss/accuracy, timings and the method's internals."""
        self.model.train()
        self.method.on_epoch_start(self)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = steps = 0
        total = math.ceil(len(self.data.train) / self.common["batch_size"])
        start = time.perf_counter()
        for inputs, labels in self.iterate(self.data.train, shuffle=True):
            ctx = self.train_step(inputs, labels)
            n = labels.shape[0]
            loss_sum += ctx.loss.detach().float() * n
            if self.regression:  # train/acc: Acc-2 with zeros, as val/acc
                correct += sign_hits(ctx.logits.detach().squeeze(1), labels).sum()
            else:
                correct += (ctx.logits.detach().argmax(dim=1) == labels).sum()
            seen += n
            steps += 1
            if progress is not None:
                progress(steps, total)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_time = time.perf_counter() - start
        self.method.on_epoch_end(self)
        self.scheduler.step()
        self.epoch += 1
        out = {
            "train/loss": float(loss_sum) / max(seen, 1),
            "train/acc": float(correct) / max(seen, 1),
            "time/train_s": train_time,
            "time/step_ms": 1000.0 * train_time / max(steps, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        out.update({f"method/{k}": v for k, v in self.method.metrics().items()})
        return out

    @torch.no_grad()
    def evaluate(self, split: Split | str, batch_size: int | None = None) -> dict[str, float]:
        """Loss, accuracy, macro-F1, mAP, per-modality zero-out accuracy and ρ over every sample;
        for a regression target the L1 loss, :func:`~tunebal.metrics.regression_metrics` (``acc``
        is Acc-2 with zeros) and per-modality Acc-2 and MAE."""
        if isinstance(split, str):
            split = getattr(self.data, split)
        self.model.eval()
        all_logits, all_labels = [], []
        uni: dict[str, list[torch.Tensor]] = {m: [] for m in self.data.modalities}
        for inputs, labels in self.iterate(split, shuffle=False, batch_size=batch_size or 2 * self.common["batch_size"]):
            with self.autocast():
                feats = self.model.encode(inputs).features
                all_logits.append(self.method.eval_logits(self.model, feats).float().cpu())
                for m, lg in self.model.unimodal_logits(feats).items():
                    uni[m].append(lg.float().cpu())
            all_labels.append(labels.cpu())
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        if self.regression:
            out = {"loss": float(F.l1_loss(logits.squeeze(1), labels))}
            out.update(regression_metrics(logits.squeeze(1), labels))
            out.update(regression_modality_metrics({m: torch.cat(v).squeeze(1) for m, v in uni.items()}, labels))
            return out
        out = {"loss": float(F.cross_entropy(logits, labels))}
        out.update(classification_metrics(logits, labels, self.data.num_classes))
        out.update(modality_metrics({m: torch.cat(v) for m, v in uni.items()}, labels))
        return out

    def run_epoch(self, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """Train one epoch, then evaluate on validation (the split used for model selection)."""
        start = time.perf_counter()
        metrics = self.train_epoch(progress)
        if self.common["bn_recalibrate"]:  # precise BN for the final weights (tunebal/bn.py)
            batches = (x for x, _ in self.iterate(self.data.train, shuffle=True))
            metrics["bn_recalibrate_batches"] = recalibrate_batchnorm(
                self.model, batches, self.common["bn_recalibrate"], self.model.encode, self.autocast
            )
        metrics.update({f"val/{k}": v for k, v in self.evaluate("val").items()})
        metrics["time/epoch_s"] = time.perf_counter() - start
        metrics["epoch"] = self.epoch
        return metrics

    # --- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs."""
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            "rng": rng,
            "epoch": self.epoch,
            "global_step": self.global_step,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])

    def save(self, path: str, metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> int:
        """Write the full state as an Arrow checkpoint; returns its size in bytes."""
        meta = {
            "epoch": self.epoch,
            "method": self.method_name,
            "dataset": self.data.name,
            "data": dict(self.data.info.get("knobs", {})),
            "config": self.config,
            "metrics": dict(metrics or {}),
            "versions": {"tunebal": __version__, "torch": torch.__version__},
            **dict(extra or {}),
        }
        return save_checkpoint(path, self.state(), meta)

    def load(self, path: str) -> dict[str, Any]:
        """Restore from an Arrow checkpoint written by ``save``; returns its metadata."""
        state, meta = load_checkpoint(path, map_location=self.device)
        check_checkpoint_matches(path, meta, self.method_name, self.data.name)
        try:
            self.load_state(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:  # config vs tensors
            raise CheckpointError(f"checkpoint {path} does not fit the model and method its config describes ({one_line(exc)})") from None
        return meta
