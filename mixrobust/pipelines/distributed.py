"""Evaluation across several processes (one per GPU, or several CPU processes) with Lightning Fabric.

``distributed.devices: k`` (k > 1) splits the evaluated examples into k contiguous shards
(`shard_bounds`: sizes differ by at most one, nothing padded or repeated), runs one shard per
process under Fabric's DDP strategy (gloo on CPUs, NCCL on GPUs) and gathers every shard's
per-example results to rank 0, which hands them back, in shard order, to the calling process.
Joined in that order they are the one-process results: each example is evaluated once, and PGD
without random start and the certification noise (per-image streams) do not depend on which
other examples share a process, up to float rounding of model outputs across batch shapes
(margins agree to about 1e-7; an exact tie could flip). Random starts and AutoAttack's own random
draws differ from one process. Metrics are computed afterwards from the gathered per-example
results, so they are synced by construction.

Processes are started with ``spawn`` (Fabric's ``ddp_spawn``), not by re-running the script: that
works inside a Hydra multirun job, where re-running ``evaluate.py -m ...`` would start the whole
sweep again, and from plain Python. The work function and its payload must be picklable.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mixrobust.errors import ConfigError, check_count


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `world` contiguous shards of n examples (sizes differ by at most one)."""
    if world < 1:
        raise ConfigError(f"distributed.devices must be >= 1, got {world}")
    edges = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(n), world)])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def accelerator_for(device: torch.device) -> str:
    """Fabric accelerator for a resolved device (cpu or cuda)."""
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"distributed evaluation runs on cpu or cuda devices, got device={str(device)!r}")
    return "gpu" if device.type == "cuda" else "cpu"


def check_devices(devices, device: torch.device, n: int) -> int:
    """Validated process count: a whole number >= 1, at most the GPUs visible and the examples."""
    devices = check_count("distributed.devices", devices)
    if devices > 1 and accelerator_for(device) == "gpu" and devices > torch.cuda.device_count():
        raise ConfigError(f"distributed.devices={devices} but {torch.cuda.device_count()} GPU(s) are visible; "
                          f"lower distributed.devices or pass device=cpu")
    if devices > n:
        raise ConfigError(f"distributed.devices={devices} exceeds the {n} examples evaluated; lower it")
    return devices


def _worker(fabric, work: Callable[..., Any], payload: bytes, n: int) -> bytes | None:
    start, stop = shard_bounds(n, fabric.world_size)[fabric.global_rank]
    part = work(pickle.loads(payload), start, stop, fabric.device)
    parts = [None] * fabric.world_size
    dist.all_gather_object(parts, part)
    dist.barrier()
    dist.destroy_process_group()  # a process group left to interpreter exit can abort the process
    return pickle.dumps(parts) if fabric.global_rank == 0 else None


def run_sharded(work: Callable[..., Any], payload: Any, n: int, devices: int, device: torch.device) -> list[Any]:
    """``[work(payload, start, stop, torch_device) for each shard]``, one shard per process.

    With ``devices == 1`` the work runs here, on ``device`` (resolved, e.g. by `resolve_device`). Otherwise Fabric spawns `devices`
    processes; each evaluates its shard [start, stop) of the n examples on its own device, and
    the shards' results come back as a list in shard order.
    """
    if devices == 1:
        return [work(payload, 0, n, device)]
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator_for(device), devices=devices, strategy="ddp_spawn")
    # payload and results cross the process boundary as pickled bytes made here (never read from
    # disk): Fabric would otherwise walk them as collections, which frozen dataclasses do not allow
    return pickle.loads(fabric.launch(_worker, work, pickle.dumps(payload), n))
