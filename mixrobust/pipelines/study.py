"""The study task (``python evaluate.py experiment=study_<data>``): one data set from nothing to a report.

A study runs every stage of the paper's evaluation on one data set, in one process and in this order,
each in its own folder under ``study.dir``:

- ``train/g``, ``train/h``, ``train/rs_sigma<s>``: the base models (train.py's task with the preset's
  overrides): g standard, h PGD-AT at the data set's threat, and Gaussian-noise models at
  ``study.rs_sigma`` (the h of Figure 3) and ``study.baseline_sigma`` (its randomized-smoothing baseline);
- ``fig2``: the alpha sweep under clean, STD, ROB and MIX (evaluate.py's mix task); its margins.json
  holds Table 1;
- ``autoattack``: AutoAttack on the mixture at the Figure 2 alpha closest to ``study.paper_alpha`` and at 1;
- ``fig1``: the R_i options x mix spaces x gamma sweep (Figures 1 and 4);
- ``fig3_plugin``, ``fig3_sound``: certified accuracy of g mixed with the RS model (evaluate.py's certify
  task), alpha selected to match the baseline RS model's clean accuracy, with the paper's plug-in radii
  and with sound ones;
- then ``report.md`` and ``report.html`` (`mixrobust.study.report`): every figure and table, the settings,
  the time each stage took, and the claims table (`mixrobust.study.claims`).

Each stage's config is composed from conf/ (train.yaml or evaluate.yaml) with the preset's overrides,
so a stage is exactly the run its own entry point would make and is checked the same way. Before any
work every stage is composed (an unknown key or a bad override stops the study there) and the training
stages' settings and the evaluation stages' own nodes are checked; each evaluation stage's full settings
(which read the checkpoints) are checked as soon as training is done, before the first evaluation.

Resumable: a training stage writes ``stage.json`` (its config's fingerprint, then the best checkpoint's
sha256) and is skipped when both still match; one killed midway resumes from its ``last.ckpt``. The
evaluation stages skip through their own ``run.json`` (``resume``). ``<dir>/stages.json`` keeps what each
stage took when it ran, so the report of a re-run still shows it.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from omegaconf import DictConfig, OmegaConf, open_dict

from mixrobust.errors import ConfigError, MixrobustError, StoppedError
from mixrobust.pipelines import inputs, module
from mixrobust.pipelines.fields import bounded, build, parse, plain
from mixrobust.runtime import progress
from mixrobust.runtime.cache import code_digest
from mixrobust.runtime.files import read_json, sha256_file, write_json
from mixrobust.runtime.hydra_job import current_job
from mixrobust.runtime.loggers import is_wandb

log = logging.getLogger(__name__)

StageGroup = Literal["train", "fig2", "autoattack", "fig1", "fig3"]
CertifyMode = Literal["plugin", "sound"]
STAGE_MARKER = "stage.json"
TIMES = "stages.json"
#: data settings that do not change the trained model (its batch size does)
TRAINING_LOADER_KEYS = tuple(k for k in inputs.LOADER_KEYS if k != "batch_size") + ("root",)


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


def _set(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
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
        if "train" in keys.stages:
            self._train()
        evaluations = [s for s in get_args(StageGroup) if s != "train" and s in keys.stages]
        for group in evaluations:
            getattr(self, f"_{group}")()
        if keys.paper_setting:
            self._check_paper_setting()

    def _check_paper_setting(self) -> None:
        """``study.paper_setting`` puts the paper's numbers beside ours: only where the setting is the paper's."""
        differs = []
        for stage in self.stages:
            cfg = stage.cfg
            if "cifar10" not in str(OmegaConf.select(cfg, "data._target_", default="")).lower().replace("_", ""):
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
            cfg = _compose("train", overrides, name)
            self.stages.append(Stage(name, "train", _set(cfg, {**self._passed(), "output_dir": str(self.root / name)})))

    def _evaluation(self, name: str, task: str, own: list[str], models: dict[str, str]) -> Stage:
        overrides = [f"task={task}", f"seed={self.cfg.seed}", f"device={self.cfg.device}", *self.keys.evaluate, *own]
        cfg = _compose("evaluate", overrides, name)
        values = {**self._passed(), "output_dir": str(self.root / name),
                  "cache": plain(self.cfg.get("cache")), "resume": bool(self.cfg.get("resume", True))}
        values.update({key: str(self.root / model / "checkpoints" / "best.ckpt") for key, model in models.items()})
        stage = Stage(name, task, _set(cfg, values), models)
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
                    module("train").settings(stage.cfg)
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
        return False


# --- running -------------------------------------------------------------------------------------

def _training_fingerprint(cfg: DictConfig) -> str:
    """sha256 of what the trained model depends on: the config without the job's and the loaders' settings. The
    code is not in it (a fix to a plot must not retrain every model): `run_training` warns when it changed."""
    config = inputs.numbers_config(plain(cfg), ("ckpt_path",), {"data": TRAINING_LOADER_KEYS,
                                                                 "trainer": ("enable_progress_bar", "log_every_n_steps")})
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _set_aside(out: Path) -> Path:
    """Move a stage folder that holds another run out of the way (nothing is deleted); returns where it went."""
    moved = out.with_name(f"{out.name}.replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.rename(moved)
    log.warning("%s held a training run of another configuration (or a damaged one); moved to %s, training anew",
                out, moved)
    return moved


def run_training(stage: Stage, resume: bool = True) -> tuple[bool, Path]:
    """Train unless this folder holds a finished run of this config with its best checkpoint intact (then skipped:
    True); resume a killed run of this config from its last.ckpt; a folder holding anything else is set aside.
    ``resume=False`` always trains anew."""
    out = stage.output_dir
    fp = _training_fingerprint(stage.cfg)
    marker = (read_json(out / STAGE_MARKER) or {}) if resume else {}
    same = marker.get("fingerprint") == fp
    best = out / marker.get("best_checkpoint", "checkpoints/best.ckpt")
    if same and marker.get("finished"):
        if best.is_file() and sha256_file(best) == marker.get("best_sha256"):
            if marker.get("code") != code_digest():
                log.warning("%s was trained by another version of mixrobust's code; kept (move the folder away to "
                            "train it anew)", out)
            log.info("%s: trained before (%s), skipped", stage.name, best)
            return True, best
        log.warning("%s: its best checkpoint %s is missing or changed", out, best)
    cfg, last = stage.cfg, out / "checkpoints" / "last.ckpt"
    if same and not marker.get("finished") and last.is_file():
        log.info("%s: resuming the killed training from %s", stage.name, last)
        cfg = _set(copy.deepcopy(cfg), {"ckpt_path": str(last)})
    elif out.is_dir() and any(out.iterdir()):
        _set_aside(out)
    write_json(out / STAGE_MARKER, {"fingerprint": fp, "finished": False})
    result = module("train").run(cfg)
    best = out / Path(result.best_checkpoint).resolve().relative_to(out.resolve())
    write_json(out / STAGE_MARKER, {"fingerprint": fp, "finished": True, "code": code_digest(),
                                    "best_checkpoint": best.relative_to(out).as_posix(),
                                    "best_sha256": sha256_file(best), "metrics": result.metrics})
    return False, best


def _point_at(stages: list[Stage], name: str, checkpoint: Path) -> None:
    """Evaluation stages read training stage `name`'s actual best checkpoint."""
    for stage in stages:
        for key, model in stage.models.items():
            if model == name:
                _set(stage.cfg, {key: str(checkpoint)})


