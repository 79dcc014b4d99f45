"""Run an attack over a large set in chunks, on the model's device, without per-sample loops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from mixrobust.attacks.pgd import PGD
from mixrobust.errors import ConfigError
from mixrobust.runtime.memory import release_freed_memory


class Attack(Protocol):
    """``attack(model, x, y) -> x_adv``: x in [0,1], x_adv in [0,1] and inside the threat ball."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor: ...


def model_device(model: nn.Module, default: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer; `default` for a stateless model."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return default


def attack_in_batches(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                      on_batch: Callable[[int], None] | None = None) -> Tensor:
    """Adversarial examples for all of `x` (N, C, H, W), attacking `batch_size` images at a time.

    Chunks are moved to the model's device and the result comes back on x's device with x's
    dtype. For a `PGD` with random start, one generator (seeded with ``attack.seed``) serves all
    chunks, so each chunk draws fresh starts and the whole run is reproducible for a fixed
    seed and `batch_size` (a different `batch_size` gives different draws). `on_batch` is called with
    the number of images of each chunk once it is attacked (progress reporting). The host memory a
    chunk's attack freed is handed back before the next (`release_freed_memory`), so peak memory
    does not grow with the number of chunks.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    device = model_device(model, x.device)
    generator = attack.make_generator(device) if isinstance(attack, PGD) else None
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], batch_size):
        stop = start + batch_size
        xb = x[start:stop].to(device, non_blocking=True)
        yb = y[start:stop].to(device, non_blocking=True)
        x_adv = attack(model, xb, yb, generator=generator) if generator is not None else attack(model, xb, yb)
        out[start:stop].copy_(x_adv)
        del x_adv
        release_freed_memory()  # the batch's attack buffers: without it glibc keeps them and RSS grows with N
        if on_batch is not None:
            on_batch(xb.shape[0])
    return out
