"""Joint training: the multimodal framework trained with plain cross-entropy (AIM, Eq. 2).

The baseline of every paper in the family (OPM/OGM (TPAMI 2024) §4, AIM §IV-A); no knobs.
"""

from __future__ import annotations

from tunebal.methods.base import Method
from tunebal.methods.registry import register_method


@register_method
class Baseline(Method):
    name = "baseline"
    description = "joint training with cross-entropy (no balancing)"
    regression_refusal = None  # L1 on the fused output
