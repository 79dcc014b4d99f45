"""The train task (``python train.py``): train one base classifier and test its best checkpoint.

`settings` checks the whole configuration before any data is loaded or the Trainer starts: the
data folder, the model (built, its weights initialized from ``seed``), the objective, the
optimizer and scheduler (built once on the model), the threat, the Trainer's epochs, precision
and accelerator, and a resume checkpoint (``ckpt_path``) against this run's data, objective,
threat, model and optimizer. `run` then loads and checks every data split, fits, tests the best
checkpoint on the official test split and writes ``metrics.json`` (atomically). It returns the
best checkpoint's path, which train.py prints last; a run without one fails instead. A run
stopped by SIGTERM (a scheduler's preemption, ``kill``) fails with a message naming
``last.ckpt``, written at the end of every epoch, to resume from.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import lightning.pytorch as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from mixrobust import zoo
from mixrobust.checkpoint import check_resume, optimizer_spec
from mixrobust.data.imagefolder import imagenet_normalization
from mixrobust.errors import ConfigError, MixrobustError, StoppedError
from mixrobust.pipelines import inputs
from mixrobust.pipelines.fields import bounded, build, check_arguments, parse, plain
from mixrobust.runtime.files import write_json
from mixrobust.runtime.loggers import job_logger
from mixrobust.runtime.placement import (check_processes_launcher, host_checks, placed_trainer, trainer_devices,
                                         visible_gpus)
from mixrobust.runtime.progress import current_mode
from mixrobust.threat import Threat
from mixrobust.training.checkpoint_io import SafeCheckpointIO
from mixrobust.training.module import ClassifierModule
from mixrobust.training.progress import LogProgress

log = logging.getLogger(__name__)

PRECISIONS = tuple(get_args(_PRECISION_INPUT_STR)) + tuple(get_args(_PRECISION_INPUT_STR_ALIAS))


@dataclass(frozen=True)
class TrainKeys:
    """The task's top-level settings."""

    seed: int = bounded(0, ge=0)
    output_dir: Path = Path(".")
    ckpt_path: Path | None = None
    init_from: str | None = None
    val_attack_steps: int = bounded(10, ge=1)
    test_attack_steps: int = bounded(20, ge=1)
    optimized_metric: str = "val/selection"


@dataclass(frozen=True)
class TrainerKeys:
    """The ``trainer.*`` settings checked here; the others go to Lightning's Trainer as they are."""

    max_epochs: int = bounded(1, ge=1)
    precision: str | int = "32-true"
    accelerator: str = "cpu"
    channels_last: bool = False
    compile: bool = False
    enable_progress_bar: bool = True

    def __post_init__(self):
        if str(self.precision) not in PRECISIONS:
            raise ConfigError(f"unknown trainer.precision {self.precision!r}; valid values: {', '.join(PRECISIONS)}")
        if self.accelerator in ("gpu", "cuda") and host_checks() and visible_gpus() == 0:
            raise ConfigError(f"trainer.accelerator={self.accelerator} but this machine has no CUDA GPU; "
                              "use trainer=cpu (or trainer.accelerator=cpu)")


#: mixrobust's extras in the trainer node: not Trainer arguments.
TRAINER_EXTRAS = ("channels_last", "compile")


@dataclass(frozen=True)
class TrainSettings:
    keys: TrainKeys
    trainer: TrainerKeys
    trainer_args: dict
    data: Any  # the data module, not loaded yet
    threat: Threat
    model: torch.nn.Module
    objective: Any
    optimizer: Any  # a factory: params -> torch.optim.Optimizer
    scheduler: Any  # a factory: optimizer -> LR scheduler, or None
    logger: Any
    config: dict


def _model(cfg: DictConfig, data, seed: int):
    """The model, built by its factory with its weights initialized from `seed` (the global RNG untouched), behind
    the data set's normalization, or ImageNet's when it starts from ImageNet weights (``model.pretrained``)."""
    factory = build(cfg.model, "model")
    mean, std = data.mean, data.std
    if cfg.model.get("pretrained") not in (None, False):
        mean, std = imagenet_normalization(len(data.mean))
        log.info("model.pretrained: normalizing with ImageNet's mean %s and std %s, which its weights expect, instead "
                 "of %s's", [round(m, 4) for m in mean], [round(v, 4) for v in std], data.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return factory(num_classes=data.num_classes, input_shape=data.input_shape, mean=mean, std=std)
        except MixrobustError:
            raise
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"model is invalid: {str(exc).splitlines()[0]}") from None


