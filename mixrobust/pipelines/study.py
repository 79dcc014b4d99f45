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

Each stage's config is composed from conf/ (train.yaml or evaluate.yaml) with the preset's overrides
by `mixrobust.pipelines.study_plan`, so a stage is exactly the run its own entry point would make and is
checked the same way, before any work where it can be (`Plan.check_before_training`). A command-line
value that no stage would see is refused (`PASSED`).

Resumable: a training stage writes ``stage.json`` (the fingerprint of its training settings, then the
best checkpoint's sha256) and is skipped while both still match; one killed midway resumes from its
``last.ckpt``; a folder holding another run is moved aside, never deleted. The evaluation stages skip
through their own ``run.json`` (``resume``). ``<dir>/stages.json`` keeps what each stage took when it
ran, so the report of a re-run still shows it. A failing stage still leaves the report of what finished.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mixrobust.errors import ConfigError, MixrobustError, StoppedError
from mixrobust.pipelines import inputs, module
from mixrobust.pipelines.fields import parse, plain
from mixrobust.pipelines.study_plan import Plan, Stage, StudyKeys, set_values
from mixrobust.runtime import progress
from mixrobust.runtime.cache import code_digest
from mixrobust.runtime.files import hold_folder, read_json, sha256_file, write_json
from mixrobust.runtime.hydra_job import current_job

log = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"
TIMES = "stages.json"
#: data settings that do not change the trained model (its batch size does)
TRAINING_LOADER_KEYS = tuple(k for k in inputs.LOADER_KEYS if k != "batch_size") + ("root",)



# --- running -------------------------------------------------------------------------------------

def _training_fingerprint(cfg: DictConfig) -> str:
    """sha256 of what the trained model depends on: the config without the job's and the loaders' settings. The
    code is not in it (a fix to a plot must not retrain every model): `run_training` warns when it changed."""
    unused = {"data": TRAINING_LOADER_KEYS, "trainer": ("enable_progress_bar", "log_every_n_steps")}
    config = inputs.numbers_config(plain(cfg), ("ckpt_path", "optimized_metric"), unused)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_reused(plan: Plan) -> None:
    """Without its train stage a study evaluates the models already in its train/ folders: warn where one was
    trained by a study under other settings than ``study.train`` gives now (its ``stage.json``). A folder without
    that marker holds a model trained elsewhere (``train.py`` into the folder), which is the point."""
    for stage in plan.reused:
        marker = read_json(stage.output_dir / STAGE_MARKER)
        if isinstance(marker, dict) and marker.get("fingerprint") != _training_fingerprint(stage.cfg):
            log.warning("study stage %s was trained with other settings than study.train gives now; without the "
                        "train stage the evaluations read its model as it is (add train to study.stages to retrain "
                        "it)", stage.name)


def _set_aside(out: Path) -> Path:
    """Move a stage folder that holds another run out of the way (nothing is deleted); returns where it went."""
    stamp = f"{out.name}.replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    moved, again = out.with_name(stamp), 1
    while moved.exists():  # set aside twice within a second
        moved, again = out.with_name(f"{stamp}-{again}"), again + 1
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
                log.warning("%s was trained by another version of mixrobust's code or of torch, torchvision, timm "
                            "or robustbench; kept (move the folder away to train it anew)", out)
            log.info("%s: trained before (%s), skipped", stage.name, best)
            return True, best
        log.warning("%s: its best checkpoint %s is missing or changed", out, best)
    cfg, last = stage.cfg, out / "checkpoints" / "last.ckpt"
    if same and not marker.get("finished") and last.is_file():
        log.info("%s: resuming the killed training from %s", stage.name, last)
        cfg = set_values(copy.deepcopy(cfg), {"ckpt_path": str(last)})
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
                set_values(stage.cfg, {key: str(checkpoint)})


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
PASSED = ("study", "experiment", "task", "seed", "device", "data_root", "debug", "progress", "logger", "cache",
          "resume", "hydra")


def _check_overrides(overrides: list[str]) -> None:
    """A command-line value that no stage would see (``n=100``, ``mix.alphas=...``) is refused, naming where it goes."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.split(".", 1)[0].split("@", 1)[0] not in PASSED:
            raise ConfigError(f"{override} does not reach a study's stages: they take their settings from the study's "
                              f"lists (and {', '.join(PASSED[3:-1])}); add it to one, e.g. "
                              f"'study.evaluate=[\"data=mnist\",\"{override}\"]' (every evaluation), study.fig2, "
                              "study.fig1, study.autoattack, study.fig3 or study.train.common (python evaluate.py "
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
    report of what finished. The study holds its folder (`hold_folder`): a second study into it stops there."""
    plan = settings(cfg)
    check_reused(plan)
    with hold_folder(plan.root, "study.dir=<folder>"):  # its stages run inside, each in a folder of its own
        return _run(plan)


def _run(plan: Plan) -> StudyResult:
    from mixrobust.study.report import write_report

    root = plan.root
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
