"""The tensor datasets: digits (embedded), MNIST, CIFAR-10 and CIFAR-100.

Each loads its official train / test split as uint8 (N, C, H, W) images and int64 labels; the
base class does the rest (validation split, loaders, augmentation). Files are checked as they
are read: a truncated or corrupt one raises a DataError naming it and the fix.
"""

from __future__ import annotations

import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mixrobust.data.base import ImageDataModule, check_labels
from mixrobust.errors import DataError, MixrobustError

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
MNIST_FIX = "re-copy it from the official release (or delete it and set data.download=true)"
IDX_MAGIC = {True: 2051, False: 2049}  # images (uint8, 3 dims), labels (uint8, 1 dim)


class MNISTDataModule(ImageDataModule):
    """MNIST, 28x28 grey, 60000 train / 10000 test, from the four uncompressed IDX files.

    `root` is torchvision's root (holding ``MNIST/raw``) or the ``MNIST`` folder itself. The files
    are read and checked by `read_idx` (torchvision only downloads them).
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
        """Read and check the split's two IDX files (header, size, counts, labels in [0, 10))."""
        raw = self._torchvision_root() / "MNIST" / "raw"
        prefix = "train" if train else "t10k"
        image_path, label_path = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
        images = read_idx(image_path, images=True)  # (N, 28, 28)
        labels = read_idx(label_path, images=False)  # (M,)
        if len(images) != len(labels):
            raise DataError(f"MNIST files {image_path} ({len(images):,} images) and {label_path} "
                            f"({len(labels):,} labels) do not match: they come from different splits or "
                            "releases; re-copy both from the official release (or delete them and set "
                            "data.download=true)")
        labels = torch.from_numpy(labels.astype(np.int64))
        check_labels(labels, self.num_classes, f"MNIST file {label_path}")
        return torch.from_numpy(images).unsqueeze(1), labels  # (N, 1, 28, 28), (N,)


def read_idx(path: Path, images: bool) -> np.ndarray:
    """One uncompressed MNIST IDX file as uint8: images (N, 28, 28) or labels (N,).

    The header is checked here, not left to torchvision: magic number 2051 (images) or 2049
    (labels), 28x28 images, and a file size of exactly header + N * item bytes. Raises DataError
    naming the file otherwise.
    """
    data = np.fromfile(path, dtype=np.uint8)  # (bytes,)
    header = 16 if images else 8
    if data.size < header:
        raise DataError(f"MNIST file {path} is truncated or corrupt ({data.size:,} bytes, shorter than "
                        f"its {header}-byte IDX header); {MNIST_FIX}")
    fields = [int(v) for v in data[:header].view(">u4")]  # magic, count[, rows, cols]
    if fields[0] != IDX_MAGIC[images]:
        gzipped = " (it is gzip-compressed: gunzip it)" if data[0] == 0x1F and data[1] == 0x8B else ""
        raise DataError(f"MNIST file {path} is not an IDX {'image' if images else 'label'} file (magic number "
                        f"{fields[0]}, expected {IDX_MAGIC[images]}){gzipped}; {MNIST_FIX}")
    n, item = fields[1], (28, 28) if images else ()
    if images and tuple(fields[2:]) != item:
        raise DataError(f"MNIST file {path} holds {fields[2]}x{fields[3]} images, expected 28x28; {MNIST_FIX}")
    expected = header + n * int(np.prod(item, dtype=np.int64))
    if data.size != expected:
        what = f"{n:,} 28x28 images" if images else f"{n:,} labels"
        raise DataError(f"MNIST file {path} is truncated or corrupt ({data.size:,} bytes, expected {expected:,} "
                        f"for {what}); {MNIST_FIX}")
    return data[header:].reshape(n, *item)


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
        """Read the split from the detected layout, checking every file (DataError naming it)."""
        kind, folder = self.layout()
        if kind == "torchvision":
            images, labels = self._load_pickles(folder, train)
        elif train:
            parts = [read_cifar_npz(path, "x_train", "y_train", self.num_classes) for path in _npz_train_files(folder)]
            images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            images, labels = read_cifar_npz(folder / "test_1k.npz", "x_test", "y_test", self.num_classes)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        return x, torch.from_numpy(labels.astype(np.int64))

    def _load_pickles(self, folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """The official python pickles, read by torchvision (its own loader of this trusted format)."""
        try:
            ds = self._torchvision_class()(str(folder), train=train, download=False)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
            raise self._pickle_error(folder, err) from err
        return ds.data, np.asarray(ds.targets)  # (N, 32, 32, 3) uint8, (N,)

    def _pickle_error(self, folder: Path, err: Exception) -> MixrobustError:
        """The error naming the pickle that torchvision could not read: missing, or failing its MD5."""
        from torchvision.datasets.utils import check_integrity

        cls = self._torchvision_class()
        base = folder / cls.base_folder
        for name, md5 in (*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])):
            path = base / name
            if not path.is_file():
                return self._not_found(f"{path} is missing")
            if not check_integrity(str(path), md5):
                return DataError(f"{self.name} file {path} is truncated or corrupt ({path.stat().st_size:,} bytes, "
                                 "MD5 differs from the official release's); re-copy it from the official release "
                                 f"(or delete {base} and set data.download=true)")
        return DataError(f"{self.name} files in {base} could not be read ({type(err).__name__}: {err}); "
                         "re-copy them from the official release")

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


NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
NPZ_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")  # zip (npz), empty zip, .npy


def read_cifar_npz(path: Path, x_key: str, y_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) of one CIFAR npz file (arrays `x_key`, `y_key`).

    Raises DataError naming the file if it is not a readable npz archive (truncated, corrupt),
    lacks an array, has the wrong dtype or shape, holds different image and label counts, or a
    label outside [0, num_classes). Pickled objects are never loaded.
    """
    fix = "re-copy it from the original files"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith(NPZ_SIGNATURES):  # checked here: numpy would suggest unpickling it
        raise DataError(f"CIFAR file {path} is truncated or corrupt ({size:,} bytes; not an npz archive: it "
                        f"starts with neither the zip nor the .npy signature); {fix}")
    try:
        archive = np.load(path, allow_pickle=False)
        present, arrays = None, None
        if isinstance(archive, np.lib.npyio.NpzFile):  # else a single .npy array
            with archive:
                present = archive.files
                if {x_key, y_key} <= set(present):
                    arrays = [archive[x_key], archive[y_key]]
    except NPZ_READ_ERRORS as err:
        raise DataError(f"CIFAR file {path} is truncated or corrupt ({size:,} bytes; not a readable npz "
                        f"archive: {err}); {fix}") from err
    if present is None:
        raise DataError(f"CIFAR file {path} is a single .npy array, not an npz archive with {x_key} and {y_key}; {fix}")
    if arrays is None:
        missing = [k for k in (x_key, y_key) if k not in present]
        raise DataError(f"CIFAR file {path} lacks the array(s) {', '.join(missing)} (it holds: "
                        f"{', '.join(present) or 'nothing'}); expected {x_key} and {y_key}; {fix}")
    images, labels = arrays
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"CIFAR file {path}: {x_key} is {images.dtype} of shape {images.shape}, expected uint8 "
                        f"(N, 32, 32, 3) (HWC RGB); {fix}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"CIFAR file {path}: {y_key} is {labels.dtype} of shape {labels.shape}, expected integer "
                        f"class indices of shape (N,); {fix}")
    if len(labels) != len(images):
        raise DataError(f"CIFAR file {path} holds {len(images):,} images ({x_key}) but {len(labels):,} labels "
                        f"({y_key}); {fix}")
    check_labels(torch.from_numpy(labels.astype(np.int64)), num_classes, f"CIFAR file {path}")
    return images, labels
