"""The report task (``python evaluate.py task=report report.dir=<multirun dir>``) and the sweep-report callback.

`run` combines the finished jobs of a sweep folder into the files described in
`mixrobust.evaluation.multirun` (``<report.dir>/report`` unless ``report.out_dir``). With a W&B
``logger`` it also logs the combined table and the plots to one run in the W&B group of the
sweep's jobs (``logger.group``, else the sweep folder, see `sweep_group`); other loggers are not
used (the report files are the output). `SweepReport` is the Hydra callback that writes the same
report when a multirun ends.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mixrobust.errors import ConfigError, MixrobustError
from mixrobust.evaluation.multirun import COMBINED_COLUMNS, Report, combine, make_report
from mixrobust.pipelines.fields import check_arguments, parse, plain
from mixrobust.runtime.loggers import is_wandb, job_logger, log_to_files, sweep_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportKeys:
    """``report.*``: the sweep folder to combine and where the report goes (default ``<dir>/report``)."""

    dir: Path | None = None
    out_dir: Path | None = None

    def __post_init__(self):
        if self.dir is None:
            raise ConfigError("missing report.dir: pass the folder of a `python evaluate.py -m ...` run, e.g. "
                              "python evaluate.py task=report report.dir=multirun/evaluate/<date>")
        if not self.dir.is_dir():
            raise ConfigError(f"report.dir={self.dir} is not a folder; pass the folder of a `python evaluate.py -m "
                              "...` run (its hydra.sweep.dir, e.g. multirun/paper_fig2)")


@dataclass(frozen=True)
class ReportSettings:
    report: ReportKeys
    plots: bool
    logger: Any


@dataclass(frozen=True)
class _Plots:
    plots: bool = True


def settings(cfg: DictConfig) -> ReportSettings:
    """Read and check the report task's settings."""
    check_arguments(cfg.get("logger"), "logger", ("save_dir",))
    return ReportSettings(parse(ReportKeys, cfg.report, "report"), parse(_Plots, cfg, strict=False).plots,
                          cfg.get("logger"))


def log_to_wandb(node, report: Report, group: str) -> None:
    """Log the report's combined table and plots to one W&B run in `group` (``logger.group`` wins)."""
    with job_logger(node, report.out_dir, "report", group=node.get("group") or group,
                    name=node.get("name") or f"report {group}", job_type="report") as logger:
        import wandb

        rows = combine(report.jobs)
        data = [[None if isinstance(r[c], float) and math.isnan(r[c]) else r[c] for c in COMBINED_COLUMNS]
                for r in rows]
        images = {f"report/{Path(p).stem}": wandb.Image(str(p)) for name, p in report.files.items()
                  if name.endswith(".png")}
        logger.experiment.log({"report/combined": wandb.Table(columns=list(COMBINED_COLUMNS), data=data), **images})


def report_sweep(sweep_dir: str | Path, out_dir: str | Path | None, plots: bool, logger_node=None,
                 console: bool = True) -> Report:
    """`make_report` of `sweep_dir`, logged (to the log files only unless `console`: the report task's entry point
    prints its own line), and copied to W&B when `logger_node` is a W&B logger."""
    report = make_report(sweep_dir, out_dir, plots=plots)
    args = ("report of %d job(s) of %s in %s", len(report.jobs), sweep_dir, report.out_dir)
    if console:
        log.info(*args)
    else:
        log_to_files(log, logging.INFO, *args)
    if is_wandb(logger_node):
        log_to_wandb(logger_node, report, sweep_group(sweep_dir))
    return report


@dataclass
class ReportResult:
    files: dict[str, str]
    jobs: int
    incomplete: list[str]
    output_dir: Path

    def text(self) -> str:
        """How many jobs the report combines, and which were left out."""
        left = f"; incomplete, left out: {', '.join(self.incomplete)}" if self.incomplete else ""
        return f"report of {self.jobs} finished job(s){left}"


def run(cfg: DictConfig) -> ReportResult:
    """Write the sweep report; returns its files, the number of jobs, the incomplete job folders and the folder."""
    s = settings(cfg)
    report = report_sweep(s.report.dir, s.report.out_dir, s.plots, s.logger, console=False)
    return ReportResult({k: str(v) for k, v in report.files.items()}, len(report.jobs),
                        [p.relative_to(s.report.dir).as_posix() for p in report.incomplete], report.out_dir)


class SweepReport(Callback):
    """Hydra callback: write the sweep report into ``<hydra.sweep.dir>/report`` when a multirun ends.

    Enable with ``hydra.callbacks.sweep_report._target_: mixrobust.pipelines.report.SweepReport``.
    Plots follow the app's ``plots`` setting, W&B logging its ``logger``. A sweep without a
    completed job gets no report (logged); a failing report is logged, not raised: the jobs'
    results are already saved and ``evaluate.py task=report report.dir=...`` can redo it.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep_dir is None:
            log.info("no hydra.sweep.dir in the config: no sweep report")
            return
        try:
            report_sweep(str(sweep_dir), None, bool(config.get("plots", True)), plain(config.get("logger"), "logger"))
        except MixrobustError as exc:  # no folder, or no completed job in it
            log.info("no sweep report: %s", exc)
        except Exception:  # the jobs' own results are safe; the report can be redone
            log.exception("the sweep report failed; redo it with: python evaluate.py task=report report.dir=%s",
                          sweep_dir)
