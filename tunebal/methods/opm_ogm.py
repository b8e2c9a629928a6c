"""OPM+OGM: prediction and gradient modulation together (OPM/OGM (TPAMI 2024) Table 12, "w/ OPM+OGM").

A composite of :class:`~tunebal.methods.opm.OPM` (drops the dominant feature before fusion
with the previous step's q) and :class:`~tunebal.methods.ogm.OGM` (scales the dominant
encoder's gradient by k from the current step's ρ, plus GE noise). Its knobs are the union of
both; see those modules for every formula and choice.

Both parts read the same ρ of the step (computed once, from the unmodified features), share
one random generator (OPM's masks are drawn in ``before_fusion``, OGM's noise in
``after_backward``, always in that order) and log into one set of epoch means
(``rho_<m>``, ``q_<m>``, ``drop_<m>``, ``k_<m>``). The checkpointed state is the generator
and OPM's q.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tunebal.methods._modulation import MultimodalOnly
from tunebal.methods.base import StepContext
from tunebal.methods.ogm import OGM
from tunebal.methods.opm import OPM
from tunebal.methods.registry import register_method

if TYPE_CHECKING:  # pragma: no cover
    from tunebal.engine import Engine


@register_method
class OPMOGM(MultimodalOnly):
    name = "opm_ogm"
    description = "OPM + OGM-GE together (OPM/OGM (TPAMI 2024) Table 12)"
    regression_refusal = "its discrepancy ratio (OPM/OGM (TPAMI 2024), Eq. 7) is built on softmax scores of the true class"
    KNOBS = OPM.KNOBS + OGM.KNOBS

    def __init__(self, values, modalities, num_classes, seed) -> None:
        super().__init__(values, modalities, num_classes, seed)
        self.opm = OPM({k: values[k] for k in OPM.KNOBS.names()}, modalities, num_classes, seed)
        self.ogm = OGM({k: values[k] for k in OGM.KNOBS.names()}, modalities, num_classes, seed)
        self._share()

    def _share(self) -> None:
        for part in (self.opm, self.ogm):
            part.rng = self.rng
            part.device_rng = self.device_rng
            part.epoch_means = self.epoch_means

    def setup(self, engine: "Engine") -> None:
        super().setup(engine)
        self.opm.setup(engine)
        self.ogm.setup(engine)
        self._share()

    def before_fusion(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return self.opm.before_fusion(ctx)

    def after_backward(self, ctx: StepContext) -> None:
        self.ogm.after_backward(ctx)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["q"] = self.opm.state_dict()["q"]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.opm.q = state["q"].to(device=self.opm.q.device, dtype=torch.float32).clone()
