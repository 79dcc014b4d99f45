"""The experiment logger of a job (CSV, W&B or none) and the W&B run's life cycle.

`job_logger` is the one way a task gets its logger: it instantiates the ``logger`` config node
(``_target_``), gives a W&B run its sweep group, name and tags, falls back to offline logging when
an online run cannot start, and always finishes the W&B run, also when the job fails, so the jobs
of a multirun never log into one run. `log_to_files` writes what an entry point prints itself (the
results table) into the job's log file only, so the console shows it once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from mixrobust.errors import ConfigError
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


def wandb_run_settings(node: Mapping, task: str, job: HydraJob, folder: str = "") -> dict:
    """W&B group, name, job type and tags for this job, where the logger config leaves them unset.

    In a multirun every job is its own run, grouped under the sweep (its folder, e.g.
    ``multirun/paper_fig2``), named as its job folder `folder` (its number and grid values, e.g.
    ``6_alphas=0.5``; Hydra's override string where there is none); the task and the experiment are tags.
    """
    own = list(node.get("tags") or [])
    out = {"tags": own + [t for t in (task, job.experiment) if t and t not in own],
           "job_type": node.get("job_type") or task}
    if job.multirun:
        out["group"] = node.get("group") or sweep_group(job.sweep_dir)
        out["name"] = node.get("name") or folder or job.override_dirname or f"job{job.num}"
    return out


#: ``logger.init_timeout`` (W&B only, not an argument of WandbLogger): seconds an online run may take to start
#: before the job logs offline instead (W&B's own default, used when the key is null or absent, is 90 s).
INIT_TIMEOUT_KEY = "init_timeout"
#: The folders a W&B run leaves in ``<save_dir>/wandb`` (``.wandb`` where that folder exists).
_WANDB_DIRS = ("wandb", ".wandb")


def wandb_init_timeout(node: Mapping) -> float | None:
    """``logger.init_timeout`` of a W&B logger node, checked: seconds > 0, or None (W&B's default)."""
    value = node.get(INIT_TIMEOUT_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"logger.{INIT_TIMEOUT_KEY} must be a number of seconds > 0 (or null for W&B's own 90 s), "
                          f"got {value!r}")
    return float(value)


def _plain(node: Mapping) -> dict:
    """`node` as a plain dict (a DictConfig resolved), so keys can be dropped and added."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _wandb_env_mode() -> str | None:
    """``WANDB_MODE`` when it makes every run offline (it wins over ``logger.offline=false``), else None.
    Lightning's WandbLogger sets it to ``dryrun`` for an offline run, for the rest of the process."""
    mode = os.environ.get("WANDB_MODE", "")
    return mode if mode in ("offline", "dryrun", "disabled") else None


def _run_folders(save_dir: Path) -> set[Path]:
    """The online runs' folders (``run-<time>-<id>``) W&B has left under `save_dir`."""
    return {p for d in _WANDB_DIRS if (save_dir / d).is_dir() for p in (save_dir / d).glob("run-*") if p.is_dir()}


def _without_anonymous(logger: Any) -> Any:
    """Lightning's WandbLogger always passes ``anonymous`` to ``wandb.init`` (None unless asked for), and W&B
    warns that this deprecated setting has no effect whenever it is passed at all; leave it out when unset."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    return logger


def _start_online(node: dict, save_dir: Path, extra: dict, timeout: float | None):
    """Build and start the online W&B run, within `timeout` seconds (None: W&B's default); a run that cannot
    start raises, its folder removed (W&B creates ``run-<time>-<id>`` before it contacts the server)."""
    node, given = dict(node), node.get("settings") or {}
    if timeout is not None and isinstance(given, Mapping):
        node["settings"] = {**given, "init_timeout": timeout}
    log.info("starting W&B online run (timeout %s)", f"{timeout:g} s" if timeout is not None else "W&B's default, 90 s")
    before = _run_folders(save_dir)
    try:
        logger = _without_anonymous(instantiate(node, save_dir=str(save_dir), **extra))
        logger.experiment  # starts the run now, not in the middle of the work
        return logger
    except Exception:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)  # (wandb 0.31 has no `quiet` argument any more)
        wandb.teardown()  # forget the failed online session's settings
        for folder in sorted(_run_folders(save_dir) - before):  # only what this attempt created
            try:
                shutil.rmtree(folder)
            except OSError as err:
                log.warning("could not remove the failed W&B run's folder %s: %s", folder, err)
        raise


def build_logger(node: Mapping | None, output_dir: str | os.PathLike, task: str, **overrides: Any):
    """Instantiate a ``logger`` config node (None or ``false``: no logger, returns False).

    W&B defaults to offline mode; a W&B logger gets its sweep group, run name and tags
    (`wandb_run_settings`, `overrides` win) and the job's overrides in its config. An online W&B
    run gets ``logger.init_timeout`` seconds to start; if it cannot (no network, no login), the job
    warns and logs offline instead, with the failed run's folder removed, so a sweep never fails
    for lack of network and the job's ``wandb/`` holds one run.
    """
    if not node:
        return False
    if not is_wandb(node):
        return instantiate(node, save_dir=str(output_dir))
    job = current_job()
    extra = {**wandb_run_settings(node, task, job, Path(output_dir).name), **overrides}
    node, save_dir = _plain(node), Path(output_dir)
    # plain dicts and lists for wandb.init: it ignores a `settings` that is not a dict or wandb.Settings (a DictConfig)
    node.setdefault("_convert_", "all")
    timeout = wandb_init_timeout(node)  # checked before any attempt: a bad value is an error, not "no network"
    node.pop(INIT_TIMEOUT_KEY, None)  # ours, not WandbLogger's
    offline = node.get("offline", True)
    if not offline and (mode := _wandb_env_mode()):
        log.info("logger.offline=false, but WANDB_MODE=%s keeps W&B from going online", mode)
        offline = True
    if offline:
        logger = _without_anonymous(instantiate(node, save_dir=str(output_dir), **extra))
    else:
        started = time.perf_counter()
        try:
            logger = _start_online(node, save_dir, extra, timeout)
        except Exception as exc:  # wandb raises several types (CommError, UsageError, timeouts)
            log.warning("W&B online run could not start in %.0f s (%s: %s); logging offline instead (sync later with "
                        "`wandb sync %s/wandb/offline-run-*`)", time.perf_counter() - started, type(exc).__name__,
                        exc, output_dir)
            logger = _without_anonymous(instantiate(node, save_dir=str(output_dir), **{**extra, "offline": True}))
    logger.log_hyperparams({"job_overrides": job.overrides})
    return logger


def log_to_files(logger: logging.Logger, level: int, msg: str, *args: Any) -> None:
    """Log a record to the log files only (every `logging.FileHandler` its records reach; under Hydra, the
    job's ``<job>.log``), not to the console. For what the entry point prints itself, such as the results table,
    so the console shows it once and the log file still holds it. Without a file handler it does nothing."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, "(log_to_files)", 0, msg, args, None)
    if not logger.filter(record):
        return
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        current = current.parent if current.propagate else None


@contextlib.contextmanager
def finish_wandb() -> Iterator[None]:
    """Always close the W&B run, also when the job fails (marked failed: exit code 1), so multirun jobs never
    log into one run and a stopped job never shows as finished. ``WANDB_MODE`` is restored on exit: Lightning sets
    it to ``dryrun`` for an offline run, which would keep every later job of this process (a sweep's worker)
    offline, online ones included."""
    failed, mode = True, os.environ.get("WANDB_MODE")
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
        if mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = mode


@contextlib.contextmanager
def job_logger(node: Mapping | None, output_dir: str | os.PathLike, task: str, **overrides: Any) -> Iterator[Any]:
    """`build_logger` for the ``with`` block, the W&B run finished on exit (`finish_wandb`)."""
    with finish_wandb():
        yield build_logger(node, output_dir, task, **overrides)
