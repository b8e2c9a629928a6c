"""Recompute BatchNorm running statistics for the current weights ("precise BN").

BatchNorm's running mean/variance are exponential moving averages (momentum 0.1) of the batch
statistics of the *last few dozen* weight states. When the weights move fast from step to step,
that average describes none of them, and the network in eval mode sees activations that are
off by a fraction of a standard deviation at every layer. Training is unaffected (batch
statistics), evaluation is not: AIM at the learning rates of its search space scored 26-62 %
on validation in eval mode while the same weights scored 98-99.5 % once the statistics were
recomputed (tunebal/bench/aim.py, ``--parts bn``).

``recalibrate_batchnorm`` resets every BatchNorm layer's running statistics, runs the model in
train mode without gradients over some training batches, and keeps their *cumulative* average
(``momentum=None``): the population statistics of the final weights, which is what eval mode
assumes (Ioffe & Szegedy 2015, §3.1; "precise BN" in Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021). The engine calls it before each validation evaluation when the common knob
``bn_recalibrate`` (number of training batches, 0 = off) is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    max_batches: int,
    forward: Callable[[dict[str, torch.Tensor]], object],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> int:
    """Replace the running statistics by their average over up to ``max_batches`` batches.

    ``forward(inputs)`` runs the part of the model that holds the BatchNorm layers (for tunebal's
    models, ``model.encode``). Only running statistics change: no parameter, no gradient. The
    model's own train/eval flags and every layer's momentum are restored. Returns the number of
    batches used (0 when the model has no BatchNorm or ``max_batches`` is 0: nothing changes).
    """
    layers = batchnorm_layers(model)
    if not layers or max_batches <= 0:
        return 0
    flags = [(mod, mod.training) for mod in model.modules()]
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the plain mean over the batches
    model.train()
    used = 0
    try:
        for inputs in batches:
            if used >= max_batches:
                break
            with autocast():
                forward(inputs)
            used += 1
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        for mod, flag in flags:
            mod.training = flag
    return used


__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]
