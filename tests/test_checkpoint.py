"""Checkpoint reading: one clear CheckpointError for every bad file, the record memo, resume checks."""

from __future__ import annotations

import collections
import copy
import os
from functools import partial
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mixrobust.checkpoint import files as checkpoint_files
from mixrobust.checkpoint import (
    RESUME_KEYS,
    check_resume,
    load_classifier,
    make_record,
    optimizer_spec,
    read_checkpoint,
    read_record,
    validate_record,
)
from mixrobust.errors import CheckpointError
from mixrobust.models import available_models, create_model
from mixrobust.threat import Threat
from mixrobust.training.module import ClassifierModule
from mixrobust.training.objectives import PGDAT, Standard
from mixrobust.training.optim import make_optimizer

THREAT = Threat("linf", 0.2, 0.05)


def tiny_model(num_classes: int = 10):
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes, (1, 8, 8), [0.5], [0.25], width=4, hidden=8)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One Lightning epoch (SGD + MultiStepLR, whose Counter must load): a resumable and a weights-only file."""
    folder = tmp_path_factory.mktemp("real")
    module = ClassifierModule(
        tiny_model(), Standard(), partial(make_optimizer, name="sgd", lr=0.05),
        partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1, 2]), threat=THREAT, data_name="digits",
    )
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False,
    )
    trainer.fit(module, loader, loader)
    trainer.save_checkpoint(folder / "full.ckpt")
    trainer.save_checkpoint(folder / "weights.ckpt", weights_only=True)
    with torch.no_grad():
        logits = module.model.eval()(x)
    return {"full": folder / "full.ckpt", "weights": folder / "weights.ckpt", "x": x, "logits": logits}


def hand_ckpt(path: Path, record_changes: dict | None = None, model=None, **extra) -> Path:
    """torch.save a minimal checkpoint of `model`; `record_changes` sets record entries ("model.arch" a nested one).

    None deletes the required entries (format, model, objective) and sets the optional ones to None.
    """
    model = model or tiny_model()
    record = make_record(model, Standard(), THREAT, "digits")
    for key, value in (record_changes or {}).items():
        target, leaf = record, key
        if "." in key:
            head, leaf = key.split(".")
            target = record[head]
        if value is None and leaf in ("format", "model", "objective"):
            target.pop(leaf)
        else:
            target[leaf] = value
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "mixrobust": record, **extra}, path)
    return path


def refused(call, path, match: str) -> str:
    """Assert call(path) raises one CheckpointError naming `path`, matching `match`, free of torch's advice."""
    with pytest.raises(CheckpointError, match=match) as info:
        call(path)
    message = str(info.value)
    assert str(path) in message, message
    assert "weights_only" not in message and "Traceback" not in message, message
    assert info.value.__suppress_context__ or info.value.__context__ is None  # no chained torch traceback
    return message


# ---------------------------------------------------------------- valid files


