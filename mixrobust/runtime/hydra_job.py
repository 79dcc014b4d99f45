"""The Hydra job this process runs, read once from Hydra's runtime (a plain single run outside Hydra)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class HydraJob:
    """What the job machinery needs to know about the running Hydra job.

    multirun: a job of a ``-m`` sweep; num: its number in the sweep; n_jobs: the joblib launcher's
    n_jobs (None for the basic and SLURM launchers); sweep_dir: ``hydra.sweep.dir`` made absolute
    (relative to where the sweep started); overrides: the job's task overrides; override_dirname:
    Hydra's name for them; experiment: the ``experiment=`` choice; config_name: the primary config.
    """

    multirun: bool = False
    num: int = 0
    n_jobs: int | None = None
    sweep_dir: Path | None = None
    overrides: list[str] = field(default_factory=list)
    override_dirname: str = ""
    experiment: str | None = None
    config_name: str | None = None


def current_job() -> HydraJob:
    """The running Hydra job (`HydraJob()` outside Hydra or outside a multirun, with the overrides kept)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return HydraJob()
    hc = HydraConfig.get()
    overrides = [str(o) for o in hc.overrides.task]
    common = dict(overrides=overrides, override_dirname=str(hc.job.override_dirname or ""),
                  experiment=hc.runtime.choices.get("experiment"), config_name=hc.job.config_name)
    if hc.get("mode") != RunMode.MULTIRUN:
        return HydraJob(**common)
    try:
        num = int(hc.job.num)
    except Exception:  # missing in an odd launcher
        num = 0
    try:
        n_jobs = hc.launcher.get("n_jobs")
    except Exception:  # an interpolation that cannot resolve here
        n_jobs = None
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int):
        n_jobs = None
    sweep_dir = Path(str(hc.sweep.dir))
    if not sweep_dir.is_absolute():  # relative to where the sweep was started (hydra.job.chdir may move cwd)
        sweep_dir = Path(str(hc.runtime.cwd)) / sweep_dir
    return HydraJob(multirun=True, num=num, n_jobs=n_jobs, sweep_dir=sweep_dir, **common)
