"""A study's stages, composed and checked (`mixrobust.pipelines.study` runs them).

`Plan` composes each stage's config from conf/ (train.yaml or evaluate.yaml) with the study preset's
overrides (``study.*``) and the study's own run settings, in the order the stages run: the base models
(``train/g``, ``train/h``, ``train/rs_sigma<s>``), then ``fig2``, ``autoattack``, ``fig1``,
``fig3_plugin`` and ``fig3_sound``. `Plan.check_before_training` checks what can be checked before any
work; `Plan.check_evaluations` the evaluation stages' full settings once their checkpoints exist.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from omegaconf import DictConfig, OmegaConf, open_dict

from mixrobust.errors import ConfigError
from mixrobust.pipelines import inputs, module
from mixrobust.pipelines.fields import bounded, build, parse, plain
from mixrobust.runtime.loggers import is_wandb
from mixrobust.runtime.placement import trainer_devices

StageGroup = Literal["train", "fig2", "autoattack", "fig1", "fig3"]
CertifyMode = Literal["plugin", "sound"]



@dataclass(frozen=True)
class TrainOverrides:
    """``study.train.*``: train.py overrides for every base model (``common``) and for each kind of model."""

    common: tuple[str, ...] = ()
    g: tuple[str, ...] = ("objective=standard",)
    h: tuple[str, ...] = ("objective=pgd_at",)
    rs: tuple[str, ...] = ("objective=gaussian_noise",)


@dataclass(frozen=True)
class StudyKeys:
    """``study.*``: the folder, the stages, the claims' settings and every stage's overrides."""

    dir: Path
    title: str = "study"
    stages: tuple[StageGroup, ...] = bounded(get_args(StageGroup), min_len=1)
    # CIFAR-10, ResNet-18, l_inf 8/255: the paper's numbers stand beside ours
    paper_setting: bool = False
    paper_alpha: float = bounded(0.6, gt=0.5, le=1)
    tolerance: float = bounded(0.01, gt=0, lt=1)
    rs_sigma: float = bounded(0.5, gt=0)
    baseline_sigma: float = bounded(0.25, gt=0)
    train: TrainOverrides = field(default_factory=TrainOverrides)
    evaluate: tuple[str, ...] = ()
    fig2: tuple[str, ...] = ()
    autoattack: tuple[str, ...] = ()
    fig1: tuple[str, ...] = ()
    fig3: tuple[str, ...] = ()
    fig3_modes: tuple[CertifyMode, ...] = bounded(get_args(CertifyMode), min_len=1)
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if "fig3" in self.stages and self.rs_sigma == self.baseline_sigma:
            raise ConfigError(f"study.rs_sigma and study.baseline_sigma are both {self.rs_sigma:g}: Figure 3 compares "
                              "the mixture with an RS model of another noise level; set two different sigmas")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"study.stages lists a stage twice: {list(self.stages)}")


@dataclass
class Stage:
    """One stage: its name (and folder under the study's), its task, its composed config, the models it reads."""

    name: str
    task: str
    cfg: DictConfig
    models: dict[str, str] = field(default_factory=dict)  # config key -> training stage name

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def rs_stage(sigma: float) -> str:
    return f"train/rs_sigma{sigma:g}"


def _compose(config_name: str, overrides: list[str], stage: str) -> DictConfig:
    """conf/<config_name>.yaml with `overrides`; a bad override is a ConfigError naming the stage."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        raise ConfigError("a study composes its stages from conf/: run it through evaluate.py "
                          "(python evaluate.py experiment=study_digits)")
    try:
        return compose(config_name=config_name, overrides=overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra's parse, composition and missing-config errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"study stage {stage}: the overrides {overrides} do not compose ({first}); fix them in "
                          "the study preset (study.*)") from None


def set_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """`cfg` with `values` set at their dotted keys (added where absent)."""
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


class Plan:
    """Every stage of a study, composed (nothing runs): see the module docstring."""

    def __init__(self, cfg: DictConfig, keys: StudyKeys):
        self.keys = keys
        self.root = keys.dir
        self.cfg = cfg
        self.stages: list[Stage] = []
        self._train()
        #: without the train stage, the training stages this run leaves out: the evaluations read their models
        self.reused: list[Stage] = []
        if "train" not in keys.stages:
            self.reused, self.stages = self.stages, []
        evaluations = [s for s in get_args(StageGroup) if s != "train" and s in keys.stages]
        for group in evaluations:
            getattr(self, f"_{group}")()
        if keys.paper_setting:
            self._check_paper_setting()

    def _check_paper_setting(self) -> None:
        """``study.paper_setting`` puts the paper's numbers beside ours: only where the setting is the paper's."""
        differs = []
        for stage in [*self.reused, *self.stages]:
            cfg = stage.cfg
            if str(OmegaConf.select(cfg, "data._target_", default="")).rsplit(".", 1)[-1] != "CIFAR10DataModule":
                differs.append(f"{stage.name} is not on CIFAR-10")
            if stage.task == "train" and stage.name in ("train/g", "train/h") and cfg.model.get("arch") != "resnet18":
                differs.append(f"{stage.name} trains {cfg.model.get('arch')}, not a ResNet-18")
            if stage.name == "fig2" and (cfg.threat.norm != "linf" or abs(float(cfg.threat.eps) - 8 / 255) > 1e-6
                                         or cfg.attack.steps != 20):
                differs.append(f"fig2 attacks with {cfg.attack.steps}-step PGD in {cfg.threat.norm} "
                               f"{float(cfg.threat.eps):g}, not PGD-20 in l_inf 8/255")
        if differs:
            raise ConfigError("study.paper_setting=true puts the paper's numbers beside this study's, but "
                              + "; ".join(differs) + "; set study.paper_setting=false")

    # --- composition ---------------------------------------------------------------------------
    def _passed(self) -> dict[str, Any]:
        """The study's own run settings, given to every stage after composition."""
        shared = {"data_root": self.cfg.get("data_root"), "debug": self.cfg.get("debug", False),
                  "progress": plain(self.cfg.get("progress")) or {}}
        logger = copy.deepcopy(plain(self.cfg.get("logger"), "logger"))
        if is_wandb(logger) and not logger.get("group"):
            logger["group"] = f"study {self.keys.title}"
        shared["logger"] = logger
        return shared

    def _train(self) -> None:
        t = self.keys.train
        kinds = {"train/g": t.g, "train/h": t.h}
        if "fig3" in self.keys.stages:
            for sigma in (self.keys.rs_sigma, self.keys.baseline_sigma):
                kinds[rs_stage(sigma)] = (*t.rs, f"objective.sigma={sigma}")
        for name, own in kinds.items():
            overrides = [f"seed={self.cfg.seed}", *t.common, *own]
            cfg = set_values(_compose("train", overrides, name),
                             {**self._passed(), "output_dir": str(self.root / name)})
            self.stages.append(Stage(name, "train", cfg))

    def _evaluation(self, name: str, task: str, own: list[str], models: dict[str, str]) -> Stage:
        overrides = [f"task={task}", f"seed={self.cfg.seed}", f"device={self.cfg.device}", *self.keys.evaluate, *own]
        cfg = _compose("evaluate", overrides, name)
        values = {**self._passed(), "output_dir": str(self.root / name),
                  "cache": plain(self.cfg.get("cache")), "resume": bool(self.cfg.get("resume", True))}
        values.update({key: str(self.root / model / "checkpoints" / "best.ckpt") for key, model in models.items()})
        stage = Stage(name, task, set_values(cfg, values), models)
        self.stages.append(stage)
        return stage

    def _fig2(self) -> None:
        self._evaluation("fig2", "mix", list(self.keys.fig2), {"g_ckpt": "train/g", "h_ckpt": "train/h"})

    def fig2_alphas(self) -> list[float]:
        """The Figure 2 grid (the fig2 stage's, composed even when that stage is not run)."""
        cfg = _compose("evaluate", ["task=mix", *self.keys.evaluate, *self.keys.fig2], "fig2")
        alphas = plain(cfg.mix.alphas, "mix.alphas")
        if not alphas:
            raise ConfigError("the autoattack stage picks its alphas from Figure 2's mix.alphas, which the fig2 "
                              "overrides leave empty; set mix.alphas in study.fig2")
        return [float(a) for a in alphas]

    def _autoattack(self) -> None:
        grid = self.fig2_alphas()
        closest = min(grid, key=lambda a: (abs(a - self.keys.paper_alpha), a))
        alphas = sorted({closest, 1.0})
        own = ["attacks=[std,rob,mix,autoattack]", f"mix.alphas=[{','.join(repr(a) for a in alphas)}]",
               "mix.gammas=null", "mix.r_options=[one]", "mix.mix_spaces=[prob]", *self.keys.autoattack]
        self._evaluation("autoattack", "mix", own, {"g_ckpt": "train/g", "h_ckpt": "train/h"})

    def _fig1(self) -> None:
        self._evaluation("fig1", "mix", list(self.keys.fig1), {"g_ckpt": "train/g", "h_ckpt": "train/h"})

    def _fig3(self) -> None:
        models = {"g_ckpt": "train/g", "h_ckpt": rs_stage(self.keys.rs_sigma),
                  "certify.baseline_ckpt": rs_stage(self.keys.baseline_sigma)}
        for mode in self.keys.fig3_modes:
            self._evaluation(f"fig3_{mode}", "certify", ["threat=l2", *self.keys.fig3, f"certify.mode={mode}"], models)

    # --- checks ----------------------------------------------------------------------------------
    def check_before_training(self) -> None:
        """The training stages' settings, and what the evaluation stages can check without checkpoints."""
        from mixrobust.pipelines import certify, mix

        for stage in self.stages:
            with _named(stage):
                if stage.task == "train":
                    _one_process(module("train").settings(stage.cfg).trainer_args)
                    continue
                inputs.examples(stage.cfg)
                inputs.device(stage.cfg)
                if stage.task == "mix":
                    parse(mix.MixKeys, stage.cfg.mix, "mix")
                    data = build(stage.cfg.data, "data")  # a missing data folder stops the study here
                    mix.attack(stage.cfg, inputs.threat(stage.cfg, data.input_shape))
                    if "autoattack" in parse(mix.SweepKeys, stage.cfg, strict=False).attacks:
                        _autoattack_installed(stage)
                else:
                    parse(certify.CertifyKeys, stage.cfg.certify, "certify")
        trained = {s.name for s in self.stages if s.task == "train"}
        for stage in self.stages:
            for key, model in stage.models.items():
                path = Path(OmegaConf.select(stage.cfg, key))
                if model not in trained and not path.is_file():
                    raise ConfigError(f"study stage {stage.name} reads {path} ({key}), which does not exist and no "
                                      f"stage trains it: add train to study.stages")

    def check_evaluations(self) -> None:
        """Every evaluation stage's full settings (the checkpoints exist now)."""
        for stage in self.stages:
            if stage.task != "train":
                with _named(stage):
                    module(stage.task).settings(stage.cfg)


def _one_process(trainer_args: dict) -> None:
    """A study trains in its own process: a Trainer that would start more (DDP re-runs the whole command in each
    of them) is refused."""
    devices, strategy = trainer_args.get("devices", 1), str(trainer_args.get("strategy", "auto"))
    if trainer_devices(devices) != 1 or "ddp" in strategy:
        raise ConfigError(f"trainer devices={devices}, strategy={strategy}: a study trains each model in its own "
                          "process, on one device; use trainer=gpu (or cpu) in study.train.common, or train the "
                          "models with python train.py trainer=ddp hydra.run.dir=<study.dir>/train/<g, h, "
                          "rs_sigma...> and run the study without its train stage: "
                          "'study.stages=[fig2,autoattack,fig1,fig3]'")


def _autoattack_installed(stage: Stage) -> None:
    from mixrobust.attacks.autoattack import find_implementation
    from mixrobust.pipelines.mix import AutoAttackKeys

    try:
        find_implementation(parse(AutoAttackKeys, stage.cfg.autoattack, "autoattack").implementation)
    except ConfigError as exc:
        raise ConfigError(f"study stage {stage.name}: {exc}; or leave the stage out: "
                          "'study.stages=[train,fig2,fig1,fig3]'") from None


class _named:
    """Prefix a ConfigError raised inside with the stage it belongs to."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, ConfigError) and not str(exc).startswith("study stage"):
            raise ConfigError(f"study stage {self.stage.name}: {exc}") from None
