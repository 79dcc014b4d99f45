"""The CPU thread policy of the entry points, applied before torch starts its thread pool.

On a machine whose cores are shared (a laptop, a shared server, a CI runner, the jobs of a local
sweep), torch's OpenMP threads spin while they wait for work, and two spinning processes slow each
other down up to ten-fold. `apply_thread_policy`, called by ``train.py`` and ``evaluate.py`` before
anything imports torch, sets two variables of the process environment unless the user set them:

- ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning (on a dedicated
  machine ``ACTIVE`` is at most a few percent faster);
- ``OMP_NUM_THREADS``: the cores this process may use (`usable_cores`: the CPU affinity mask and a
  container's cgroup CPU quota), not the machine's core count, which a container may not own.

Child processes inherit the environment, so Lightning's and Fabric's spawned workers, joblib's
workers (the ``local_cpus`` launcher then lowers each job's torch threads to its share of the
cores, see `mixrobust.runtime.placement`) and data-loader workers follow the same policy. Set
either variable yourself to override it, e.g. ``OMP_NUM_THREADS=1`` to run several jobs side by side.

This module imports nothing heavy: it must run before torch is imported to have any effect.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

#: The cgroup files that cap this process's CPU time: v2 ``cpu.max`` ("<quota> <period>" or
#: "max <period>"), v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: no cap).
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def _cgroup_cpus(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int | None:
    """Whole CPUs the cgroup quota allows (rounded up), or None when there is no quota or no cgroup."""
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period or 100_000)))
        if v1[0].is_file() and v1[1].is_file():
            quota, period = int(v1[0].read_text()), int(v1[1].read_text())
            return None if quota <= 0 or period <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None
    return None


def usable_cores() -> int:
    """CPU cores this process may use: the affinity mask (all cores where the OS has none) capped by the
    cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, quota) if quota else cores)


def apply_thread_policy(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` in `environ` (default ``os.environ``) where unset
    (module docstring); returns what it set. Has no effect on the threads of a torch imported already,
    so call it first thing in an entry point."""
    environ = os.environ if environ is None else environ
    wanted = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(usable_cores())}
    applied = {k: v for k, v in wanted.items() if not environ.get(k)}
    environ.update(applied)
    if applied and environ is os.environ and "torch" in sys.modules:
        import torch

        if "OMP_NUM_THREADS" in applied:
            torch.set_num_threads(int(applied["OMP_NUM_THREADS"]))
    return applied
