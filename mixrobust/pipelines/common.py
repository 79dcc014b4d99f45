"""Pieces shared by the pipelines: config checks, loggers, W&B life cycle."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

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


def build_logger(cfg: DictConfig, output_dir: str):
    """Instantiate ``cfg.logger`` (None or ``false`` disables logging). W&B defaults to offline mode."""
    node = cfg.get("logger")
    if not node:
        return False
    return instantiate(node, save_dir=output_dir)


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
