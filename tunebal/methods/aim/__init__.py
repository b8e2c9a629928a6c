"""AIM: Adaptive Intra-Network Modulation (AIM paper), the first public implementation.

- ``prototypes.py``: Depth-Adaptive Prototypes (DAP, Eqs. 3-6)
- ``decoupler.py``: PAM's parameter decoupling (Eq. 7, Eq. 8's reconstruction, Eq. 13)
- ``losses.py``: the formulas (Eqs. 4, 8-12, 14, 15) as pure functions
- ``method.py``: Algorithm 1 on tunebal's hooks, the knobs and every interpretation made

Importing this package registers the method ``aim``.
"""

from tunebal.methods.aim.decoupler import (
    BlockDecoupler,
    Decoupler,
    LayerDecoupler,
    num_decoupler_parameters,
    run_block,
)
from tunebal.methods.aim.method import AIM
from tunebal.methods.aim.prototypes import DepthAdaptivePrototypes

__all__ = [
    "AIM",
    "BlockDecoupler",
    "Decoupler",
    "DepthAdaptivePrototypes",
    "LayerDecoupler",
    "num_decoupler_parameters",
    "run_block",
]
