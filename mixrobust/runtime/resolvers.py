"""OmegaConf resolvers used by the configs (``mr.*``; `register_resolvers`, called on import of `mixrobust`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from mixrobust.runtime.job_names import job_dir_name

log = logging.getLogger(__name__)

def gpu_count() -> int:
    """Number of visible CUDA devices (`mixrobust.runtime.placement.visible_gpus`), at least 1 (``${mr.gpu_count:}``,
    e.g. joblib's n_jobs)."""
    from mixrobust.runtime.placement import visible_gpus

    return max(1, visible_gpus())


def pgd_step(eps, steps) -> float:
    """PGD step size 2.5 * eps / steps (Madry et al.): the attack can cross the ball and back."""
    return 2.5 * float(eps) / int(steps)


def _launch_context(num: int, overrides: Sequence[str]) -> tuple[set[str] | None, tuple[str, ...]]:
    """The grid axes of the launch job `num` belongs to (None if unknown: not a basic or checked
    sweeper's launch, or its ``multirun.yaml`` lists other jobs) and the keys of
    ``hydra.job.config.override_dirname.exclude_keys``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, ()
    hc = HydraConfig.get()
    exclude = tuple(str(k) for k in OmegaConf.select(hc, "job.config.override_dirname.exclude_keys", default=None)
                    or ())
    try:
        from mixrobust.runtime.jobs import latest_grid

        sweep_dir = Path(str(hc.sweep.dir))
        if not sweep_dir.is_absolute():  # relative to where the sweep started
            sweep_dir = Path(str(OmegaConf.select(hc, "runtime.cwd", default=None) or os.getcwd())) / sweep_dir
        grid = latest_grid(sweep_dir)
    except Exception as exc:  # noqa: BLE001 - an unreadable launch only makes the name longer
        log.debug("job %d: the launch's grid is unknown (%s); its folder is named after all its overrides", num, exc)
        grid = None
    if grid is None or not (num < len(grid[1]) and grid[1][num] == frozenset(overrides)):
        return None, exclude
    return grid[0], exclude


def job_dir(num, overrides) -> str:
    """``${mr.job_dir:${hydra:job.num},${hydra:overrides.task}}``: the folder name of a multirun job
    (`job_dir_name`), naming the overrides on the axes of its launch's grid (read from the sweep
    folder's ``multirun.yaml``: the sweeper's params and the command line's sweeps), all but
    ``experiment=`` when the grid is unknown, never ``hydra.job.config.override_dirname.exclude_keys``."""
    overrides = [str(o) for o in (overrides or [])]
    named, exclude = (None, ()) if num is None else _launch_context(int(num), overrides)
    return job_dir_name(num, overrides, named, exclude)


def register_resolvers() -> None:
    """Register the ``mr.*`` resolvers (idempotent).

    ``${mr.mul_int:a,b}`` = int(a * b), e.g. LR milestones as fractions of max_epochs;
    ``${mr.gpu_count:}`` = max(1, number of visible CUDA devices), e.g. one local job per GPU;
    ``${mr.pgd_step:eps,steps}`` = 2.5 * eps / steps, PGD's step size in eps sweeps;
    ``${mr.job_dir:${hydra:job.num},${hydra:overrides.task}}`` = a multirun job's folder name, its number
    and its grid values (`job_dir`), e.g. ``3_alphas=0.6,r_options=one``.
    """
    if not OmegaConf.has_resolver("mr.mul_int"):
        OmegaConf.register_new_resolver("mr.mul_int", lambda a, b: int(float(a) * float(b)))
    if not OmegaConf.has_resolver("mr.pgd_step"):
        OmegaConf.register_new_resolver("mr.pgd_step", pgd_step)
    if not OmegaConf.has_resolver("mr.gpu_count"):
        OmegaConf.register_new_resolver("mr.gpu_count", gpu_count)
    if not OmegaConf.has_resolver("mr.job_dir"):
        OmegaConf.register_new_resolver("mr.job_dir", job_dir)
