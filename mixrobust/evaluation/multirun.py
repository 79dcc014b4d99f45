"""One report over a Hydra multirun sweep of ``evaluate.py task=mix`` jobs.

A job folder is complete when its marker (``run.json`` of a mix job, ``certify_summary.json`` of
a certification job) is intact and every results file still matches the checksum it records
(`mixrobust.runtime.jobs.find_job_folders`). Other folders with ``.hydra/`` are incomplete jobs
(still running, failed, damaged): they are listed and left out. Jobs are found at any depth below
the sweep folder, except in ``report/`` and dot-folders, and ordered by their relative path with
job numbers compared as numbers (``2_alphas=0.5,r_options=one``, or ``2`` from earlier versions, before
``10_...``). A job's name is its folder's path relative to the sweep folder, e.g.
``3_alphas=0.6,r_options=one`` (``hydra.sweep.subdir``: the job number, then its grid values).

`write_report` writes, atomically, into ``<sweep_dir>/report`` (or `out_dir`):

- ``combined.csv``: every row of every completed job, in job order then the job's row order,
  with the columns ``job,overrides,`` + `COLUMNS` (``overrides``: the job's Hydra overrides,
  sorted, joined by spaces); floats keep full precision, None / NaN are empty cells. It holds no
  timings, dates or absolute paths, so the same results give the same bytes however the jobs
  finished or were resumed;
- ``jobs.json``: the completed and incomplete jobs with their overrides, the stale ones (finished
  jobs of an earlier launch into the same folder whose overrides the latest launch, recorded by
  Hydra in ``multirun.yaml``, no longer asks for, and the extra folders of one job, e.g. ``1`` of
  an earlier version next to its re-run ``1_seed=1``: one counts, `mixrobust.runtime.jobs.launch_jobs`;
  left out) and the missing ones (asked for, not finished);
- with plots, from the rows deduplicated across jobs (`dedupe_for_plots`; g's and h's rows
  repeat in every job of an alpha sweep): ``accuracy_vs_alpha.png`` and ``tradeoff.png`` (the
  paper's Figures 2 and 1). If the rows span several (norm, eps) threat settings, one pair per
  setting instead, e.g. ``accuracy_vs_alpha_linf_eps0.3.png``, plus ``robust_vs_eps.png``
  (``robust_vs_eps_<norm>.png`` when several norms) for each norm with two or more eps values. If
  the jobs evaluate several base-model pairs (``g_model`` / ``h_model``), every figure is drawn per
  pair, its name ending in ``_pair<k>`` (k counts the pairs in job order) and its title naming the
  models. Plots of an earlier report that this one no longer writes are removed.

The Hydra callback that writes the report when a multirun ends lives with the report task
(`mixrobust.pipelines.report.SweepReport`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from mixrobust.certify.report import CURVE_COLUMNS, plot_certified_accuracy
from mixrobust.certify.report import read_rows as read_curve_rows
from mixrobust.errors import ConfigError
from mixrobust.evaluation.options import option_key
from mixrobust.evaluation.outcomes import COLUMNS, OPTIONAL_COLUMNS
from mixrobust.evaluation.plots import model_pair, plot_accuracy_vs_alpha, plot_accuracy_vs_eps, plot_tradeoff
from mixrobust.evaluation.report import read_results_csv
from mixrobust.runtime.files import csv_text, write_json, write_text
from mixrobust.runtime.jobs import find_job_folders, latest_launch, launch_jobs, read_overrides

log = logging.getLogger(__name__)

REPORT_DIR = "report"
#: The marker of a finished job, by kind: mix (evaluate.py task=mix) and certify (task=certify).
MARKERS = {"run.json": "mix", "certify_summary.json": "certify"}
#: Columns of combined.csv, in order.
COMBINED_COLUMNS = ("job", "overrides", *COLUMNS)
#: What identifies a result row across jobs (everything but the accuracy and the implementation).
ROW_KEY = ("model", "alpha", "r_option", "mix_space", "h_map", "norm", "eps", "attack", "steps", "n", "g_model",
           "h_model")
PLOT_PREFIXES = ("accuracy_vs_alpha", "tradeoff", "robust_vs_eps", "certified_accuracy_")
#: Columns of combined_certified.csv, in order.
CERTIFIED_COLUMNS = ("job", "overrides", "sigma", *CURVE_COLUMNS)


@dataclass
class Job:
    """A completed job: its folder, its name (path relative to the sweep folder), its Hydra
    overrides and its results.csv rows."""

    path: Path
    name: str
    overrides: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    kind: str = "mix"  # "mix": results.csv rows; "certify": certified_accuracy.csv rows


@dataclass
class Report:
    """What `make_report` wrote: the output folder, file name -> path, the jobs used and the
    incomplete job folders left out."""

    out_dir: Path
    files: dict[str, Path]
    jobs: list[Job]
    incomplete: list[Path]


# --- finding jobs --------------------------------------------------------------------------------

def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ConfigError(f"{path} lacks the column(s) {', '.join(missing)}: it was not written by "
                          "evaluate.py task=mix of this version; rerun that job or move it out of the sweep")
    return [{c: row.get(c) for c in COLUMNS} for row in read_results_csv(path)]


def find_jobs(sweep_dir: str | os.PathLike) -> tuple[list[Job], list[Path]]:
    """Completed jobs (with their rows) and incomplete job folders below `sweep_dir`, both sorted
    (see the module docstring)."""
    folders, incomplete = find_job_folders(sweep_dir, tuple(MARKERS), skip=REPORT_DIR)
    jobs = []
    for f in folders:
        kind = MARKERS[f.marker]
        rows = _read_rows(f.path / "results.csv") if kind == "mix" else read_curve_rows(f.path / "certified_accuracy.csv")
        jobs.append(Job(path=f.path, name=f.name, overrides=f.overrides, rows=rows, kind=kind))
    return jobs, incomplete


# --- rows ----------------------------------------------------------------------------------------

def combine(jobs: list[Job]) -> list[dict]:
    """Every row of every mix job, in job order then row order, with leading ``job`` and ``overrides``."""
    return [{"job": job.name, "overrides": " ".join(sorted(job.overrides)), **{c: row[c] for c in COLUMNS}}
            for job in jobs if job.kind == "mix" for row in job.rows]


def combine_certified(jobs: list[Job]) -> list[dict]:
    """Every certified-accuracy row of every certification job, with ``job``, ``overrides`` and h's ``sigma``."""
    out = []
    for job in jobs:
        if job.kind == "certify":
            summary = json.loads((job.path / "certify_summary.json").read_text())
            mode = (summary.get("settings") or {}).get("mode")  # a file written before certified_accuracy.csv had it
            out += [{"job": job.name, "overrides": " ".join(sorted(job.overrides)), "sigma": summary.get("sigma"),
                     **{c: row[c] for c in CURVE_COLUMNS if c != "mode"},
                     "mode": row.get("mode") or ("sound" if row["model"] == "baseline" else mode)}
                    for row in job.rows]
    return out


