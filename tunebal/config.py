"""The common knobs every trial has (optimiser, schedule, model, data loading, seed).

Method knobs are declared beside each method; dataset knobs beside each dataset. A search
space may name the common knobs, the method's knobs and ``data.<knob>`` dataset knobs.
"""

from __future__ import annotations

from tunebal.knobs import Knob, knobs
from tunebal.models import BACKBONES, FUSIONS

COMMON_KNOBS = knobs(
    Knob("lr", "float", 0.01, "learning rate", low=1e-6, high=10.0, log=True),
    Knob("optimizer", "str", "sgd", "optimiser", choices=("sgd", "adam", "adamw")),
    Knob("momentum", "float", 0.9, "SGD momentum", low=0.0, high=0.999),
    Knob("weight_decay", "float", 1e-4, "weight decay", low=0.0, high=1.0),
    Knob("batch_size", "int", 64, "mini-batch size", low=2, high=4096),
    Knob("epochs", "int", 10, "training epochs", low=1, high=10000),
    Knob("lr_schedule", "str", "step", "learning-rate schedule", choices=("none", "step", "cosine")),
    Knob("lr_step", "int", 70, "StepLR step size in epochs (OGM-GE release: 70)", low=1, high=10000),
    Knob("lr_gamma", "float", 0.1, "StepLR decay factor", low=0.0, high=1.0),
    Knob("grad_clip", "float", 0.0, "clip the global gradient norm at this value (0: off)", low=0.0, high=1e6),
    Knob("fusion", "str", "concat", "fusion module", choices=FUSIONS),
    Knob("backbone", "str", "auto", "encoder: auto (small for synth, resnet18 otherwise)", choices=("auto", *BACKBONES)),
    Knob("width", "int", 16, "first-stage channels of the small encoder", low=1, high=512),
    Knob("seed", "int", 0, "seed of initialisation, shuffling and method randomness", low=0, high=2**31 - 1),
    Knob("amp", "bool", True, "bf16 autocast and channels_last on CUDA (ignored on CPU)"),
    Knob("pretrained", "str", "", "local file of torchvision ImageNet ResNet18 weights for resnet18 encoders ('' = random init)"),
    Knob("loader_workers", "int", -1, "data-loader worker processes for prepared (sharded) datasets; -1 = one per CPU thread, at most 8", low=-1, high=64),
    Knob("bn_recalibrate", "int", 0, "before each validation, recompute BatchNorm running statistics over this many training batches (precise BN; 0 = off, the same for every method)", low=0, high=1_000_000),
)
