"""Index helpers and loaders over uint8 image tensors.

`InMemoryLoader` serves batches by slicing tensors that already sit on the training device, so an
epoch over CIFAR-10 costs no host-to-device copies and no worker processes.
`TensorImageDataset` is the map-style counterpart for a standard DataLoader with per-image
torchvision transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset

from mixrobust.errors import ConfigError


def subset_indices(
    labels: torch.Tensor, n: int | None = None, n_per_class: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Indices of a subset of a labelled split, sorted ascending (LongTensor).

    - neither set: every index; `n`: the first `n` examples (0 .. n-1);
    - `n_per_class`: exactly `n_per_class` examples of every class 0 .. max(labels), chosen
      uniformly at random without replacement, reproducibly from `seed`.
    Raises ConfigError if both are set, a count is negative, `n` exceeds the split, or a
    class has fewer than `n_per_class` examples.
    """
    labels = torch.as_tensor(labels).long().cpu()  # (N,)
    total = labels.numel()
    if n is not None and n_per_class is not None:
        raise ConfigError(f"set at most one of n={n} and n_per_class={n_per_class}")
    if n_per_class is None:
        if n is None:
            return torch.arange(total)
        if not 0 <= n <= total:
            raise ConfigError(f"n={n} examples requested, but the split has {total}")
        return torch.arange(n)
    if n_per_class < 0:
        raise ConfigError(f"n_per_class must be >= 0, got {n_per_class}")
    if total == 0:
        return torch.arange(0)
    counts = torch.bincount(labels)  # (K,)
    short = (counts < n_per_class).nonzero().flatten().tolist()
    if short:
        have = ", ".join(f"class {k}: {counts[k].item()}" for k in short[:5])
        raise ConfigError(f"n_per_class={n_per_class} but some classes have fewer examples ({have})")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=gen)  # random order ...
    order = order[torch.sort(labels[order], stable=True).indices]  # ... grouped by class
    starts = torch.cumsum(counts, 0) - counts  # (K,) first position of each class in `order`
    rank = torch.arange(total) - starts[labels[order]]  # position within its class
    return torch.sort(order[rank < n_per_class]).values


def check_val_size(val_size: int | float) -> None:
    """Raise ConfigError unless `val_size` is a fraction in [0, 1) or a count >= 0."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(f"data.val_size must be a fraction in [0, 1) or a count, got {val_size!r}")
    if isinstance(val_size, float) and not 0.0 <= val_size < 1.0:
        raise ConfigError(f"data.val_size={val_size} as a fraction must lie in [0, 1)")
    if isinstance(val_size, int) and val_size < 0:
        raise ConfigError(f"data.val_size={val_size} as a count must be >= 0")


def split_train_val(total: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 0 .. total-1 into sorted (train, val) indices; the val part drawn with `seed`.

    `val_size` is a fraction in [0, 1) (rounded to a count) or a count in [0, total).
    """
    check_val_size(val_size)
    n_val = round(val_size * total) if isinstance(val_size, float) else val_size
    if not 0 <= n_val < total:
        raise ConfigError(f"data.val_size={val_size} must leave training data out of {total} examples")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return torch.sort(perm[n_val:]).values, torch.sort(perm[:n_val]).values


class TensorImageDataset(Dataset):
    """Map-style dataset over uint8 images (N, C, H, W) and labels (N,), with a per-image transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        return (self.transform(image) if self.transform is not None else image), self.labels[i]


class InMemoryLoader:
    """Iterable of (x, y) batches sliced from tensors; yields exactly `len(self)` batches.

    Training (`shuffle`): every epoch draws one permutation of all examples from a generator
    seeded with ``seed + epoch`` (identical on every rank), cuts it into `world_size` equal
    shards of ``N // world_size`` (the last ``N % world_size`` examples of the permutation are
    skipped that epoch), and this rank takes shard `rank`, so all ranks see the same number of
    batches. `drop_last` also drops a final batch smaller than `batch_size`.
    Evaluation (not `shuffle`): this rank takes indices ``rank::world_size`` in order (no
    padding, no duplicates; shard sizes may differ by one).
    The epoch is ``epoch_fn()`` if given (e.g. the trainer's current epoch), else the number of
    earlier iterations over this loader. Batches live on the device of `images`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        epoch_fn: Callable[[], int] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} must lie in [0, world_size={world_size})")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels  # (N, C, H, W), (N,)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch_fn = epoch_fn
        self._iterations = 0

    def _num_examples(self) -> int:
        total = self.labels.shape[0]
        if self.shuffle:
            return total // self.world_size
        return len(range(self.rank, total, self.world_size))

    def __len__(self) -> int:
        n = self._num_examples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's example indices for `epoch`, in the order they are served (CPU LongTensor)."""
        total = self.labels.shape[0]
        if not self.shuffle:
            return torch.arange(self.rank, total, self.world_size)
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = total // self.world_size
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._iterations
        self._iterations += 1
        idx = self.epoch_indices(epoch).to(self.images.device)
        for b in range(len(self)):
            batch = idx[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[batch], self.labels[batch]