def _certify_report(jobs: list[Job], out: Path, plots: bool) -> dict[str, Path]:
    """combined_certified.csv and, with plots, one Figure-3 plot per certification job."""
    rows = combine_certified(jobs)
    files = {"combined_certified.csv": write_text(out / "combined_certified.csv",
                                                  csv_text(CERTIFIED_COLUMNS, rows))}
    for job in (j for j in jobs if j.kind == "certify") if plots else ():
        summary = json.loads((job.path / "certify_summary.json").read_text())
        name = f"certified_accuracy_{job.name.replace('/', '_')}.png"
        files[name] = plot_certified_accuracy(job.rows, out / name, summary.get("alpha_selection", {}).get("alpha"),
                                              title=f"job {job.name}: h sigma={summary.get('sigma')}, "
                                                    + " ".join(sorted(job.overrides)))
    return files


def _key(row: dict) -> tuple:
    """The row's `ROW_KEY` values (NaN as None; a mixture row of an earlier version, without h_map, is linear)."""
    row = {**row, "h_map": option_key(row)[2]} if row["model"] == "mix" else row
    return tuple(None if isinstance(row.get(k), float) and math.isnan(row[k]) else row.get(k) for k in ROW_KEY)


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def dedupe_for_plots(rows: list[dict]) -> list[dict]:
    """One row per `ROW_KEY`, the first seen. Rows with the same key but different accuracies (jobs
    that differ in something else than alpha, eps or the base models, e.g. the seed) give one warning per
    pair of jobs."""
    kept: dict[tuple, dict] = {}
    conflicts: dict[tuple[str, str], list[tuple]] = {}
    for row in rows:
        key = _key(row)
        first = kept.setdefault(key, row)
        if first is not row and not _same(first["accuracy"], row["accuracy"]):
            conflicts.setdefault((first.get("job", "?"), row.get("job", "?")), []).append(
                (key, first["accuracy"], row["accuracy"]))
    for (job_a, job_b), items in conflicts.items():
        key, acc_a, acc_b = items[0]
        log.warning("jobs %s and %s disagree on %d result row(s), e.g. %s: accuracy %r vs %r; the plots use "
                    "job %s's (do the jobs differ in more than alpha, eps or the base models, e.g. the seed?)",
                    job_a, job_b, len(items), ", ".join(f"{k}={v}" for k, v in zip(ROW_KEY, key) if v is not None),
                    acc_a, acc_b, job_a)
    return list(kept.values())


