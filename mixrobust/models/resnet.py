"""CIFAR-style residual networks: ResNet-18, PreAct ResNet-18 and the 6n+2 family (ResNet-20/110).

All of them use a 3x3 stride-1 stem (no max-pool), three or four stages whose first block
downsamples by 2 (except the first stage), and global average pooling before a linear head.
Pooling is adaptive, so they run on any input of at least 8x8 pixels and any channel count
(1x8x8 digits, 1x28x28 MNIST, 3x32x32 CIFAR).

- ``resnet18``: the CIFAR ResNet-18 used throughout the AT literature: post-activation
  BasicBlocks [2, 2, 2, 2], widths 64..512, projection shortcuts (1x1 conv + BN).
  11,173,962 parameters for 10 classes.
- ``preact_resnet18``: He et al. (2016), "Identity Mappings in Deep Residual Networks", in the
  form used for adversarial training by Wong et al. (2020) and Rice et al. (2020): no BN/ReLU
  after the stem, BN-ReLU before each conv, 1x1 conv shortcuts (no BN) on the pre-activated
  input, and a final BN-ReLU before pooling.
- ``resnet20`` / ``resnet110``: the 6n+2 CIFAR ResNets of He et al. (2016) with widths 16/32/64,
  as used by Cohen et al. (2019) for randomized smoothing (n = 3 / 18; projection shortcuts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mixrobust.errors import ConfigError
from mixrobust.models.registry import register_model


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)



def init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, BatchNorm at identity, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

class BasicBlock(nn.Module):
    """Post-activation block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block: conv(relu(bn(conv(relu(bn(x)))))) + shortcut.

    The shortcut is the identity on x, or a 1x1 conv on the pre-activated relu(bn(x)) when the
    shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU()  # not in-place: the pre-activation also feeds the shortcut
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """Stem conv, stages of residual blocks, global average pooling, linear head.

    `widths[i]` / `depths[i]` are the channel count / number of blocks of stage i; the stem
    outputs `widths[0]` channels and every stage after the first starts with a stride-2 block.
    With `preact`, the stem has no BN-ReLU and a BN-ReLU precedes the pooling instead.
    """

    def __init__(
        self,
        block: type[nn.Module],
        in_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int,
        preact: bool = False,
    ):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.stem_act: nn.Module = (
            nn.Identity() if preact else nn.Sequential(nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        )
        stages = []
        channels = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_act: nn.Module = (
            nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) if preact else nn.Identity()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem_act(self.conv1(x))  # (N, widths[0], H, W)
        out = self.final_act(self.stages(out))  # (N, widths[-1], H', W')
        return self.fc(torch.flatten(self.pool(out), 1))  # (N, K)


@register_model("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """CIFAR ResNet-18: BasicBlocks [2, 2, 2, 2], widths 64/128/256/512, 3x3 stem, no max-pool."""
    return ResNet(BasicBlock, input_shape[0], (64, 128, 256, 512), (2, 2, 2, 2), num_classes)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """PreAct ResNet-18 (He et al. 2016; the AT baseline of Wong et al. 2020 and Rice et al. 2020)."""
    return ResNet(PreActBlock, input_shape[0], (64, 128, 256, 512), (2, 2, 2, 2), num_classes, preact=True)


def cifar_resnet(num_classes: int, input_shape: tuple[int, int, int], depth: int) -> nn.Module:
    """The 6n+2 CIFAR ResNet: three stages of n BasicBlocks with widths 16/32/64.

    `depth` = 6n + 2 counts the conv layers plus the linear head (20, 32, 44, 56, 110, ...).
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, input_shape[0], (16, 32, 64), (n, n, n), num_classes)


@register_model("resnet20")
def resnet20(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """CIFAR ResNet-20 (n = 3): small and fast; same family as `resnet110`."""
    return cifar_resnet(num_classes, input_shape, depth=20)


@register_model("resnet110")
def resnet110(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """CIFAR ResNet-110 (n = 18), the base classifier of Cohen et al.'s randomized smoothing."""
    return cifar_resnet(num_classes, input_shape, depth=110)
