"""Self-describing checkpoints: a checkpoint alone rebuilds the classifier it was trained as.

Lightning checkpoints written by `ClassifierModule` carry, under the key ``"mixrobust"``, a plain
record (only strings, numbers, lists and dicts)::

    {"format": 1, "model": {arch, num_classes, input_shape, mean, std, kwargs},
     "objective": {name, ...}, "threat": {norm, eps, step_size} | None, "sigma": float | None,
     "data": "digits" | ... | None, "optimizer": {name, lr, weight_decay, ...} | None}

and the weights under ``state_dict`` with the prefix ``model.``. ``optimizer`` is optional (older
records lack it).

Guarantees:

- Files are read with ``torch.load(weights_only=True)``: a checkpoint never executes pickled code.
- Every way a file can be bad (missing, a directory, empty, truncated, corrupt, pickled objects,
  foreign content, an invalid record, weights that do not fit the record) raises ONE
  `CheckpointError` whose message names the file, says what is wrong and how to fix it.
- `read_checkpoint`, `read_record`, `load_classifier` and `check_resume` only ever return a
  checkpoint whose record passed `validate_record`.
"""

from __future__ import annotations

import collections
import copy
import math
import numbers
import os
import re
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mixrobust.errors import CheckpointError, ConfigError
from mixrobust.models import ImageClassifier, available_models, create_model

CHECKPOINT_KEY = "mixrobust"
FORMAT_VERSION = 1
RESUME_KEYS = ("epoch", "global_step", "optimizer_states", "loops")  # Lightning's state beyond the weights
_PREFIX = "model."
# MultiStepLR keeps its milestones in a Counter: a plain dict subclass, safe to allow.
_SAFE_GLOBALS = [collections.Counter]
_RECORD_FIX = "retrain it with train.py, or rewrite the record with mixrobust.checkpoint.make_record"
_TRAIN_FIX = "train base models with train.py so their checkpoints describe themselves"

_records: dict[tuple[str, int, int], dict] = {}  # (resolved path, size, mtime_ns) -> validated record
_records_lock = threading.Lock()


def optimizer_spec(optimizer: torch.optim.Optimizer) -> dict:
    """The plain-dict description of `optimizer` stored in a checkpoint's record.

    ``{"name", "lr", "weight_decay"}`` from the first parameter group (``lr`` is the scheduler's
    ``initial_lr`` when one set it), plus ``momentum``/``nesterov`` for SGD or ``betas`` for the
    Adam family. ``name`` is the lowercased class name: ``"sgd"``, ``"adamw"``, ``"adam"``, ...
    """
    group = optimizer.param_groups[0]
    spec = {
        "name": type(optimizer).__name__.lower(),
        "lr": float(group.get("initial_lr", group["lr"])),
        "weight_decay": float(group.get("weight_decay", 0.0)),
    }
    if isinstance(optimizer, torch.optim.SGD):
        spec.update(momentum=float(group.get("momentum", 0.0)), nesterov=bool(group.get("nesterov", False)))
    elif "betas" in group:
        spec["betas"] = [float(b) for b in group["betas"]]
    return spec


def make_record(
    model: ImageClassifier,
    objective,
    threat,
    data_name: str | None,
    optimizer: dict | torch.optim.Optimizer | None = None,
) -> dict:
    """The plain-dict record stored in a checkpoint beside the weights.

    `optimizer` is an `optimizer_spec` dict (an optimizer is converted with `optimizer_spec`) or
    None, which records ``"optimizer": None`` as older checkpoints implicitly do.
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
    }


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a mixrobust checkpoint file on the CPU, never executing pickled code.

    Returns the whole checkpoint dict; its ``"mixrobust"`` record has passed `validate_record` and
    its ``state_dict`` maps names to tensors. Anything else raises one `CheckpointError`.
    """
    resolved, st = _stat(path)
    ckpt = _load(path, st.st_size)
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} is not a mixrobust checkpoint: it holds a {type(ckpt).__name__}, not a dict with "
            f"{CHECKPOINT_KEY!r} and 'state_dict'; {_TRAIN_FIX}"
        )
    missing = [key for key in (CHECKPOINT_KEY, "state_dict") if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not a mixrobust checkpoint (no {' and no '.join(map(repr, missing))} entry); {_TRAIN_FIX}"
        )
    validate_record(ckpt[CHECKPOINT_KEY], path)
    _check_state_dict(ckpt["state_dict"], path)
    _remember(resolved, st, ckpt[CHECKPOINT_KEY])
    return ckpt


