"""ImageNet ResNet18 weights from a local file, loaded without running code from it.

No downloads at run time: ``--set pretrained=PATH`` names torchvision's
``resnet18-f37072fd.pth`` (or any ``state_dict`` of ``torchvision.models.resnet18``). It is
read with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which builds
tensors and plain containers only and refuses any other object (so a planted ``__reduce__``
never runs). ``fc.*`` is ignored (the multimodal head replaces it). For a stem with other
than 3 input channels (1-channel spectrograms, 2-channel optical flow) ``conv1``'s weights
are averaged over the RGB channels and repeated, the usual cross-modality initialisation.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tunebal.errors import ConfigError


def load_imagenet_resnet18(net: nn.Module, path: str | os.PathLike, in_channels: int) -> None:
    """Copy ImageNet weights from ``path`` into ``net`` (a torchvision ResNet18); one-line ConfigError on any problem."""
    path = os.fspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"pretrained weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors/containers, zip errors, ...
        raise ConfigError(f"pretrained weights {path}: not a plain tensor state dict ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"pretrained weights {path}: expected a dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.dim() == 4 and conv1.shape[1] != in_channels:
        state["conv1.weight"] = conv1.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"pretrained weights {path}: not a ResNet18 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        raise ConfigError(f"pretrained weights {path}: shape mismatch at {wrong[0]} ({tuple(state[wrong[0]].shape)})")
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