def test_load_classifier_reproduces_logits(real):
    model = load_classifier(real["full"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model(real["x"]), real["logits"])
    assert model.record["data"] == "digits" and model.record["threat"] == THREAT.as_dict()
    assert model.record == read_record(real["full"])


def test_read_checkpoint_of_real_file_holds_lightning_state(real):
    ckpt = read_checkpoint(real["full"])
    assert set(RESUME_KEYS) <= set(ckpt)
    assert ckpt["lr_schedulers"][0]["milestones"] == {1: 1, 2: 1}  # a Counter, allowed as plain data


# ---------------------------------------------------------------- bad files


class Evil:
    """Unpickling this runs a shell command: it must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _bad_file(kind: str, tmp_path: Path, real: dict) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return path
    if kind == "directory":
        (path / "checkpoints").mkdir(parents=True)
        (path / "checkpoints" / "best.ckpt").write_bytes(b"x")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        path.write_bytes(noise.numpy().tobytes())
    elif kind == "truncated":
        data = real["full"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    elif kind == "plain_state_dict":
        torch.save(tiny_model().state_dict(), path)
    elif kind == "no_state_dict":
        torch.save({"mixrobust": make_record(tiny_model(), Standard(), THREAT, "digits")}, path)
    elif kind == "state_dict_list":
        hand_ckpt(path)
        ckpt = torch.load(path, weights_only=True)
        torch.save({**ckpt, "state_dict": list(ckpt["state_dict"].values())}, path)
    elif kind == "state_dict_non_tensor":
        hand_ckpt(path)
        ckpt = torch.load(path, weights_only=True)
        torch.save({**ckpt, "state_dict": {**ckpt["state_dict"], "model.extra": [1.0, 2.0]}}, path)
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "checkpoint not found: .*train.py printed last"),
        ("directory", r"is a directory, not a file \(it holds checkpoints/best.ckpt\)"),
        ("empty", r"is empty \(0 bytes\).*Re-copy it"),
        ("random", "is truncated or corrupt: its 4,096 bytes are not a complete file written by torch.save"),
        ("truncated", "is truncated or corrupt.*Re-copy it, or retrain"),
        ("not_a_dict", "is not a mixrobust checkpoint: it holds a list, not a dict"),
        ("plain_state_dict", r"is not a mixrobust checkpoint \(no 'mixrobust' and no 'state_dict' entry\)"),
        ("no_state_dict", r"is not a mixrobust checkpoint \(no 'state_dict' entry\)"),
        ("state_dict_list", r"state_dict that is not a dict of named tensors \(it is a list\)"),
        ("state_dict_non_tensor", r"not a dict of named tensors \(entry 'model.extra' is a list\)"),
    ],
)
def test_bad_file_is_one_clear_error(kind, match, tmp_path, real):
    path = _bad_file(kind, tmp_path, real)
    for call in (read_checkpoint, read_record, load_classifier):
        refused(call, path, match)


@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_never_runs(nested, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    if nested:
        hand_ckpt(path, {"data": Evil(marker)})
    else:
        torch.save(Evil(marker), path)
    assert not marker.exists()  # saving does not run it either
    for call in (read_checkpoint, read_record, load_classifier, partial(check_resume, expected={})):
        pattern = r"holds pickled Python objects that are not plain data \(the global '\w+\.system'\)"
        message = refused(call, path, pattern)
        assert "never unpickles code" in message and "state_dict" in message
    assert not marker.exists()


def test_downloaded_torchvision_weights_never_unpickle_code(tmp_path, monkeypatch):
    """`model.pretrained=true` and `zoo.download=true` read torch.hub's cache: a file planted there is refused."""
    import torchvision.models

    from mixrobust.models.imagenet import TORCHVISION_MODELS, _read_state_dict
    from mixrobust.zoo.sources import Source, download

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    marker = tmp_path / "pwned"
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    torch.save({"fc.weight": Evil(marker)}, cached)
    with pytest.raises(Exception, match="could not download torchvision's"):
        _read_state_dict(True, TORCHVISION_MODELS["resnet18_imagenet"])
    with pytest.raises(Exception, match="the download failed"):
        download(Source("torchvision", "resnet18", None), tmp_path / "zoo" / "resnet18.safetensors")
    assert not marker.exists()


# ---------------------------------------------------------------- invalid records


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format": None}, "it has no format version"),
        ({"format": "1"}, "format must be 1, got '1'"),
        ({"format": 0}, "format must be 1, got 0"),
        ({"model": None}, "model must be a dict, got None"),
        ({"model": ["small_cnn"]}, r"model must be a dict, got \['small_cnn'\]"),
        ({"model.arch": 3}, "model.arch must be a str, got 3"),
        ({"model.num_classes": 1}, "model.num_classes must be a whole number >= 2, got 1"),
        ({"model.num_classes": 10.0}, "model.num_classes must be a whole number >= 2, got 10.0"),
        ({"model.num_classes": True}, "model.num_classes must be a whole number >= 2, got True"),
        ({"model.input_shape": [1, 8]}, r"model.input_shape must be 3 positive whole numbers \(C, H, W\), got \[1, 8"),
        ({"model.input_shape": [1, 0, 8]}, r"model.input_shape must be 3 positive whole numbers"),
        ({"model.input_shape": "1x8x8"}, r"model.input_shape must be 3 positive whole numbers"),
        ({"model.mean": [0.5, 0.5]}, r"model.mean must be a list of 1 finite numbers \(one per channel\), got \[0.5,"),
        ({"model.mean": ["a"]}, "model.mean must be a list of 1 finite numbers"),
        ({"model.std": [float("nan")]}, r"model.std must be a list of 1 finite numbers > 0"),
        ({"model.std": [0.0]}, r"model.std must be a list of 1 finite numbers > 0"),
        ({"model.kwargs": ["width", 4]}, r"model.kwargs must be a dict, got \['width', 4\]"),
        ({"objective": None}, "objective must be a dict with a str name, got None"),
        ({"objective": "standard"}, "objective must be a dict with a str name, got 'standard'"),
        ({"objective": {"name": 1}}, "objective must be a dict with a str name"),
        (
            {"objective": {"name": "pgd_at", "threat": {"norm": "l1", "eps": 0.1, "step_size": 0.1}}},
            "objective.threat.norm must be 'linf' or 'l2', got 'l1'",
        ),
        ({"threat": "linf"}, "threat must be None or a dict, got 'linf'"),
        ({"threat": {"norm": "l3", "eps": 0.1, "step_size": 0.1}}, "threat.norm must be 'linf' or 'l2', got 'l3'"),
        ({"threat": {"norm": "linf", "eps": float("inf"), "step_size": 0.1}}, "threat.eps must be a finite .*, got inf"),
        ({"threat": {"norm": "l2", "eps": 0.5}}, "threat.step_size must be a finite number >= 0, got None"),
        ({"threat": {"norm": "l2", "eps": "0.5", "step_size": 0.1}}, "threat.eps must be a finite .*, got '0.5'"),
        ({"sigma": 0}, "sigma must be None or a number > 0, got 0"),
        ({"sigma": "0.25"}, "sigma must be None or a number > 0, got '0.25'"),
        ({"data": 3}, "data must be None or a str, got 3"),
        ({"split": {"seed": 0.5, "val_size": 0.1}}, "split must be None or a dict with a whole-number seed and a "
                                                    "val_size, got {'seed': 0.5, 'val_size': 0.1}"),
        ({"optimizer": "sgd"}, "optimizer must be None or a dict with a str name, got 'sgd'"),
    ],
)
def test_invalid_record_is_one_clear_error(changes, match, tmp_path):
    path = hand_ckpt(tmp_path / "bad.ckpt", changes)
    message = refused(read_checkpoint, path, match)
    assert "invalid 'mixrobust' record" in message and "retrain it with train.py" in message


