"""The CPU thread policy of the entry points, applied before torch starts its thread pool.

On a machine whose cores are shared (a laptop, a shared server, a CI runner, the jobs of a local
sweep), torch's OpenMP threads spin while they wait for work, and two spinning processes slow each
other down up to ten-fold. `apply_thread_policy`, called by ``train.py`` and ``evaluate.py`` before
anything imports torch, sets in the process environment, unless the user set them:

- ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning (on a dedicated
  machine ``ACTIVE`` is at most a few percent faster);
- ``OMP_NUM_THREADS``, only where the process may use fewer cores than the machine has (`usable_cores`:
  its CPU affinity mask, and the CPU quota of its cgroup, e.g. a container's ``--cpus``): torch would
  otherwise start a thread per core of the whole machine. Elsewhere torch's own default (one thread
  per physical core) and joblib's per-worker split stay as they are.

Child processes inherit the environment: Lightning's and Fabric's spawned workers, joblib's
workers (the ``local_cpus`` launcher then gives each job its share of the cores, see
`mixrobust.runtime.placement`) and data-loader workers follow the same policy. Set either variable
yourself to override it, e.g. ``OMP_NUM_THREADS=1`` to run several jobs side by side.

This module imports nothing heavy: it must run before torch is imported to have any effect.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

#: cgroup v2 (``cpu.max``: "<quota> <period>" or "max <period>") and v1 (``cpu.cfs_quota_us`` and
#: ``cpu.cfs_period_us``; quota -1: no cap) CPU limits, below these mount points.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _quota(folder: Path) -> float | None:
    """The CPUs a cgroup folder's own limit allows (fractional), or None without one."""
    try:
        v2 = folder / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100_000)
        v1 = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
        if v1[0].is_file() and v1[1].is_file():
            quota, period = int(v1[0].read_text()), int(v1[1].read_text())
            return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def _cgroup_folders(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> list[Path]:
    """This process's cgroup folders with CPU limits, innermost first, up to the mount point: the v2 path
    (``0::/a/b``) below `root`, the v1 ``cpu`` controller's below ``root/cpu``; just the mount points when
    /proc does not say."""
    candidates = []
    try:
        for line in proc.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                candidates.append((root, path))
            elif "cpu" in controllers.split(","):
                candidates.append((root / "cpu", path))
    except (OSError, ValueError):
        pass
    folders = []
    for base, path in candidates or [(root, "/"), (root / "cpu", "/")]:
        folder = base / path.strip("/")
        while True:
            folders.append(folder)
            if folder == base:
                break
            folder = folder.parent
    return folders


def _cgroup_cpus(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int | None:
    """Whole CPUs the tightest cgroup quota on this process's path allows (rounded up), or None without one."""
    quotas = [q for q in map(_quota, _cgroup_folders(root, proc)) if q is not None]
    return max(1, math.ceil(min(quotas))) if quotas else None


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
    """Set ``OMP_WAIT_POLICY`` and, where the process may use fewer cores than the machine has,
    ``OMP_NUM_THREADS`` in `environ` (default ``os.environ``) where unset (module docstring); returns what
    it set. OpenMP reads the wait policy when torch is loaded, so call it first thing in an entry point;
    if torch is imported already, only its thread count can still change (``torch.set_num_threads``)."""
    environ = os.environ if environ is None else environ
    wanted = {"OMP_WAIT_POLICY": "PASSIVE"}
    if (cores := usable_cores()) < (os.cpu_count() or cores):  # limited: torch would count the whole machine
        wanted["OMP_NUM_THREADS"] = str(cores)
    applied = {k: v for k, v in wanted.items() if not environ.get(k)}
    environ.update(applied)
    if applied and environ is os.environ and "torch" in sys.modules:
        import torch

        if "OMP_NUM_THREADS" in applied:
            torch.set_num_threads(int(applied["OMP_NUM_THREADS"]))
    return applied
