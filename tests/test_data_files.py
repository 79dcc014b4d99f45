"""Data files checked up front (truncated / corrupt files -> one DataError naming the file) and
augmentation that is reproducible per epoch (exact resume)."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixrobust.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    augmentation_seed,
    check_labels,
)
from mixrobust.errors import DataError, DataNotFoundError


# -- MNIST IDX files ---------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """An IDX file: big-endian magic, one count per dimension, then the uint8 data."""
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int = 30, n_test: int = 10) -> Path:
    """root/MNIST/raw with four small, valid IDX files; returns the raw folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return raw


def _load_error(dm, split: str = "all") -> str:
    """The DataError message of loading `split` (all: load_all)."""
    with pytest.raises(DataError) as info:
        dm.load_all() if split == "all" else dm.split_tensors(split)
    return str(info.value)


def test_fake_mnist_loads_and_load_all_reports_sizes(tmp_path):
    raw = _fake_mnist(tmp_path)
    dm = MNISTDataModule(root=str(tmp_path), val_size=5)
    assert dm.load_all() == {"train": 25, "val": 5, "test": 10}
    x, y = dm.split_tensors("test")
    assert x.dtype == torch.uint8 and x.shape == (10, 1, 28, 28) and y.dtype == torch.int64
    with open(raw / "t10k-images-idx3-ubyte", "rb") as f:
        assert x.numpy().tobytes() == f.read()[16:]
    assert y.tolist() == list(range(10))


def test_mnist_truncated_images_file(tmp_path):
    raw = _fake_mnist(tmp_path, n_test=10_000)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-48])
    message = _load_error(MNISTDataModule(root=str(tmp_path)))
    assert message == (f"MNIST file {path} is truncated or corrupt (7,839,968 bytes, expected 7,840,016 for "
                       "10,000 28x28 images); re-copy it from the official release (or delete it and set "
                       "data.download=true)")


def test_mnist_truncated_labels_and_header(tmp_path):
    raw = _fake_mnist(tmp_path)
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    assert f"MNIST file {labels} is truncated or corrupt (37 bytes, expected 38 for 30 labels)" in _load_error(
        MNISTDataModule(root=str(tmp_path)))
    labels.write_bytes(b"\x00\x00\x08")
    assert "shorter than its 8-byte IDX header" in _load_error(MNISTDataModule(root=str(tmp_path)))
    labels.write_bytes(b"")
    assert str(labels) in _load_error(MNISTDataModule(root=str(tmp_path)))


def test_mnist_wrong_magic_gzip_and_shape(tmp_path):
    raw = _fake_mnist(tmp_path)
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    original = images.read_bytes()
    shutil.copy(labels, images)  # a label file under the image file's name
    message = _load_error(MNISTDataModule(root=str(tmp_path)))
    assert message.startswith(f"MNIST file {images} is not an IDX image file (magic number 2049, expected 2051)")
    images.write_bytes(gzip.compress(original))  # still gzip-compressed
    assert "gzip-compressed: gunzip it" in _load_error(MNISTDataModule(root=str(tmp_path)))
    _write_idx(images, np.zeros((30, 32, 32)))
    assert f"MNIST file {images} holds 32x32 images, expected 28x28" in _load_error(
        MNISTDataModule(root=str(tmp_path)))


def test_mnist_count_mismatch_and_bad_labels(tmp_path):
    raw = _fake_mnist(tmp_path)
    images, labels = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    _write_idx(labels, np.arange(12) % 10)
    message = _load_error(MNISTDataModule(root=str(tmp_path)))
    assert message.startswith(f"MNIST files {images} (10 images) and {labels} (12 labels) do not match")
    assert "re-copy both" in message
    _write_idx(labels, np.array([0, 1, 2, 3, 4, 5, 6, 7, 10, 255]))
    message = _load_error(MNISTDataModule(root=str(tmp_path)))
    assert message.startswith(f"MNIST file {labels} holds 2 of 10 labels outside [0, 10) (min 0, max 255)")


