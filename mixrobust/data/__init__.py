"""Data modules: images in [0, 1] as float32 (N, C, H, W), labels int64 (N,).

Each class is a LightningDataModule instantiated by Hydra (``_target_``); see `ImageDataModule`
for the shared arguments and the split / loader contracts.
"""

from mixrobust.data.augment import (
    apply_crop_flip,
    augmentation_seed,
    draw_crop_flip_params,
    random_crop_flip,
    to_unit_float,
)
from mixrobust.data.base import ImageDataModule, check_labels
from mixrobust.data.datasets import CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, MNISTDataModule
from mixrobust.data.imagefolder import ImageFolderDataModule
from mixrobust.data.loaders import InMemoryLoader, TensorImageDataset, split_train_val, subset_indices

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "InMemoryLoader",
    "MNISTDataModule",
    "TensorImageDataset",
    "apply_crop_flip",
    "augmentation_seed",
    "check_labels",
    "draw_crop_flip_params",
    "random_crop_flip",
    "split_train_val",
    "subset_indices",
    "to_unit_float",
]
