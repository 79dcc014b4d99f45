"""Reading a zoo model's weights file safely, and matching its tensor names to a network.

Files are read with safetensors or ``torch.load(weights_only=True)`` (through `mixrobust.checkpoint`'s
reader): a file that needs pickled code is refused, never run. Libraries save weights in several
wrappings; `unwrap` finds the state_dict inside the common ones, and `fit_names` adds or removes the
prefixes that DistributedDataParallel (``module.``), Lightning modules (``model.``) or normalization
wrappers (``model.``) put in front of the names, choosing the variant whose names the network has.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mixrobust.checkpoint.files import load_file, stat_file, weights_mismatch
from mixrobust.errors import CheckpointError

#: Keys under which libraries nest the state_dict (RobustBench's checkpoints: state_dict; some: 'last').
CONTAINERS = ("state_dict", "model_state_dict", "model", "last", "net")
#: Prefixes that wrappers add: DDP, Lightning modules, normalization wrappers.
PREFIXES = ("module.", "model.", "net.")
#: Buffers a network may define itself that some published files lack (RobustBench's normalization
#: constants: mu, sigma, mean, std): set by the network's constructor, so their absence changes nothing.
CONSTANT_BUFFERS = ("mu", "sigma", "mean", "std")

_memo: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}
_memo_lock = threading.Lock()


def read_weights(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The state_dict in file `path` (``.safetensors`` or a torch file), CPU tensors memory-mapped where
    torch can; `what` names the source in errors. Memoized by (path, size, mtime)."""
    resolved, st = stat_file(path, what, fix="put the weights file there")
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    if Path(path).suffix == ".safetensors":
        state = _read_safetensors(path, what)
    else:
        state = unwrap(load_file(path, st.st_size, what), path, what)
    with _memo_lock:
        _memo[key] = state
    return state


def _read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError: the file is not a complete safetensors file
        raise CheckpointError(f"{what}: {path} is not a readable safetensors file ({type(exc).__name__}: "
                              f"{str(exc)[:120]}); re-copy it") from None


def unwrap(obj: object, path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The dict of named tensors in `obj`, looking inside the `CONTAINERS` keys of a dict."""
    for _ in range(3):  # e.g. {"state_dict": {...}} or {"last": {"state_dict": ...}}
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in CONTAINERS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    if not (isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items())):
        held = type(obj).__name__ if not isinstance(obj, Mapping) else f"a dict with keys {list(obj)[:5]}"
        raise CheckpointError(f"{what}: {path} holds {held}, not a state_dict (a dict of named tensors); save the "
                              "weights with torch.save(model.state_dict(), path) or safetensors")
    return dict(obj)


def fit_names(state: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with wrapper prefixes removed or added so that its names best match `wanted`'s."""
    candidates = [dict(state)]
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            candidates.append({k[len(prefix):]: v for k, v in state.items()})
        candidates.append({prefix + k: v for k, v in state.items()})
    stripped = dict(state)  # 'module.model.x': every wrapper prefix removed in turn
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in stripped):
            stripped = {k[len(prefix):]: v for k, v in stripped.items()}
    candidates.append(stripped)
    return max(candidates, key=lambda c: len(c.keys() & wanted.keys()))


def load_into(net: nn.Module, state: Mapping[str, torch.Tensor], what: str, path: str | os.PathLike,
              allow_constant_buffers: bool = False) -> None:
    """Copy `state` into `net` exactly (names and shapes), or raise one CheckpointError summarizing the mismatch.

    With `allow_constant_buffers`, buffers named in `CONSTANT_BUFFERS` that the file lacks keep the
    network's own values (RobustBench loads some of its entries the same way)."""
    problem = mismatch(net, state, allow_constant_buffers)
    if problem:
        raise CheckpointError(f"{what}: the weights in {path} do not fit its network: {problem}. The file holds "
                              "another network's weights (or another entry's): check the name and the file")
    missing = net.state_dict().keys() - state.keys()
    net.load_state_dict(state, strict=not missing)


def mismatch(net_or_state: nn.Module | Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
             allow_constant_buffers: bool = False) -> str:
    """How `state` fails to fit a network (or its state_dict, e.g. on the meta device); "" if it fits."""
    wanted = net_or_state.state_dict() if isinstance(net_or_state, nn.Module) else net_or_state
    if allow_constant_buffers:
        wanted = {k: v for k, v in wanted.items() if k in state or k.rpartition(".")[2] not in CONSTANT_BUFFERS}
    return weights_mismatch(wanted, state)
