"""Run an attack over a large set in chunks, on the model's device, without per-sample loops."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def attack_chunks(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                  index: Tensor | None = None,
                  on_batch: Callable[[int], None] | None = None) -> Iterator[tuple[int, Tensor]]:
    """Attack ``x[index]`` (all of `x` (N, C, H, W) if `index` is None) `batch_size` images at a time, yielding
    ``(start, x_adv)``: the adversarial examples of positions ``start .. start + len(x_adv)`` of the selection, on
    the model's device.

    Only one chunk's images exist at a time (no copy of the selection is made), so a caller that judges each chunk
    as it comes holds per-example results only. For a `PGD` with random start, one generator (seeded with
    ``attack.seed``) serves all chunks, so each chunk draws fresh starts and the whole run is reproducible for a
    fixed seed and `batch_size` (a different `batch_size` gives different draws). `on_batch` is called with the
    number of images of each chunk once it is attacked (progress reporting). Once the caller is done with a chunk,
    the host memory its attack and the caller's use of it freed is handed back before the next chunk
    (`release_freed_memory`), so peak memory does not grow with the number of chunks.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    device = model_device(model, x.device)
    generator = attack.make_generator(device) if isinstance(attack, PGD) else None
    count = x.shape[0] if index is None else index.shape[0]
    for start in range(0, count, batch_size):
        rows = slice(start, start + batch_size) if index is None else index[start:start + batch_size]
        xb = x[rows].to(device, non_blocking=True)
        yb = y[rows].to(device, non_blocking=True)
        x_adv = attack(model, xb, yb, generator=generator) if generator is not None else attack(model, xb, yb)
        del xb, yb
        if on_batch is not None:
            on_batch(x_adv.shape[0])
        yield start, x_adv
        del x_adv
        release_freed_memory()  # the batch's attack buffers: without it glibc keeps them and RSS grows with N


def attack_in_batches(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                      on_batch: Callable[[int], None] | None = None) -> Tensor:
    """Adversarial examples for all of `x` (N, C, H, W), attacking `batch_size` images at a time (`attack_chunks`):
    the result comes back on x's device with x's dtype."""
    out = torch.empty_like(x)
    for start, x_adv in attack_chunks(attack, model, x, y, batch_size, on_batch=on_batch):
        out[start:start + x_adv.shape[0]].copy_(x_adv)
    return out
