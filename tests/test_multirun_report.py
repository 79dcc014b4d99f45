"""The multirun sweep report on hand-built sweep folders: combined.csv against hand-computed rows,
byte-stability, incomplete and damaged jobs (markers with file checksums), errors, conflicting rows,
eps sweeps, the latest launch (basic and checked sweepers), the Hydra callback and the
``task=report`` pipeline (W&B through fakes)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import yaml
from omegaconf import OmegaConf

from hydra.errors import CompactHydraException

from mixrobust.errors import ConfigError
from mixrobust.evaluation import multirun
from mixrobust.evaluation.multirun import combine, dedupe_for_plots, find_jobs, make_report, write_report
from mixrobust.evaluation.outcomes import COLUMNS
from mixrobust.evaluation.plots import models_line
from mixrobust.evaluation.report import rows_to_csv
from mixrobust.pipelines import report as report_pipeline
from mixrobust.pipelines.report import ReportResult, SweepReport
from mixrobust.runtime import loggers, resume
from mixrobust.runtime.hydra_job import HydraJob
from mixrobust.runtime.jobs import find_job_folders, in_launch, latest_launch, read_overrides
from mixrobust.runtime.resume import finished, read_marker, write_marker

N = 96
OPTIONS = (("one", "prob"), ("one", "logit"))
MIX_ATTACKS = ("clean", "std", "rob", "mix", "worst")
BASE_ATTACKS = ("clean", "std", "rob", "worst")
ALPHAS = (0.25, 0.5, 0.75)
IMPL = {a: "mixrobust 0.1.0" for a in ("std", "rob", "mix", "worst")}  # the rows' implementation column
MODELS = {"g_model": "g/best.ckpt sha256:0123456789ab", "h_model": "robustbench:cifar10/Linf/Standard sha256:ba9876543210"}


def base_rows(eps: float = 0.3, shift: int = 0) -> list[dict]:
    return [{"model": m, "alpha": math.nan, "r_option": None, "mix_space": None, "norm": "linf", "eps": eps,
             "attack": a, "implementation": IMPL.get(a), "steps": 0 if a == "clean" else 10,
             "accuracy": (90 - 20 * i - 7 * j + shift) / N, "n": N, **MODELS}
            for i, m in enumerate("gh") for j, a in enumerate(BASE_ATTACKS)]


def mix_rows(alpha: float, eps: float = 0.3) -> list[dict]:
    return [{"model": "mix", "alpha": alpha, "r_option": r, "mix_space": s, "norm": "linf", "eps": eps,
             "attack": a, "implementation": IMPL.get(a), "steps": 0 if a == "clean" else 10,
             "accuracy": (int(80 * alpha) + 3 * k - 5 * j - int(eps * 10)) / N, "n": N, **MODELS}
            for k, (r, s) in enumerate(OPTIONS) for j, a in enumerate(MIX_ATTACKS)]


def alpha_job(alpha: float, eps: float = 0.3) -> tuple[list[str], list[dict]]:
    return ([f"threat.eps={eps}", f"mix.alphas=[{alpha}]", "mix.mix_spaces=[prob,logit]"],
            base_rows(eps) + mix_rows(alpha, eps))


FP = "f" * 64  # the fingerprint the hand-built jobs' markers record
CHECKED_SWEEPER = "hydra_plugins.mixrobust_sweeper.checked_sweeper.CheckedSweeper"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@contextmanager
def running_job(overrides: list[str]):
    """`current_job()` as seen by a job launched with `overrides` (the marker records them)."""
    with mock.patch.object(resume, "current_job", lambda: HydraJob(overrides=list(overrides))):
        yield


def mark_finished(job: Path, marker: str, content: dict, files: list[str], overrides: list[str] | None = None) -> Path:
    """Write the job's marker last, as a finished job does: its content, checksums and overrides."""
    with running_job(read_overrides(job) if overrides is None else overrides):
        return write_marker(job, marker, content, FP, files)


def make_job(sweep: Path, name: str, overrides: list[str], rows: list[dict], complete: bool = True,
             seconds: float = 1.0) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text("task: mix\n")
    (job / "run.json").unlink(missing_ok=True)  # a re-run clears its old marker first
    (job / "results.csv").write_text(rows_to_csv(rows))
    if complete:
        mark_finished(job, "run.json", {"seconds": seconds, "output_dir": str(job)}, ["results.csv"])
    return job