# --- plots ---------------------------------------------------------------------------------------

def _eps_label(eps: float) -> str:
    return f"{eps:.6g}"


def write_plots(rows: list[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """The report's figures from deduplicated rows (see the module docstring); name -> path. Rows of several
    base-model pairs (jobs that sweep the checkpoints) get one set of figures per pair, ``..._pair2.png`` for
    the second pair in job order, each titled with its models."""
    pairs = list(dict.fromkeys(model_pair(r) for r in rows))
    if len(pairs) == 1:
        return _threat_plots(rows, Path(out_dir), "")
    paths: dict[str, Path] = {}
    for k, pair in enumerate(pairs, 1):
        log.info("plots *_pair%d.png: g %s, h %s", k, *(m or "(not recorded)" for m in pair))
        paths.update(_threat_plots([r for r in rows if model_pair(r) == pair], Path(out_dir), f"_pair{k}"))
    return paths


def _threat_plots(rows: list[dict], out: Path, tail: str) -> dict[str, Path]:
    """The accuracy-vs-alpha and trade-off figures per (norm, eps) setting and the accuracy-vs-eps figures of
    rows of one model pair; `tail` ends every file stem."""
    settings = sorted({(r["norm"], r["eps"]) for r in rows}, key=lambda s: (str(s[0]), s[1] or 0.0))
    labels = [_eps_label(eps) if eps is not None else "none" for _, eps in settings]
    if len({(n, lab) for (n, _), lab in zip(settings, labels)}) < len(settings):
        labels = [repr(eps) for _, eps in settings]
    paths: dict[str, Path] = {}
    for (norm, eps), label in zip(settings, labels):
        part = [r for r in rows if (r["norm"], r["eps"]) == (norm, eps)]
        suffix = "" if len(settings) == 1 else f"_{norm}_eps{label}"
        if not any(r["model"] == "mix" for r in part):
            log.warning("no mixture rows for %s eps=%s: no accuracy-vs-alpha plots for it", norm, label)
            continue
        for column in ("n", "steps"):
            values = {r[column] for r in part if r["attack"] != "clean" and r[column] is not None}
            if len(values) > 1:
                log.warning("the %s eps=%s rows come from jobs with different %s (%s): the plots overlay them",
                            norm, label, column, ", ".join(map(str, sorted(values))))
        for stem, plot in (("accuracy_vs_alpha", plot_accuracy_vs_alpha), ("tradeoff", plot_tradeoff)):
            name = f"{stem}{suffix}{tail}.png"
            paths[name] = plot(part, out / name)
    if len(settings) > 1:
        norms = sorted({str(n) for n, _ in settings})
        for norm in norms:
            part = [r for r in rows if str(r["norm"]) == norm]
            if len({r["eps"] for r in part}) > 1:
                name = ("robust_vs_eps" if len(norms) == 1 else f"robust_vs_eps_{norm}") + f"{tail}.png"
                paths[name] = plot_accuracy_vs_eps(part, out / name)
    return paths


def _remove_stale_plots(out: Path, keep: dict[str, Path]) -> None:
    for path in sorted(out.glob("*.png")):
        if path.name not in keep and path.name.startswith(PLOT_PREFIXES):
            log.info("removing %s from an earlier report", path)
            path.unlink(missing_ok=True)


# --- the report ----------------------------------------------------------------------------------

def _no_jobs_message(root: Path, incomplete: list[Path]) -> str:
    msg = (f"no completed job in {root}: a job folder must hold an intact run.json (evaluate.py task=mix writes "
           "it last, when the job finished) or certify_summary.json (task=certify); pass the folder of a "
           "`python evaluate.py -m ...` run (its hydra.sweep.dir, e.g. multirun/evaluate/<date>)")
    if incomplete:
        msg += f"; {len(incomplete)} incomplete job(s): {', '.join(_name(p, root) for p in incomplete)}"
    return msg


def make_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                plots: bool = True) -> Report:
    """Write the report of the sweep in `sweep_dir` (see the module docstring)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ConfigError(f"sweep folder {root} does not exist (or is not a folder); pass the folder of a "
                          "`python evaluate.py -m ...` run (its hydra.sweep.dir, e.g. multirun/evaluate/<date>)")
    jobs, incomplete = find_jobs(root)
    wanted, stale = latest_launch(root), []
    if wanted is not None:  # jobs of an earlier launch with another grid, or a job's extra folders, are left out
        jobs, stale = launch_jobs(jobs, wanted, root, tuple(MARKERS))
        if stale:
            log.warning("%d job folder(s) in %s are not part of the latest launch (multirun.yaml) or another folder "
                        "of their job counts; left out: %s", len(stale), root, ", ".join(j.name for j in stale))
    if not jobs:
        raise ConfigError(_no_jobs_message(root, incomplete))
    if incomplete:
        log.warning("%d job folder(s) in %s hold no finished results (still running or failed); left out: %s",
                    len(incomplete), root, ", ".join(_name(p, root) for p in incomplete))
    out = Path(out_dir) if out_dir is not None else root / REPORT_DIR
    rows = combine(jobs)
    files = {"combined.csv": write_text(out / "combined.csv", csv_text(COMBINED_COLUMNS, rows))} if rows else {}
    if any(j.kind == "certify" for j in jobs):
        files.update(_certify_report(jobs, out, plots))
    files.update({
        "jobs.json": write_json(out / "jobs.json", {
            "completed": [{"job": j.name, "overrides": j.overrides, "rows": len(j.rows)} for j in jobs],
            "incomplete": [{"job": _name(p, root), "overrides": read_overrides(p)} for p in incomplete],
            "stale": [{"job": j.name, "overrides": j.overrides} for j in stale],
            "missing": [] if wanted is None else sorted(
                sorted(w) for w in set(wanted) - {frozenset(j.overrides) for j in jobs}),
        }),
    })
    if plots and rows:
        files.update(write_plots(dedupe_for_plots(rows), out))
    _remove_stale_plots(out, files)
    return Report(out_dir=out, files=files, jobs=jobs, incomplete=incomplete)


def write_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """`make_report`, returning file name -> path."""
    return make_report(sweep_dir, out_dir, plots).files
