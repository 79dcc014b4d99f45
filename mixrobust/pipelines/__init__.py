"""The tasks behind the entry points, each a module with ``settings(cfg)`` and ``run(cfg)``.

``train`` (train.py), and ``mix``, ``certify``, ``report``, ``study``, ``fit_map`` (evaluate.py, chosen by ``task=``).
Each task's `settings` reads the configuration into typed, frozen settings and checks everything
the user typed before any work starts; `run` does the work. `check` is what the checked sweeper
(``hydra/sweeper: checked``) calls on every job of a multirun grid before the first job starts.
Everything here is importable and testable without Hydra's entry point.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from omegaconf import DictConfig, OmegaConf

from mixrobust.errors import DataNotFoundError, MixrobustError
from mixrobust.runtime import progress
from mixrobust.runtime.files import RANK_VARIABLES, hold_folder
from mixrobust.runtime.quiet import lightning_logs_once
from mixrobust.runtime.hydra_job import current_job
from mixrobust.runtime.placement import available_cpus, effective_n_jobs, without_host_checks
from mixrobust.pipelines.fields import bounded, convert, parse, value_at

EvaluateTask = Literal["mix", "certify", "report", "study", "fit_map"]
"""The tasks of evaluate.py (``task=``); train.py's config has no ``task`` key: its task is ``train``."""
TASKS: tuple[str, ...] = ("train", *get_args(EvaluateTask))


def task_of(cfg: DictConfig) -> str:
    """The task a config asks for: ``task`` (evaluate.py), or ``train`` for train.py's config."""
    return convert(value_at(cfg, "task", ""), EvaluateTask, "task") if "task" in cfg else "train"


def module(task: str):
    """The task's module (imported on first use, so an entry point loads only what its task needs)."""
    return importlib.import_module(f"mixrobust.pipelines.{task}")


@dataclass(frozen=True)
class ProgressKeys:
    """``progress``: how long stages report (`mixrobust.runtime.progress`): a live bar on a terminal, a log
    line every `interval` seconds elsewhere."""

    mode: progress.ProgressMode = "auto"
    interval: float = bounded(progress.DEFAULT_INTERVAL, gt=0)


def progress_settings(cfg: DictConfig) -> ProgressKeys:
    """The ``progress`` node of either entry point's config (defaults where the node is absent)."""
    return parse(ProgressKeys, cfg.get("progress") or {}, "progress")


#: Launchers whose jobs run on this machine; under any other (SLURM) a job runs elsewhere.
LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher")


def check(cfg: DictConfig) -> None:
    """Build the settings of `cfg`'s task, which checks them; nothing runs (the checked sweeper's hook).

    Warnings are left to the job itself: a grid of 96 jobs would repeat each one 96 times here. For a
    job launched elsewhere (SLURM), what depends on this machine (its GPUs, a data folder only the
    compute nodes see) is left to the job.
    """
    launcher = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    remote = bool(launcher) and launcher.rpartition(".")[2] not in LOCAL_LAUNCHERS
    log = logging.getLogger("mixrobust")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with without_host_checks() if remote else contextlib.nullcontext():
            progress_settings(cfg)
            module(task_of(cfg)).settings(cfg)
    except DataNotFoundError:
        if not remote:
            raise
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def errors(cfg: DictConfig) -> Iterator[None]:
    """Let a `MixrobustError` through as it is (the entry point prints its message alone and exits 1),
    or, with ``debug=true``, as an error Hydra prints with its traceback."""
    debug = convert(value_at(cfg, "debug", ""), bool, "debug") if "debug" in cfg else False
    try:
        yield
    except MixrobustError as exc:
        if debug:
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
        raise


def parallel_job() -> bool:
    """Whether this job runs beside others of its sweep (a joblib launcher with n_jobs > 1): their live bars
    would overwrite each other on one terminal, so ``progress.mode=auto`` writes log lines."""
    job = current_job()
    return job.multirun and job.n_jobs is not None and effective_n_jobs(job.n_jobs, available_cpus()) > 1


def is_rank_zero() -> bool:
    """Whether this process is the global-zero one (under DDP only it prints the result)."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


@contextlib.contextmanager
def own_folder(cfg: DictConfig) -> Iterator[None]:
    """Hold the task's ``output_dir`` while it runs (`hold_folder`): a second run started into the same folder (two
    launches within the same second, a job array) stops before the task starts. Processes numbered above 0 by
    `RANK_VARIABLES` (DDP's later ranks) share their first process's folder and take no lock."""
    out = OmegaConf.select(cfg, "output_dir", default=None, throw_on_resolution_failure=False)
    if not out or any(os.environ.get(k, "0").strip() not in ("", "0") for k in RANK_VARIABLES):
        yield
        return
    with hold_folder(Path(str(out)), "hydra.run.dir=<folder> (with -m: hydra.sweep.dir=<folder>)"):
        yield


def run(cfg: DictConfig):
    """Run `cfg`'s task (see `TASKS`) and return its result, holding its folder (`own_folder`); user errors as
    described in `errors`."""
    with errors(cfg):
        shown = progress_settings(cfg)
        progress.configure("log" if shown.mode == "auto" and parallel_job() else shown.mode, shown.interval)
        task = module(task_of(cfg))
        lightning_logs_once()
        with own_folder(cfg):
            return task.run(cfg)