def read_record(path: str | os.PathLike) -> dict:
    """The validated ``"mixrobust"`` record of checkpoint `path` (a fresh copy the caller may change).

    Memoized in-process by (resolved path, size, mtime_ns): validating many jobs that share a
    checkpoint reads the file once, and a rewritten file is read again.
    """
    resolved, st = _stat(path)
    with _records_lock:
        record = _records.get((str(resolved), st.st_size, st.st_mtime_ns))
    if record is None:
        record = read_checkpoint(path)[CHECKPOINT_KEY]
    return copy.deepcopy(record)


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


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ImageClassifier:
    """Rebuild the trained classifier from a checkpoint file alone, frozen and in eval mode.

    The result is an `ImageClassifier` (images in [0,1] -> logits) on `map_location` whose ``record``
    attribute holds the checkpoint's validated description: objective, threat, sigma and data set
    it was trained with. Its weights are exactly the checkpoint's; weights that do not fit the
    record's architecture raise one `CheckpointError` summarizing the mismatch.
    """
    ckpt = read_checkpoint(path)
    record = ckpt[CHECKPOINT_KEY]
    spec = record["model"]
    kwargs = dict(spec.get("kwargs") or {})
    if "pretrained" in kwargs:  # the checkpoint's weights replace any pretrained ones: don't fetch them
        kwargs["pretrained"] = False
    try:
        model = create_model(
            spec["arch"], spec["num_classes"], spec["input_shape"], spec["mean"], spec["std"], **kwargs
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: its model record cannot be rebuilt ({_first_line(exc)}); {_RECORD_FIX}"
        ) from None
    state = {k[len(_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(_PREFIX)}
    mismatch = _weights_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} does not match its own model record ({spec['arch']}, {spec['num_classes']} "
            f"classes, input {list(spec['input_shape'])}): {mismatch}. The weights belong to another network or "
            "were edited; retrain with train.py"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # not expected once the names and shapes match; still one short message
        raise CheckpointError(
            f"checkpoint {path}: its weights cannot be loaded ({_first_line(exc)}); retrain with train.py"
        ) from None
    model.record = record
    return freeze(model.to(map_location))


def check_resume(path: str | os.PathLike, expected: Mapping) -> dict:
    """Refuse to resume training from a checkpoint that belongs to another run; return its record.

    `expected` describes this run: ``"data"`` (str), ``"objective"`` (its ``spec()``), ``"model"``
    (arch, num_classes, input_shape) and ``"optimizer"`` (an `optimizer_spec` dict or None). The
    checkpoint must hold Lightning's resume state (`RESUME_KEYS`), and its data set, objective name
    (and, for robust objectives, threat norm and eps), architecture, class count, input shape and
    optimizer name must equal this run's. A None on either side (e.g. a record without an
    optimizer entry whose name cannot be inferred from its optimizer state) is not compared. All
    differences are listed in one `CheckpointError`.
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
    trained = {**record, "optimizer": record.get("optimizer") or _inferred_optimizer(ckpt)}
    diffs = _resume_differences(trained, expected)
    if diffs:
        raise CheckpointError(
            f"ckpt_path={path} cannot resume this run: it was trained with {', '.join(diffs)}; "
            "resume with the settings it was trained with, or drop ckpt_path to start afresh"
        )
    return record


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: how base models are used in a mixture."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------- reading files


def _stat(path: str | os.PathLike) -> tuple[Path, os.stat_result]:
    """The resolved path and stat of a non-empty regular file, else a CheckpointError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint not found: {path}. Pass the path that train.py printed last "
            "(its run directory's checkpoints/best.ckpt)."
        ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); check its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        patterns = ("*.ckpt", "checkpoints/*.ckpt")
        found = sorted(p.relative_to(path).as_posix() for pattern in patterns for p in Path(path).glob(pattern))
        inside = f"it holds {', '.join(found[:4])}" if found else "it holds no .ckpt file"
        raise CheckpointError(f"checkpoint {path} is a directory, not a file ({inside}); pass the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file; pass the .ckpt file that train.py wrote")
    if st.st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): its save or copy was interrupted. Re-copy it, or retrain"
        )
    return Path(path).resolve(), st


