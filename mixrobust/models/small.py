"""Small CNNs for digits (8x8) and MNIST (28x28): fast on a CPU, strong enough for PGD training."""

from __future__ import annotations

from torch import nn

from mixrobust.models.registry import register_model


@register_model("small_cnn")
def small_cnn(num_classes: int, input_shape, width: int = 32, hidden: int = 128) -> nn.Module:
    """Two conv blocks (conv-ReLU-conv-ReLU-pool) and a two-layer head.

    For 8x8 inputs the second pool is skipped so the feature map never shrinks below 2x2.
    """
    c, h, w = input_shape
    second_pool = min(h, w) >= 16
    layers = [
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
    ]
    h, w = h // 2, w // 2
    if second_pool:
        layers.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    layers += [
        nn.Flatten(),
        nn.Linear(2 * width * h * w, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)
