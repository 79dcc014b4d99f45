"""Train one base classifier: ``run(cfg)`` is what ``python train.py`` calls.

Validates the whole configuration (data folder, model, objective, threat, resume checkpoint)
before building the Trainer, fits, tests the best checkpoint on the official test split, and writes
``metrics.json`` (atomically) in ``cfg.output_dir``.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, OmegaConf

from mixrobust.atomic import write_json
from mixrobust.checkpoint import read_checkpoint
from mixrobust.pipelines.common import build_logger, finish_wandb, instantiate, log, require_keys
from mixrobust.threat import Threat
from mixrobust.training.module import ClassifierModule

TRAINER_EXTRAS = ("channels_last", "compile")


def build(cfg: DictConfig) -> tuple[ClassifierModule, L.LightningDataModule]:
    """Instantiate and validate data, model and objective; cheap, no training."""
    require_keys(cfg, "data", "model", "objective", "threat", "optimizer", "trainer")
    threat = Threat(**OmegaConf.to_container(cfg.threat, resolve=True))
    datamodule = instantiate(cfg.data)
    objective = instantiate(cfg.objective)
    model = instantiate(cfg.model)(
        num_classes=datamodule.num_classes,
        input_shape=datamodule.input_shape,
        mean=datamodule.mean,
        std=datamodule.std,
    )
    module = ClassifierModule(
        model,
        objective,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        threat=threat,
        val_attack_steps=cfg.val_attack_steps,
        test_attack_steps=cfg.test_attack_steps,
        seed=cfg.seed,
        channels_last=bool(cfg.trainer.get("channels_last", False)),
        data_name=datamodule.name,
    )
    if cfg.trainer.get("compile", False):
        module.model.compile()
    return module, datamodule


def run(cfg: DictConfig) -> dict:
    """Train, test the best checkpoint, write metrics.json; return the metrics and the checkpoint path."""
    output_dir = Path(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule = build(cfg)
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)  # a bad resume file fails here, not after setup

    with finish_wandb():
        checkpoint = ModelCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename="best",
            monitor="val/selection",
            mode="max",
            save_last=True,
            enable_version_counter=False,  # a rerun into the same run dir replaces best.ckpt, never best-v1.ckpt
        )
        logger = build_logger(cfg, str(output_dir))
        callbacks = [checkpoint, LearningRateMonitor(logging_interval="epoch")] if logger else [checkpoint]
        trainer_cfg = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in TRAINER_EXTRAS}
        if trainer_cfg.get("enable_progress_bar", True):
            callbacks.append(RichProgressBar())
        trainer: L.Trainer = instantiate(
            trainer_cfg, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir), inference_mode=False
        )
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        best = checkpoint.best_model_path or checkpoint.last_model_path
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics = {k: float(v) for k, v in results[0].items()} if results else {}
        metrics["best_checkpoint"] = str(best)
        if trainer.is_global_zero:
            write_json(output_dir / "metrics.json", metrics)
            log.info("test metrics: %s", {k: v for k, v in metrics.items() if k.startswith("test/")})
    return metrics
