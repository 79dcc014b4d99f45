"""Self-describing checkpoints: a checkpoint alone rebuilds the classifier it was trained as.

Lightning checkpoints written by `ClassifierModule` carry, under the key ``"mixrobust"``, a plain
record (only strings, numbers, lists and dicts)::

    {"format": 1, "model": {arch, num_classes, input_shape, mean, std, kwargs},
     "objective": {name, ...}, "threat": {norm, eps, step_size} | None, "sigma": float | None,
     "data": "digits" | ...}

and the weights under ``state_dict`` with the prefix ``model.``. `load_classifier` reads it with
``torch.load(weights_only=True)``, which never executes pickled code.
"""

from __future__ import annotations

import collections
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from mixrobust.errors import CheckpointError
from mixrobust.models import ImageClassifier, create_model

CHECKPOINT_KEY = "mixrobust"
FORMAT_VERSION = 1
_PREFIX = "model."


def make_record(model: ImageClassifier, objective, threat, data_name: str | None) -> dict:
    """The plain-dict record stored in a checkpoint beside the weights."""
    spec = objective.spec()
    return {
        "format": FORMAT_VERSION,
        "model": dict(model.spec),
        "objective": spec,
        "threat": threat.as_dict() if threat is not None else None,
        "sigma": spec.get("sigma"),
        "data": data_name,
    }


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file safely (``weights_only=True``); one clear error for every way it can be bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}. Pass the path that train.py printed last "
            "(its run directory's checkpoints/best.ckpt)."
        )
    try:
        # MultiStepLR keeps its milestones in a Counter: a plain dict subclass, safe to allow.
        with torch.serialization.safe_globals([collections.Counter]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt, or holds pickled objects "
            f"that are not plain data ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Re-copy it or retrain."
        ) from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a mixrobust checkpoint (no {CHECKPOINT_KEY!r} record); "
            "train base models with train.py so their checkpoints describe themselves"
        )
    return ckpt


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ImageClassifier:
    """Rebuild the trained classifier from a checkpoint file alone, frozen and in eval mode.

    The result is an `ImageClassifier` (images in [0,1] -> logits) whose ``record`` attribute holds
    the checkpoint's description: objective, threat, sigma and data set it was trained with.
    """
    ckpt = read_checkpoint(path)
    record = ckpt[CHECKPOINT_KEY]
    spec = record["model"]
    try:
        kwargs = dict(spec.get("kwargs", {}))
        if "pretrained" in kwargs:  # the checkpoint's weights replace any pretrained ones: don't fetch them
            kwargs["pretrained"] = False
        model = create_model(spec["arch"], spec["num_classes"], spec["input_shape"], spec["mean"], spec["std"], **kwargs)
        state = {k[len(_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(_PREFIX)}
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match its own model record: {exc}") from None
    model.record = record
    model = model.to(map_location)
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: how base models are used in a mixture."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
