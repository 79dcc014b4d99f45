"""The record a mixrobust checkpoint carries beside its weights: how to rebuild the model and how it was trained.

See `mixrobust.checkpoint` for the format. `make_record` writes it (from the training module),
`validate_record` checks one read from a file, listing every problem in one `CheckpointError`.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from mixrobust.errors import CheckpointError
from mixrobust.models import ImageClassifier, available_models

CHECKPOINT_KEY = "mixrobust"
FORMAT_VERSION = 1
_RECORD_FIX = "retrain it with train.py, or rewrite the record with mixrobust.checkpoint.make_record"


def optimizer_spec(optimizer: torch.optim.Optimizer) -> dict:
    """The plain-dict description of `optimizer` stored in a checkpoint's record.

    ``{"name", "lr", "weight_decay"}`` from the first parameter group, plus ``momentum``/``nesterov``
    for SGD or ``betas`` for the Adam family. Values a scheduler moves during training are recorded as
    configured: ``lr`` is a one-cycle schedule's peak ``max_lr`` (``optimizer.lr`` in the config), else the
    scheduler's ``initial_lr`` when one set it, and the momentum (beta1) a one-cycle schedule cycles is its
    peak, ``max_momentum``, so a spec taken mid-run equals the run's.
    ``name`` is the lowercased class name: ``"sgd"``, ``"adamw"``, ``"adam"``, ...
    """
    group = optimizer.param_groups[0]
    spec = {
        "name": type(optimizer).__name__.lower(),
        "lr": float(group.get("max_lr", group.get("initial_lr", group["lr"]))),
        "weight_decay": float(group.get("weight_decay", 0.0)),
    }
    peak = group.get("max_momentum")  # a one-cycle schedule cycles the momentum (or beta1) from this peak
    if isinstance(optimizer, torch.optim.SGD):
        momentum = group.get("momentum", 0.0) if peak is None else peak
        spec.update(momentum=float(momentum), nesterov=bool(group.get("nesterov", False)))
    elif "betas" in group:
        spec["betas"] = [float(group["betas"][0] if peak is None else peak), float(group["betas"][1])]
    return spec


def make_record(
    model: ImageClassifier,
    objective,
    threat,
    data_name: str | None,
    optimizer: dict | torch.optim.Optimizer | None = None,
    max_epochs: int | None = None,
    split: dict | None = None,
) -> dict:
    """The plain-dict record stored in a checkpoint beside the weights.

    `optimizer` is an `optimizer_spec` dict (an optimizer is converted with `optimizer_spec`) or
    None, which records ``"optimizer": None`` as older checkpoints implicitly do; `max_epochs` is the
    length of the training schedule (its learning-rate schedule depends on it), None if unknown;
    `split` is how the run carved its validation images out of the training split, ``{"seed", "val_size"}``
    (what a later map fit checks its held-out images against), None if unknown.
    """
    spec = objective.spec()
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer_spec(optimizer)
    return {
        "format": FORMAT_VERSION,
        "model": dict(model.spec),
        "objective": spec,
        "threat": threat.as_dict() if threat is not None else None,
        "sigma": spec.get("sigma"),
        "data": data_name,
        "optimizer": dict(optimizer) if optimizer is not None else None,
        "max_epochs": None if max_epochs is None else int(max_epochs),
        "split": None if split is None else {"seed": int(split["seed"]), "val_size": split["val_size"]},
    }


def validate_record(record: object, path: str | os.PathLike) -> dict:
    """Return `record` if it is a well-formed format-1 record of a registered architecture.

    Raises one `CheckpointError` naming `path` and listing every problem otherwise.
    """
    version = record.get("format") if isinstance(record, dict) else None
    if _is_int(version) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has record format {version}, written by a newer mixrobust; "
            f"this version reads format {FORMAT_VERSION}: upgrade mixrobust to load it"
        )
    problems = _record_problems(record)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} has an invalid {CHECKPOINT_KEY!r} record: {'; '.join(problems)}. "
            f"It was not written by this mixrobust's train.py or was edited: {_RECORD_FIX}"
        )
    arch = record["model"]["arch"]
    if arch not in available_models():
        raise CheckpointError(
            f"checkpoint {path} was trained as model {arch!r}, which is not registered here "
            f"(registered models: {', '.join(available_models())}); import the module that registers it "
            "with @register_model before loading, or retrain with one of these"
        )
    return record


def _record_problems(record: object) -> list[str]:
    """Every way `record` departs from the format-1 record, as short phrases ([] if none)."""
    if not isinstance(record, dict):
        return [f"the record is a {type(record).__name__}, not a dict"]
    problems = []
    if "format" not in record:
        problems.append("it has no format version")
    elif not _is_int(record["format"]) or record["format"] != FORMAT_VERSION:
        problems.append(f"format must be {FORMAT_VERSION}, got {_show(record['format'])}")
    model = record.get("model")
    problems += _model_problems(model) if isinstance(model, dict) else [f"model must be a dict, got {_show(model)}"]
    objective = record.get("objective")
    if not isinstance(objective, dict) or not isinstance(objective.get("name"), str):
        problems.append(f"objective must be a dict with a str name, got {_show(objective)}")
    elif "threat" in objective:
        problems += _threat_problems("objective.threat", objective["threat"])
    problems += _threat_problems("threat", record.get("threat"))
    sigma = record.get("sigma")
    if sigma is not None and not (_is_number(sigma) and sigma > 0):
        problems.append(f"sigma must be None or a number > 0, got {_show(sigma)}")
    if record.get("data") is not None and not isinstance(record["data"], str):
        problems.append(f"data must be None or a str, got {_show(record['data'])}")
    optimizer = record.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer, dict) and isinstance(optimizer.get("name"), str)):
        problems.append(f"optimizer must be None or a dict with a str name, got {_show(optimizer)}")
    epochs = record.get("max_epochs")
    if epochs is not None and not (_is_int(epochs) and epochs >= 1):
        problems.append(f"max_epochs must be None or a whole number >= 1, got {_show(epochs)}")
    split = record.get("split")
    if split is not None and not (isinstance(split, dict) and _is_int(split.get("seed"))
                                  and _is_number(split.get("val_size"))):
        problems.append(f"split must be None or a dict with a whole-number seed and a val_size, got {_show(split)}")
    return problems


def _model_problems(model: dict) -> list[str]:
    problems = []
    if not isinstance(model.get("arch"), str):
        problems.append(f"model.arch must be a str, got {_show(model.get('arch'))}")
    if not (_is_int(model.get("num_classes")) and model["num_classes"] >= 2):
        problems.append(f"model.num_classes must be a whole number >= 2, got {_show(model.get('num_classes'))}")
    shape = model.get("input_shape")
    shape_ok = isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_is_int(s) and s > 0 for s in shape)
    if not shape_ok:
        problems.append(f"model.input_shape must be 3 positive whole numbers (C, H, W), got {_show(shape)}")
    for key in ("mean", "std"):
        values = model.get(key)
        ok = isinstance(values, (list, tuple)) and all(_is_number(v) for v in values)
        ok = ok and (len(values) == shape[0] if shape_ok else len(values) > 0)
        if ok and key == "std":
            ok = all(v > 0 for v in values)
        if not ok:
            channels = f"{shape[0]} " if shape_ok else ""
            extra = " > 0" if key == "std" else ""
            problems.append(
                f"model.{key} must be a list of {channels}finite numbers{extra} (one per channel), got {_show(values)}"
            )
    if not isinstance(model.get("kwargs", {}), dict):
        problems.append(f"model.kwargs must be a dict, got {_show(model.get('kwargs'))}")
    return problems


def _threat_problems(name: str, threat: object) -> list[str]:
    if threat is None:
        return []
    if not isinstance(threat, dict):
        return [f"{name} must be None or a dict, got {_show(threat)}"]
    problems = []
    if threat.get("norm") not in ("linf", "l2"):
        problems.append(f"{name}.norm must be 'linf' or 'l2', got {_show(threat.get('norm'))}")
    for key in ("eps", "step_size"):
        if not (_is_number(threat.get(key)) and threat[key] >= 0):
            problems.append(f"{name}.{key} must be a finite number >= 0, got {_show(threat.get(key))}")
    return problems


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
