"""Where each job of a Hydra sweep runs: which GPU, how many CPU threads.

Three launch modes (``python evaluate.py -m ... hydra/launcher=<choice>``, conf/hydra/launcher/):

* ``basic`` (default) runs the jobs one after another in this process: each job gets ``cuda`` if
  a GPU is visible, else ``cpu``; nothing else changes.
* ``local_gpus`` runs one joblib (loky) worker process per visible GPU. Each job *leases* a GPU:
  it takes an exclusive ``flock`` on ``<sweep dir>/.gpu_locks/<host>/gpu<k>.lock``, starting at
  ``job_num % count`` and trying the next GPU while one is held, keeps the lock while it runs and
  uses ``cuda:<k>``. ``local_cpus`` runs n_jobs CPU worker processes; each job then uses at most
  ``cores // n_jobs`` torch threads so the workers do not oversubscribe the cores.
* ``slurm`` submits a job array (hydra-submitit-launcher); each job sees the GPUs SLURM gave it
  (usually one, used as ``cuda``; with several, the leases above apply within the allocation).

Why leases rather than ``job_num % count``: joblib hands the next job to whichever worker is free,
so which jobs run together depends on how long earlier ones took. With 2 GPUs, jobs 0 and 1 start on
GPUs 0 and 1; if job 1 runs long while jobs 0 and 2 finish, job 3 starts next to it and
``3 % 2 == 1``: two jobs on GPU 1 while GPU 0 idles. A lock per GPU, held for the job's lifetime and
released explicitly (loky reuses worker processes between jobs, so process exit cannot be relied
on), gives every concurrently running job its own GPU whatever the order; the modulo only picks
where to start looking, and is the fallback when more jobs run than there are GPUs.

The decision is the pure function `plan_placement` (testable without Hydra or GPUs);
`job_placement` reads the Hydra runtime, applies the plan and holds the lease.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mixrobust.errors import ConfigError
from mixrobust.runtime.files import try_lock
from mixrobust.runtime.hydra_job import current_job
from mixrobust.runtime.threads import usable_cores

if TYPE_CHECKING:  # torch is imported where it is used: launching a sweep does not need it
    import torch

log = logging.getLogger(__name__)

LEASE = "lease"
"""`Placement.device` value meaning: lease a GPU (`lease_gpu`), then use ``cuda:<k>``."""

LOCK_DIR_NAME = ".gpu_locks"


@dataclass(frozen=True)
class Placement:
    """Where one job runs.

    device: a torch device string (``cpu``, ``cuda``, ``cuda:1``, ...) or `LEASE`.
    threads: the torch CPU thread count to set for the job, or None to leave it alone.
    """

    device: str
    threads: int | None = None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def visible_gpus() -> int:
    """Number of CUDA devices this process can see (CUDA_VISIBLE_DEVICES applies); 0 without CUDA.

    ``torch.cuda.device_count()`` asks NVML first, so it does not initialise CUDA in the launching
    process (which would make forked children unable to use the GPU).
    """
    import torch

    return int(torch.cuda.device_count())


def available_cpus() -> int:
    """CPU cores this process may use (affinity mask, cgroup quota): `mixrobust.runtime.threads.usable_cores`."""
    return usable_cores()


def gpu_for_job(job_num: int, count: int) -> int:
    """The GPU index that job `job_num` starts looking at among `count` GPUs: ``job_num % count``."""
    _check_int("GPU count", count, 1)
    _check_int("job number", job_num, 0)
    return job_num % count


def effective_n_jobs(n_jobs: int, cpu_count: int) -> int:
    """Joblib's meaning of n_jobs: a positive number as is, -1 = all cores, -2 = all but one, ..."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise ConfigError(f"hydra.launcher.n_jobs must be a non-zero integer, got {n_jobs!r}")
    return n_jobs if n_jobs > 0 else max(1, cpu_count + 1 + n_jobs)