@pytest.mark.parametrize("record", [["format", 1], "mixrobust", None])
def test_record_of_the_wrong_type(record, tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "mixrobust": record}, path)
    refused(read_checkpoint, path, f"the record is a {type(record).__name__}, not a dict")


def test_all_record_problems_in_one_message(tmp_path):
    path = hand_ckpt(tmp_path / "bad.ckpt", {"model.num_classes": 0, "sigma": -1.0, "data": 7})
    message = refused(read_checkpoint, path, "num_classes")
    assert "sigma must be" in message and "data must be" in message


def test_newer_record_format_says_upgrade(tmp_path):
    path = hand_ckpt(tmp_path / "new.ckpt", {"format": 2})
    refused(read_checkpoint, path, "record format 2, written by a newer mixrobust.*upgrade mixrobust")


def test_unknown_arch_lists_registered_models(tmp_path):
    path = hand_ckpt(tmp_path / "a.ckpt", {"model.arch": "no_such_net"})
    message = refused(read_record, path, "'no_such_net', which is not registered")
    assert f"registered models: {', '.join(available_models())}" in message


def test_validate_record_returns_a_valid_record():
    record = make_record(tiny_model(), PGDAT(eps=0.1, step_size=0.02, steps=2), THREAT, None)
    assert validate_record(record, "x.ckpt") is record
    with pytest.raises(CheckpointError, match="x.ckpt"):
        validate_record({**record, "sigma": -1}, "x.ckpt")


# ---------------------------------------------------------------- weights that do not fit the record


def test_a_record_whose_normalization_differs_from_the_weights_is_refused(tmp_path):
    path = hand_ckpt(tmp_path / "n.ckpt", {"model.std": [0.3081]})  # the weights' layer holds std 0.25
    message = refused(load_classifier, path,
                      r"its weights normalize with std \[0\.25\] but its record says \[0\.3081\]")
    assert "model.mean / model.std" in message
    assert load_classifier(hand_ckpt(tmp_path / "same.ckpt", {"model.std": [0.25]})).normalize.std.item() == 0.25


def test_missing_and_unexpected_weights_are_summarized(tmp_path):
    path = hand_ckpt(tmp_path / "w.ckpt")
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    first, second = list(state)[:2]
    state["model.net.extra.weight"] = state.pop(first)
    del state[second]
    torch.save(ckpt, path)
    message = refused(load_classifier, path, rf"2 missing and 1 unexpected weight names, e\.g\. {first[6:]}")
    assert "does not match its own model record (small_cnn, 10 classes, input [1, 8, 8])" in message
    assert "Error(s) in loading state_dict" not in message and len(message) < 400
    read_record(path)  # the record alone is fine: evaluation can still check it


def test_wrong_shapes_are_summarized(tmp_path):
    path = hand_ckpt(tmp_path / "s.ckpt", model=tiny_model(num_classes=5))
    ckpt = torch.load(path, weights_only=True)
    ckpt["mixrobust"]["model"]["num_classes"] = 10
    torch.save(ckpt, path)
    refused(load_classifier, path, r"2 weights of the wrong shape, e\.g\. net\.\S+: \[5, 8\] in the file, \[10, 8\] in the model")


