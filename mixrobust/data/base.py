"""The base LightningDataModule: splits, loaders and the on-device batch hook.

Contract for every data module: batches reaching the LightningModule are ``(x, y)`` with x float32
(N, C, H, W) in [0, 1] and y int64 (N,). Normalization is left to the model (its first layer).

Splits: the official test split is only ever served by `test_dataloader` / ``eval_tensors("test")``;
validation is carved out of the official training split with `seed`, so model selection never
sees test images. Every split is checked as it is loaded (shape, dtype, labels in
[0, num_classes)); `ImageDataModule.load_all` loads and checks all of them before training starts.

Training augmentation on the in-memory path is drawn from a generator the data module owns,
re-seeded every epoch from (seed, epoch, global rank): epoch k augments identically whether the
run started at epoch 0 or was resumed at epoch k, on the CPU or a GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from mixrobust.data.augment import augmentation_seed, random_crop_flip, to_unit_float
from mixrobust.data.loaders import InMemoryLoader, TensorImageDataset, check_val_size, split_train_val
from mixrobust.errors import ConfigError, DataError, DataNotFoundError, check_choice

if TYPE_CHECKING:  # imported where used: any torchvision import loads its whole model zoo
    from torchvision.transforms import v2

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = get_args(Split)


@rank_zero_only
def _info(msg: str) -> None:
    log.info(msg)


def check_labels(labels: torch.Tensor, num_classes: int, source: str) -> None:
    """Raise DataError unless every label of `labels` (N,) lies in [0, num_classes).

    `source` names where the labels come from (a file), for the message.
    """
    bad = (labels < 0) | (labels >= num_classes)  # (N,)
    n_bad = int(bad.sum())
    if n_bad:
        raise DataError(
            f"{source} holds {n_bad:,} of {labels.numel():,} labels outside [0, {num_classes}) "
            f"(min {int(labels.min())}, max {int(labels.max())}): it is corrupt or belongs to another "
            "data set; re-copy it from the official release"
        )


class ImageDataModule(L.LightningDataModule):
    """Image classification data as uint8 tensors, served in memory or through a DataLoader.

    Subclasses set the class attributes and implement `check` (cheap existence test of the
    files) and `_load_official(train)` -> (uint8 images (N, C, H, W), int64 labels (N,)).

    Args:
        root: folder holding the dataset (None: the dataset's `default_root`).
        batch_size / eval_batch_size: per-device batch size for training / val and test.
        num_workers, pin_memory, persistent_workers: DataLoader settings (DataLoader path only).
        val_size: fraction in [0, 1) or count of the official training split held out for
            validation, drawn with `seed`.
        seed: seeds the train/val split, the per-epoch shuffling (``seed + epoch``) and the
            in-memory path's per-epoch augmentation (see `transform_batch`).
        augment: master switch for training augmentation (None: dataset default).
        crop_padding: random crop with this much zero padding; 0 = no crop (None: default).
        flip: random horizontal flip (None: dataset default).
        in_memory: serve batches from tensors on the training device and augment there, with
            per-epoch reproducible randomness (see `transform_batch`); False uses a DataLoader
            with per-image torchvision transforms, which draw from the global RNG (of each
            worker), so resuming there does not replay an epoch's augmentation exactly.
        download: let torchvision download a missing dataset in `prepare_data`.
        drop_last: drop each epoch's final training batch if it is smaller than `batch_size`.
    """

    name: ClassVar[str] = "image"
    num_classes: int = 0
    input_shape: tuple[int, int, int] = (0, 0, 0)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    default_root: ClassVar[str | None] = "data"
    default_augment: ClassVar[bool] = False
    default_crop_padding: ClassVar[int] = 0
    default_flip: ClassVar[bool] = False
    flip_allowed: ClassVar[bool] = True
    can_download: ClassVar[bool] = False
    root_hint: ClassVar[str] = "folder"  # what data.root should point at, for error messages

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: int | float = 0.1,
        seed: int = 0,
        augment: bool | None = None,
        crop_padding: int | None = None,
        flip: bool | None = None,
        in_memory: bool = True,
        download: bool = False,
        drop_last: bool = False,
        persistent_workers: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        for key, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{key} must be an integer >= {low}, got {value!r}")
        check_val_size(val_size)
        self.augment = self.default_augment if augment is None else bool(augment)
        self.crop_padding = self.default_crop_padding if crop_padding is None else int(crop_padding)
        self.flip = self.default_flip if flip is None else bool(flip)
        self.hparams.update(augment=self.augment, crop_padding=self.crop_padding, flip=self.flip)
        if self.crop_padding < 0:
            raise ConfigError(f"data.crop_padding must be >= 0, got {self.crop_padding}")
        if self.augment and self.flip and not self.flip_allowed:
            raise ConfigError(f"data.flip=true mirrors {self.name} images and changes their class; "
                              "set data.flip=false")
        if self.augment and self.crop_padding == 0 and not self.flip:
            log.warning("data.augment=true but crop_padding=0 and flip=false: no augmentation")
        root = root if root is not None else self.default_root
        self.root = Path(root).expanduser().absolute() if root is not None else None
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.val_size, self.seed = val_size, seed
        self.in_memory, self.download, self.drop_last = in_memory, download, drop_last
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # CPU uint8 images, labels
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._aug_generator: torch.Generator | None = None  # CPU generator of the epoch below
        self._aug_key: tuple[int, int] | None = None  # (epoch, global rank) it was seeded for
        self.check()

    # -- dataset-specific ------------------------------------------------------------------
    @property
    def val_split(self) -> dict:
        """Which training images the validation split holds out: ``{"seed", "val_size"}`` (a checkpoint records it;
        a map fit checks its images against it)."""
        return {"seed": self.seed, "val_size": self.val_size}

    def check(self, allow_download: bool = True) -> None:
        """Raise DataNotFoundError unless the files are present; only tests existence (cheap).

        With `download` (and `allow_download`), missing files are left to `prepare_data`.
        """
        raise NotImplementedError

    def _load_official(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The official training (`train`) or test split as uint8 (N, C, H, W), int64 (N,).

        Raises DataError naming the file if one is truncated, corrupt or holds the wrong arrays.
        """
        raise NotImplementedError

    def _download(self) -> None:
        """Fetch the dataset into `root` (only for datasets with `can_download`)."""
        raise NotImplementedError

    def _not_found(self, what: str) -> DataNotFoundError:
        """The one error for a missing dataset: where it looked, and the config keys that fix it."""
        fix = f"set the config key data.root=/path/to/{self.root_hint}"
        if self.can_download:
            fix += " (or data.download=true to let torchvision download it)"
        where = self.root if self.root is not None else "(no folder: data.root is not set)"
        return DataNotFoundError(f"{self.name} data not found in {where}: {what}; {fix}")

    # -- splits ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download and self.can_download:
            try:
                self.check(allow_download=False)
            except DataNotFoundError:
                self._download()

    def load_all(self) -> dict[str, int]:
        """Load and check every split (train, val and test) now; return their sizes.

        The training task calls this once, before it builds the Trainer, so a missing, truncated
        or corrupt file (of any split, the test split included) stops the run within seconds,
        naming the file, instead of after training when `trainer.test` first reads the test
        split. Loaded splits are kept: the Trainer's later `setup` calls load nothing again.
        With `download` and files still missing, nothing is loaded here (empty dict): the
        Trainer's `prepare_data` downloads them once per node and `setup` checks them.

        Under DDP every process calls it before the Trainer starts and keeps its own copy, as
        `setup` would have. Raises DataNotFoundError for missing files and DataError for files
        that are present but unreadable (truncated, corrupt, wrong arrays, shape or dtype,
        labels outside [0, num_classes)).
        """
        if self.download and self.can_download:
            try:
                self.check(allow_download=False)
            except DataNotFoundError:
                _info(f"{self.name}: files missing; prepare_data will download them")
                return {}
        self.setup(None)
        return {split: self._split_size(split) for split in SPLITS}

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that `stage` needs ("fit", "validate", "test", None = all), once each.

        Each official split is read and checked (see `_load_checked`) the first time it is needed.
        "fit" (and None) also restart the augmentation generator, so a second `fit` on the same
        data module augments like the first.
        """
        if stage in (None, "fit"):
            self._aug_generator, self._aug_key = None, None
        if stage in (None, "fit", "validate") and "train" not in self._splits:
            self.check(allow_download=False)
            x, y = self._load_checked(train=True)
            train_idx, val_idx = split_train_val(y.shape[0], self.val_size, self.seed)
            self._splits["train"] = (x[train_idx], y[train_idx])
            self._splits["val"] = (x[val_idx], y[val_idx])
            _info(f"{self.name}: {len(train_idx)} train / {len(val_idx)} val examples "
                  f"(seed {self.seed}) from the official training split")
        if stage in (None, "test", "predict") and "test" not in self._splits:
            self.check(allow_download=False)
            self._splits["test"] = self._load_checked(train=False)
            _info(f"{self.name}: {self._splits['test'][1].shape[0]} test examples")

    def _load_checked(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`_load_official`, then a DataError unless it holds >= 1 example of `input_shape` (uint8)
        and as many int64 labels, all in [0, num_classes)."""
        x, y = self._load_official(train)  # (N, C, H, W), (N,)
        what = f"the official {'training' if train else 'test'} split of {self.name} in {self.root}"
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != tuple(self.input_shape) or y.shape != (x.shape[0],):
            raise DataError(f"{what} holds {x.dtype} images of shape {tuple(x.shape)} and labels of shape "
                            f"{tuple(y.shape)}; expected uint8 (N, {', '.join(map(str, self.input_shape))}) "
                            "and (N,); re-copy the files from the official release")
        if x.shape[0] == 0:
            raise DataError(f"{what} holds no examples; re-copy the files from the official release")
        check_labels(y, self.num_classes, what)
        return x, y.long()

    def _split_size(self, split: str) -> int:
        """Number of examples of a loaded split."""
        return self._splits[split][1].shape[0]

    def split_tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """A split as stored: uint8 images (N, C, H, W) and int64 labels (N,), on the CPU."""
        check_choice("split", split, SPLITS)
        if split not in self._splits:
            self.setup("test" if split == "test" else "fit")
        return self._splits[split]

    def eval_tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split, unaugmented: float32 images (N, C, H, W) in [0, 1] and int64 labels (N,)."""
        x, y = self.split_tensors(split)
        return to_unit_float(x), y

    # -- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> Any:
        return self._loader("train", train=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", train=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", train=False)

    def _device_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split on the trainer's root device (moved once), or on the CPU without a trainer."""
        x, y = self.split_tensors(split)
        if self.trainer is None:
            return x, y
        device = self.trainer.strategy.root_device
        if split not in self._on_device or self._on_device[split][0].device != device:
            self._on_device[split] = (x.to(device), y.to(device))
        return self._on_device[split]

    def _loader(self, split: str, train: bool) -> Any:
        if not self.in_memory:
            dataset = TensorImageDataset(*self.split_tensors(split), transform=self._transform(train))
            return self._dataloader(dataset, train)
        x, y = self._device_tensors(split)
        trainer = self.trainer
        return InMemoryLoader(
            x, y,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            drop_last=self.drop_last and train,
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
        )

    def _dataloader(self, dataset: Any, train: bool) -> DataLoader:
        """A standard DataLoader; under DDP Lightning swaps in a DistributedSampler."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def _transform(self, train: bool) -> v2.Transform:
        """Per-image transforms of the DataLoader path: uint8 tensor -> float in [0, 1] (+ augment)."""
        from torchvision.transforms import v2

        steps: list[v2.Transform] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if train and self.augment:
            if self.crop_padding > 0:
                steps.append(v2.RandomCrop(self.input_shape[1:], padding=self.crop_padding, fill=0))
            if self.flip:
                steps.append(v2.RandomHorizontalFlip())
        return v2.Compose([*steps, v2.ToPureTensor()])

    # -- batch hook ------------------------------------------------------------------------
    def transform_batch(
        self, batch: tuple[torch.Tensor, torch.Tensor], train: bool, epoch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch -> float32 in [0, 1], then (if `train` and `augment`) random crop / flip.

        Crops and flips come from the data module's own CPU generator, seeded with
        ``augmentation_seed(seed, epoch, global rank)`` whenever the (epoch, rank) changes (and at
        `setup("fit")`), never from the global RNG: the k-th training batch of an epoch gets the
        same augmentation whatever ran before (a run resumed at that epoch, other RNG users), and
        the same on the CPU and on a GPU (parameters are drawn on the CPU, then moved to the
        batch's device). `epoch` defaults to the trainer's current epoch (0 without a trainer).
        Float batches (the DataLoader path, already transformed per image) pass through.
        """
        x, y = batch
        if x.dtype != torch.uint8:
            return x, y
        x = to_unit_float(x)  # (N, C, H, W)
        if train and self.augment:
            x = random_crop_flip(x, self.crop_padding, self.flip, generator=self._augmentation_generator(epoch))
        return x, y

    def _augmentation_generator(self, epoch: int | None = None) -> torch.Generator:
        """The CPU generator of `epoch` on this rank, re-seeded when (epoch, rank) changes."""
        trainer = self.trainer
        if epoch is None:
            epoch = trainer.current_epoch if trainer is not None else 0
        key = (int(epoch), trainer.global_rank if trainer is not None else 0)
        if self._aug_generator is None or self._aug_key != key:
            self._aug_generator = torch.Generator().manual_seed(augmentation_seed(self.seed, *key))
            self._aug_key = key
        return self._aug_generator

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook (it takes precedence over a LightningModule's own): see `transform_batch`."""
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(batch, train=training)
