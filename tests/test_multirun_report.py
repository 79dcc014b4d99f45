"""The multirun sweep report on hand-built sweep folders: combined.csv against hand-computed rows,
byte-stability, incomplete jobs, errors, conflicting rows, eps sweeps, the Hydra callback and
the ``task=report`` pipeline (W&B through fakes)."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mixrobust.errors import ConfigError
from mixrobust.evaluation.multirun import SweepReport, combine, dedupe_for_plots, find_jobs, write_report
from mixrobust.evaluation.outcomes import COLUMNS
from mixrobust.evaluation.report import rows_to_csv
from mixrobust.pipelines import report as report_pipeline

N = 96
OPTIONS = (("one", "prob"), ("one", "logit"))
MIX_ATTACKS = ("clean", "std", "rob", "mix", "worst")
BASE_ATTACKS = ("clean", "std", "rob", "worst")
ALPHAS = (0.25, 0.5, 0.75)


def base_rows(eps: float = 0.3, shift: int = 0) -> list[dict]:
    return [{"model": m, "alpha": math.nan, "r_option": None, "mix_space": None, "norm": "linf", "eps": eps,
             "attack": a, "steps": 0 if a == "clean" else 10, "accuracy": (90 - 20 * i - 7 * j + shift) / N, "n": N}
            for i, m in enumerate("gh") for j, a in enumerate(BASE_ATTACKS)]


def mix_rows(alpha: float, eps: float = 0.3) -> list[dict]:
    return [{"model": "mix", "alpha": alpha, "r_option": r, "mix_space": s, "norm": "linf", "eps": eps,
             "attack": a, "steps": 0 if a == "clean" else 10,
             "accuracy": (int(80 * alpha) + 3 * k - 5 * j - int(eps * 10)) / N, "n": N}
            for k, (r, s) in enumerate(OPTIONS) for j, a in enumerate(MIX_ATTACKS)]


def alpha_job(alpha: float, eps: float = 0.3) -> tuple[list[str], list[dict]]:
    return ([f"threat.eps={eps}", f"mix.alphas=[{alpha}]", "mix.mix_spaces=[prob,logit]"],
            base_rows(eps) + mix_rows(alpha, eps))


def make_job(sweep: Path, name: str, overrides: list[str], rows: list[dict], complete: bool = True,
             seconds: float = 1.0) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text("task: mix\n")
    (job / "results.csv").write_text(rows_to_csv(rows))
    if complete:
        (job / "run.json").write_text(json.dumps({"seconds": seconds, "output_dir": str(job)}))
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
                             **{c: cell(row[c]) for c in COLUMNS}})
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
    with pytest.raises(ConfigError, match="run.json and results.csv"):
        write_report(tmp_path)
    make_job(tmp_path, "0", [], base_rows(), complete=False)
    with pytest.raises(ConfigError, match="1 incomplete job"):
        write_report(tmp_path)
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
    assert result["jobs"] == 3 and result["incomplete"] == ["3"]
    assert result["output_dir"] == str(out)
    assert set(result["files"]) == {"combined.csv", "jobs.json"} and (out / "combined.csv").is_file()
    with pytest.raises(ConfigError, match="report.dir="):
        report_pipeline.run(OmegaConf.create({"report": {"dir": "???"}, "plots": False}))


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

    def build_logger(cfg, output_dir):
        seen.update(group=cfg.logger.group, output_dir=output_dir)
        return WandbLogger()

    monkeypatch.setattr(report_pipeline, "build_logger", build_logger)
    monkeypatch.chdir(tmp_path)
    sweep = alpha_sweep(tmp_path / "multirun" / "2024-05-06_07-08-09")
    cfg = OmegaConf.create({"plots": True, "report": {"dir": str(sweep) + "/"},
                            "logger": {"_target_": "lightning.pytorch.loggers.WandbLogger", "group": None}})
    report_pipeline.run(cfg)
    # the group the jobs got from hydra.sweep.dir (relative to the working directory)
    assert seen == {"group": "multirun/2024-05-06_07-08-09", "output_dir": str(sweep / "report")}
    assert cfg.logger.group is None  # the caller's config is left alone
    table = logged["report/combined"]
    assert table.columns == ["job", "overrides", *COLUMNS] and len(table.data) == 3 * 18
    assert table.data[0][3] is None  # the base rows' NaN alpha
    assert {k for k in logged if k != "report/combined"} == {"report/accuracy_vs_alpha", "report/tradeoff"}
    cfg.logger.group = "fig2"  # an explicit logger.group wins (the jobs used it too)
    report_pipeline.run(cfg)
    assert seen["group"] == "fig2"


def test_jobs_of_an_earlier_launch_are_left_out_and_missing_ones_listed(tmp_path):
    """multirun.yaml (written by Hydra at each launch) says which jobs the latest launch asked for."""
    sweep = alpha_sweep(tmp_path / "sweep")  # three jobs: alphas 0.25, 0.5, 0.75
    make_job(sweep, "3", *alpha_job(0.5))  # an older launch's job 3 with a grid point the new launch has as job 1
    multirun = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                      "params": {"mix.alphas": "[0.25],[0.5],[0.9]"}},
                          "overrides": {"task": ["threat.eps=0.3", "mix.mix_spaces=[prob,logit]"]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    write_report(sweep)
    jobs = json.loads((sweep / "report" / "jobs.json").read_text())
    assert [j["job"] for j in jobs["completed"]] == ["0", "1"]
    assert [j["job"] for j in jobs["stale"]] == ["2", "3"]  # alpha 0.75 is not in the grid; 3 is not its job 1
    assert jobs["missing"] == [sorted(["mix.alphas=[0.9]", "threat.eps=0.3", "mix.mix_spaces=[prob,logit]"])]
    assert {r["job"] for r in read_csv(sweep / "report" / "combined.csv")} == {"0", "1"}


def test_certification_jobs_get_a_combined_csv_and_one_figure_each(tmp_path):
    sweep = tmp_path / "sweep"
    for i, sigma in enumerate((0.25, 0.5)):
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"h_ckpt=rs{sigma}.ckpt"]))
        rows = [{"model": "mix", "alpha": a, "theorem": t, "radius": r, "certified_accuracy": (1 - r) * a * (1 - i / 4)}
                for a in (0.5, 1.0) for t in ("rs", "lipschitz") for r in (0.0, 0.5)]
        rows.append({"model": "baseline", "alpha": "", "theorem": "cohen", "radius": 0.0, "certified_accuracy": 0.7})
        with open(job / "certified_accuracy.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["model", "alpha", "theorem", "radius", "certified_accuracy"])
            writer.writeheader()
            writer.writerows(rows)
        (job / "certify_summary.json").write_text(json.dumps({"sigma": sigma, "alpha_selection": {"alpha": 0.5}}))
    files = write_report(sweep)
    assert "combined.csv" not in files and {"certified_accuracy_0.png", "certified_accuracy_1.png"} <= set(files)
    combined = read_csv(sweep / "report" / "combined_certified.csv")
    assert len(combined) == 2 * 9 and list(combined[0]) == ["job", "overrides", "sigma", "model", "alpha", "theorem",
                                                            "radius", "certified_accuracy"]
    assert {(r["job"], r["sigma"]) for r in combined} == {("0", "0.25"), ("1", "0.5")}
    got = [float(r["certified_accuracy"]) for r in combined if r["job"] == "1" and r["model"] == "mix"]
    assert got == pytest.approx([(1 - r) * a * 0.75 for a in (0.5, 1.0) for _ in range(2) for r in (0.0, 0.5)])


def test_results_of_an_earlier_launch_under_new_overrides_are_left_out(tmp_path):
    """A job that failed early in a later launch keeps old results next to its new .hydra/overrides.yaml."""
    sweep = alpha_sweep(tmp_path / "sweep")
    for name in ("0", "1"):
        marker = sweep / name / "run.json"
        overrides = yaml.safe_load((sweep / name / ".hydra" / "overrides.yaml").read_text())
        marker.write_text(json.dumps({"overrides": list(reversed(overrides))}))  # order does not matter
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["mix.alphas=[0.9]"]))  # relaunched
    jobs, incomplete = find_jobs(sweep)
    assert [j.name for j in jobs] == ["0", "2"] and [p.name for p in incomplete] == ["1"]