def alpha_sweep(sweep: Path, order=(0, 1, 2)) -> Path:
    for i in order:
        make_job(sweep, str(i), *alpha_job(ALPHAS[i]), seconds=10.0 + i)
    return sweep


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def test_combined_csv_equals_hand_computed_rows(tmp_path):
    sweep = alpha_sweep(tmp_path / "sweep", order=(2, 0, 1))
    files = write_report(sweep, plots=False)
    assert set(files) == {"combined.csv", "jobs.json"}
    assert files["combined.csv"] == sweep / "report" / "combined.csv"
    expected = []
    for i, alpha in enumerate(ALPHAS):
        overrides, rows = alpha_job(alpha)
        for row in rows:
            expected.append({"job": str(i), "overrides": " ".join(sorted(overrides)),
                             **{c: cell(row.get(c)) for c in COLUMNS}})  # rows without h_map: empty
    assert files["combined.csv"].read_text().splitlines()[0] == ",".join(("job", "overrides", *COLUMNS))
    assert read_csv(files["combined.csv"]) == expected
    assert float(read_csv(files["combined.csv"])[0]["accuracy"]) == 90 / N  # full precision


def test_dedupe_keeps_one_row_per_key(tmp_path):
    jobs, _ = find_jobs(alpha_sweep(tmp_path))
    rows = combine(jobs)
    assert len(rows) == 3 * (8 + 2 * 5)
    deduped = dedupe_for_plots(rows)
    assert len(deduped) == 8 + 3 * 2 * 5
    assert sum(r["model"] == "g" for r in deduped) == 4
    assert [r["job"] for r in deduped if r["model"] != "mix"] == ["0"] * 8


def test_combined_csv_is_byte_identical_across_order_rewrite_and_resume(tmp_path):
    a = write_report(alpha_sweep(tmp_path / "a", order=(0, 1, 2)), plots=False)["combined.csv"].read_bytes()
    sweep_b = alpha_sweep(tmp_path / "b", order=(2, 1, 0))
    overrides, rows = alpha_job(ALPHAS[1])  # job 1 re-run: new timings, overrides in another order, same results
    make_job(sweep_b, "1", overrides[::-1], rows, seconds=99.0)
    b = write_report(sweep_b, plots=False)["combined.csv"].read_bytes()
    assert a == b
    again = write_report(sweep_b, plots=False)["combined.csv"].read_bytes()  # report/ exists now: skipped
    assert again == a
    assert b"99" not in a and str(tmp_path).encode() not in a


def test_job_order_is_numeric_and_skips_report_and_dot_folders(tmp_path):
    _, rows = alpha_job(0.5)
    for name in ("10", "2", "b/1", "report/9", ".cache/5"):
        make_job(tmp_path, name, [], rows)
    jobs, incomplete = find_jobs(tmp_path)
    assert [j.name for j in jobs] == ["2", "10", "b/1"]
    assert incomplete == []


def test_incomplete_job_is_left_out_and_listed(tmp_path, caplog):
    sweep = alpha_sweep(tmp_path)
    make_job(sweep, "3", ["mix.alphas=[1.0]"], base_rows() + mix_rows(1.0), complete=False)
    with caplog.at_level(logging.WARNING):
        files = write_report(sweep, plots=False)
    assert {r["job"] for r in read_csv(files["combined.csv"])} == {"0", "1", "2"}
    info = json.loads(files["jobs.json"].read_text())
    assert [j["job"] for j in info["completed"]] == ["0", "1", "2"]
    assert info["incomplete"] == [{"job": "3", "overrides": ["mix.alphas=[1.0]"]}]
    assert any("left out: 3" in r.getMessage() for r in caplog.records)


def test_missing_or_empty_sweep_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no completed job.*intact run.json.*certify_summary.json"):
        write_report(tmp_path)
    make_job(tmp_path, "0", [], base_rows(), complete=False)
    with pytest.raises(ConfigError, match="1 incomplete job") as info:
        write_report(tmp_path)
    assert isinstance(info.value, CompactHydraException) and isinstance(info.value, ValueError)
    assert not (tmp_path / "report").exists()


def test_conflicting_base_rows_warn_and_keep_the_first(tmp_path, caplog):
    sweep = alpha_sweep(tmp_path)
    make_job(sweep, "1", ["mix.alphas=[0.5]"], base_rows(shift=1) + mix_rows(0.5))
    jobs, _ = find_jobs(sweep)
    with caplog.at_level(logging.WARNING):
        deduped = dedupe_for_plots(combine(jobs))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "jobs 0 and 1 disagree on 8 result row(s)" in warnings[0]
    assert [r["accuracy"] for r in deduped if r["model"] != "mix"] == [r["accuracy"] for r in base_rows()]


