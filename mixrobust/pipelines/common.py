"""Pieces shared by the pipelines: config checks, loggers, W&B life cycle."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mixrobust.errors import ConfigError

log = logging.getLogger("mixrobust")


def require_keys(cfg: DictConfig, *keys: str) -> None:
    """Raise a ConfigError naming every required key that is missing or ``???``."""
    missing = [k for k in keys if OmegaConf.select(cfg, k, default=None) is None]
    if missing:
        raise ConfigError(f"missing config value(s): {', '.join(missing)}; set them on the command line, e.g. {missing[0]}=...")


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
