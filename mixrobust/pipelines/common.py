"""Pieces shared by the pipelines: config checks, loggers, W&B life cycle, caches and resuming."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from mixrobust.atomic import write_json
from mixrobust.errors import ConfigError, MixrobustError

log = logging.getLogger("mixrobust")


def require_keys(cfg: DictConfig, *keys: str) -> None:
    """Raise a ConfigError naming every required key that is missing or ``???``."""
    missing = [k for k in keys if OmegaConf.select(cfg, k, default=None) is None]
    if missing:
        raise ConfigError(f"missing config value(s): {', '.join(missing)}; set them on the command line, e.g. {missing[0]}=...")


def instantiate(node, *args, **kwargs):
    """`hydra.utils.instantiate`, re-raising our own user-facing errors without Hydra's wrapper."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, MixrobustError):
            raise cause from None
        raise


def hydra_job() -> dict | None:
    """The Hydra job this code runs in: mode, sweep dir, job number, overrides, preset (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    from mixrobust.launch import hydra_placement_job  # one reading of the run mode for placement and logging

    hc = HydraConfig.get()
    return {"multirun": hydra_placement_job().multirun, "sweep_dir": str(hc.sweep.dir),
            "num": hc.job.get("num"), "overrides": list(hc.overrides.task),
            "override_dirname": hc.job.override_dirname, "experiment": hc.runtime.choices.get("experiment")}


def is_wandb(cfg: DictConfig) -> bool:
    """Whether ``cfg.logger`` is a W&B logger."""
    node = cfg.get("logger")
    return bool(node) and str(node.get("_target_", "")).endswith("WandbLogger")


def sweep_group(sweep_dir: str | os.PathLike) -> str:
    """The W&B group the sweep's jobs used when ``logger.group`` was unset: the sweep folder as
    Hydra names it (``hydra.sweep.dir``, e.g. ``multirun/evaluate/<date>``), i.e. relative to the
    working directory when it lies below it, else absolute."""
    path = Path(os.path.abspath(sweep_dir))
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def wandb_run_settings(cfg: DictConfig, node, job: dict | None) -> dict:
    """W&B group, name, job type and tags for this job, where the logger config leaves them unset.

    In a multirun every job is its own run, grouped under the sweep (its folder, e.g.
    ``multirun/paper_fig2``), named after its overrides; the task and the experiment are tags.
    """
    task = str(cfg.get("task", "train"))
    tags = [t for t in (task, job and job["experiment"]) if t]
    out = {"tags": list(node.get("tags") or []) + [t for t in tags if t not in (node.get("tags") or [])],
           "job_type": node.get("job_type") or task}
    if job and job["multirun"]:
        out["group"] = node.get("group") or sweep_group(job["sweep_dir"])
        out["name"] = node.get("name") or job["override_dirname"] or f"job{job['num']}"
    return out


def build_logger(cfg: DictConfig, output_dir: str):
    """Instantiate ``cfg.logger`` (None or ``false`` disables logging). W&B defaults to offline mode.

    A W&B logger gets its sweep group, run name and tags (`wandb_run_settings`) and the job's
    overrides in its config. If an online W&B run cannot start (no network, no login), the job
    warns and logs offline instead, so a sweep never fails or hangs for lack of network.
    """
    node = cfg.get("logger")
    if not node:
        return False
    if not is_wandb(cfg):
        return instantiate(node, save_dir=output_dir)
    job = hydra_job()
    extra = wandb_run_settings(cfg, node, job)
    logger = instantiate(node, save_dir=output_dir, **extra)
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
        logger = instantiate(node, save_dir=output_dir, **{**extra, "offline": True})
    logger.log_hyperparams({"job_overrides": job["overrides"] if job else []})
    return logger


# --- caches and resuming -------------------------------------------------------------------------

def build_cache(cfg: DictConfig):
    """The shared on-disk cache of ``cfg.cache`` (`mixrobust.evaluation.cache.DiskCache`), None when disabled."""
    from mixrobust.evaluation.cache import DiskCache

    node = cfg.get("cache")
    if not node or not node.get("enabled", True):
        return None
    return DiskCache(node.dir)


#: Keys that do not change any number a run reports (device: only in float rounding, and a local
#: multi-GPU sweep hands a resumed job another GPU): they are left out of its fingerprint.
VOLATILE_KEYS = ("output_dir", "resume", "logger", "plots", "cache", "distributed", "preflight", "device", "hydra")


def run_fingerprint(cfg: DictConfig, *checkpoints: str) -> str:
    """sha256 of the resolved config (without `VOLATILE_KEYS`), the checkpoints' contents and the code."""
    from mixrobust.evaluation.cache import code_digest, file_digest

    container = OmegaConf.to_container(cfg, resolve=False)
    for key in VOLATILE_KEYS:
        container.pop(key, None)
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    blob = json.dumps({"config": resolved, "checkpoints": [file_digest(c) for c in checkpoints],
                       "code": code_digest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def job_overrides() -> list[str]:
    """The running Hydra job's task overrides ([] outside Hydra): recorded in the results marker, so a
    sweep report can tell a job's own results from those of an earlier launch into the same folder."""
    job = hydra_job()
    return job["overrides"] if job else []


def finished_run(output_dir: str | Path, fingerprint: str, files: Sequence[str], marker: str = "run.json") -> bool:
    """Whether `output_dir` holds a finished run with this fingerprint and every one of `files`.

    The marker file is written last and atomically, so a run killed at any point has none (or an
    old one); a finished run of a different configuration is recomputed with a warning. A
    finished run found here is adopted by this launch: the marker records this job's overrides.
    """
    path = Path(output_dir) / marker
    if not path.is_file():
        return False
    try:
        content = json.loads(path.read_text())
        recorded = content.get("fingerprint")
    except (OSError, ValueError, AttributeError):
        content, recorded = {}, None
    if recorded != fingerprint:
        log.warning("%s holds a run of a different configuration (or checkpoints); recomputing it", output_dir)
        return False
    missing = [f for f in files if not (Path(output_dir) / f).is_file()]
    if missing:
        log.warning("%s lacks %s; recomputing it", output_dir, ", ".join(missing))
        return False
    log.info("%s already holds this run's results: skipped (resume=false recomputes)", output_dir)
    if content.get("overrides") != job_overrides():
        write_json(path, {**content, "overrides": job_overrides()})
    return True


@contextlib.contextmanager
def finish_wandb() -> Iterator[None]:
    """Always close the W&B run, also when the job fails, so multirun jobs never log into one run."""
    try:
        yield
    finally:
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            return
        if wandb.run is not None:
            wandb.finish()