def test_no_warning_without_conflicts(tmp_path, caplog):
    jobs, _ = find_jobs(alpha_sweep(tmp_path))
    with caplog.at_level(logging.WARNING):
        dedupe_for_plots(combine(jobs))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_single_setting_plots(tmp_path):
    files = write_report(alpha_sweep(tmp_path))
    assert set(files) == {"combined.csv", "jobs.json", "accuracy_vs_alpha.png", "tradeoff.png"}
    assert all(files[k].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for k in files if k.endswith(".png"))


def test_eps_sweep_writes_plots_per_setting(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, "0", *alpha_job(0.5, eps=0.1))
    make_job(sweep, "1", *alpha_job(1.0, eps=0.1))
    assert "accuracy_vs_alpha.png" in write_report(sweep)  # one setting so far
    make_job(sweep, "2", *alpha_job(0.5, eps=0.3))
    make_job(sweep, "3", *alpha_job(1.0, eps=0.3))
    files = write_report(sweep)
    expected = {f"{stem}_linf_eps{eps}.png" for stem in ("accuracy_vs_alpha", "tradeoff") for eps in ("0.1", "0.3")}
    assert set(files) == {"combined.csv", "jobs.json", "robust_vs_eps.png"} | expected
    for name in files:
        assert (sweep / "report" / name).is_file()
    # the single-setting plots of the earlier report would be stale: removed
    assert not (sweep / "report" / "accuracy_vs_alpha.png").exists()
    assert not (sweep / "report" / "tradeoff.png").exists()


def test_a_checkpoint_sweep_gets_plots_per_model_pair(tmp_path, caplog, monkeypatch):
    sweep = tmp_path / "sweep"
    other = {**MODELS, "h_model": "h2/best.ckpt sha256:fedcba987654"}
    for i, models in enumerate((MODELS, other)):  # the same alphas, another h: no conflict, a second pair
        for j, alpha in enumerate((0.5, 1.0)):
            overrides, rows = alpha_job(alpha)
            make_job(sweep, str(2 * i + j), overrides + [f"h_ckpt=h{i}"],
                     [{**r, **models, "accuracy": r["accuracy"] - i / N} for r in rows])
    drawn, real = {}, multirun.plot_accuracy_vs_alpha

    def spy(rows, path):
        drawn[Path(path).name] = rows
        return real(rows, path)

    monkeypatch.setattr(multirun, "plot_accuracy_vs_alpha", spy)
    with caplog.at_level(logging.WARNING):
        files = write_report(sweep)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert set(files) == {"combined.csv", "jobs.json"} | {f"{stem}_pair{k}.png" for stem in ("accuracy_vs_alpha",
                                                                                               "tradeoff") for k in (1, 2)}
    for k, models in ((1, MODELS), (2, other)):
        rows = drawn[f"accuracy_vs_alpha_pair{k}.png"]
        assert {(r["g_model"], r["h_model"]) for r in rows} == {(models["g_model"], models["h_model"])}
        mix = {(r["alpha"], r["r_option"], r["mix_space"], r["attack"]): r["accuracy"] for r in rows if r["model"] == "mix"}
        expected = {(a, r["r_option"], r["mix_space"], r["attack"]): r["accuracy"] - (k - 1) / N
                    for a in (0.5, 1.0) for r in mix_rows(a)}
        assert mix == expected
    assert models_line(drawn["accuracy_vs_alpha_pair2.png"]) == f"\ng: {MODELS['g_model']}, h: {other['h_model']}"
    assert models_line(combine(find_jobs(sweep)[0])) == ""  # two pairs: no single line


def test_callback_writes_the_report(tmp_path):
    sweep = alpha_sweep(tmp_path / "multirun" / "2024-01-01_00-00-00")
    cfg = OmegaConf.create({"plots": False, "hydra": {"sweep": {"dir": str(sweep)}}})
    SweepReport().on_multirun_end(config=cfg, config_name="evaluate")
    assert len(read_csv(sweep / "report" / "combined.csv")) == 3 * 18
    assert not (sweep / "report" / "tradeoff.png").exists()


def test_callback_skips_a_sweep_without_completed_jobs(tmp_path, caplog):
    make_job(tmp_path, "0", [], base_rows(), complete=False)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with caplog.at_level(logging.INFO):
        SweepReport().on_multirun_end(config=cfg)
    assert not (tmp_path / "report").exists()
    assert any("no completed job" in r.getMessage() for r in caplog.records)


