"""A map over example shards in several processes (one per GPU, or several CPU processes), with Lightning Fabric.

``map_shards(fn, tensors, device, processes)`` is ``[fn(*shard, device=device_k) for each shard]``:
the tensors (all with the same first dimension N) are split into `processes` contiguous shards
(`shard_bounds`: sizes differ by at most one, nothing padded or repeated), and each shard goes to
its own process under Fabric's DDP strategy (gloo on CPUs, NCCL on GPUs), which calls `fn` with its
device and sends the result back (the shards stay where they are, on the CPU in spawned processes:
`fn` moves what it needs, batch by batch if the data is large); the results come back in shard order. Joined in that order they
are the one-process results when `fn` treats each example independently of the others in its
shard (the caller's contract to state). With one process `fn` runs here, on `device`.

Processes are started with ``spawn`` (Fabric's ``ddp_spawn``), not by re-running the script: that
works inside a Hydra multirun job, where re-running ``evaluate.py -m ...`` would start the whole
sweep again, and from plain Python. `fn` (e.g. a ``functools.partial`` binding models and
settings) and the tensors must be picklable; keep models in `fn` on the CPU, each process moves
what it needs to its own device. A `MixrobustError` raised by `fn` in any process is raised here.
Progress (`mixrobust.runtime.progress`): the first shard's process shows its stages as this process
would (its log lines on stderr, tagged ``shard 1 of k``); the other processes stay quiet.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mixrobust.errors import ConfigError, MixrobustError
from mixrobust.runtime import progress


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `world` contiguous shards of n examples (sizes differ by at most one)."""
    assert world >= 1, world
    edges = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(n), world)])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def check_gpu_processes(processes: int, gpus: int) -> None:
    """Refuse more processes than the `gpus` visible (a job on GPUs)."""
    if processes > 1 and processes > gpus:
        raise ConfigError(f"distributed.devices={processes} but {gpus} GPU(s) are visible; lower distributed.devices "
                          "or pass device=cpu")


def check_processes(processes: int, device: torch.device, n: int) -> None:
    """Refuse more processes than the GPUs visible (on cuda) or the examples to split."""
    if device.type == "cuda":
        check_gpu_processes(processes, torch.cuda.device_count())
    if processes > n:
        raise ConfigError(f"distributed.devices={processes} exceeds the {n} examples evaluated; lower it")


def _show_progress(rank: int, world: int, mode: str, interval: float) -> None:
    """A spawned process has none of the parent's log handlers (Hydra's): the first shard's gets one on stderr
    and the parent's resolved progress mode; the others show none (they would repeat the first)."""
    if rank != 0:
        progress.configure("none", interval)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[%(asctime)s][%(name)s][%(levelname)s] - shard 1 of {world}: %(message)s"))
    logger = logging.getLogger(progress.log.name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    progress.configure(mode, interval)


def _worker(fabric, fn: Callable[..., Any], payload: bytes, shown: tuple[str, float]) -> bytes | None:
    _show_progress(fabric.global_rank, fabric.world_size, *shown)
    tensors = pickle.loads(payload)
    start, stop = shard_bounds(tensors[0].shape[0], fabric.world_size)[fabric.global_rank]
    try:
        part = fn(*[t[start:stop] for t in tensors], device=fabric.device)
    except MixrobustError as exc:  # sent back like a result, so every process reaches the gather
        part = exc
    parts = [None] * fabric.world_size
    dist.all_gather_object(parts, part)
    dist.barrier()
    dist.destroy_process_group()  # a process group left to interpreter exit can abort the process
    return pickle.dumps(parts) if fabric.global_rank == 0 else None


def map_shards(fn: Callable[..., Any], tensors: Sequence[torch.Tensor], device: torch.device,
               processes: int = 1) -> list[Any]:
    """``[fn(*shard_tensors, device=...) for each of `processes` contiguous shards]`` (see the module docstring)."""
    tensors = list(tensors)
    if processes == 1:
        return [fn(*tensors, device=device)]
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import LightningEnvironment

    # the processes are this job's own, spawned here: inside a SLURM or torchrun allocation Fabric would otherwise
    # take ranks and world size from it (one task: rank 0 of 1 in every process)
    fabric = Fabric(accelerator="gpu" if device.type == "cuda" else "cpu", devices=processes, strategy="ddp_spawn",
                    plugins=[LightningEnvironment()])
    # arguments and results cross the process boundary as pickled bytes made here (never read from
    # disk): Fabric would otherwise walk them as collections, which frozen dataclasses do not allow
    shown = (progress.current_mode(), progress.current_interval())
    parts = pickle.loads(fabric.launch(_worker, fn, pickle.dumps([t.cpu() for t in tensors]), shown))
    for part in parts:
        if isinstance(part, MixrobustError):  # a user-facing error in one process is the job's error
            raise part
    return parts
