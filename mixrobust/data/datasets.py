"""The tensor datasets: digits (embedded), MNIST, CIFAR-10 and CIFAR-100.

Each loads its official train / test split as uint8 (N, C, H, W) images and int64 labels; the
base class does the rest (validation split, loaders, augmentation).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mixrobust.data.base import ImageDataModule
from mixrobust.errors import DataNotFoundError

# Official test split of the digits data: a stratified 20 %, fixed independently of the run seed.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_STATE = 0


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes); needs no files.

    Pixel values 0..16 become uint8 ``round(v * 255 / 16)``. The test split is a stratified 20 %
    drawn with a constant random_state (360 images), the training split the other 1437.
    mean / std are those of the training split's pixels.
    """

    name = "digits"
    num_classes = 10
    input_shape = (1, 8, 8)
    mean = (0.3054,)
    std = (0.3760,)
    default_root = None
    flip_allowed = False

    def check(self, allow_download: bool = True) -> None:
        """Nothing to check: the data ships with scikit-learn."""

    def _load_official(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
        labels = digits.target.astype(np.int64)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
            random_state=DIGITS_SPLIT_STATE,
        )
        idx = np.sort(train_idx if train else test_idx)
        return torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx])


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MNISTDataModule(ImageDataModule):
    """MNIST, 28x28 grey, 60000 train / 10000 test, read by torchvision.datasets.MNIST.

    `root` is torchvision's root (holding ``MNIST/raw``) or the ``MNIST`` folder itself.
    """

    name = "mnist"
    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)
    flip_allowed = False
    can_download = True
    root_hint = "folder-holding-MNIST"

    def _torchvision_root(self) -> Path | None:
        candidates = (self.root, self.root.parent) if self.root.name == "MNIST" else (self.root,)
        for root in candidates:
            if all((root / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES):
                return root
        return None

    def check(self, allow_download: bool = True) -> None:
        if self._torchvision_root() is None and not (allow_download and self.download):
            raise self._not_found(f"expected the four uncompressed IDX files in {self.root / 'MNIST' / 'raw'}")

    def _download(self) -> None:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(str(self.root), train=train, download=True)

    def _load_official(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import MNIST

        ds = MNIST(str(self._torchvision_root()), train=train, download=False)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


CifarLayout = Literal["torchvision", "npz"]


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10, 32x32 RGB. Two layouts are detected under `root` or ``root/CIFAR10``:

    - the official python pickles (``cifar-10-batches-py``), read by torchvision;
    - the npz layout: every ``train_*.npz`` (x_train uint8 (N, 32, 32, 3), y_train) plus
      ``test_1k.npz`` (x_test, y_test; the first 1000 official test images).
    Default training augmentation: random crop with padding 4 and horizontal flip.
    """

    name = "cifar10"
    num_classes = 10
    input_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2471, 0.2435, 0.2616)
    default_augment = True
    default_crop_padding = 4
    default_flip = True
    can_download = True
    root_hint = "folder-holding-CIFAR10"
    pickle_folder = "cifar-10-batches-py"
    pickle_files = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
    subfolder = "CIFAR10"

    def _candidates(self) -> tuple[Path, ...]:
        return (self.root, self.root / self.subfolder)

    def layout(self) -> tuple[CifarLayout, Path] | None:
        """Which layout is present and the folder holding it (None if neither)."""
        for folder in self._candidates():
            if all((folder / self.pickle_folder / f).is_file() for f in self.pickle_files):
                return "torchvision", folder
            if _npz_train_files(folder) and (folder / "test_1k.npz").is_file():
                return "npz", folder
        return None

    def check(self, allow_download: bool = True) -> None:
        if self.layout() is None and not (allow_download and self.download):
            raise self._not_found(
                f"looked in {' and '.join(map(str, self._candidates()))} for {self.pickle_folder}/ "
                "or for train_*.npz with test_1k.npz"
            )

    def _torchvision_class(self) -> type:
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def _download(self) -> None:
        for train in (True, False):
            self._torchvision_class()(str(self.root), train=train, download=True)

    def _load_official(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        kind, folder = self.layout()
        if kind == "torchvision":
            ds = self._torchvision_class()(str(folder), train=train, download=False)
            images, labels = ds.data, np.asarray(ds.targets)
        elif train:
            images_parts, label_parts = [], []
            for path in _npz_train_files(folder):
                with np.load(path) as part:
                    images_parts.append(part["x_train"])
                    label_parts.append(part["y_train"])
            images, labels = np.concatenate(images_parts), np.concatenate(label_parts)
        else:
            with np.load(folder / "test_1k.npz") as part:
                images, labels = part["x_test"], part["y_test"]
        if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or len(labels) != len(images):
            raise DataNotFoundError(f"{self.name} files in {folder} hold images of shape {images.shape} "
                                    f"({images.dtype}) and {len(labels)} labels; expected (N, 32, 32, 3) uint8")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        return x, torch.from_numpy(labels.astype(np.int64))


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (100 fine classes) from the official python pickles, via torchvision."""

    name = "cifar100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    pickle_folder = "cifar-100-python"
    pickle_files = ("train", "test")
    subfolder = "CIFAR100"
    root_hint = "folder-holding-CIFAR100"

    def layout(self) -> tuple[CifarLayout, Path] | None:
        for folder in self._candidates():
            if all((folder / self.pickle_folder / f).is_file() for f in self.pickle_files):
                return "torchvision", folder
        return None

    def check(self, allow_download: bool = True) -> None:
        if self.layout() is None and not (allow_download and self.download):
            raise self._not_found(
                f"looked in {' and '.join(map(str, self._candidates()))} for {self.pickle_folder}/train and test"
            )

    def _torchvision_class(self) -> type:
        from torchvision.datasets import CIFAR100

        return CIFAR100


def _npz_train_files(folder: Path) -> list[Path]:
    """Every ``train_<k>.npz`` in `folder`, in numeric order of k."""
    files = [p for p in folder.glob("train_*.npz") if re.fullmatch(r"train_\d+\.npz", p.name)]
    return sorted(files, key=lambda p: int(p.name[6:-4]))