def plan_placement(
    device: str,
    multirun: bool,
    gpu_count: int,
    n_jobs: int | None = None,
    cpu_count: int = 1,
    current_threads: int | None = None,
) -> Placement:
    """Decide where a job runs (pure; see the module docstring).

    device: the config's device, ``auto`` or a torch device string (used as given, but for ``cuda`` in a multirun
        with >= 2 GPUs, which leases as ``auto`` does: it names no GPU, and every job would take GPU 0).
    multirun: whether this is a job of a Hydra ``-m`` sweep.
    gpu_count: visible CUDA devices.
    n_jobs: the launcher's ``n_jobs`` (joblib) or None (basic, SLURM: one job per process/allocation).
    cpu_count: cores available to the sweep's process.
    current_threads: torch's thread count now (OMP_NUM_THREADS, which loky also sets in its
        workers); the plan never raises it, only lowers it to ``cpu_count // n_jobs``.
    """
    if not isinstance(device, str) or not device:
        raise ConfigError(f"device must be 'auto' or a torch device string, got {device!r}")
    _check_int("GPU count", gpu_count, 0)
    _check_int("CPU count", cpu_count, 1)
    if device in ("auto", "cuda") and multirun and gpu_count >= 2:
        resolved = LEASE  # "cuda" names no GPU: as auto, each job its own
    elif device == "auto":
        resolved = "cuda" if gpu_count else "cpu"
    else:
        import torch

        try:
            torch.device(device)
        except RuntimeError as err:
            raise ConfigError(f"device must be 'auto' or a torch device string, got {device!r}: {err}") from None
        resolved = device
    threads = None
    if multirun and resolved.split(":")[0] == "cpu" and n_jobs is not None:
        parallel = effective_n_jobs(n_jobs, cpu_count)
        if parallel > 1:
            threads = max(1, cpu_count // parallel)
            if current_threads is not None and current_threads >= 1:
                threads = min(threads, current_threads)
    return Placement(resolved, threads)


@contextlib.contextmanager
def lease_gpu(count: int, lock_dir: str | os.PathLike[str], job_num: int) -> Iterator[int]:
    """Hold a GPU index exclusively among the jobs that share `lock_dir`, for the ``with`` block.

    Tries GPUs ``job_num % count``, then the next ones (wrapping around), taking a non-blocking
    exclusive ``flock`` on ``lock_dir/gpu<k>.lock``; the first one free is yielded and its lock
    released on exit (explicitly: worker processes outlive jobs). If every GPU is held (more
    concurrent jobs than GPUs), or the file system cannot lock, yields ``job_num % count`` unlocked
    and logs a warning.
    """
    start = gpu_for_job(job_num, count)
    lock_dir = Path(lock_dir)
    fd: int | None = None
    gpu = start
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        for offset in range(count):
            k = (start + offset) % count
            fd = try_lock(lock_dir / f"gpu{k}.lock")
            if fd is not None:
                gpu = k
                break
    except OSError as err:  # e.g. ENOLCK on a file system without locks, read-only sweep dir
        log.warning("cannot lock GPUs under %s (%s); job %d uses GPU %d without a lease", lock_dir, err, job_num, gpu)
    else:
        if fd is None:
            log.warning(
                "all %d GPUs are leased by running jobs (more concurrent jobs than GPUs; lower "
                "hydra.launcher.n_jobs); job %d shares GPU %d",
                count, job_num, gpu,
            )
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid={os.getpid()} host={socket.gethostname()} job={job_num}\n".encode())
            log.info("job %d leased GPU %d (%s)", job_num, gpu, lock_dir / f"gpu{gpu}.lock")
    try:
        yield gpu
    finally:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def gpu_lock_dir(sweep_dir: str | os.PathLike[str]) -> Path:
    """``<sweep_dir>/.gpu_locks/<host>[-<CUDA_VISIBLE_DEVICES>]``: one lock namespace per set of GPUs.

    The host and visible-device list keep jobs on other nodes of a shared file system (SLURM), or
    with other GPUs of the same node, from contending for locks of GPUs they do not see.
    """
    key = socket.gethostname()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        key += "-" + visible
    return Path(sweep_dir) / LOCK_DIR_NAME / re.sub(r"[^A-Za-z0-9._-]+", "_", key)


@contextlib.contextmanager
def job_placement(device: str = "auto") -> Iterator[str]:
    """Place the current job; yields the torch device string to use for the ``with`` block.

    Outside a Hydra multirun, with an explicit `device` or with fewer than 2 visible GPUs: ``cuda``
    if a GPU is visible else ``cpu`` for ``auto``, `device` unchanged otherwise. In a multirun job
    with >= 2 GPUs and ``auto`` (or ``cuda``, which names no GPU): leases a GPU (`lease_gpu`, lock dir
    `gpu_lock_dir`), makes it the current CUDA device and yields ``cuda:<k>``; its cached memory is freed and
    the lease released on exit. On CPU in a joblib multirun with n_jobs > 1: at most ``cores // n_jobs`` torch
    threads for the block.
    """
    import torch

    job = current_job()
    gpu_count = visible_gpus()
    threads_before = torch.get_num_threads()
    cpu_count = available_cpus()
    plan = plan_placement(
        device,
        multirun=job.multirun,
        gpu_count=gpu_count,
        n_jobs=job.n_jobs,
        cpu_count=cpu_count,
        current_threads=threads_before,
    )
    if plan.threads is not None:
        log.info(
            "job %d: %d torch threads (%d cores, n_jobs=%s, %d threads before)",
            job.num, plan.threads, cpu_count, job.n_jobs, threads_before,
        )
        if plan.threads != threads_before:
            torch.set_num_threads(plan.threads)
    try:
        if plan.device == LEASE:
            assert job.sweep_dir is not None
            with lease_gpu(gpu_count, gpu_lock_dir(job.sweep_dir), job.num) as k:
                torch.cuda.set_device(k)
                try:
                    yield f"cuda:{k}"
                finally:
                    # the worker process outlives the job: give its cached blocks back for the next lessee
                    torch.cuda.empty_cache()
        else:
            yield plan.device
    finally:
        if plan.threads is not None and torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


_HOST_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("host_checks", default=True)


@contextlib.contextmanager
def without_host_checks() -> Iterator[None]:
    """Skip the checks that depend on this machine (its GPUs) for the block: a sweep submitted to a
    cluster from a login node is checked there, but runs elsewhere."""
    token = _HOST_CHECKS.set(False)
    try:
        yield
    finally:
        _HOST_CHECKS.reset(token)


def host_checks() -> bool:
    """Whether checks about this machine apply (see `without_host_checks`)."""
    return _HOST_CHECKS.get()


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` setting: ``auto`` is cuda if a GPU is visible, else cpu.

    One ConfigError for a name torch does not know and for a CUDA device this machine lacks.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if visible_gpus() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...): "
                          f"{str(err).splitlines()[0]}") from None
    if device.type == "cuda" and host_checks():
        count = visible_gpus()
        if count == 0:
            raise ConfigError(f"device={name} but this machine has no CUDA GPU (torch sees none); use device=cpu "
                              "or device=auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name} but only {count} GPU(s) are visible (cuda:0 ... cuda:{count - 1})")
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r}: mixrobust runs on cpu or cuda devices (or auto)")
    return device


def trainer_devices(devices: Any) -> int | None:
    """How many devices a Trainer's ``devices`` asks for: a count, a list or ``"0,1"`` of indices, or None for all
    of them (``-1``, ``"auto"``: Lightning's default)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        return int(text) if text.lstrip("-").isdigit() else None
    if isinstance(devices, int) and not isinstance(devices, bool):
        return None if devices == -1 else devices
    try:
        return len(devices)
    except TypeError:
        return None


def check_processes_launcher(processes: int, key: str = "distributed.devices") -> None:
    """Refuse several processes per job under a parallel joblib launcher (Fabric and DDP put every job's processes
    on devices 0..k-1, so jobs running at the same time would share them); `key` names the setting."""
    job = current_job()
    if processes > 1 and job.multirun and job.n_jobs is not None and effective_n_jobs(job.n_jobs, available_cpus()) > 1:
        raise ConfigError(f"{key} > 1 uses the devices 0..k-1 in every job, so jobs that run at the same time "
                          f"(joblib launchers) would share them: use the basic launcher (one job at a time) or SLURM "
                          f"with {key}, or {key}=1")


@contextlib.contextmanager
def placed_device(device: str, processes: int = 1) -> Iterator[torch.device]:
    """The device an evaluation job runs on, for the ``with`` block (`job_placement`, resolved).

    With ``processes > 1`` (Lightning Fabric spawns them on devices 0..k-1) nothing is leased, and a
    parallel joblib launcher is refused: its concurrent jobs would share those devices.
    """
    if processes > 1:
        check_processes_launcher(processes)
        yield resolve_device(device)
        return
    with job_placement(device) as name:
        yield resolve_device(name)


@contextlib.contextmanager
def placed_trainer(trainer: dict) -> Iterator[dict]:
    """The Trainer arguments of a training job, for the ``with`` block: in a local multi-GPU sweep a
    one-GPU trainer gets its leased GPU (``devices=[k]``); DDP and CPU trainers keep their settings."""
    one_gpu = trainer.get("accelerator") in ("gpu", "cuda", "auto") and str(trainer.get("devices")) == "1"
    with job_placement("auto" if one_gpu else "cpu") as device:
        if device.startswith("cuda:"):
            trainer = {**trainer, "devices": [int(device.split(":")[1])]}
        yield trainer
