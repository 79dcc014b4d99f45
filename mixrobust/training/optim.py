"""Optimizer construction from one config node.

The torch class is picked by `name`, so a per-(data, objective) recipe can switch SGD for AdamW by
setting ``optimizer.name`` (Hydra does not allow group overrides inside the interpolated recipe
configs), and keys that only one optimizer takes (momentum, betas) never reach the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch

from mixrobust.errors import ConfigError, check_choice

OptimizerName = Literal["sgd", "adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: OptimizerName = "sgd",
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """`torch.optim.SGD` (lr, momentum, nesterov, weight_decay) or `torch.optim.AdamW` (lr, betas, weight_decay)."""
    check_choice("optimizer.name", name, OPTIMIZERS)
    if not lr > 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