def _initial_model(cfg: DictConfig, data):
    """The model to fine-tune (``init_from``): a checkpoint's or zoo source's classifier with its weights, fitted to
    `data` (class count, image shape, resize), trainable again (base models load frozen)."""
    f, = inputs.fit_models([inputs.model_file(cfg, "init_from")], data, cfg)
    if f.num_classes != data.num_classes:
        raise ConfigError(f"init_from={cfg.init_from} has {f.num_classes} classes but data={data.name} has "
                          f"{data.num_classes}; to fine-tune on other labels, build the architecture with a new head "
                          "(e.g. model=resnet50 model.pretrained=<ImageNet weights file>)")
    if f.source is None and f.input_shape != tuple(data.input_shape):
        raise ConfigError(f"init_from={cfg.init_from} takes {f.input_shape} images but data={data.name} has "
                          f"{tuple(data.input_shape)}")
    model = f.load("cpu").train()
    for p in model.parameters():
        p.requires_grad_(True)
    log.info("fine-tuning from %s", zoo.summary(f.record) if f.source else f.path)
    return model


def _optimizer(cfg: DictConfig, model):
    """The optimizer and scheduler factories, checked by building them once on the model's parameters."""
    optimizer = build(cfg.optimizer, "optimizer")
    scheduler = build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    try:
        built = optimizer(list(model.parameters()))
    except MixrobustError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer is invalid: {str(exc).splitlines()[0]}") from None
    if scheduler is not None:
        try:
            ClassifierModule.make_scheduler(scheduler, built, total_steps=100)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"scheduler is invalid: {str(exc).splitlines()[0]}") from None
    return optimizer, scheduler, optimizer_spec(built)


def _check_resume(keys: TrainKeys, expected: dict) -> None:
    """A resumed run continues its own run folder with the settings it was trained with.

    In another folder Lightning would keep the best checkpoint of the old folder but not its score,
    so the best checkpoint this run reports could be another run's file.
    """
    if str(keys.ckpt_path) in ("last", "best", "hpc", "registry"):  # Lightning's names: ambiguous across runs
        raise ConfigError(f"ckpt_path={keys.ckpt_path}: give the checkpoint file to resume from, e.g. "
                          "ckpt_path=<run dir>/checkpoints/last.ckpt hydra.run.dir=<run dir>")
    check_resume(keys.ckpt_path, expected)
    folder = keys.ckpt_path.expanduser().resolve().parent
    if folder != (keys.output_dir / "checkpoints").resolve():
        run_dir = folder.parent
        raise ConfigError(f"ckpt_path={keys.ckpt_path} belongs to the run folder {run_dir}; a resumed run continues "
                          f"in that folder: add hydra.run.dir={run_dir}")


def settings(cfg: DictConfig) -> TrainSettings:
    """Read and check the whole configuration of a training run (see the module docstring)."""
    keys = parse(TrainKeys, cfg, strict=False)
    trainer = parse(TrainerKeys, cfg.trainer, "trainer", strict=False)
    data = build(cfg.data, "data")
    threat = inputs.threat(cfg, data.input_shape)
    objective = build(cfg.objective, "objective")
    trained = getattr(objective, "threat", None)
    if objective.robust and (trained.norm, trained.eps) != (threat.norm, threat.eps):
        raise ConfigError(f"the objective trains in the {trained.norm.value} ball of eps {trained.eps:g} but "
                          f"threat is {threat.norm.value} eps {threat.eps:g}, which validation (the best checkpoint), "
                          "test/robust_acc and the checkpoint's record use: set threat.norm / threat.eps, which the "
                          "objective follows, instead of objective.norm / objective.eps")
    if objective.robust and str(trainer.precision) in ("bf16-true", "16-true"):
        log.warning("trainer.precision=%s casts the weights themselves to half precision, so val/robust_acc (the best "
                    "checkpoint) and test/robust_acc come from a half-precision search; trainer.precision=bf16-mixed "
                    "trains in bf16 and validates and tests in float32", trainer.precision)
    for key in ("val_attack_steps", "test_attack_steps") if objective.robust else ():  # val/ and test/robust_acc
        inputs.warn_unreachable(getattr(keys, key), threat.step_size, threat.eps, False, key)
    model = _initial_model(cfg, data) if keys.init_from is not None else _model(cfg, data, keys.seed)
    optimizer, scheduler, opt_spec = _optimizer(cfg, model)
    if keys.ckpt_path is not None:
        _check_resume(keys, {"data": data.name, "objective": objective.spec(), "model": dict(model.spec),
                             "optimizer": opt_spec, "max_epochs": trainer.max_epochs, "split": data_split(keys, data)})
    trainer_args = {k: v for k, v in check_arguments(cfg.trainer, "trainer", TRAINER_EXTRAS).items()
                    if k not in TRAINER_EXTRAS}
    accelerator = trainer_args.get("accelerator", "auto")
    on_gpus = accelerator in ("gpu", "cuda") or (accelerator == "auto" and host_checks() and visible_gpus() > 0)
    if on_gpus and trainer_devices(trainer_args.get("devices", "auto")) != 1:
        check_processes_launcher(2, "trainer.devices")  # DDP over several GPUs: each concurrent job would take them
    return TrainSettings(keys, trainer, trainer_args, data, threat, model, objective, optimizer, scheduler,
                         inputs.logger(cfg), plain(cfg))


