"""Wide residual networks (Zagoruyko & Komodakis, 2016) for CIFAR-sized inputs.

WRN-d-k has a 3x3 stem with 16 channels, three stages of n = (d - 4) / 6 pre-activation blocks
with widths 16k, 32k, 64k (strides 1, 2, 2), a final BN-ReLU, global average pooling and a
linear head. This is the architecture of the TRADES repository's WRN-34-10 and of most
l_inf-robust CIFAR-10 models: when a block changes the channel count, its BN-ReLU is shared
by the residual branch and the 1x1 conv shortcut; otherwise the shortcut is the identity on
the block's raw input. Pooling is adaptive, so inputs other than 32x32 work too.

(The TRADES code also builds an unused ``sub_block1``; it has no effect on the function and is
not reproduced here, so its checkpoints load with those keys dropped.)
"""

from __future__ import annotations

import torch
from torch import nn

from mixrobust.errors import ConfigError
from mixrobust.models.registry import register_model
from mixrobust.models.resnet import init_weights


class WideBlock(nn.Module):
    """conv(dropout(relu(bn(conv(relu(bn(x))))))) + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU()  # not in-place: the pre-activation may also feed the shortcut
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.relu(self.bn2(self.conv1(pre)))
        return self.conv2(self.dropout(out)) + skip


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor` on `in_channels`-channel images; see the module docstring."""

    def __init__(self, depth: int, widen_factor: int, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet depth must be 6n+4 with n >= 1 (16, 28, 34, ...), got {depth}")
        if widen_factor < 1:
            raise ConfigError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        stages = []
        channels = 16
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBlock(channels, width, stride, dropout))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.conv1(x))  # (N, 64k, H/4, W/4)
        out = self.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))  # (N, K)


def wide_resnet(
    num_classes: int,
    input_shape: tuple[int, int, int],
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """Shared builder of the registered WRNs; `dropout` acts between the two convs of each block."""
    return WideResNet(int(depth), int(widen_factor), input_shape[0], num_classes, float(dropout))


@register_model("wrn_28_10")
def wrn_28_10(num_classes: int, input_shape: tuple[int, int, int], dropout: float = 0.0) -> nn.Module:
    """WRN-28-10 (36,479,194 parameters for 10 classes)."""
    return wide_resnet(num_classes, input_shape, depth=28, widen_factor=10, dropout=dropout)


@register_model("wrn_34_10")
def wrn_34_10(num_classes: int, input_shape: tuple[int, int, int], dropout: float = 0.0) -> nn.Module:
    """WRN-34-10, the TRADES architecture (46,160,474 parameters for 10 classes)."""
    return wide_resnet(num_classes, input_shape, depth=34, widen_factor=10, dropout=dropout)
