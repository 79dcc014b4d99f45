"""Batched, on-device data augmentation: random crop with zero padding and horizontal flip.

Every function works on a whole batch with tensor ops (no per-example Python loop), on whatever
device the batch lives on. Images are float (N, C, H, W); the output has the input's shape.
For reproducible (and resumable) augmentation, pass a generator seeded with `augmentation_seed`.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from mixrobust.errors import ConfigError
from mixrobust.runtime.seeds import mixed_seed


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1], bit-identical to torchvision's ``ToDtype(float32, scale=True)``.

    (x * (1/255) rather than x / 255, so the in-memory and DataLoader paths give the same floats.)
    """
    return x.to(torch.float32).mul_(1.0 / 255)


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of an epoch's augmentation on a rank: `mixed_seed` of (seed, epoch, rank)."""
    return mixed_seed(seed, epoch, rank)


def draw_crop_flip_params(
    n: int,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw per-example crop offsets and flip decisions.

    Returns ``offsets`` (n, 2) int64 with (top, left) in [0, 2 * padding], and ``flip_mask`` (n,)
    bool (all False when `flip` is False). Offsets are drawn before the flip mask, from
    `generator` (or the global RNG), on the generator's device, then moved to `device`.
    """
    if padding < 0:
        raise ConfigError(f"crop padding must be >= 0, got {padding}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=gen_device)
    if flip:
        flip_mask = torch.rand(n, generator=generator, device=gen_device) < 0.5
    else:
        flip_mask = torch.zeros(n, dtype=torch.bool, device=gen_device)
    return offsets.to(device or gen_device), flip_mask.to(device or gen_device)


def apply_crop_flip(
    x: torch.Tensor, padding: int, offsets: torch.Tensor, flip_mask: torch.Tensor
) -> torch.Tensor:
    """Crop each image of `x` at its offset out of the zero-padded batch, then flip where `flip_mask`.

    Output[n] equals ``pad(x[n])[:, top:top + H, left:left + W]``, mirrored left-right where
    ``flip_mask[n]``. The batch is padded once and crops are gathered by advanced indexing.
    """
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))  # (N, C, H + 2p, W + 2p)
        offsets = offsets.to(x.device)
        rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (N, H)
        cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (N, W)
        batch_idx = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chan_idx = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[batch_idx, chan_idx, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]  # (N, C, H, W)
    flip_mask = flip_mask.to(x.device).view(n, 1, 1, 1)
    return torch.where(flip_mask, x.flip(-1), x)


def random_crop_flip(
    x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop of size (H, W) from the image padded by `padding` zeros, then a random flip.

    Each example gets its own uniform offset in [0, 2 * padding]^2 and, if `flip`, is mirrored
    left-right with probability 1/2. `padding` = 0 and `flip` = False returns `x` unchanged.
    Randomness comes from `generator` (any device) or the global RNG.
    """
    if padding == 0 and not flip:
        return x
    offsets, flip_mask = draw_crop_flip_params(x.shape[0], padding, flip, generator, x.device)
    return apply_crop_flip(x, padding, offsets, flip_mask)
