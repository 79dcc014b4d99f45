"""One registry for every architecture, in the style of timm's `register_model` / `create_model`.

A registered builder takes ``(num_classes, input_shape, **kwargs)`` and returns a bare network
that maps *normalized* images to logits. `create_model` puts the normalization layer in front,
so every model in mixrobust takes images in [0,1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mixrobust.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator: register ``builder(num_classes, input_shape, **kwargs) -> nn.Module`` as `name`."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available_models() -> list[str]:
    return sorted(_REGISTRY)


class Normalize(nn.Module):
    """(x - mean) / std per channel; the first layer of every model, so inputs stay in [0,1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(f"normalization mean {list(mean)} and std {list(std)} differ in length")
        if any(s <= 0 for s in std):
            raise ConfigError(f"normalization std must be > 0, got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """A classifier on images in [0,1]: ``forward(x)`` (N, C, H, W) -> (N, K) logits.

    `spec` is the plain-dict description that `create_model(**spec)` rebuilds it from; it is
    stored in checkpoints so a checkpoint alone is enough to rebuild the network.
    """

    def __init__(self, normalize: Normalize, net: nn.Module, spec: dict):
        super().__init__()
        self.normalize = normalize
        self.net = net
        self.spec = dict(spec)

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.spec["input_shape"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def create_model(
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    **kwargs,
) -> ImageClassifier:
    """Build registered architecture `arch` with normalization in front.

    `input_shape` is (C, H, W) of the images the model will see; `mean`/`std` have C entries.
    Extra `kwargs` go to the builder (e.g. ``pretrained`` for torchvision models).
    """
    if arch not in _REGISTRY:
        raise ConfigError(f"unknown model {arch!r}; registered models: {', '.join(available_models())}")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W), got {input_shape}")
    if len(mean) != input_shape[0]:
        raise ConfigError(
            f"normalization has {len(mean)} channels but the input has {input_shape[0]}; "
            "set data.mean/data.std to one value per channel"
        )
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    net = _REGISTRY[arch](num_classes=int(num_classes), input_shape=input_shape, **kwargs)
    spec = {
        "arch": arch,
        "num_classes": int(num_classes),
        "input_shape": list(input_shape),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "kwargs": dict(kwargs),
    }
    return ImageClassifier(Normalize(mean, std), net, spec)
