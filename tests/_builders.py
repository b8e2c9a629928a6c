"""Tiny in-memory datasets and a probe method for tests that pin the engine's behaviour.

Not a test module (no ``test_`` prefix): imported by tests/test_engine_pins.py, test_aim.py, test_conformance.py,
tests/test_method_options.py and tests/test_mechanisms.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from tunebal.data.base import MultimodalData, Split
from tunebal.methods import Method, StepContext
from tunebal.methods.registry import METHODS, register_method

#: vector encoders of width 1 are 4-4-8-8 MLPs: a training step costs well under a millisecond
VEC = {"backbone": "small", "width": 1, "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "none"}


def _split(n: int, dims: dict[str, int], classes: int, informative: set[str], gen: torch.Generator, id_of: str | None) -> Split:
    labels = torch.randint(0, classes, (n,), generator=gen)
    inputs = {}
    for m, d in dims.items():
        x = torch.randn(n, d, generator=gen)
        if m in informative:  # the label as a clear one-hot signal in the first `classes` dims
            x[:, :classes] += 3.0 * F.one_hot(labels, classes).float()
        if m == id_of:  # the sample's index, so a test can see which samples a step used
            x[:, -1] = torch.arange(n, dtype=torch.float32)
        inputs[m] = x.contiguous()
    return Split(inputs, labels)


def vector_data(
    n_train: int,
    n_val: int = 24,
    n_test: int = 24,
    dims: dict[str, int] | None = None,
    classes: int = 3,
    informative: tuple[str, ...] = (),
    id_of: str | None = None,
    seed: int = 0,
    name: str = "unit",
) -> MultimodalData:
    """A dataset of vector modalities with Gaussian inputs; ``informative`` ones carry the label.

    ``id_of`` names a modality whose last input dimension is the sample's index in its split.
    """
    dims = dims or {"a": 6, "b": 6}
    gen = torch.Generator().manual_seed(seed)
    splits = [_split(n, dims, classes, set(informative), gen, id_of) for n in (n_train, n_val, n_test)]
    return MultimodalData(
        name=name,
        modalities=tuple(dims),
        kinds={m: "vector" for m in dims},
        num_classes=classes,
        class_names=[f"c{i}" for i in range(classes)],
        train=splits[0],
        val=splits[1],
        test=splits[2],
    )


class Probe(Method):
    """Joint training that records, per step, the sample ids it trained on and its loss."""

    name = "_probe_test"
    description = "test-only: records what each training step saw"
    id_modality = "a"

    def __init__(self, values, modalities, num_classes, seed) -> None:
        super().__init__(values, modalities, num_classes, seed)
        self.steps: list[dict] = []

    def loss(self, ctx: StepContext) -> torch.Tensor:
        loss = super().loss(ctx)
        ids = ctx.inputs[self.id_modality][:, -1].detach().round().long().tolist()
        self.steps.append({"epoch": ctx.epoch, "ids": ids, "loss": float(loss.detach()), "n": len(ids)})
        return loss


@contextlib.contextmanager
def probe_registered() -> Iterator[type[Probe]]:
    """Register :class:`Probe` for the duration of a test (so ``tunebal methods`` never lists it)."""
    METHODS.pop(Probe.name, None)
    register_method(Probe)
    try:
        yield Probe
    finally:
        METHODS.pop(Probe.name, None)


@contextlib.contextmanager
def capture_step_grads(engine) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Record, at every ``optimizer.step``, the gradients the optimiser is about to apply."""
    seen: list[dict[str, torch.Tensor]] = []
    opt = engine.optimizer
    original = opt.step

    def step(*args, **kwargs):
        seen.append({n: p.grad.detach().clone() for n, p in engine.model.named_parameters() if p.grad is not None})
        return original(*args, **kwargs)

    opt.step = step
    try:
        yield seen
    finally:
        del opt.step


@contextlib.contextmanager
def record_steps(engine) -> Iterator[list[dict]]:
    """Record every training step: a copy of the model as the step found it, the batch, the
    features before and after the method's ``before_fusion``, and the gradients the optimiser
    applied. Lets a test recompute a step independently with autograd."""
    steps: list[dict] = []
    method, opt = engine.method, engine.optimizer
    original_bf, original_step = method.before_fusion, opt.step

    def before_fusion(ctx):
        out = original_bf(ctx)
        model = copy.deepcopy(ctx.model)  # parameters are those of this step (not yet updated)
        for module in model.modules():  # a method's hooks (AMSS per-sample Fisher) stay on the original
            module._forward_hooks.clear()
        steps.append({
            "model": model,
            "inputs": {m: x.detach().clone() for m, x in ctx.inputs.items()},
            "labels": ctx.labels.detach().clone(),
            "epoch": ctx.epoch,
            "encoded": {m: z.detach().clone() for m, z in ctx.encoded.features.items()},
            "features": {m: z.detach().clone() for m, z in out.items()},
        })
        return out

    def step(*args, **kwargs):
        steps[-1]["grads"] = {n: p.grad.detach().clone() for n, p in engine.model.named_parameters() if p.grad is not None}
        return original_step(*args, **kwargs)

    method.before_fusion, opt.step = before_fusion, step
    try:
        yield steps
    finally:
        del method.before_fusion, opt.step


def zero_out(model, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's logits with every other feature zeroed, written out independently."""
    return {m: model.head({j: (z if j == m else torch.zeros_like(z)) for j, z in feats.items()}) for m in model.modalities}


def autograd_grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂loss/∂θ for every parameter of ``model`` that the loss reaches, by name."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, retain_graph=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


def tree_equal(a, b, path: str = "") -> None:
    """Assert two nested state dicts / lists / tensors are identical (tensors bit for bit;
    NaN equals NaN), naming the first differing path."""
    if isinstance(a, dict):  # OrderedDict and dict alike
        assert isinstance(b, dict), path
    else:
        assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            tree_equal(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
