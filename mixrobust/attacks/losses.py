"""Per-example attack losses. Both are computed in float32, whatever dtype the logits come in."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from mixrobust.errors import check_choice

AttackLoss = Literal["ce", "margin"]
LOSSES: tuple[str, ...] = get_args(AttackLoss)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin ``max_{i != y} z_i - z_y`` per example, (N, K) -> (N,).

    Positive exactly where some other class beats the label (the example is misclassified,
    up to ties).
    """
    logits = logits.float()
    z_y = logits.gather(1, y[:, None]).squeeze(1)  # (N,)
    is_label = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, y[:, None], True)  # (N, K)
    z_other = logits.masked_fill(is_label, float("-inf")).amax(dim=1)  # (N,)
    return z_other - z_y


def cross_entropy_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy ``-log softmax(z)_y`` per example, (N, K) -> (N,)."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def attack_loss(name: AttackLoss, logits: Tensor, y: Tensor) -> Tensor:
    """The per-example loss `name` (one of `LOSSES`) that an attack maximises, (N,) float32."""
    check_choice("attack.loss", name, LOSSES)
    return cross_entropy_loss(logits, y) if name == "ce" else margin_loss(logits, y)
