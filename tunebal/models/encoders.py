"""Per-modality encoders exposed as an ordered list of D blocks.

AIM (AIM §III-B) splits every encoder into D sequential blocks E_1..E_D and needs the
input I_d of each block; OGM/ARL/AMSS only need to know which parameters belong to which
modality. Every encoder here therefore has the same shape:

    prepare(x) -> I_1            # e.g. frames (B, T, C, H, W) -> (B*T, C, H, W)
    blocks[d](I_d) -> I_{d+1}    # d = 0..D-1
    pool(I_{D+1}, B) -> z        # (B, out_dim): global average pool, then mean over frames

For ResNet18 the blocks are the four residual stages, with the stem (conv1, bn, relu,
maxpool) folded into block 1 so that block 1's input is the raw input x^m, as AIM's
prototypes P_0 live at the encoder input (Eq. 3, 6).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

INPUT_KINDS = ("spectrogram", "frames", "vector", "sequence")


class BlockEncoder(nn.Module):
    """An encoder made of ``blocks`` with a modality-kind-specific ``prepare`` and ``pool``."""

    def __init__(self, kind: str, blocks: list[nn.Module], out_dim: int) -> None:
        super().__init__()
        if kind not in INPUT_KINDS:
            raise ValueError(f"unknown input kind {kind!r}")
        self.kind = kind
        self.blocks = nn.ModuleList(blocks)
        self.out_dim = out_dim

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Input of block 1: frames are folded into the batch so every frame runs alone."""
        if self.kind == "frames":
            b, t = x.shape[:2]
            return x.reshape(b * t, *x.shape[2:])
        return x

    def pool(self, h: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Block-D output -> feature z (B, out_dim); frames are averaged over time."""
        if h.dim() == 4:
            h = h.mean(dim=(2, 3))
        elif h.dim() == 3:  # (N, L, C) token sequences
            h = h.mean(dim=1)
        if h.shape[0] != batch_size:  # frames: (B*T, C) -> (B, C)
            h = h.reshape(batch_size, -1, h.shape[-1]).mean(dim=1)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prepare(x)
        for block in self.blocks:
            h = block(h)
        return self.pool(h, x.shape[0])


def resnet18_encoder(kind: str, in_channels: int, pretrained: str = "") -> BlockEncoder:
    """torchvision's ResNet18 cut into its four residual stages.

    Spectrograms use a 1-channel stem, as in the OGM-GE/OPM audio encoders (OPM/OGM, TPAMI
    2024, §4.2). ``pretrained`` names a local file of torchvision's ImageNet weights (no
    download at run time; loaded without unpickling arbitrary objects by
    :func:`tunebal.models.pretrained.load_imagenet_resnet18`, which averages the stem over the
    RGB channels for other channel counts); '' keeps the random initialisation.
    """
    net = resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    if pretrained:
        from tunebal.models.pretrained import load_imagenet_resnet18

        load_imagenet_resnet18(net, pretrained, in_channels)
    stage1 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    return BlockEncoder(kind, [stage1, net.layer2, net.layer3, net.layer4], out_dim=512)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def small_conv_encoder(kind: str, in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> BlockEncoder:
    """A 4-stage conv encoder of ResNet18's block structure, small enough for CPU tests and synth."""
    chans = (in_channels, *widths)
    blocks = [_conv_block(chans[i], chans[i + 1]) for i in range(len(widths))]
    return BlockEncoder(kind, blocks, out_dim=widths[-1])


def mlp_encoder(in_dim: int, widths: tuple[int, ...] = (64, 64, 128, 128)) -> BlockEncoder:
    """Block-structured MLP for vector modalities (one Linear-BN-ReLU per block)."""
    dims = (in_dim, *widths)
    blocks = [
        nn.Sequential(nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True))
        for i in range(len(widths))
    ]
    return BlockEncoder("vector", blocks, out_dim=widths[-1])


BACKBONES = ("small", "resnet18")


class SequenceEmbedding(nn.Module):
    """(B, L, D) features -> (B, L, d_model): a linear projection plus a learnt position embedding."""

    def __init__(self, in_dim: int, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, d_model)
        self.position = nn.Parameter(torch.zeros(1, seq_len, d_model))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.position[:, : x.shape[1]]


def transformer_encoder(input_shape: tuple[int, ...], d_model: int = 64, layers: int = 3, heads: int = 4) -> BlockEncoder:
    """A small Transformer for feature sequences (CMU-MOSI's text, audio and visual streams).

    Each of its ``layers`` encoder layers is one block (the blocks AIM modulates); the first
    block also embeds the raw features, so block 1's input is the raw sequence x^m (AIM's
    prototypes live at the encoder input). Post-norm layers, GELU, dropout 0.1, mean-pooled
    over time.
    """
    seq_len, in_dim = input_shape

    def layer() -> nn.TransformerEncoderLayer:
        return nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.1,
                                          activation="gelu", batch_first=True)

    blocks: list[nn.Module] = [nn.Sequential(SequenceEmbedding(in_dim, seq_len, d_model), layer())]
    blocks += [layer() for _ in range(layers - 1)]
    return BlockEncoder("sequence", blocks, out_dim=d_model)


def build_encoder(
    kind: str, input_shape: tuple[int, ...], backbone: str, width: int = 16, pretrained: str = ""
) -> BlockEncoder:
    """Encoder for one modality from its input kind and shape.

    ``width`` is the first stage's channel count of the small encoder (doubling per stage);
    ``pretrained`` (a local ImageNet weights file) applies to ResNet18 encoders only.
    """
    if kind == "vector":
        return mlp_encoder(input_shape[0], tuple(width * m for m in (4, 4, 8, 8)))
    if kind == "sequence":
        return transformer_encoder(input_shape, d_model=4 * width)
    in_channels = input_shape[0] if kind == "spectrogram" else input_shape[1]
    if backbone == "resnet18":
        return resnet18_encoder(kind, in_channels, pretrained)
    if backbone == "small":
        return small_conv_encoder(kind, in_channels, tuple(width * m for m in (1, 2, 4, 8)))
    raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