def test_corrupt_test_split_fails_in_load_all_not_after_training(tmp_path):
    raw = _fake_mnist(tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    dm = MNISTDataModule(root=str(tmp_path))
    dm.setup("fit")  # what trainer.fit loads: the test split is not read yet
    assert str(path) in _load_error(dm)


def test_load_all_loads_each_split_once(monkeypatch):
    calls = []
    original = DigitsDataModule._load_official

    def counting(self, train):
        calls.append(train)
        return original(self, train)

    monkeypatch.setattr(DigitsDataModule, "_load_official", counting)
    dm = DigitsDataModule()
    assert dm.load_all() == {"train": 1293, "val": 144, "test": 360}
    for stage in ("fit", "validate", "test", "predict", None):
        dm.setup(stage)
    dm.eval_tensors("val"), dm.eval_tensors("test"), dm.load_all()
    assert calls == [True, False]


def test_load_all_with_download_leaves_missing_files_to_prepare_data(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    assert dm.load_all() == {}  # no network here: prepare_data (rank 0) downloads, setup checks
    with pytest.raises(DataNotFoundError):
        dm.setup("test")


@pytest.mark.real_data
def test_real_mnist_truncated_copy(data_root, tmp_path):
    shutil.copytree(data_root / "MNIST", tmp_path / "MNIST")
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-48])
    assert MNISTDataModule(root=str(data_root)).load_all() == {"train": 54000, "val": 6000, "test": 10000}
    assert "(7,839,968 bytes, expected 7,840,016 for 10,000 28x28 images)" in _load_error(
        MNISTDataModule(root=str(tmp_path)))


# -- CIFAR npz ---------------------------------------------------------------------------------
def _fake_cifar_npz(root: Path, n: int = 6) -> Path:
    folder = root / "CIFAR10"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in (1, 2):
        np.savez(folder / f"train_{k}.npz", x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y_train=(np.arange(n) % 10).astype(np.uint8))
    np.savez(folder / "test_1k.npz", x_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(4, dtype=np.uint8))
    return folder


def test_fake_cifar_npz_loads(tmp_path):
    _fake_cifar_npz(tmp_path)
    assert CIFAR10DataModule(root=str(tmp_path), val_size=2).load_all() == {"train": 10, "val": 2, "test": 4}


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b"", "is truncated or corrupt (0 bytes; not an npz archive"),
    (lambda b: b[: len(b) // 2], "is truncated or corrupt ("),
    (lambda b: b"not an archive" * 100, "(1,400 bytes; not an npz archive: it starts with neither the zip nor"),
    (lambda b: b[:1000] + bytes([b[1000] ^ 0xFF]) + b[1001:], "Bad CRC-32"),
])
def test_cifar_npz_unreadable(tmp_path, damage, expected):
    folder = _fake_cifar_npz(tmp_path)
    path = folder / "train_2.npz"
    path.write_bytes(damage(path.read_bytes()))
    message = _load_error(CIFAR10DataModule(root=str(tmp_path)))
    assert message.startswith(f"CIFAR file {path} ") and expected in message and "re-copy it" in message


@pytest.mark.parametrize("arrays, expected", [
    ({"images": np.zeros((6, 32, 32, 3), np.uint8), "y_train": np.zeros(6, np.uint8)},
     "lacks the array(s) x_train (it holds: images, y_train); expected x_train and y_train"),
    ({"x_train": np.zeros((6, 32, 32, 3), np.float32), "y_train": np.zeros(6, np.uint8)},
     "x_train is float32 of shape (6, 32, 32, 3), expected uint8 (N, 32, 32, 3)"),
    ({"x_train": np.zeros((6, 3, 32, 32), np.uint8), "y_train": np.zeros(6, np.uint8)},
     "x_train is uint8 of shape (6, 3, 32, 32), expected uint8 (N, 32, 32, 3)"),
    ({"x_train": np.zeros((6, 32, 32, 3), np.uint8), "y_train": np.zeros(6, np.float32)},
     "y_train is float32 of shape (6,), expected integer class indices"),
    ({"x_train": np.zeros((6, 32, 32, 3), np.uint8), "y_train": np.zeros(5, np.uint8)},
     "holds 6 images (x_train) but 5 labels (y_train)"),
    ({"x_train": np.zeros((6, 32, 32, 3), np.uint8), "y_train": np.array([0, 1, 2, 3, -1, 10])},
     "holds 2 of 6 labels outside [0, 10) (min -1, max 10)"),
])
def test_cifar_npz_wrong_arrays(tmp_path, arrays, expected):
    folder = _fake_cifar_npz(tmp_path)
    path = folder / "train_1.npz"
    np.savez(path, **arrays)
    message = _load_error(CIFAR10DataModule(root=str(tmp_path)), "train")
    assert message.startswith(f"CIFAR file {path}") and expected in message