def test_unbuildable_model_kwargs(tmp_path):
    path = hand_ckpt(tmp_path / "k.ckpt", {"model.kwargs": {"no_such_option": 1}})
    refused(load_classifier, path, "its model record cannot be rebuilt .*no_such_option")


# ---------------------------------------------------------------- the record memo


def test_read_record_reads_each_file_once_and_rereads_a_rewritten_one(tmp_path, monkeypatch):
    loads = []
    original = checkpoint_files.load_file
    monkeypatch.setattr(checkpoint_files, "load_file", lambda path, size: loads.append(path) or original(path, size))
    path = hand_ckpt(tmp_path / "m.ckpt")
    for _ in range(96):
        assert read_record(path)["data"] == "digits"
    assert len(loads) == 1
    read_record(path)["data"] = "changed by the caller"
    assert read_record(tmp_path / "." / "m.ckpt")["data"] == "digits" and len(loads) == 1  # a copy; same file

    before = path.stat().st_mtime_ns
    hand_ckpt(path, {"data": "mnist"})
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a distinct mtime even on coarse clocks
    assert read_record(path)["data"] == "mnist" and len(loads) == 2


# ---------------------------------------------------------------- resuming


def expected_of(record: dict, **changes) -> dict:
    expected = {"data": record["data"], "objective": record["objective"], "model": record["model"],
                "optimizer": record.get("optimizer")}
    return {**copy.deepcopy(expected), **changes}


def resume_copy(real: dict, path: Path, edit) -> Path:
    """A copy of the real resumable checkpoint after `edit(ckpt)`."""
    with torch.serialization.safe_globals([collections.Counter]):
        ckpt = torch.load(real["full"], weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


def test_check_resume_accepts_the_same_run(real, tmp_path):
    record = read_record(real["full"])
    sgd = {"name": "sgd", "lr": record["optimizer"]["lr"]}
    assert check_resume(real["full"], expected_of(record, optimizer=sgd)) == record
    assert check_resume(real["full"], expected_of(record, optimizer=record["optimizer"])) == record
    # Lightning restores the checkpoint's optimizer state: a changed learning rate would be ignored, so it is refused
    faster = expected_of(record, optimizer={**record["optimizer"], "lr": 2 * record["optimizer"]["lr"]})
    refused(partial(check_resume, expected=faster), real["full"], r"optimizer\.lr 0\.05 \(this run: 0\.1\)")
    assert check_resume(real["full"], expected_of(record, optimizer=None)) == record  # None: not compared
    # a record written before the optimizer entry existed: the name comes from Lightning's optimizer state
    legacy = resume_copy(real, tmp_path / "legacy.ckpt", lambda ckpt: ckpt["mixrobust"].pop("optimizer", None))
    assert "optimizer" not in read_record(legacy)
    assert check_resume(legacy, expected_of(record, optimizer=sgd))["data"] == "digits"
    adamw = expected_of(record, optimizer={"name": "adamw"})
    refused(partial(check_resume, expected=adamw), legacy, r"optimizer 'sgd' \(this run: 'adamw'\)")


def test_check_resume_refuses_a_weights_only_file(real):
    message = refused(partial(check_resume, expected=expected_of(read_record(real["weights"]))), real["weights"],
                      "holds weights only .*cannot resume")
    assert "initial weights" in message and "drop ckpt_path" in message


def test_check_resume_lists_every_difference(real):
    record = read_record(real["full"])
    model = {**record["model"], "arch": "resnet20", "num_classes": 5, "input_shape": (3, 32, 32), "std": [0.5],
             "kwargs": {}}
    pgd = PGDAT(eps=0.1, step_size=0.02, steps=2).spec()
    expected = expected_of(record, data="mnist", objective=pgd, model=model, optimizer={"name": "adamw"})
    message = refused(partial(check_resume, expected=expected), real["full"], "cannot resume this run: it was trained")
    for phrase in (
        "data 'digits' (this run: 'mnist')", "objective 'standard' (this run: 'pgd_at')",
        "model 'small_cnn' (this run: 'resnet20')", "num_classes 10 (this run: 5)",
        "input_shape [1, 8, 8] (this run: [3, 32, 32])", "optimizer 'sgd' (this run: 'adamw')",
        "normalization std [0.25] (this run: [0.5])", "model settings {'width': 4, 'hidden': 8} (this run: {})",
    ):
        assert phrase in message, phrase
    assert message.startswith(f"ckpt_path={real['full']} ")
    assert message.endswith("resume with the settings it was trained with, or drop ckpt_path to start afresh")


def test_check_resume_compares_the_robust_threat_and_the_recorded_optimizer(real, tmp_path):
    pgd = PGDAT(eps=0.2, step_size=0.05, steps=2)
    adamw = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999]}
    record = make_record(tiny_model(), pgd, THREAT, "digits", optimizer=adamw)
    path = resume_copy(real, tmp_path / "pgd.ckpt", lambda ckpt: ckpt.update(mixrobust=record))
    record = read_record(path)
    assert check_resume(path, expected_of(record)) == record
    other = PGDAT(norm="l2", eps=0.5, step_size=0.1, steps=2).spec()
    message = refused(partial(check_resume, expected=expected_of(record, objective=other, optimizer={"name": "sgd"})),
                      path, "cannot resume")
    assert "objective.threat linf eps=0.2 step_size=0.05 (this run: l2 eps=0.5 step_size=0.1)" in message
    assert "optimizer 'adamw' (this run: 'sgd')" in message  # the record wins over the SGD optimizer state


