"""Reading checkpoint files: safely (``weights_only=True``), with one clear error for every bad file.

See `mixrobust.checkpoint` for the guarantees.
"""

from __future__ import annotations

import collections
import copy
import os
import re
import stat
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from mixrobust.checkpoint.record import _RECORD_FIX, CHECKPOINT_KEY, validate_record
from mixrobust.errors import CheckpointError, ConfigError
from mixrobust.models import ImageClassifier, create_model
from mixrobust.runtime.files import file_version

_PREFIX = "model."
#: The non-container types a checkpoint may hold: MultiStepLR keeps its milestones in a Counter.
SAFE_GLOBALS = [collections.Counter]
_TRAIN_FIX = "train base models with train.py so their checkpoints describe themselves"
_records: dict[tuple[str, int, int], dict] = {}  # (resolved path, size, mtime_ns) -> validated record
_records_lock = threading.Lock()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a mixrobust checkpoint file on the CPU, never executing pickled code.

    Returns the whole checkpoint dict; its ``"mixrobust"`` record has passed `validate_record` and
    its ``state_dict`` maps names to tensors. Anything else raises one `CheckpointError`.
    """
    resolved, st = stat_file(path)
    ckpt = load_file(path, st.st_size)
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

    Memoized in-process by the resolved path and `file_version`: validating many jobs that share a
    checkpoint reads the file once, and a rewritten file is read again.
    """
    resolved, st = stat_file(path)
    with _records_lock:
        record = _records.get((str(resolved), *file_version(st)))
    if record is None:
        record = read_checkpoint(path)[CHECKPOINT_KEY]
    return copy.deepcopy(record)


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
    mismatch = weights_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} does not match its own model record ({spec['arch']}, {spec['num_classes']} "
            f"classes, input {list(spec['input_shape'])}): {mismatch}. The weights belong to another network or "
            "were edited; retrain with train.py"
        )
    edited = normalization_mismatch(model.state_dict(), state)
    if edited:
        raise CheckpointError(
            f"checkpoint {path}: {edited}, so its record does not describe the model it holds (the file was "
            "edited); retrain with train.py, or set the record's model.mean / model.std to the weights' values"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # not expected once the names and shapes match; still one short message
        raise CheckpointError(
            f"checkpoint {path}: its weights cannot be loaded ({_first_line(exc)}); retrain with train.py"
        ) from None
    model.record = record
    return freeze(model.to(map_location))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: how base models are used in a mixture."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def stat_file(path: str | os.PathLike, what: str = "checkpoint",
              fix: str = "pass the path that train.py printed last (its run directory's checkpoints/best.ckpt)"
              ) -> tuple[Path, os.stat_result]:
    """The resolved path and stat of a non-empty regular file, else one CheckpointError that calls the file
    `what` and ends with `fix` when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}. {fix[:1].upper() + fix[1:]}.") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CheckpointError(f"{what} {path} cannot be read ({reason}); check its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        patterns = ("*.ckpt", "checkpoints/*.ckpt")
        found = sorted(p.relative_to(path).as_posix() for pattern in patterns for p in Path(path).glob(pattern))
        inside = f"it holds {', '.join(found[:4])}" if found else "it holds no .ckpt file"
        raise CheckpointError(f"{what} {path} is a directory, not a file ({inside}); pass the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {path} is not a regular file; pass the file itself")
    if st.st_size == 0:
        raise CheckpointError(
            f"{what} {path} is empty (0 bytes): its save or copy was interrupted. Re-copy it, or retrain"
        )
    return Path(path).resolve(), st


def load_file(path: str | os.PathLike, size: int, what: str = "checkpoint") -> object:
    """``torch.load(weights_only=True)`` on the CPU; torch's errors become one short CheckpointError calling
    the file `what`.

    torch's own message is summarized, never copied: it advises loading with pickled code enabled.
    """
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            # a corrupt file whose first byte looks like a pickle header: the error below says what is wrong
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # every other failure to parse the file means the same to the user: unusable
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            message = (
                f"{what} {path} holds pickled Python objects that are not plain data (the global "
                f"{unsafe.group(1)!r}); mixrobust never unpickles code: re-save the weights with train.py "
                "or as a plain state_dict of tensors"
            )
        elif isinstance(exc, PermissionError):  # other OSErrors (e.g. a failed seek) come from corrupt content
            message = f"{what} {path} cannot be read (permission denied); check its permissions"
        else:
            message = (
                f"{what} {path} is truncated or corrupt: its {size:,} bytes are not a complete file written "
                f"by torch.save ({type(exc).__name__}). Re-copy it, or retrain with train.py"
            )
    raise CheckpointError(message) from None



def _remember(resolved: Path, st: os.stat_result, record: dict) -> None:
    """Memoize `record` for `read_record`, unless the file changed while it was read."""
    try:
        after = resolved.stat()
    except OSError:
        return
    if file_version(after) == file_version(st):
        with _records_lock:
            _records[(str(resolved), *file_version(st))] = copy.deepcopy(record)


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


def weights_mismatch(wanted: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
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


def normalization_mismatch(wanted: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """How the normalization layer's mean / std in `state` differ from a model built from the record (`wanted`:
    its state_dict), e.g. "its weights normalize with std [0.5] but its record says [0.3081]"; "" if they agree.
    Loading would silently use the weights' values while every report shows the record's."""
    for key in ("normalize.mean", "normalize.std"):
        if key in wanted and key in state and not torch.allclose(state[key].float(), wanted[key].float(),
                                                                   rtol=1e-6, atol=1e-7):
            found, recorded = ([round(v, 6) for v in t.flatten().tolist()] for t in (state[key], wanted[key]))
            return f"its weights normalize with {key.split('.')[1]} {found} but its record says {recorded}"
    return ""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]