def test_cifar_npz_single_array_and_bad_test_file(tmp_path):
    folder = _fake_cifar_npz(tmp_path)
    with open(folder / "train_1.npz", "wb") as f:
        np.save(f, np.zeros((6, 32, 32, 3), np.uint8))
    assert "is a single .npy array, not an npz archive" in _load_error(CIFAR10DataModule(root=str(tmp_path)))
    folder = _fake_cifar_npz(tmp_path / "other")
    np.savez(folder / "test_1k.npz", x_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.zeros(4, np.uint8))
    dm = CIFAR10DataModule(root=str(tmp_path / "other"))
    dm.setup("fit")
    assert f"CIFAR file {folder / 'test_1k.npz'} lacks the array(s) x_test, y_test" in _load_error(dm)


# -- CIFAR python pickles ----------------------------------------------------------------------
def _fake_cifar_pickles(root: Path, labels: list[int] | None = None) -> Path:
    """cifar-10-batches-py with tiny, well-formed pickles (their MD5s are not the official ones)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in CIFAR10DataModule.pickle_files:
        entry = {"data": np.zeros((2, 3072), np.uint8), "labels": labels or [0, 1]}
        (base / name).write_bytes(pickle.dumps(entry))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(k) for k in range(10)]}))
    return base


def _trust(monkeypatch, bad: str | None = None) -> None:
    """Let every pickle pass torchvision's MD5 check except the one named `bad`."""
    import torchvision.datasets.cifar
    import torchvision.datasets.utils

    def check(path, md5=None):
        return Path(path).is_file() and Path(path).name != bad

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", check)
    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", check)


def test_cifar_pickle_failing_md5_is_named(tmp_path):
    base = _fake_cifar_pickles(tmp_path)
    message = _load_error(CIFAR10DataModule(root=str(tmp_path)))
    assert message.startswith(f"cifar10 file {base / 'data_batch_1'} is truncated or corrupt (")
    assert "MD5 differs from the official release's" in message and "data.download=true" in message


def test_cifar_pickle_corrupt_or_missing_is_named(tmp_path, monkeypatch):
    base = _fake_cifar_pickles(tmp_path)
    _trust(monkeypatch)
    assert CIFAR10DataModule(root=str(tmp_path), val_size=2).load_all() == {"train": 8, "val": 2, "test": 2}
    (base / "data_batch_3").write_bytes(b"\x80\x04garbage")
    _trust(monkeypatch, bad="data_batch_3")
    assert _load_error(CIFAR10DataModule(root=str(tmp_path))).startswith(
        f"cifar10 file {base / 'data_batch_3'} is truncated or corrupt")
    _trust(monkeypatch)  # checksums "pass" but the pickle is unreadable: the folder and the error
    assert "UnpicklingError" in _load_error(CIFAR10DataModule(root=str(tmp_path)))
    _fake_cifar_pickles(tmp_path / "nometa")
    (tmp_path / "nometa" / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(DataNotFoundError, match="batches.meta is missing"):
        CIFAR10DataModule(root=str(tmp_path / "nometa")).load_all()


def test_cifar_pickle_labels_out_of_range(tmp_path, monkeypatch):
    _fake_cifar_pickles(tmp_path, labels=[3, 11])
    _trust(monkeypatch)
    message = _load_error(CIFAR10DataModule(root=str(tmp_path)))
    assert "training split of cifar10" in message and "holds 5 of 10 labels outside [0, 10)" in message


# -- every data set: the generic check -------------------------------------------------------
class _BadDigits(DigitsDataModule):
    labels_offset = 0
    shape = None

    def _load_official(self, train):
        x, y = super()._load_official(train)
        return (x if self.shape is None else x.reshape(self.shape)), y + self.labels_offset


def test_generic_split_check_shape_and_labels():
    dm = _BadDigits()
    dm.labels_offset = 1  # labels 1..10
    assert "labels outside [0, 10) (min 1, max 10)" in _load_error(dm)
    dm = _BadDigits()
    dm.shape = (-1, 1, 4, 16)
    assert "of shape (1437, 1, 4, 16)" in _load_error(dm, "train")
    with pytest.raises(DataError, match=r"the table holds 1 of 3 labels outside \[0, 2\) \(min 0, max 2\)"):
        check_labels(torch.tensor([0, 1, 2]), 2, "the table")
    check_labels(torch.tensor([0, 1, 1]), 2, "the table")


# -- image folders -----------------------------------------------------------------------------
def _image_folder(root: Path, counts: dict[str, dict[str, int]]) -> None:
    from PIL import Image

    for split, per_class in counts.items():
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (6, 6), (255, 0, 0)).save(root / split / cls / f"{i}.png")


