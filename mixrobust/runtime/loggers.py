"""The experiment logger of a job (CSV, W&B or none) and the W&B run's life cycle.

`job_logger` is the one way a task gets its logger: it instantiates the ``logger`` config node
(``_target_``), gives a W&B run its sweep group, name and tags, falls back to offline logging when
an online run cannot start, and always finishes the W&B run, also when the job fails, so the jobs
of a multirun never log into one run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from mixrobust.runtime.hydra_job import HydraJob, current_job

log = logging.getLogger(__name__)


def is_wandb(node: Mapping | None) -> bool:
    """Whether a ``logger`` config node is a W&B logger."""
    return bool(node) and str(node.get("_target_", "")).endswith("WandbLogger")


def is_wandb_logger(logger: Any) -> bool:
    """Whether a built logger is Lightning's W&B logger."""
    return type(logger).__name__ == "WandbLogger"


def sweep_group(sweep_dir: str | os.PathLike) -> str:
    """The W&B group of a sweep's jobs when ``logger.group`` is unset: the sweep folder as Hydra names it
    (``hydra.sweep.dir``, e.g. ``multirun/evaluate/<date>``), i.e. relative to the working directory
    when it lies below it, else absolute."""
    path = Path(os.path.abspath(sweep_dir))
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def wandb_run_settings(node: Mapping, task: str, job: HydraJob) -> dict:
    """W&B group, name, job type and tags for this job, where the logger config leaves them unset.

    In a multirun every job is its own run, grouped under the sweep (its folder, e.g.
    ``multirun/paper_fig2``), named after its overrides; the task and the experiment are tags.
    """
    own = list(node.get("tags") or [])
    out = {"tags": own + [t for t in (task, job.experiment) if t and t not in own],
           "job_type": node.get("job_type") or task}
    if job.multirun:
        out["group"] = node.get("group") or sweep_group(job.sweep_dir)
        out["name"] = node.get("name") or job.override_dirname or f"job{job.num}"
    return out


def build_logger(node: Mapping | None, output_dir: str | os.PathLike, task: str, **overrides: Any):
    """Instantiate a ``logger`` config node (None or ``false``: no logger, returns False).

    W&B defaults to offline mode; a W&B logger gets its sweep group, run name and tags
    (`wandb_run_settings`, `overrides` win) and the job's overrides in its config. If an online W&B
    run cannot start (no network, no login), the job warns and logs offline instead, so a sweep
    never fails for lack of network.
    """
    if not node:
        return False
    if not is_wandb(node):
        return instantiate(node, save_dir=str(output_dir))
    job = current_job()
    extra = {**wandb_run_settings(node, task, job), **overrides}
    logger = instantiate(node, save_dir=str(output_dir), **extra)
    try:
        logger.experiment  # starts the run now, not in the middle of the work
    except Exception as exc:  # wandb raises several types (CommError, UsageError, timeouts)
        if node.get("offline", True):
            raise
        import wandb

        log.warning("W&B online run could not start (%s: %s); logging offline instead (sync later with `wandb "
                    "sync %s/wandb/offline-run-*`)", type(exc).__name__, exc, output_dir)
        if wandb.run is not None:
            wandb.finish(exit_code=1, quiet=True)
        wandb.teardown()  # forget the failed online session's settings
        logger = instantiate(node, save_dir=str(output_dir), **{**extra, "offline": True})
    logger.log_hyperparams({"job_overrides": job.overrides})
    return logger


@contextlib.contextmanager
def finish_wandb() -> Iterator[None]:
    """Always close the W&B run, also when the job fails (marked failed: exit code 1), so multirun jobs never
    log into one run and a stopped job never shows as finished."""
    failed = True
    try:
        yield
        failed = False
    finally:
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            return
        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


@contextlib.contextmanager
def job_logger(node: Mapping | None, output_dir: str | os.PathLike, task: str, **overrides: Any) -> Iterator[Any]:
    """`build_logger` for the ``with`` block, the W&B run finished on exit (`finish_wandb`)."""
    with finish_wandb():
        yield build_logger(node, output_dir, task, **overrides)
