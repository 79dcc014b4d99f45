"""Resuming training: refuse a checkpoint that belongs to another run, before the Trainer starts."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from mixrobust.checkpoint.files import read_checkpoint
from mixrobust.checkpoint.record import CHECKPOINT_KEY
from mixrobust.errors import CheckpointError

RESUME_KEYS = ("epoch", "global_step", "optimizer_states", "loops")  # Lightning's state beyond the weights


def check_resume(path: str | os.PathLike, expected: Mapping) -> dict:
    """Refuse to resume training from a checkpoint that belongs to another run; return its record.

    `expected` describes this run: ``"data"`` (str), ``"objective"`` (its ``spec()``), ``"model"`` (arch,
    num_classes, input_shape, mean, std, kwargs), ``"optimizer"`` (an `optimizer_spec` dict or None) and
    ``"max_epochs"`` (the schedule's length: a one-cycle or cosine schedule cannot be stretched). The
    checkpoint must hold Lightning's resume state (`RESUME_KEYS`), and its data set, objective name
    (and, for robust objectives, threat norm and eps), architecture, class count, input shape,
    normalization (Lightning would restore the checkpoint's), model settings, optimizer name, max_epochs
    and validation split (``"split"``: seed and val_size) must equal this run's. A None or absent entry on
    either side (e.g. a record without an optimizer entry whose name cannot be inferred from its optimizer
    state) is not compared. All differences are listed in one `CheckpointError`.
    """
    ckpt = read_checkpoint(path)
    absent = [key for key in RESUME_KEYS if key not in ckpt]
    if absent:
        raise CheckpointError(
            f"ckpt_path={path} holds weights only (no {', '.join(absent)}): it was saved without the optimizer "
            "and loop state, so training cannot resume from it. Use it as initial weights instead "
            "(mixrobust.load_classifier) and drop ckpt_path"
        )
    record = ckpt[CHECKPOINT_KEY]
    trained = {**record, "optimizer": _peak_lr(record.get("optimizer"), ckpt) or _inferred_optimizer(ckpt)}
    diffs = _resume_differences(trained, expected)
    if diffs:
        raise CheckpointError(
            f"ckpt_path={path} cannot resume this run: it was trained with {', '.join(diffs)}; "
            "resume with the settings it was trained with, or drop ckpt_path to start afresh"
        )
    return record


def _peak_lr(spec: dict | None, ckpt: dict) -> dict | None:
    """`spec` with a one-cycle run's configured peak lr, ``max_lr`` of the saved optimizer state: records written
    before `optimizer_spec` recorded it hold the schedule's starting lr (max_lr / 25) instead."""
    try:
        peak = ckpt["optimizer_states"][0]["param_groups"][0]["max_lr"]
    except (KeyError, IndexError, TypeError):
        return spec
    return {**spec, "lr": float(peak)} if spec else spec


def _inferred_optimizer(ckpt: dict) -> dict | None:
    """{"name": "adamw" | "sgd"} from Lightning's saved optimizer state, for records without an optimizer entry."""
    try:
        group = ckpt["optimizer_states"][0]["param_groups"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if "betas" in group:
        return {"name": "adamw"}
    if "momentum" in group:
        return {"name": "sgd"}
    return None


def _same(a, b) -> bool:
    """Equal settings: numbers up to float rounding, lists and dicts element by element, enums by value."""
    a, b = getattr(a, "value", a), getattr(b, "value", b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _resume_differences(trained: Mapping, expected: Mapping) -> list[str]:
    """Phrases "<what> <trained value> (this run: <expected value>)" for every setting that differs: the data
    set, the model, every setting of the objective (its threat, steps, beta, sigma, ...) and of the optimizer
    (lr, weight decay, momentum, betas: Lightning would restore the checkpoint's and ignore this run's), and
    the schedule's length."""
    diffs = []

    def compare(what: str, mine, theirs, show=repr) -> None:
        if mine is not None and theirs is not None and not _same(mine, theirs):
            diffs.append(f"{what} {show(mine)} (this run: {show(theirs)})")

    compare("data", trained.get("data"), expected.get("data"))
    mine, theirs = trained["objective"], expected.get("objective") or {}
    compare("objective", mine["name"], theirs.get("name"))
    if mine["name"] == theirs.get("name"):
        for key in sorted(set(mine) & set(theirs) - {"name"}):
            show = _threat_text if key == "threat" and isinstance(mine[key], dict) else repr
            compare(f"objective.{key}", mine[key], theirs[key], show=show)
    model, want = trained["model"], expected.get("model") or {}
    compare("model", model["arch"], want.get("arch"))
    compare("num_classes", model["num_classes"], want.get("num_classes"), show=str)
    shape = want.get("input_shape")
    compare("input_shape", list(model["input_shape"]), None if shape is None else [int(s) for s in shape], show=str)
    for key in ("mean", "std"):  # Lightning restores the checkpoint's normalization; this run would record its own
        compare(f"normalization {key}", model.get(key), want.get(key), show=lambda v: str(list(v)))
    if "kwargs" in want:
        compare("model settings", model.get("kwargs") or {}, want["kwargs"] or {})
    optimizer, other = trained.get("optimizer") or {}, expected.get("optimizer") or {}
    compare("optimizer", optimizer.get("name"), other.get("name"))
    if optimizer.get("name") == other.get("name"):
        for key in sorted(set(optimizer) & set(other) - {"name"}):
            compare(f"optimizer.{key}", optimizer[key], other[key], show=str)
    compare("trainer.max_epochs", trained.get("max_epochs"), expected.get("max_epochs"), show=str)
    split, want = trained.get("split") or {}, expected.get("split") or {}
    for key in ("seed", "val_size"):  # the validation images it held out (model selection, a later map fit)
        compare("seed" if key == "seed" else "data.val_size", split.get(key), want.get(key), show=str)
    return diffs


def _threat_text(threat: Mapping) -> str:
    text = f"{getattr(threat['norm'], 'value', threat['norm'])} eps={float(threat['eps']):g}"
    return text + (f" step_size={float(threat['step_size']):g}" if "step_size" in threat else "")