def test_check_resume_infers_adamw_from_betas(real, tmp_path):
    def to_adam_state(ckpt: dict) -> None:
        ckpt["mixrobust"].pop("optimizer", None)
        group = ckpt["optimizer_states"][0]["param_groups"][0]
        del group["momentum"]
        group["betas"] = (0.9, 0.999)

    path = resume_copy(real, tmp_path / "adam.ckpt", to_adam_state)
    record = read_record(path)
    check_resume(path, expected_of(record, optimizer={"name": "adamw"}))
    sgd = expected_of(record, optimizer={"name": "sgd"})
    refused(partial(check_resume, expected=sgd), path, r"optimizer 'adamw' \(this run: 'sgd'\)")


def test_check_resume_reads_a_one_cycle_runs_peak_lr_and_compares_the_split(real, tmp_path):
    """A record written before the spec held one-cycle's peak lr holds max_lr / 25; the optimizer state says the peak."""
    sgd = {"name": "sgd", "lr": 0.1 / 25, "weight_decay": 5e-4, "momentum": 0.95, "nesterov": False}

    def to_one_cycle(ckpt: dict) -> None:
        ckpt["mixrobust"].update(optimizer=sgd, split={"seed": 0, "val_size": 0.1})
        ckpt["optimizer_states"][0]["param_groups"][0]["max_lr"] = 0.1

    path = resume_copy(real, tmp_path / "cycle.ckpt", to_one_cycle)
    record = read_record(path)
    same = {**sgd, "lr": 0.1}
    check_resume(path, expected_of(record, optimizer=same, split={"seed": 0, "val_size": 0.1}))
    message = refused(partial(check_resume, expected=expected_of(record, optimizer={**same, "lr": 0.2},
                                                                 split={"seed": 1, "val_size": 0.2})), path, "cannot")
    assert "optimizer.lr 0.1 (this run: 0.2)" in message
    assert "seed 0 (this run: 1)" in message and "data.val_size 0.1 (this run: 0.2)" in message


# ---------------------------------------------------------------- the optimizer entry


def test_optimizer_spec():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(params, name="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[1], gamma=0.1)  # sets initial_lr
    sgd.step()  # no gradients: changes no parameter
    scheduler.step()  # lowers lr to 0.01; the spec keeps the initial 0.1
    assert optimizer_spec(sgd) == {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": True}
    cycled = make_optimizer(params, name="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(cycled, max_lr=0.1, total_steps=10)  # starts at lr 0.1 / 25, momentum 0.95
    assert optimizer_spec(cycled) == {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.95,
                                      "nesterov": False}  # the configured peak, not the starting lr of 0.004
    adamw = make_optimizer(params, name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99))
    assert optimizer_spec(adamw) == {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.8, 0.99]}
    assert optimizer_spec(torch.optim.Adam(params))["name"] == "adam"
    assert optimizer_spec(torch.optim.RMSprop(params)).keys() == {"name", "lr", "weight_decay"}


def test_make_record_optimizer_entry_is_optional(tmp_path):
    model = tiny_model()
    old_style = make_record(model, Standard(), THREAT, "digits")
    assert old_style["optimizer"] is None
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    record = make_record(model, Standard(), THREAT, "digits", optimizer=optimizer_spec(sgd))
    assert record == make_record(model, Standard(), THREAT, "digits", optimizer=sgd)
    assert record["optimizer"]["name"] == "sgd"
    path = tmp_path / "o.ckpt"
    torch.save({"state_dict": {}, "mixrobust": record}, path)
    assert read_record(path)["optimizer"] == record["optimizer"]
