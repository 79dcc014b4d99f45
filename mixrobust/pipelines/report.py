"""Report over a finished (or partly finished) sweep: ``python evaluate.py task=report report.dir=<multirun dir>``.

``run(cfg)`` reads ``cfg.report.dir`` (required: the ``hydra.sweep.dir`` of a ``python
evaluate.py -m ...`` run), ``cfg.report.out_dir`` (default ``<report.dir>/report``) and
``cfg.plots``, and writes the files described in `mixrobust.evaluation.multirun`. With a W&B
``logger`` it also logs the combined table and the plots to one run in the W&B group of the
sweep's jobs (``logger.group``, else the sweep folder, see `sweep_group`), then finishes it;
other loggers are not used (the report files are the output).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from mixrobust.errors import ConfigError
from mixrobust.evaluation.multirun import COMBINED_COLUMNS, combine, make_report
from mixrobust.pipelines.common import build_logger, finish_wandb, is_wandb, log, sweep_group


def log_to_wandb(cfg: DictConfig, report, group: str) -> None:
    """Log the report's combined table and plots to one W&B run in `group` (``logger.group`` wins)."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        cfg.logger.group = cfg.logger.get("group") or group
        cfg.logger.name = cfg.logger.get("name") or f"report {group}"
        cfg.logger.job_type = "report"
        cfg.task = "report"
    with finish_wandb():
        logger = build_logger(cfg, str(report.out_dir))
        import wandb

        rows = combine(report.jobs)
        data = [[None if isinstance(r[c], float) and math.isnan(r[c]) else r[c] for c in COMBINED_COLUMNS]
                for r in rows]
        images = {f"report/{Path(p).stem}": wandb.Image(str(p)) for name, p in report.files.items()
                  if name.endswith(".png")}
        logger.experiment.log({"report/combined": wandb.Table(columns=list(COMBINED_COLUMNS), data=data), **images})


def report_sweep(cfg: DictConfig, sweep_dir: str, out_dir: str | None = None):
    """`make_report` of `sweep_dir` (plots as ``cfg.plots``), logged, and copied to W&B with a W&B ``cfg.logger``."""
    report = make_report(sweep_dir, out_dir, plots=bool(cfg.get("plots", True)))
    log.info("report of %d job(s) of %s in %s", len(report.jobs), sweep_dir, report.out_dir)
    if is_wandb(cfg):
        log_to_wandb(cfg, report, sweep_group(sweep_dir))
    return report


def run(cfg: DictConfig) -> dict:
    """Write the sweep report; returns the files, the number of jobs, the incomplete job folders and the folder."""
    sweep_dir = OmegaConf.select(cfg, "report.dir", default=None)
    if sweep_dir is None:
        raise ConfigError("missing report.dir: pass the folder of a `python evaluate.py -m ...` run, e.g. "
                          "python evaluate.py task=report report.dir=multirun/evaluate/<date>")
    report = report_sweep(cfg, str(sweep_dir), OmegaConf.select(cfg, "report.out_dir", default=None))
    root = Path(sweep_dir)
    return {
        "files": {k: str(v) for k, v in report.files.items()},
        "jobs": len(report.jobs),
        "incomplete": [p.relative_to(root).as_posix() for p in report.incomplete],
        "output_dir": str(report.out_dir),
    }
