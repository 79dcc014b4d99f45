"""torchvision ImageNet architectures, adapted for fine-tuning on small images.

Each registered builder returns a `ResizedBackbone`: a torchvision network with a fresh
`num_classes` head, behind a layer that repeats 1-channel images to 3 channels and resizes them
bilinearly (no antialiasing, so the map stays linear and cheap to differentiate) to
``resize x resize`` pixels. The resizing is part of the model, so attacks, noise and radii stay
in the pixel space of the small images.

Pretrained backbones (``pretrained``):

- ``False`` (default): random initialization, no file access.
- ``True``: torchvision's default ImageNet weights, downloaded (or read from the torch hub
  cache). Offline, this raises a ConfigError asking for a local file instead.
- a path: a local state_dict of the torchvision network (``torch.save(net.state_dict())`` or a
  ``.safetensors`` file), loaded with ``weights_only=True``. The classification head in the file
  is skipped (it has ImageNet's 1000 classes); every other tensor must match.

Pretrained weights expect ImageNet normalization: train.py puts ImageNet's mean/std in front of a
model built with ``pretrained`` (for 1-channel data, their channel averages), not the data set's.

The spec of a model stores ``pretrained``; a checkpoint restorer should rebuild with
``pretrained=False`` and load the checkpoint's own weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixrobust.errors import CheckpointError, ConfigError
from mixrobust.models.registry import register_model

log = logging.getLogger(__name__)

MIN_RESIZE = 32  # the coarsest stage of every network below needs a 32x32 input to be >= 1x1


@dataclass(frozen=True)
class TorchvisionArch:
    """A torchvision builder name and the module path of its final linear layer."""

    tv_name: str
    head: str


TORCHVISION_MODELS: dict[str, TorchvisionArch] = {
    "convnext_tiny": TorchvisionArch("convnext_tiny", "classifier.2"),
    "resnet50": TorchvisionArch("resnet50", "fc"),
    "resnet18_imagenet": TorchvisionArch("resnet18", "fc"),
}


def _check_input(in_channels: int, resize: int) -> None:
    if in_channels not in (1, 3):
        raise ConfigError(
            f"torchvision models take 1-channel (repeated to RGB) or 3-channel images, got {in_channels} channels"
        )
    if resize < MIN_RESIZE:
        raise ConfigError(f"resize must be >= {MIN_RESIZE} pixels for torchvision models, got {resize}")


class ResizedBackbone(nn.Module):
    """x (N, C, H, W) normalized -> repeat to 3 channels if C == 1 -> resize -> backbone -> (N, K)."""

    def __init__(self, backbone: nn.Module, in_channels: int, resize: int):
        super().__init__()
        _check_input(in_channels, resize)
        self.backbone = backbone
        self.in_channels = in_channels
        self.resize = resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (N, 3, resize, resize)
        return self.backbone(x)


def _read_state_dict(pretrained: bool | str | Path, arch: TorchvisionArch) -> Mapping[str, torch.Tensor]:
    """The ImageNet state_dict named by `pretrained` (True: torchvision default; str: local file)."""
    if pretrained is True:
        import torchvision.models  # on first use: the whole zoo (and torchvision.ops, torch._dynamo)

        weights = torchvision.models.get_model_weights(arch.tv_name).DEFAULT
        try:
            return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)  # no pickled code
        except Exception as err:  # URLError, OSError, hash mismatch, ... all mean "no weights here"
            raise ConfigError(
                f"could not download torchvision's {weights} for {arch.tv_name} ({type(err).__name__}: {err}); "
                "download it elsewhere and pass a local weights file path as pretrained=<path>"
            ) from err
    path = Path(pretrained)
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read pretrained weights {str(path)!r}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} is not a state_dict (a mapping from names to tensors)")
    return state


def _load_backbone(net: nn.Module, state: Mapping[str, torch.Tensor], arch: TorchvisionArch, source: str) -> None:
    """Copy every tensor of `state` except the head into `net`; the file must cover the rest exactly."""
    head = arch.head + "."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    expected = {k for k in net.state_dict() if not k.startswith(head)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match torchvision's {arch.tv_name}: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{source} does not fit torchvision's {arch.tv_name}: {err}") from err


def build_torchvision(
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    pretrained: bool | str | None = False,
    resize: int = 224,
) -> ResizedBackbone:
    """torchvision model `name` (a key of TORCHVISION_MODELS) with a `num_classes` head; see module doc."""
    arch = TORCHVISION_MODELS[name]
    _check_input(input_shape[0], int(resize))  # fail before building a large network
    import torchvision.models  # on first use: the whole zoo (and torchvision.ops, torch._dynamo)

    net = torchvision.models.get_model(arch.tv_name, weights=None, num_classes=num_classes)
    if pretrained is not False and pretrained is not None:
        if not isinstance(pretrained, (bool, str, Path)):
            raise ConfigError(f"pretrained must be a bool or a path to a weights file, got {pretrained!r}")
        state = _read_state_dict(pretrained, arch)
        source = "torchvision default weights" if pretrained is True else repr(str(pretrained))
        _load_backbone(net, state, arch, source)
        log.info("loaded pretrained %s backbone from %s", arch.tv_name, source)
    return ResizedBackbone(net, input_shape[0], int(resize))


def _register(name: str) -> None:
    def builder(
        num_classes: int, input_shape: tuple[int, int, int], pretrained: bool | str = False, resize: int = 224
    ) -> nn.Module:
        return build_torchvision(name, num_classes, input_shape, pretrained=pretrained, resize=resize)

    builder.__name__ = name
    builder.__doc__ = f"torchvision {TORCHVISION_MODELS[name].tv_name} behind a resize-to-`resize` layer."
    register_model(name)(builder)


for _name in TORCHVISION_MODELS:
    _register(_name)
