"""Data modules: splits, subsets, batched augmentation, the in-memory loader and real files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from mixrobust.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    InMemoryLoader,
    MNISTDataModule,
    apply_crop_flip,
    draw_crop_flip_params,
    random_crop_flip,
    subset_indices,
    to_unit_float,
)
from mixrobust.errors import ConfigError, DataNotFoundError


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    """Each example as a hashable (pixels, label) tuple, sorted: a multiset of examples."""
    return sorted(zip(map(tuple, x.flatten(1).tolist()), y.tolist()))


# -- digits ------------------------------------------------------------------------------------
def test_digits_shapes_dtypes_and_split_sizes():
    dm = DigitsDataModule()
    sizes = {}
    for split in ("train", "val", "test"):
        x, y = dm.eval_tensors(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) == dm.input_shape and y.shape == (x.shape[0],)
        assert 0.0 <= x.min() and x.max() <= 1.0
        sizes[split] = len(y)
    # 1797 digits: 20 % test = 360 (rounded up by sklearn), 10 % of the remaining 1437 = 144 val
    assert sizes == {"train": 1293, "val": 144, "test": 360}
    assert DigitsDataModule(val_size=100).eval_tensors("val")[0].shape[0] == 100
    # pixel levels are round(v * 255 / 16) for the 17 raw values v = 0..16
    levels = torch.unique((dm.eval_tensors("train")[0] * 255).round()).tolist()
    assert set(levels) <= {round(v * 255 / 16) for v in range(17)} and 255 in levels


def test_digits_splits_partition_the_data_and_test_is_fixed():
    raw = load_digits()
    full = torch.from_numpy(np.round(raw.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(raw.target)
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=7)
    test_a, test_b = a.eval_tensors("test"), b.eval_tensors("test")
    assert torch.equal(test_a[0], test_b[0]) and torch.equal(test_a[1], test_b[1])
    for dm in (a, b):
        parts = [dm.split_tensors(s) for s in ("train", "val", "test")]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        assert _rows(x, y) == _rows(full, labels)  # train + val + test is exactly the data set
    # validation depends on the seed, the train+val pool does not
    assert not torch.equal(a.eval_tensors("val")[0], b.eval_tensors("val")[0])
    pool = [torch.cat([dm.eval_tensors("train")[0], dm.eval_tensors("val")[0]]) for dm in (a, b)]
    assert _rows(pool[0], torch.zeros(len(pool[0]))) == _rows(pool[1], torch.zeros(len(pool[1])))
    # the test split is stratified: each class holds 20 % of its examples, up to rounding
    test_counts, all_counts = torch.bincount(test_a[1]), torch.bincount(labels)
    assert ((test_counts - 0.2 * all_counts).abs() <= 1).all()


def test_digits_mean_std_constants():
    dm = DigitsDataModule()
    pool = torch.cat([dm.eval_tensors("train")[0], dm.eval_tensors("val")[0]]).double()
    assert abs(pool.mean().item() - dm.mean[0]) < 1e-4
    assert abs(pool.std(unbiased=False).item() - dm.std[0]) < 1e-4


def test_bad_options_fail_at_construction():
    with pytest.raises(ConfigError, match="flip"):
        DigitsDataModule(augment=True, flip=True)
    with pytest.raises(ConfigError, match="val_size"):
        DigitsDataModule(val_size=1.0)
    with pytest.raises(ConfigError, match="val_size"):
        DigitsDataModule(val_size=1797).setup("fit")  # more than the 1437 training images
    with pytest.raises(ConfigError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ConfigError, match="valid values: train, val, test"):
        DigitsDataModule().eval_tensors("validation")


# -- subset_indices ----------------------------------------------------------------------------
def test_subset_indices_first_n_and_all():
    labels = torch.tensor([3, 1, 0, 2, 1, 0])
    assert subset_indices(labels).tolist() == [0, 1, 2, 3, 4, 5]
    assert subset_indices(labels, n=4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="n=7"):
        subset_indices(labels, n=7)
    with pytest.raises(ConfigError, match="at most one"):
        subset_indices(labels, n=2, n_per_class=1)


def test_subset_indices_per_class():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0])
    picked = subset_indices(labels, n_per_class=2, seed=3)
    assert picked.tolist() == sorted(set(picked.tolist()))
    assert torch.bincount(labels[picked], minlength=3).tolist() == [2, 2, 2]
    assert torch.equal(picked, subset_indices(labels, n_per_class=2, seed=3))
    # across seeds every member of class 0 gets picked sometimes (not just the first two)
    chosen = set()
    for seed in range(50):
        chosen |= set(subset_indices(labels, n_per_class=2, seed=seed).tolist())
    assert chosen == set(range(len(labels)))
    with pytest.raises(ConfigError, match="class 1: 3"):
        subset_indices(labels, n_per_class=4)


# -- batched augmentation ----------------------------------------------------------------------
def _reference_crop_flip(x, padding, offsets, flip_mask):
    out = []
    for image, (top, left), flip in zip(x, offsets.tolist(), flip_mask.tolist()):
        padded = F.pad(image, (padding,) * 4)
        crop = padded[:, top : top + x.shape[2], left : left + x.shape[3]]
        out.append(torch.flip(crop, dims=[-1]) if flip else crop)
    return torch.stack(out)


@pytest.mark.parametrize("padding, flip", [(2, True), (3, False), (0, True)])
def test_crop_flip_matches_per_image_reference(padding, flip):
    x = torch.rand(16, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    offsets, mask = draw_crop_flip_params(16, padding, flip, torch.Generator().manual_seed(1))
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding
    assert torch.equal(apply_crop_flip(x, padding, offsets, mask), _reference_crop_flip(x, padding, offsets, mask))
    # random_crop_flip draws the same parameters from the same generator
    out = random_crop_flip(x, padding, flip, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, _reference_crop_flip(x, padding, offsets, mask))


def test_crop_flip_hand_cases_and_distribution():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    centre = torch.tensor([[1, 1], [1, 1]])
    no_flip = torch.tensor([False, True])
    out = apply_crop_flip(x, 1, centre, no_flip)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    corner = apply_crop_flip(x, 1, torch.tensor([[0, 0], [2, 2]]), torch.tensor([False, False]))
    assert corner[0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 3, 4]]
    assert corner[1, 0].tolist() == [[13, 14, 0], [16, 17, 0], [0, 0, 0]]
    assert random_crop_flip(x, 0, False) is x
    offsets, mask = draw_crop_flip_params(4000, 2, True, torch.Generator().manual_seed(0))
    assert set(offsets.flatten().tolist()) == {0, 1, 2, 3, 4}
    assert 0.45 < mask.float().mean() < 0.55


def test_to_unit_float_matches_torchvision():
    from torchvision.transforms import v2

    x = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    expected = v2.ToDtype(torch.float32, scale=True)(v2.ToImage()(x))
    assert torch.equal(to_unit_float(x), expected)
    assert to_unit_float(x)[0, 0, 0] == 0 and to_unit_float(x)[0, -1, -1] == 1
    assert torch.allclose(to_unit_float(x), x.double().div(255).float(), rtol=0, atol=1e-7)


# -- in-memory loader --------------------------------------------------------------------------
def test_in_memory_loader_epochs():
    labels = torch.arange(103)
    images = labels.view(-1, 1, 1, 1).to(torch.uint8)
    loader = InMemoryLoader(images, labels, batch_size=10, shuffle=True, seed=5)
    assert len(loader) == 11
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 11 and all(torch.equal(xb.view(-1).long(), yb) for xb, yb in batches)
        epochs.append(torch.cat([yb for _, yb in batches]))
        assert sorted(epochs[-1].tolist()) == list(range(103))  # each example exactly once
    assert not torch.equal(epochs[0], epochs[1])
    fresh = InMemoryLoader(images, labels, batch_size=10, shuffle=True, seed=5, epoch_fn=lambda: 1)
    assert torch.equal(torch.cat([yb for _, yb in fresh]), epochs[1])  # epoch 1 is reproducible
    assert len(InMemoryLoader(images, labels, 10, shuffle=True, drop_last=True)) == 10


def test_in_memory_loader_ddp_shards():
    labels = torch.arange(103)
    images = labels.view(-1, 1, 1, 1).to(torch.uint8)
    for epoch in (0, 4):
        shards = []
        for rank in range(3):
            loader = InMemoryLoader(images, labels, 8, shuffle=True, seed=2, rank=rank, world_size=3,
                                    epoch_fn=lambda: epoch)
            shards.append(torch.cat([yb for _, yb in loader]))
            assert len(loader) == 5  # 34 examples per rank
        assert [len(s) for s in shards] == [34, 34, 34]
        assert len(set(torch.cat(shards).tolist())) == 102  # disjoint
    evals = [torch.cat([yb for _, yb in InMemoryLoader(images, labels, 8, False, rank=r, world_size=3)])
             for r in range(3)]
    assert evals[1].tolist() == list(range(1, 103, 3))
    assert sorted(torch.cat(evals).tolist()) == list(range(103))  # no padding, no duplicates


def test_datamodule_shards_by_trainer_rank():
    dm = DigitsDataModule(batch_size=50, seed=3)
    n_train = dm.eval_tensors("train")[1].shape[0]
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=1, training=True,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
        loader = dm.train_dataloader()
        shards.append(loader.epoch_indices(1))
        assert (loader.rank, loader.world_size, len(loader)) == (rank, 2, -(-(n_train // 2) // 50))
        assert len(dm.val_dataloader().epoch_indices(0)) == 72  # 144 val examples, r::2
    dm.trainer = None
    assert len(shards[0]) == len(shards[1]) == n_train // 2
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_dataloader_path_gives_float_batches():
    dm = DigitsDataModule(in_memory=False, batch_size=32, eval_batch_size=100)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert dm.on_after_batch_transfer((x, y), 0)[0] is x  # float batches pass through
    xv, yv = next(iter(dm.val_dataloader()))
    ref_x, ref_y = dm.eval_tensors("val")
    assert torch.equal(xv, ref_x[:100]) and torch.equal(yv, ref_y[:100])


# -- Lightning ---------------------------------------------------------------------------------
class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.train_batches: list[torch.Tensor] = []
        self.val_batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_batches.append(x.clone())
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch[0].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_epoch_through_in_memory_loader_and_hook():
    dm = DigitsDataModule(batch_size=64, eval_batch_size=100, augment=True, crop_padding=1, seed=4)
    model = _Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert len(model.train_batches) == 3 and len(model.val_batches) == 1
    for x in model.train_batches + model.val_batches:
        assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    # validation: sequential and unaugmented
    assert torch.equal(model.val_batches[0], dm.eval_tensors("val")[0][:100])
    # training: epoch 0's permutation, each image one of the 9 crops of its zero-padded original
    train_x = dm.eval_tensors("train")[0]
    idx = InMemoryLoader(train_x, torch.zeros(len(train_x)), 64, shuffle=True, seed=4).epoch_indices(0)[:64]
    padded = F.pad(train_x[idx], (1, 1, 1, 1))
    crops = torch.stack([padded[..., i : i + 8, j : j + 8] for i in range(3) for j in range(3)], 1)
    # crops: (64, 9, 1, 8, 8), the 9 shifts of each padded image
    matches = (crops == model.train_batches[0][:, None]).flatten(2).all(-1)  # (64, 9)
    assert matches.any(1).all()
    assert not matches[:, 4].all()  # not every image is the un-shifted centre crop


# -- files -------------------------------------------------------------------------------------
def test_cifar10_npz_layout(tmp_path):
    folder = tmp_path / "CIFAR10"
    folder.mkdir()
    rng = np.random.default_rng(0)
    parts = {k: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8))
             for k, n in ((2, 5), (10, 4), (1, 6))}
    for k, (x, y) in parts.items():
        np.savez(folder / f"train_{k}.npz", x_train=x, y_train=y)
    np.savez(folder / "test_1k.npz", x_test=parts[1][0][:3], y_test=parts[1][1][:3])
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=0)
    assert dm.layout() == ("npz", folder) and (dm.augment, dm.crop_padding, dm.flip) == (True, 4, True)
    x, y = dm.split_tensors("train")
    order = [parts[1], parts[2], parts[10]]  # numeric order of train_<k>
    assert torch.equal(y, torch.from_numpy(np.concatenate([p[1] for p in order])).long())
    assert torch.equal(x, torch.from_numpy(np.concatenate([p[0] for p in order])).permute(0, 3, 1, 2))
    assert dm.split_tensors("test")[0].shape == (3, 3, 32, 32)
    # official pickles take precedence when both are present
    (folder / "cifar-10-batches-py").mkdir()
    for name in CIFAR10DataModule.pickle_files:
        (folder / "cifar-10-batches-py" / name).touch()
    assert CIFAR10DataModule(root=str(folder)).layout() == ("torchvision", folder)


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule, CIFAR100DataModule, ImageFolderDataModule])
def test_missing_data_names_path_and_fix(cls, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (tmp_path / "absent", empty):
        with pytest.raises(DataNotFoundError) as info:
            cls(root=str(root))
        assert str(root) in str(info.value) and "data.root=" in str(info.value)
        assert ("data.download=true" in str(info.value)) == cls.can_download


def test_download_defers_the_check_to_setup(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path), download=True)  # prepare_data would fetch it
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        dm.setup("fit")


def _image_folder(root: Path, counts: dict[str, dict[str, int]]) -> None:
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 10), colours[cls]).save(root / split / cls / f"{i}.png")


def test_imagefolder(tmp_path):
    _image_folder(tmp_path, {"train": {"cat": 4, "dog": 3}, "val": {"cat": 1, "dog": 2}})
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_size=2, batch_size=3, eval_batch_size=4)
    assert (dm.num_classes, dm.input_shape, dm.in_memory) == (2, (3, 8, 8), False)
    x, y = dm.eval_tensors("test")
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 and y.tolist() == [0, 1, 1]
    # solid colours survive resize and crop: cat is pure red, dog pure blue
    assert torch.equal(x[0], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 8, 8))
    assert torch.equal(x[1], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 8, 8))
    assert len(dm.eval_tensors("train")[1]) == 5 and len(dm.eval_tensors("val")[1]) == 2
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (3, 3, 8, 8) and 0.0 <= xb.min() and xb.max() <= 1.0 and yb.dtype == torch.int64


def test_imagefolder_mismatched_classes(tmp_path):
    _image_folder(tmp_path, {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1}})
    with pytest.raises(ConfigError, match="differ"):
        ImageFolderDataModule(root=str(tmp_path))


# -- real data (MIXROBUST_DATA_ROOT) -----------------------------------------------------------
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR10_BATCH1_COUNTS = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]


@pytest.mark.real_data
def test_real_mnist(data_root):
    dm = MNISTDataModule(root=str(data_root), val_size=5000)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (dm.split_tensors(s) for s in ("train", "val", "test"))
    assert (len(y_tr), len(y_va), len(y_te)) == (55000, 5000, 10000)
    assert x_tr.dtype == torch.uint8 and x_tr.shape[1:] == (1, 28, 28) and x_tr.max() == 255 and x_tr.min() == 0
    assert torch.bincount(torch.cat([y_tr, y_va])).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(y_te).tolist() == MNIST_TEST_COUNTS
    pool = torch.cat([x_tr, x_va]).double() / 255
    assert abs(pool.mean().item() - dm.mean[0]) < 1e-3 and abs(pool.std().item() - dm.std[0]) < 1e-3
    assert MNISTDataModule(root=str(data_root / "MNIST")).split_tensors("test")[1].shape == (10000,)


@pytest.mark.real_data
def test_real_cifar10_npz(data_root):
    folder = data_root / "CIFAR10"
    if not folder.is_dir():
        pytest.skip(f"no CIFAR10 folder in {data_root}")
    dm = CIFAR10DataModule(root=str(data_root), val_size=1000)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (dm.split_tensors(s) for s in ("train", "val", "test"))
    n_files = len(list(folder.glob("train_*.npz")))
    assert (len(y_tr) + len(y_va), len(y_va), len(y_te)) == (10000 * n_files, 1000, 1000)
    assert x_tr.shape[1:] == (3, 32, 32) and x_tr.min() == 0 and x_tr.max() == 255
    with np.load(folder / "train_1.npz") as batch1:
        assert np.bincount(batch1["y_train"]).tolist() == CIFAR10_BATCH1_COUNTS
    counts = torch.bincount(torch.cat([y_tr, y_va]), minlength=10)
    assert counts.sum() == 10000 * n_files and (counts > 0).all()
    with np.load(folder / "test_1k.npz") as test:
        assert torch.equal(x_te, torch.from_numpy(test["x_test"]).permute(0, 3, 1, 2))
        assert torch.equal(y_te, torch.from_numpy(test["y_test"]).long())
    pool = torch.cat([x_tr, x_va]).double() / 255
    assert torch.allclose(pool.mean((0, 2, 3)), torch.tensor(dm.mean, dtype=torch.double), atol=0.01)
    std = pool.permute(1, 0, 2, 3).flatten(1).std(1)  # (3,) over all pixels of each channel
    assert torch.allclose(std, torch.tensor(dm.std, dtype=torch.double), atol=0.01)
