"""The method hook interface: one training loop, balancing methods as plugins.

The engine (tunebal/engine.py) runs, for every mini-batch:

    ctx.encoded  = model.encode(inputs, keep_block_inputs=method.needs_block_inputs)
    ctx.features = method.before_fusion(ctx)        # OPM drops features here
    ctx.logits   = model.head(ctx.features)
    loss         = method.loss(ctx)                 # ARL / AIM add terms here
    loss.backward()
    method.after_backward(ctx)                      # OGM-GE, ARL, AMSS scale/mask gradients
    clip, optimizer.step()
    method.after_step(ctx)

and around epochs ``on_epoch_start(engine)`` / ``on_epoch_end(engine)`` (AIM's phases and DAP
fitting, OGM's modulation window). ``setup(engine)`` runs once after the model and optimiser
exist (AIM adds its decoupler and prototypes to the optimiser there), and always before a
checkpoint is loaded, so the optimiser's parameter groups line up on resume.

Every hook a method does not need is a no-op here. A method declares its knobs in ``KNOBS``
beside its code; ``state_dict``/``load_state_dict`` must cover every piece of state that a
bit-exact resume needs. The method's own random draws use ``self.rng`` (CPU) or
``self.device_rng`` (the training device), whose states the base class saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from tunebal.errors import ConfigError
from tunebal.knobs import KnobSet, knobs
from tunebal.models import Encoded, MultimodalModel

if TYPE_CHECKING:  # pragma: no cover
    from tunebal.engine import Engine


@dataclass
class StepContext:
    """Everything a hook may read or change during one training step."""

    model: MultimodalModel
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    epoch: int  # 0-based epoch being trained
    step: int  # global step index (0-based)
    encoded: Encoded | None = None
    features: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    scratch: dict[str, Any] = field(default_factory=dict)
    _unimodal: dict[str, torch.Tensor] | None = None

    def unimodal_logits(self) -> dict[str, torch.Tensor]:
        """Zero-out logits of each modality from the *unmodified* features, with autograd.

        Computed once per step and shared by every hook (detach where only a value is needed).
        """
        if self._unimodal is None:
            assert self.encoded is not None
            self._unimodal = self.model.unimodal_logits(self.encoded.features)
        return self._unimodal


class EpochMeans:
    """Running means of a method's internals over one epoch (tensors summed without syncs)."""

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        self._sums[name] = self._sums.get(name, 0.0) + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / self._counts[k] for k, v in self._sums.items()}

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()


class Method:
    """Base class: the joint-training behaviour; every hook is a no-op or plain CE."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    KNOBS: ClassVar[KnobSet] = knobs()
    #: modality counts the method supports; None means any M >= 1
    supported_modalities: ClassVar[tuple[int, ...] | None] = None
    #: fusion modules the method supports; None means all
    supported_fusions: ClassVar[tuple[str, ...] | None] = None
    #: ask the engine to keep every block's input I_d (AIM)
    needs_block_inputs: ClassVar[bool] = False
    #: why the method cannot train a regression target (a dataset whose ``task`` is
    #: "regression", e.g. CMU-MOSI with labels=regression); None: it can, with :meth:`supervised_loss`
    regression_refusal: ClassVar[str | None] = "it is defined for classification only"

    def __init__(self, values: dict[str, Any], modalities: tuple[str, ...], num_classes: int, seed: int) -> None:
        self.knobs = values
        self.modalities = modalities
        self.num_classes = num_classes
        self.seed = seed
        self.rng = torch.Generator().manual_seed(seed + 7919)
        self.device_rng: torch.Generator = self.rng
        self.epoch_means = EpochMeans()
        #: set by the engine before ``setup``: the targets are float scores and the head has one output
        self.regression = False

    # --- compatibility -------------------------------------------------------------------
    @classmethod
    def check_compatible(cls, num_modalities: int, fusion: str) -> None:
        """Raise ConfigError when the method cannot run with this many modalities or fusion."""
        if cls.supported_modalities is not None and num_modalities not in cls.supported_modalities:
            raise ConfigError(
                f"method '{cls.name}' supports {list(cls.supported_modalities)} modalities, the dataset has {num_modalities}"
            )
        if cls.supported_fusions is not None and fusion not in cls.supported_fusions:
            raise ConfigError(f"method '{cls.name}' supports fusion {list(cls.supported_fusions)}, got '{fusion}'")

    @classmethod
    def check_task(cls, task: str, dataset: str) -> None:
        """Raise ConfigError when the method cannot train the dataset's task (``regression_refusal``)."""
        if task == "regression" and cls.regression_refusal:
            raise ConfigError(f"method '{cls.name}' cannot train {dataset}'s regression target: {cls.regression_refusal}; "
                              "use a classification preparation (e.g. --data labels=binary)")

    # --- overridable step and prediction ----------------------------------------------------
    def train_step(self, engine: "Engine", inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> StepContext:
        """One optimisation step. The default is the engine's joint step, which calls the hooks
        below; a method that needs several updates per batch (e.g. one per modality, as
        alternating methods do) overrides this and may call ``engine.joint_step`` repeatedly."""
        return engine.joint_step(inputs, labels)

    def eval_logits(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prediction scored in evaluation; by default the fused head. A unimodal ensemble
        overrides it to combine the modalities' own predictions."""
        return model.head(features)

    # --- hooks ---------------------------------------------------------------------------
    def setup(self, engine: "Engine") -> None:
        """Add modules or parameter groups; create device-side generators."""
        if engine.device.type != "cpu":
            self.device_rng = torch.Generator(device=engine.device).manual_seed(self.seed + 7919)

    def on_epoch_start(self, engine: "Engine") -> None:
        self.epoch_means.reset()

    def before_fusion(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        assert ctx.encoded is not None
        return dict(ctx.encoded.features)

    def supervised_loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits against class indices (AIM, Eq. 2); for a regression target the
        L1 loss of the single output against the score (MulT's and MISA's CMU-MOSI loss)."""
        if self.regression:
            return F.l1_loss(output.float().squeeze(1), labels)
        return F.cross_entropy(output, labels)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        """Training loss; plain cross-entropy of the fused prediction (AIM, Eq. 2), or L1 for regression."""
        assert ctx.logits is not None
        return self.supervised_loss(ctx.logits, ctx.labels)

    def after_backward(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

    def on_epoch_end(self, engine: "Engine") -> None:
        pass

    # --- logging and state ---------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """The method's internals averaged over the last epoch (logged under ``method/``)."""
        return self.epoch_means.means()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": self.rng.get_state()}
        if self.device_rng is not self.rng:
            state["device_rng"] = self.device_rng.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"].cpu())
        if "device_rng" in state and self.device_rng is not self.rng:
            self.device_rng.set_state(state["device_rng"].cpu())