def _load(path: str | os.PathLike, size: int) -> object:
    """``torch.load(weights_only=True)`` on the CPU; torch's errors become one short CheckpointError.

    torch's own message is summarized, never copied: it advises loading with pickled code enabled.
    """
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # every other failure to parse the file means the same to the user: unusable
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            message = (
                f"checkpoint {path} holds pickled Python objects that are not plain data (the global "
                f"{unsafe.group(1)!r}); mixrobust never unpickles code: re-save the weights with train.py "
                "or as a plain state_dict of tensors"
            )
        elif isinstance(exc, PermissionError):  # other OSErrors (e.g. a failed seek) come from corrupt content
            message = f"checkpoint {path} cannot be read (permission denied); check its permissions"
        else:
            message = (
                f"checkpoint {path} is truncated or corrupt: its {size:,} bytes are not a complete file written "
                f"by torch.save ({type(exc).__name__}). Re-copy it, or retrain with train.py"
            )
    raise CheckpointError(message) from None


def _remember(resolved: Path, st: os.stat_result, record: dict) -> None:
    """Memoize `record` for `read_record`, unless the file changed while it was read."""
    try:
        after = resolved.stat()
    except OSError:
        return
    if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
        with _records_lock:
            _records[(str(resolved), st.st_size, st.st_mtime_ns)] = copy.deepcopy(record)


def _check_state_dict(state: object, path: str | os.PathLike) -> None:
    if not isinstance(state, dict):
        detail = f"it is a {type(state).__name__}"
    else:
        bad = next(((k, v) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        detail = None if bad is None else f"entry {bad[0]!r} is a {type(bad[1]).__name__}"
    if detail:
        raise CheckpointError(
            f"checkpoint {path} has a state_dict that is not a dict of named tensors ({detail}); "
            "re-save the weights with train.py or as a plain state_dict"
        )


def _weights_mismatch(wanted: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """A one-line summary of how `state` fails to fit a model whose state_dict is `wanted`; "" if it fits."""
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    shaped = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(wanted[k].shape)]
    parts = []
    if missing or unexpected:
        counts = " and ".join(f"{len(keys)} {what}" for keys, what in ((missing, "missing"), (unexpected, "unexpected"))
                              if keys)
        parts.append(f"{counts} weight names, e.g. {(missing or unexpected)[0]}")
    if shaped:
        k = shaped[0]
        parts.append(
            f"{len(shaped)} weights of the wrong shape, e.g. {k}: {list(state[k].shape)} in the file, "
            f"{list(wanted[k].shape)} in the model"
        )
    return "; ".join(parts)


# ---------------------------------------------------------------- the record


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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


# ---------------------------------------------------------------- resuming


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


def _resume_differences(trained: Mapping, expected: Mapping) -> list[str]:
    """Phrases "<what> <trained value> (this run: <expected value>)" for every setting that differs."""
    diffs = []

    def compare(what: str, mine, theirs, show=repr) -> None:
        if mine is not None and theirs is not None and mine != theirs:
            diffs.append(f"{what} {show(mine)} (this run: {show(theirs)})")

    compare("data", trained.get("data"), expected.get("data"))
    mine, theirs = trained["objective"], expected.get("objective") or {}
    compare("objective", mine["name"], theirs.get("name"))
    if mine["name"] == theirs.get("name") and isinstance(mine.get("threat"), dict) and theirs.get("threat"):
        a, b = mine["threat"], theirs["threat"]
        same_norm = a["norm"] == getattr(b["norm"], "value", b["norm"])
        if not (same_norm and math.isclose(a["eps"], float(b["eps"]), rel_tol=1e-9, abs_tol=1e-12)):
            diffs.append(f"threat {_threat_text(a)} (this run: {_threat_text(b)})")
    model, want = trained["model"], expected.get("model") or {}
    compare("model", model["arch"], want.get("arch"))
    compare("num_classes", model["num_classes"], want.get("num_classes"), show=str)
    shape = want.get("input_shape")
    compare("input_shape", list(model["input_shape"]), None if shape is None else [int(s) for s in shape], show=str)
    optimizer = trained.get("optimizer") or {}
    compare("optimizer", optimizer.get("name"), (expected.get("optimizer") or {}).get("name"))
    return diffs


def _threat_text(threat: Mapping) -> str:
    return f"{getattr(threat['norm'], 'value', threat['norm'])} eps={float(threat['eps']):g}"