@dataclass
class TrainResult:
    metrics: dict
    best_checkpoint: Path
    output_dir: Path


def data_split(keys: TrainKeys, data) -> dict | None:
    """The validation images the run holds out, for its record; None when it starts from other weights (``init_from``),
    which may have trained on them (a zoo model trained on the whole training split)."""
    return None if keys.init_from is not None else data.val_split


def build_module(s: TrainSettings) -> ClassifierModule:
    """The LightningModule of the run: the settings' model, objective, optimizer and schedule."""
    module = ClassifierModule(
        s.model, s.objective, optimizer=s.optimizer, scheduler=s.scheduler, threat=s.threat,
        val_attack_steps=s.keys.val_attack_steps, test_attack_steps=s.keys.test_attack_steps, seed=s.keys.seed,
        channels_last=s.trainer.channels_last, data_name=s.data.name, data_split=data_split(s.keys, s.data))
    if s.trainer.compile:
        module.model.compile()
    return module


def _trainer(s: TrainSettings, trainer_args: dict, logger, checkpoint: ModelCheckpoint) -> L.Trainer:
    callbacks = [checkpoint] + ([LearningRateMonitor(logging_interval="epoch")] if logger else [])
    args = dict(trainer_args)
    shown = current_mode() if s.trainer.enable_progress_bar else "none"
    if shown == "bar":
        callbacks.append(RichProgressBar())
    elif shown == "log":
        callbacks.append(LogProgress())  # a rich bar in a log file would draw only its last frame
    args["enable_progress_bar"] = shown == "bar"
    args.setdefault("enable_model_summary", False)  # run() logs the parameter count; the table adds a FLOPs column of 0
    plugins = list(args.pop("plugins", None) or []) + [SafeCheckpointIO()]  # atomic, never unpickles code
    return build(args, "trainer", callbacks=callbacks, logger=logger, plugins=plugins,
                 default_root_dir=str(s.keys.output_dir), inference_mode=False)


def _stopped(checkpoint: ModelCheckpoint, trainer: L.Trainer) -> StoppedError:
    last = Path(checkpoint.dirpath or "") / "last.ckpt"
    where = (f"the last complete epoch is saved in {last}: resume by rerunning with ckpt_path={last} "
             f"hydra.run.dir={last.parent.parent}" if last.is_file()
             else "no epoch had completed, so there is no checkpoint to resume from")
    return StoppedError(f"training was stopped by SIGTERM during epoch {trainer.current_epoch}; {where}")


def run(cfg: DictConfig) -> TrainResult:
    """Check, load the data, train, test the best checkpoint and write metrics.json."""
    s = settings(cfg)
    out = s.keys.output_dir
    s.data.load_all()  # a truncated or corrupt data file fails here, before the Trainer starts
    L.seed_everything(s.keys.seed, workers=True)
    module = build_module(s)
    params = list(module.model.parameters())
    arch = (s.config["model"].get("arch", type(s.model).__name__) if s.keys.init_from is None
            else f"{s.model.spec['arch']} from {s.keys.init_from}")
    log.info("model: %s, %s parameters (%s trainable)", arch,
             f"{sum(p.numel() for p in params):,}",
             f"{sum(p.numel() for p in params if p.requires_grad):,}")
    with placed_trainer(s.trainer_args) as trainer_args, job_logger(s.logger, out, "train") as logger:
        # last.ckpt at the end of every epoch (resume); best.ckpt on the objective's main validation metric
        checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/selection", mode="max",
                                     save_last=True, enable_version_counter=False)
        trainer = _trainer(s, trainer_args, logger, checkpoint)
        if logger:
            logger.log_hyperparams(s.config)
        try:
            with warnings.catch_warnings():
                if s.keys.ckpt_path is not None:  # resuming in its own folder (checked): its checkpoints are there
                    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
                trainer.fit(module, datamodule=s.data, ckpt_path=s.keys.ckpt_path)
            best = checkpoint.best_model_path or checkpoint.last_model_path
            if not best or not Path(best).is_file():
                raise MixrobustError(f"training ended without writing a checkpoint in {out / 'checkpoints'}; "
                                     "nothing to test or mix")
            results = trainer.test(module, datamodule=s.data, ckpt_path=best, verbose=False)
        except SIGTERMException:  # Lightning's own exit on SIGTERM has exit code 0: a scheduler would see success
            raise _stopped(checkpoint, trainer) from None
        metrics = {k: float(v) for k, v in results[0].items()} if results else {}
        if checkpoint.best_model_score is not None:  # what a sweeper should optimize: never a test metric
            metrics["val/selection"] = float(checkpoint.best_model_score)
        metrics["best_checkpoint"] = str(best)
        if trainer.is_global_zero:
            write_json(out / "metrics.json", metrics)
            log.info("test metrics: %s", {k: v for k, v in metrics.items() if k.startswith("test/")})
    return TrainResult(metrics, Path(best), out)
