"""Any ``root/{train,val|test}/<class>/<image>`` folder, streamed from disk with a DataLoader."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Subset

from mixrobust.data.base import SPLITS, ImageDataModule, Split, _info
from mixrobust.data.loaders import split_train_val
from mixrobust.errors import ConfigError, DataError, check_choice

if TYPE_CHECKING:  # imported where used: any torchvision import loads its whole model zoo
    from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std for images of `channels` channels: per channel for 3; for 1, their channel
    averages (a grayscale image that a pretrained network sees repeated to 3 channels)."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ConfigError(f"ImageNet's normalization is defined for 1- or 3-channel images, not {channels}")


def _class_names(folder: Path) -> list[str]:
    """Sorted sub-folder names, as torchvision's ImageFolder indexes them."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


class ImageFolderDataModule(ImageDataModule):
    """RGB images in class sub-folders: ``root/train`` (train + val) and ``root/val`` or ``root/test``.

    The test folder is the official test split; validation is carved from ``train`` with `seed`.
    Training augmentation (default on): RandomResizedCrop(image_size) and a horizontal flip.
    Evaluation (and training without augmentation): Resize(resize_size) then
    CenterCrop(image_size); resize_size defaults to round(image_size / 0.875).
    Always uses a DataLoader (`in_memory` is ignored). Normalization constants are ImageNet's.
    `setup` (and `load_all`) list every image file and check that no class folder is empty,
    without decoding images; an unreadable image fails when a batch first holds it.
    """

    name = "imagefolder"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    default_root = None
    default_augment = True
    default_flip = True
    root_hint = "folder-with-train-and-val"

    def __init__(self, root: str | None = None, image_size: int = 224, resize_size: int | None = None,
                 **kwargs: Any):
        if image_size < 1:
            raise ConfigError(f"data.image_size must be >= 1, got {image_size}")
        self.image_size = image_size
        self.resize_size = resize_size if resize_size is not None else round(image_size / 0.875)
        if self.resize_size < image_size:
            raise ConfigError(f"data.resize_size={self.resize_size} is smaller than image_size={image_size}")
        self.input_shape = (3, image_size, image_size)
        self._datasets: dict[str, Any] = {}
        super().__init__(root=root, **kwargs)
        if self.crop_padding:
            raise ConfigError("imagefolder augments with RandomResizedCrop; set data.crop_padding=0")
        self.in_memory = False
        self.hparams.update(in_memory=False)

    def _folders(self) -> tuple[Path, Path | None]:
        test = next((self.root / n for n in ("val", "test") if (self.root / n).is_dir()), None)
        return self.root / "train", test

    def check(self, allow_download: bool = True) -> None:
        """Check that train/ and val/ (or test/) exist, hold the same non-empty class folders."""
        if self.root is None or not self.root.is_dir():
            raise self._not_found("the folder does not exist")
        train, test = self._folders()
        if not train.is_dir() or test is None:
            raise self._not_found("expected sub-folders train/ and val/ (or test/), one folder per class in each")
        classes = _class_names(train)
        if not classes or not any(True for _ in os.scandir(train / classes[0])):
            raise self._not_found(f"{train} holds no class folder with images")
        test_classes = _class_names(test)
        if test_classes != classes:
            missing = sorted(set(classes) ^ set(test_classes))[:5]
            raise ConfigError(f"class folders of {train} and {test} differ (e.g. {missing}); "
                              "labels would not match")
        self.num_classes = len(classes)

    def _transform(self, train: bool) -> v2.Transform:
        from torchvision.transforms import v2

        if train and self.augment:
            steps = [v2.ToImage(), v2.RandomResizedCrop(self.image_size, antialias=True)]
            if self.flip:
                steps.append(v2.RandomHorizontalFlip())
        else:
            steps = [v2.ToImage(), v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.image_size)]
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])

    def setup(self, stage: str | None = None) -> None:
        """List the image files of the splits that `stage` needs (see `_list_images`), once each."""
        train_dir, test_dir = self._folders()
        if stage in (None, "fit", "validate") and "train" not in self._datasets:
            self.check()
            full = self._list_images(train_dir, self._transform(train=True))
            evaluated = copy.copy(full)
            evaluated.transform = self._transform(train=False)
            train_idx, val_idx = split_train_val(len(full), self.val_size, self.seed)
            self._datasets["train"] = Subset(full, train_idx.tolist())
            self._datasets["train_eval"] = Subset(evaluated, train_idx.tolist())
            self._datasets["val"] = Subset(evaluated, val_idx.tolist())
            _info(f"{self.name}: {len(train_idx)} train / {len(val_idx)} val images from {train_dir}")
        if stage in (None, "test", "predict") and "test" not in self._datasets:
            self.check()
            self._datasets["test"] = self._list_images(test_dir, self._transform(train=False))
            _info(f"{self.name}: {len(self._datasets['test'])} test images from {test_dir}")

    @staticmethod
    def _list_images(folder: Path, transform: v2.Transform) -> Any:
        """An ImageFolder over `folder`; DataError if it cannot be listed or a class folder holds no image.

        Cheap: files are listed by name and extension, never opened.
        """
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import IMG_EXTENSIONS

        try:
            dataset = ImageFolder(str(folder), transform=transform, allow_empty=True)
        except OSError as err:
            raise DataError(f"cannot list the images in {folder} ({err}); check that it is readable") from err
        counts = torch.bincount(torch.tensor(dataset.targets, dtype=torch.long), minlength=len(dataset.classes))
        empty = [str(folder / dataset.classes[k]) for k in (counts == 0).nonzero().flatten().tolist()]
        if empty:
            more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
            which = (f"class folder {empty[0]} holds" if len(empty) == 1
                     else f"class folders {', '.join(empty[:3])}{more} hold")
            raise DataError(f"{which} no readable image file (extensions {', '.join(IMG_EXTENSIONS)}); "
                            "add the images or remove the folder from every split")
        return dataset

    def _split_size(self, split: str) -> int:
        return len(self._datasets[split])

    def _dataset(self, split: str) -> Any:
        if split not in self._datasets:
            self.setup("test" if split == "test" else "fit")
        return self._datasets[split]

    def split_tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("imagefolder data is not stored as uint8 tensors; use eval_tensors")

    def eval_tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split through the evaluation transform: float32 (N, 3, S, S) in [0, 1], int64 (N,)."""
        check_choice("split", split, SPLITS)
        dataset = self._dataset("train_eval" if split == "train" else split)
        loader = DataLoader(dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers)
        xs, ys = zip(*loader) if len(dataset) else ((torch.empty(0, *self.input_shape),), (torch.empty(0),))
        return torch.cat(xs), torch.cat(ys).long()

    def _loader(self, split: str, train: bool) -> Any:
        return self._dataloader(self._dataset(split), train)
