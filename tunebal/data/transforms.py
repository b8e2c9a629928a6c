"""Frame augmentation (torchvision transforms v2, in loader workers) and normalisation (on the device).

Training: ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()``, the OGM-GE / OPM /
AIM pipelines' augmentation; evaluation: ``Resize((size, size))``. Both run on uint8 tensors
``(T, 3, H, W)``: v2 transforms one call's tensor with one set of random parameters, so all
``T`` frames of a clip share the crop and the flip (a clip is augmented as a whole). The
randomness comes from torch's global generator, which the caller seeds per sample inside
``torch.random.fork_rng`` (tunebal/data/prepared.py). Normalisation with ImageNet's mean and
std happens on the training device, after the uint8 batch is copied there.
"""

from __future__ import annotations

from typing import Callable

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def frame_transform(train: bool, size: int = 224) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``(T, 3, H, W)`` -> uint8 ``(T, 3, size, size)``: random crop + flip in training, resize otherwise."""
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Resize((size, size), antialias=True)


def normalize_on_device(x: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``(..., 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` (ImageNet), on ``x``'s device."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x.float().div_(255.0) - mean).div_(std)


class _FlowFlip:
    """Horizontal flip of a stacked (u, v) optical-flow clip: mirroring the image also mirrors
    the horizontal motion, so u (stored as uint8, zero motion at 127.5) becomes 255 - u."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() < 0.5:
            x = x.flip(-1)
            x[:, 0] = 255 - x[:, 0]
        return x


def flow_transform(train: bool, size: int = 224) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``(T, 2, H, W)`` (u, v) -> uint8 ``(T, 2, size, size)``: the frame pipeline with a flow-aware flip."""
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), _FlowFlip()])
    return v2.Resize((size, size), antialias=True)


def normalize_flow_on_device(x: torch.Tensor) -> torch.Tensor:
    """uint8 flow ``(..., 2, H, W)`` -> float32 in [-1, 1] (127.5 = no motion)."""
    return x.float().div_(127.5).sub_(1.0)