@dataclass
class StudyResult:
    """What the study did: each stage's status and seconds, the claims and the report's files."""

    output_dir: Path
    stages: dict[str, dict]
    claims: list
    files: dict[str, str]
    skipped: bool

    def text(self) -> str:
        from mixrobust.study.claims import claims_table

        ran = [n for n, s in self.stages.items() if s["status"] == "ran"]
        head = (f"study {self.output_dir}: {len(ran)} stage(s) ran, {len(self.stages) - len(ran)} finished before"
                f"; report in {self.files.get('report.md')}")
        return head + "\n" + claims_table(self.claims)


#: top-level keys of evaluate.py that a study passes to its stages; every other setting is in ``study.*``
PASSED = ("study", "experiment", "task", "seed", "device", "data_root", "debug", "progress", "logger", "cache", "resume",
          "hydra")


def _check_overrides(overrides: list[str]) -> None:
    """A command-line value that no stage would see (``n=100``, ``mix.alphas=...``) is refused, naming where it goes."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.split(".", 1)[0].split("@", 1)[0] not in PASSED:
            raise ConfigError(f"{override} does not reach a study's stages: they take their settings from the study's "
                              f"lists (and {', '.join(PASSED[3:-1])}); add it to one, e.g. "
                              f"'study.evaluate=[data=mnist,{override}]' (every evaluation), study.fig2, study.fig1, "
                              "study.autoattack, study.fig3 or study.train.common (python evaluate.py "
                              "experiment=<study> --cfg job shows the lists)")


def settings(cfg: DictConfig) -> Plan:
    """Compose and check every stage (see `Plan.check_before_training`); nothing runs."""
    if cfg.get("study") is None:
        raise ConfigError("task=study needs a study preset: python evaluate.py experiment=study_digits "
                          "(or study_mnist, study_cifar10_cpu, study_cifar10)")
    _check_overrides(current_job().overrides)
    keys = parse(StudyKeys, cfg.study, "study")
    plan = Plan(cfg, keys)
    plan.check_before_training()
    return plan


def _run_stage(plan: Plan, stage: Stage) -> bool:
    """Run one stage (True: it was finished before and skipped); errors name the stage."""
    try:
        if stage.task != "train":
            return module(stage.task).run(stage.cfg).skipped
        skipped, best = run_training(stage, resume=bool(plan.cfg.get("resume", True)))
        _point_at(plan.stages, stage.name, best)
        return skipped
    except MixrobustError as exc:
        hint = "; rerun the same command to resume it" if isinstance(exc, StoppedError) else ""
        raise type(exc)(f"study stage {stage.name}: {exc}{hint}") from exc


def run(cfg: DictConfig) -> StudyResult:
    """Run the missing stages in order, then write the report (module docstring); a failing stage still leaves the
    report of what finished."""
    from mixrobust.study.report import write_report

    plan = settings(cfg)
    root = plan.root
    root.mkdir(parents=True, exist_ok=True)
    times: dict[str, dict] = read_json(root / TIMES) or {}
    status: dict[str, dict] = {}
    current = {"name": ""}
    try:
        with progress.stage(plan.keys.title, total=len(plan.stages), unit="stages") as shown:
            shown.detail = lambda: current["name"]
            for i, stage in enumerate(plan.stages, 1):
                current["name"] = stage.name
                if stage.task != "train" and not any(s.task != "train" for s in plan.stages[:i - 1]):
                    plan.check_evaluations()  # the checkpoints exist now: before the first evaluation
                log.info("study stage %d/%d: %s (%s) in %s", i, len(plan.stages), stage.name, stage.task,
                         stage.output_dir)
                start = time.perf_counter()
                if _run_stage(plan, stage):
                    status[stage.name] = {**times.get(stage.name, {"seconds": None}), "status": "skipped"}
                    shown.initial += 1  # the ETA counts only the stages that run
                else:
                    times[stage.name] = {"seconds": time.perf_counter() - start,
                                         "finished_at": datetime.datetime.now().isoformat(timespec="seconds")}
                    status[stage.name] = {**times[stage.name], "status": "ran"}
                    write_json(root / TIMES, times)
                shown.advance()
    except BaseException:
        try:
            write_report(plan, status)
        except Exception:  # noqa: BLE001 - the stage's own error is the one to raise
            log.exception("the report of the finished stages failed")
        raise
    claims, files = write_report(plan, status)
    return StudyResult(root, status, claims, {k: str(v) for k, v in files.items()},
                       all(s["status"] == "skipped" for s in status.values()))