def test_report_pipeline(tmp_path):
    sweep = alpha_sweep(tmp_path / "sweep")
    make_job(sweep, "3", [], base_rows(), complete=False)
    out = tmp_path / "out"
    cfg = OmegaConf.create({"task": "report", "plots": False, "logger": None,
                            "report": {"dir": str(sweep), "out_dir": str(out)}})
    result = report_pipeline.run(cfg)
    assert isinstance(result, ReportResult)
    assert result.jobs == 3 and result.incomplete == ["3"]
    assert result.output_dir == out
    assert result.files == {"combined.csv": str(out / "combined.csv"), "jobs.json": str(out / "jobs.json")}
    assert (out / "combined.csv").is_file() and not (sweep / "report").exists()
    assert result.text() == "report of 3 finished job(s); incomplete, left out: 3"
    assert report_pipeline.run(OmegaConf.create({"plots": False, "report": {"dir": str(sweep), "out_dir": None}})
                               ).output_dir == sweep / "report"  # the default folder
    with pytest.raises(ConfigError, match="report.dir="):
        report_pipeline.run(OmegaConf.create({"report": {"dir": "???"}, "plots": False}))


@pytest.mark.parametrize(("report", "match"), [
    ({"dir": None}, "missing report.dir"),
    ({"dir": "???"}, "report.dir="),
    ({"dir": "does/not/exist"}, "is not a folder"),
])
def test_report_settings_reject_a_missing_folder(tmp_path, monkeypatch, report, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=match):
        report_pipeline.settings(OmegaConf.create({"report": report, "plots": False}))


def test_report_settings(tmp_path):
    sweep = alpha_sweep(tmp_path / "sweep")
    s = report_pipeline.settings(OmegaConf.create({"report": {"dir": str(sweep), "out_dir": None}, "plots": False,
                                                   "logger": None}))
    assert (s.report.dir, s.report.out_dir, s.plots, s.logger) == (sweep, None, False, None)
    s = report_pipeline.settings(OmegaConf.create({"report": {"dir": str(sweep)}}))
    assert s.plots is True  # plots by default
    with pytest.raises(ConfigError, match="plots"):
        report_pipeline.settings(OmegaConf.create({"report": {"dir": str(sweep)}, "plots": "maybe"}))


def test_report_result_text_without_incomplete_jobs(tmp_path):
    assert ReportResult({}, 2, [], tmp_path).text() == "report of 2 finished job(s)"


def test_report_pipeline_logs_to_wandb(tmp_path, monkeypatch):
    logged, seen = {}, {}

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Image:
        def __init__(self, path):
            self.path = path

    fake = types.SimpleNamespace(Table=Table, Image=Image, run=None, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)

    class WandbLogger:
        experiment = types.SimpleNamespace(log=logged.update)

    def build_logger(node, output_dir, task, **overrides):
        seen.update(group=overrides["group"], output_dir=str(output_dir), task=task)
        return WandbLogger()

    monkeypatch.setattr(loggers, "build_logger", build_logger)
    monkeypatch.chdir(tmp_path)
    sweep = alpha_sweep(tmp_path / "multirun" / "2024-05-06_07-08-09")
    cfg = OmegaConf.create({"plots": True, "report": {"dir": str(sweep) + "/"},
                            "logger": {"_target_": "lightning.pytorch.loggers.WandbLogger", "group": None}})
    report_pipeline.run(cfg)
    # the group the jobs got from hydra.sweep.dir (relative to the working directory)
    assert seen == {"group": "multirun/2024-05-06_07-08-09", "output_dir": str(sweep / "report"), "task": "report"}
    assert cfg.logger.group is None  # the caller's config is left alone
    table = logged["report/combined"]
    assert table.columns == ["job", "overrides", *COLUMNS] and len(table.data) == 3 * 18
    assert table.data[0][3] is None  # the base rows' NaN alpha
    assert {k for k in logged if k != "report/combined"} == {"report/accuracy_vs_alpha", "report/tradeoff"}
    cfg.logger.group = "fig2"  # an explicit logger.group wins (the jobs used it too)
    report_pipeline.run(cfg)
    assert seen["group"] == "fig2"