def test_imagefolder_load_all_and_empty_class_folders(tmp_path):
    _image_folder(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    assert ImageFolderDataModule(root=str(tmp_path), val_size=1).load_all() == {"train": 4, "val": 1, "test": 2}
    for path in (tmp_path / "val" / "dog").iterdir():
        path.unlink()
    (tmp_path / "val" / "dog" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(root=str(tmp_path))
    dm.setup("fit")  # the train folder is fine
    message = _load_error(dm)
    assert message.startswith(f"class folder {tmp_path / 'val' / 'dog'} holds no readable image file")


# -- augmentation per epoch ---------------------------------------------------------------------
def test_augmentation_seed_is_stable_and_mixes():
    # pinned: the same in every process and Python version (no salted hash)
    assert augmentation_seed(0, 0, 0) == 2278555635313361279
    seeds = {augmentation_seed(s, e, r) for s in range(3) for e in range(3) for r in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)


def _fake_trainer(epoch: int, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, global_rank=rank, training=True)


def _augmented(dm: DigitsDataModule, epoch: int, rank: int = 0, batches: int = 3) -> torch.Tensor:
    """The first `batches` augmented training batches of `epoch`, as the hook would make them."""
    dm.trainer = _fake_trainer(epoch, rank)
    x = dm.split_tensors("train")[0][: 32 * batches]  # (3 * 32, 1, 8, 8) uint8
    out = torch.cat([dm.on_after_batch_transfer((xb, None), 0)[0] for xb in x.split(32)])
    dm.trainer = None
    return out


def test_augmentation_depends_on_epoch_not_on_history():
    kwargs = dict(augment=True, crop_padding=2, seed=5)
    fresh, used = DigitsDataModule(**kwargs), DigitsDataModule(**kwargs)
    for epoch in (0, 1, 2):  # `used` ran three epochs, and other code drew from the global RNG
        _augmented(used, epoch)
        torch.rand(100)
    state = torch.get_rng_state()
    epoch3 = _augmented(fresh, 3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched
    assert torch.equal(_augmented(used, 3), epoch3)  # epoch 3 as if resumed there
    assert not torch.equal(_augmented(fresh, 4), epoch3)
    assert not torch.equal(_augmented(DigitsDataModule(**kwargs), 3, rank=1), epoch3)
    assert not torch.equal(_augmented(DigitsDataModule(**{**kwargs, "seed": 6}), 3), epoch3)
    unaugmented = DigitsDataModule(**kwargs).transform_batch((fresh.split_tensors("train")[0][:96], None), False)[0]
    assert not torch.equal(epoch3, unaugmented)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augmentation_identical_on_cpu_and_gpu():
    dm = DigitsDataModule(augment=True, crop_padding=2, seed=1)
    x = dm.split_tensors("train")[0][:64]
    cpu = DigitsDataModule(augment=True, crop_padding=2, seed=1).transform_batch((x, None), True, epoch=2)[0]
    gpu = dm.transform_batch((x.cuda(), None), True, epoch=2)[0]
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.batches: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.setdefault(self.current_epoch, []).append(x.clone())
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):  # never run (limit_val_batches=0); defined so Lightning does not warn
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(max_epochs: int, root: Path, ckpt_path: str | None = None, save: str | None = None) -> _Recorder:
    dm = DigitsDataModule(batch_size=64, augment=True, crop_padding=2, seed=3)
    dm.load_all()
    model = _Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, limit_train_batches=2,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model


def test_resumed_run_augments_like_an_uninterrupted_one(tmp_path):
    torch.manual_seed(0)
    straight = _fit(2, tmp_path)
    ckpt = str(tmp_path / "epoch1.ckpt")
    torch.manual_seed(1)
    first = _fit(1, tmp_path, save=ckpt)
    torch.manual_seed(2)  # a different global RNG state on resume
    resumed = _fit(2, tmp_path, ckpt_path=ckpt)
    assert list(resumed.batches) == [1]
    for a, b in zip(first.batches[0], straight.batches[0]):
        assert torch.equal(a, b)
    for a, b in zip(resumed.batches[1], straight.batches[1], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(straight.batches[0][0], straight.batches[1][0])