@pytest.mark.parametrize("sweeper", [BASIC_SWEEPER, CHECKED_SWEEPER])
def test_jobs_of_an_earlier_launch_are_left_out_and_missing_ones_listed(tmp_path, sweeper):
    """multirun.yaml (written by Hydra at each launch) says which jobs the latest launch asked for."""
    sweep = alpha_sweep(tmp_path / "sweep")  # three jobs: alphas 0.25, 0.5, 0.75
    make_job(sweep, "3", *alpha_job(0.5))  # an older launch's job 3 with a grid point the new launch has as job 1
    multirun = {"hydra": {"sweeper": {"_target_": sweeper,
                                      "params": {"mix.alphas": "[0.25],[0.5],[0.9]"}},
                          "overrides": {"task": ["threat.eps=0.3", "mix.mix_spaces=[prob,logit]"]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    write_report(sweep)
    jobs = json.loads((sweep / "report" / "jobs.json").read_text())
    assert [j["job"] for j in jobs["completed"]] == ["0", "1"]
    assert [j["job"] for j in jobs["stale"]] == ["2", "3"]  # alpha 0.75 is not in the grid; 3 is not its job 1
    assert jobs["missing"] == [sorted(["mix.alphas=[0.9]", "threat.eps=0.3", "mix.mix_spaces=[prob,logit]"])]
    assert {r["job"] for r in read_csv(sweep / "report" / "combined.csv")} == {"0", "1"}


def _seed_launch(sweep: Path) -> list[str]:
    """A seed sweep's multirun.yaml (jobs 0 and 1: seed 0 and 1 at alpha 0.5); the overrides of job 1."""
    _write_multirun_yaml(sweep, BASIC_SWEEPER, {"seed": "0,1"}, alpha_job(0.5)[0])
    return [*alpha_job(0.5)[0], "seed=1"]


def _finished_at(job: Path, seconds: int) -> None:
    os.utime(job / "run.json", ns=(seconds * 10**9, seconds * 10**9))


def test_an_earlier_version_s_folder_of_a_re_run_job_is_stale(tmp_path):
    """A sweep folder made before job folders were named ``<num>_<grid values>``, re-run by the same launch:
    ``1`` (old results, e.g. at another default eps) and ``1_seed=1`` hold the same job; the new name counts."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    job1 = _seed_launch(sweep)
    old_rows = [{**r, "accuracy": r["accuracy"] / 2} for r in alpha_job(0.5)[1]]
    make_job(sweep, "0", [*alpha_job(0.5)[0], "seed=0"], old_rows)  # job 0 not re-run yet: its only folder
    _finished_at(make_job(sweep, "1_seed=1", job1, alpha_job(0.5)[1]), 1_000)
    _finished_at(make_job(sweep, "1", job1[::-1], old_rows), 2_000)  # finished later: the name decides
    report = make_report(sweep, plots=False)
    assert [j.name for j in report.jobs] == ["0", "1_seed=1"]
    info = json.loads(report.files["jobs.json"].read_text())
    assert [j["job"] for j in info["completed"]] == ["0", "1_seed=1"]
    assert info["stale"] == [{"job": "1", "overrides": job1[::-1]}] and info["missing"] == []
    rows = read_csv(report.files["combined.csv"])
    assert len(rows) == 2 * len(alpha_job(0.5)[1])  # no job's rows twice
    assert [float(r["accuracy"]) for r in rows if r["job"] == "1_seed=1"] == [r["accuracy"] for r in alpha_job(0.5)[1]]


def test_of_a_job_s_folders_with_other_names_the_last_finished_counts(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    job1 = _seed_launch(sweep)
    make_job(sweep, "0_seed=0", [*alpha_job(0.5)[0], "seed=0"], alpha_job(0.5)[1])
    _finished_at(make_job(sweep, "1_s=1", job1, alpha_job(0.5)[1]), 2_000)  # neither is named "1_seed=1"
    _finished_at(make_job(sweep, "1_old", job1, [{**r, "accuracy": 0.0} for r in alpha_job(0.5)[1]]), 1_000)
    info = json.loads(write_report(sweep, plots=False)["jobs.json"].read_text())
    assert [j["job"] for j in info["completed"]] == ["0_seed=0", "1_s=1"]
    assert info["stale"] == [{"job": "1_old", "overrides": job1}]
    assert {r["job"] for r in read_csv(sweep / "report" / "combined.csv")} == {"0_seed=0", "1_s=1"}


def test_certification_jobs_get_a_combined_csv_and_one_figure_each(tmp_path):
    sweep = tmp_path / "sweep"
    for i, sigma in enumerate((0.25, 0.5)):
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"h_ckpt=rs{sigma}.ckpt"]))
        # job 0 is plug-in, written before the files had a mode column (its summary's settings say it); job 1 sound
        mode = {} if i == 0 else {"mode": "sound"}
        rows = [{"model": "mix", "alpha": a, "theorem": t, **mode, "radius": r,
                 "certified_accuracy": (1 - r) * a * (1 - i / 4)}
                for a in (0.5, 1.0) for t in ("rs", "lipschitz") for r in (0.0, 0.5)]
        rows.append({"model": "baseline", "alpha": "", "theorem": "cohen", **mode, "radius": 0.0,
                     "certified_accuracy": 0.7})
        with open(job / "certified_accuracy.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        mark_finished(job, "certify_summary.json", {"sigma": sigma, "alpha_selection": {"alpha": 0.5},
                                                    "settings": {"mode": "plugin" if i == 0 else "sound"}},
                      ["certified_accuracy.csv"])
    files = write_report(sweep)
    assert "combined.csv" not in files and {"certified_accuracy_0.png", "certified_accuracy_1.png"} <= set(files)
    combined = read_csv(sweep / "report" / "combined_certified.csv")
    assert len(combined) == 2 * 9 and list(combined[0]) == ["job", "overrides", "sigma", "model", "alpha", "theorem",
                                                            "mode", "radius", "certified_accuracy"]
    assert {(r["job"], r["sigma"]) for r in combined} == {("0", "0.25"), ("1", "0.5")}
    # every row says whether its radii are sound; the baseline's CERTIFY always is
    assert {(r["job"], r["model"], r["mode"]) for r in combined} == {
        ("0", "mix", "plugin"), ("0", "baseline", "sound"), ("1", "mix", "sound"), ("1", "baseline", "sound")}
    got = [float(r["certified_accuracy"]) for r in combined if r["job"] == "1" and r["model"] == "mix"]
    assert got == pytest.approx([(1 - r) * a * 0.75 for a in (0.5, 1.0) for _ in range(2) for r in (0.0, 0.5)])


def test_results_of_an_earlier_launch_under_new_overrides_are_left_out(tmp_path):
    """A job that failed early in a later launch keeps old results next to its new .hydra/overrides.yaml."""
    sweep = alpha_sweep(tmp_path / "sweep")
    for name in ("0", "1"):
        overrides = read_overrides(sweep / name)
        # written under the overrides in another order: the order does not matter
        mark_finished(sweep / name, "run.json", {"seconds": 1.0}, ["results.csv"], overrides=overrides[::-1])
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["mix.alphas=[0.9]"]))  # relaunched
    jobs, incomplete = find_jobs(sweep)
    assert [j.name for j in jobs] == ["0", "2"] and [p.name for p in incomplete] == ["1"]


# --- finished jobs: markers with file checksums ------------------------------------------------------


def warning_texts(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_results_csv_edited_after_the_marker_makes_the_job_incomplete(tmp_path, caplog):
    sweep = alpha_sweep(tmp_path / "sweep")
    edited = sweep / "1" / "results.csv"
    edited.write_text(edited.read_text().replace(repr(90 / N), repr(91 / N), 1))  # one accuracy, by hand
    with caplog.at_level(logging.WARNING):
        files = write_report(sweep, plots=False)
    info = json.loads(files["jobs.json"].read_text())
    assert [j["job"] for j in info["completed"]] == ["0", "2"]
    assert info["incomplete"] == [{"job": "1", "overrides": alpha_job(ALPHAS[1])[0]}]
    assert {r["job"] for r in read_csv(files["combined.csv"])} == {"0", "2"}
    warnings = warning_texts(caplog)
    assert any(str(edited) in w and "does not match the checksum recorded in run.json" in w for w in warnings)
    assert any("left out: 1" in w for w in warnings)
    caplog.clear()
    with running_job(alpha_job(ALPHAS[1])[0]), caplog.at_level(logging.WARNING):
        assert finished(sweep / "1", "run.json", FP, ["results.csv"]) is None
    assert any(str(edited) in w for w in warning_texts(caplog))
    with running_job(alpha_job(ALPHAS[0])[0]):  # an untouched job of the same sweep is finished
        done = finished(sweep / "0", "run.json", FP, ["results.csv"])
    assert done is not None and done["seconds"] == 10.0 and done["fingerprint"] == FP


def test_edited_certification_results_make_the_job_incomplete(tmp_path, caplog):
    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["h_ckpt=rs0.25.ckpt"]))
    curve = job / "certified_accuracy.csv"
    curve.write_text("model,alpha,theorem,radius,certified_accuracy\nmix,0.5,rs,0.0,0.5\n")
    mark_finished(job, "certify_summary.json", {"sigma": 0.25}, [curve.name])
    assert [j.kind for j in find_jobs(tmp_path / "sweep")[0]] == ["certify"]
    curve.write_text(curve.read_text().replace("0.0,0.5", "0.0,0.6"))
    with caplog.at_level(logging.WARNING):
        jobs, incomplete = find_jobs(tmp_path / "sweep")
    assert jobs == [] and incomplete == [job]
    assert any("certified_accuracy.csv does not match the checksum recorded in certify_summary.json" in w
               for w in warning_texts(caplog))


def _marker_without_checksums(job: Path) -> None:  # written by an older version
    (job / "run.json").write_text(json.dumps({"seconds": 1.0, "fingerprint": FP, "overrides": read_overrides(job)}))


def _checksums_not_a_mapping(job: Path) -> None:
    content = json.loads((job / "run.json").read_text())
    (job / "run.json").write_text(json.dumps({**content, "checksums": ["results.csv"]}))


def _truncated_marker(job: Path) -> None:
    data = (job / "run.json").read_bytes()
    (job / "run.json").write_bytes(data[: len(data) // 2])


def _results_deleted(job: Path) -> None:
    (job / "results.csv").unlink()


def _results_truncated(job: Path) -> None:
    data = (job / "results.csv").read_bytes()
    (job / "results.csv").write_bytes(data[:-10])


@pytest.mark.parametrize(("damage", "warning"), [
    (_marker_without_checksums, "lacks file checksums"),
    (_checksums_not_a_mapping, "lacks file checksums"),
    (_truncated_marker, "is unreadable"),
    (_results_deleted, "results.csv is missing"),
    (_results_truncated, "does not match the checksum"),
])
def test_a_job_with_a_damaged_or_old_marker_is_not_finished(tmp_path, caplog, damage, warning):
    sweep = alpha_sweep(tmp_path / "sweep")
    damage(sweep / "2")
    overrides = read_overrides(sweep / "2")
    with caplog.at_level(logging.WARNING):
        assert read_marker(sweep / "2", "run.json") is None
        with running_job(overrides):
            assert finished(sweep / "2", "run.json", FP, ["results.csv"]) is None
        jobs, incomplete = find_jobs(sweep)
    assert [j.name for j in jobs] == ["0", "1"] and incomplete == [sweep / "2"]
    assert any(warning in w for w in warning_texts(caplog))
    info = json.loads(write_report(sweep, plots=False)["jobs.json"].read_text())
    assert info["incomplete"] == [{"job": "2", "overrides": overrides}]


def test_finished_needs_the_same_fingerprint_and_every_file(tmp_path, caplog):
    job = make_job(tmp_path, "0", *alpha_job(0.5))
    overrides = read_overrides(job)
    with running_job(overrides), caplog.at_level(logging.WARNING):
        assert finished(job, "run.json", "0" * 64, ["results.csv"]) is None
        assert any("different configuration" in w for w in warning_texts(caplog))
        assert finished(job, "run.json", FP, ["results.csv", "results.json"]) is None  # not recorded
        assert any("lacks results.json" in w for w in warning_texts(caplog))
        assert finished(job, "run.json", FP, ["results.csv"])["checksums"] == {
            "results.csv": resume.sha256_file(job / "results.csv")}
    assert finished(tmp_path / "nothing", "run.json", FP, []) is None  # no marker: not finished, no warning


def test_a_finished_job_found_by_another_launch_is_adopted(tmp_path):
    job = make_job(tmp_path, "0", *alpha_job(0.5))
    before = json.loads((job / "run.json").read_text())
    with running_job(alpha_job(0.5)[0]):  # the same job: the marker is left as it is
        assert finished(job, "run.json", FP, ["results.csv"]) is not None
    assert json.loads((job / "run.json").read_text()) == before
    with running_job(alpha_job(0.5)[0][::-1]):  # the same overrides in another order: still this job's results
        assert finished(job, "run.json", FP, ["results.csv"]) is not None
    assert [j.name for j in find_jobs(tmp_path)[0]] == ["0"]
    with running_job(["mix.alphas=[0.5]"]):  # a job with other overrides took this folder over
        assert finished(job, "run.json", FP, ["results.csv"]) is not None
    after = read_marker(job, "run.json")
    assert after == {**before, "overrides": ["mix.alphas=[0.5]"]}  # still intact, under the new overrides
    # the folder's .hydra/overrides.yaml still names the old job: not counted as its results
    assert [p.name for p in find_jobs(tmp_path)[1]] == ["0"]


def test_write_marker_records_checksums_and_overrides_and_never_itself(tmp_path):
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "b.json").write_text("{}")
    with running_job(["seed=1"]):
        path = write_marker(tmp_path, "run.json", {"seconds": 2.0}, FP, [tmp_path / "b.json", "a.csv", "run.json"])
    content = json.loads(path.read_text())
    assert content == {"seconds": 2.0, "fingerprint": FP, "overrides": ["seed=1"],
                       "checksums": {"a.csv": resume.sha256_file(tmp_path / "a.csv"),
                                     "b.json": resume.sha256_file(tmp_path / "b.json")}}
    assert read_marker(tmp_path, "run.json") == content


# --- job folders and the latest launch -------------------------------------------------------------


def test_find_job_folders_with_other_markers_and_report_folder(tmp_path):
    for name in ("1", "out/2", "0"):
        job = make_job(tmp_path, name, [f"seed={name[-1]}"], base_rows(), complete=False)
        (job / "done.json").write_text("{}")
        mark_finished(job, "done.json", {"n": 1}, ["results.csv"])
    folders, incomplete = find_job_folders(tmp_path, ("done.json",), skip="out")
    assert [(f.name, f.marker, f.overrides, f.content["n"]) for f in folders] == [
        ("0", "done.json", ["seed=0"], 1), ("1", "done.json", ["seed=1"], 1)]
    assert incomplete == []
    folders, _ = find_job_folders(tmp_path, ("done.json",), skip="report")
    assert [f.name for f in folders] == ["0", "1", "out/2"]
    folders, incomplete = find_job_folders(tmp_path, ("run.json",))
    assert folders == [] and [p.name for p in incomplete] == ["0", "1", "2"]


def test_read_overrides(tmp_path):
    assert read_overrides(tmp_path) == []  # no .hydra/overrides.yaml
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("")
    assert read_overrides(tmp_path) == []
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["a=1", "b=[1,2]"]))
    assert read_overrides(tmp_path) == ["a=1", "b=[1,2]"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump({"a": 1}))
    with pytest.raises(ConfigError, match="YAML list of override strings"):
        read_overrides(tmp_path)


def _write_multirun_yaml(sweep: Path, target: str, params: dict | None, task: list[str]) -> None:
    sweeper = {"_target_": target, **({"params": params} if params is not None else {})}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}}))


@pytest.mark.parametrize("sweeper", [BASIC_SWEEPER, CHECKED_SWEEPER])
def test_latest_launch_expands_the_grid_as_hydra_does(tmp_path, sweeper):
    assert latest_launch(tmp_path) is None  # no multirun.yaml
    _write_multirun_yaml(tmp_path, sweeper, {"seed": "0,1"}, ["threat.eps=0.1,0.3", "n=100"])
    # the sweeper's params come first, then the command line's: Hydra's job order
    assert latest_launch(tmp_path) == [frozenset({f"threat.eps={e}", f"seed={s}", "n=100"})
                                       for s in ("0", "1") for e in ("0.1", "0.3")]
    _write_multirun_yaml(tmp_path, sweeper, None, ["seed=3"])
    assert latest_launch(tmp_path) == [frozenset({"seed=3"})]


def test_other_sweepers_count_every_job(tmp_path):
    sweep = alpha_sweep(tmp_path / "sweep")
    _write_multirun_yaml(sweep, "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                         {"mix.alphas": "choice([0.1])"}, [])
    assert latest_launch(sweep) is None
    report = make_report(sweep, plots=False)
    assert [j.name for j in report.jobs] == ["0", "1", "2"]
    info = json.loads(report.files["jobs.json"].read_text())
    assert info["stale"] == [] and info["missing"] == []


def test_in_launch_matches_numbered_folders_by_position(tmp_path):
    wanted = [frozenset({"seed=0"}), frozenset({"seed=1"})]
    folders = {}
    for name, overrides in (("0", ["seed=0"]), ("1", ["seed=0"]), ("5", ["seed=1"]), ("a/b", ["seed=1"]),
                            ("a/c", ["seed=2"])):
        folders[name] = make_job(tmp_path, name, overrides, base_rows())
    jobs = {f.name: f for f in find_job_folders(tmp_path, ("run.json",))[0]}
    assert {name: in_launch(jobs[name], wanted) for name in folders} == {
        "0": True, "1": False, "5": False, "a/b": True, "a/c": False}
