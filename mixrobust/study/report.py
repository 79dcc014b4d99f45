"""A study's report: ``report.md``, ``report.html`` (figures inline) and ``claims.json`` in the study folder.

Built from the files the stages left (each stage's results files are the source of truth, so a report
can be rebuilt at any time): the claims table first (`mixrobust.study.claims`), the paper's numbers
beside ours in the paper's setting, the time each stage took, the base models, then every figure with
its table (Figure 2, AutoAttack on the mixture, Table 1, Figure 1, Figure 3) and the settings of every
stage. A stage that did not run leaves its section saying so. With a W&B ``logger`` the claims table,
the report and the figures also go to one W&B run in the study's group.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import logging
import math
import re
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from mixrobust.evaluation import read_results_csv
from mixrobust.evaluation.plots import ATTACK_NAMES, attack_legend
from mixrobust.evaluation.report import pivot
from mixrobust.runtime.files import package_version, read_json, write_json, write_text
from mixrobust.runtime.loggers import is_wandb, job_logger
from mixrobust.runtime.progress import duration
from mixrobust.study.claims import PAPER, Claim, check_claims, claims_table, md_table, pct

log = logging.getLogger(__name__)


class Plan(Protocol):
    """What the report reads of a study (`mixrobust.pipelines.study.Plan`): its settings (``study.*``), its folder,
    its config and its stages (each with ``name``, ``task``, ``cfg`` and ``output_dir``), in order."""

    keys: Any
    root: Path
    cfg: DictConfig
    stages: list



def _rows(path: Path) -> list[dict] | None:
    return read_results_csv(path) if path.is_file() else None


def _alpha(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def results_table(rows: list[dict], models: tuple[str, ...] = ("g", "h", "mix")) -> str:
    """One line per (model, alpha, option), one column per attack (accuracy in %), the worst case last."""
    attacks, lines = pivot(rows)
    order = sorted(range(len(attacks)), key=lambda i: attacks[i] == "worst")
    body = [[model, _alpha(alpha), option or "-", *(pct(cells[i]) for i in order)]
            for model, alpha, option, cells in lines if model in models]
    return md_table(["model", "alpha", "option", *(attack_legend(rows, attacks[i]) for i in order)], body)


def margins_table(margins: dict, paper: bool) -> str:
    """Table 1: mean (median) top-1 minus top-2 probability, clean / attacked x correct / incorrect."""
    cells = [("clean", "correct"), ("clean", "incorrect"), ("attacked", "correct"), ("attacked", "incorrect")]
    body = []
    for model in ("g", "h"):
        entry = margins.get(model) or {}
        row = [model]
        for kind, split in cells:
            c = (entry.get(kind) or {}).get(split) or {}
            mean, median = c.get("mean"), c.get("median")
            row.append("n/a" if mean is None else f"{mean:.3f} ({median:.3f}), n={c.get('n')}")
        body.append(row)
        if paper:
            body.append([f"{model}, paper", *(f"{v:.3f}" for v in PAPER["table1"][model])])
    attack = {m: (margins.get(m) or {}).get("attack", "") for m in ("g", "h")}
    headers = ["model", "clean, correct", "clean, incorrect", "attacked, correct", "attacked, incorrect"]
    note = (f"Mean (median) probability gap top-1 minus top-2; attacked = each model's own PGD "
            f"(g: {ATTACK_NAMES.get(attack['g'], attack['g'])}, h: {ATTACK_NAMES.get(attack['h'], attack['h'])}) "
            "on the images it classifies correctly when clean, split into survived / broken.")
    return note + "\n\n" + md_table(headers, body)


def certify_table(summary: dict) -> str:
    """Certified accuracy at the report radii per certified alpha (Theorem 5 and 4) and the baseline."""
    table, acc, selected = summary["certified_accuracy"], summary["clean_accuracy"], summary["alpha_selection"]["alpha"]
    mix = table["mix"]
    radii = [k.rpartition("@")[2] for k in next(iter(mix.values()), {}) if k.startswith("cert/rs_acc@")]
    body = []
    for alpha, metrics in sorted(mix.items(), key=lambda kv: float(kv[0])):
        mark = " (selected)" if selected is not None and math.isclose(float(alpha), selected) else ""
        for theorem, name in (("rs", "Thm 5"), ("lipschitz", "Thm 4")):
            body.append([f"{float(alpha):g}{mark}", pct(acc["mix"][alpha]), name,
                         *(pct(metrics[f"cert/{theorem}_acc@{r}"]) for r in radii)])
    if "baseline" in table:
        body.append([f"baseline RS, sigma {summary.get('baseline_sigma'):g}", pct(acc["baseline"]), "CERTIFY",
                     *(pct(table["baseline"][f"cert/baseline_acc@{r}"]) for r in radii)])
    st = summary["settings"]
    how = (f"sound (each radius holds with probability >= 1 - {st['failure_prob']:g}; n0={st['n0']}, n={st['n']})"
           if st["mode"] == "sound" else f"plug-in (the paper's: Monte Carlo estimates, no guarantee; n={st['n']})")
    head = (f"{summary['n_examples']} images, h = RS model sigma {summary['sigma']:g}, {how}, {st['votes']} votes. "
            f"Clean accuracy: g {pct(acc['g'])}, smoothed h {pct(acc['h'])}. "
            + (f"Selected alpha {selected:g} (clean accuracy matched to the baseline's)." if selected is not None
               else f"No alpha selected: {summary['alpha_selection'].get('reason')}."))
    return head + "\n\n" + md_table(["alpha", "clean", "bound", *(f"r={r}" for r in radii)], body)


def finished_stages(plan: Plan, status: dict[str, dict]) -> set[str]:
    """The stages this run ran or found finished: the only ones whose files the report reads. A stage left out of
    this study, or not reached because an earlier one failed or was stopped, may hold files of older models or
    settings, which stay on disk to resume from."""
    return {s.name for s in plan.stages if status.get(s.name, {}).get("status") in ("ran", "skipped")}


def base_models_table(plan: Plan, done: set[str]) -> str:
    """One row per training stage: its settings and, if it is among `done`, its own test (``metrics.json``)."""
    body = []
    for stage in plan.stages:
        if stage.task != "train":
            continue
        metrics = (read_json(stage.output_dir / "metrics.json") or {}) if stage.name in done else {}
        cfg = stage.cfg
        objective = OmegaConf.select(cfg, "objective._target_", default="").rpartition(".")[2]
        if "sigma" in cfg.objective:
            objective += f" (sigma {cfg.objective.sigma:g})"
        elif "steps" in cfg.objective:
            objective += f" ({cfg.objective.steps} steps)"
        body.append([stage.name.removeprefix("train/"), cfg.model.arch, objective, cfg.trainer.max_epochs,
                     pct(metrics.get("test/acc")), pct(metrics.get("test/robust_acc"))])
    return md_table(["model", "architecture", "objective", "epochs", "test clean", "test PGD (train.py's)"], body)


def paper_table(fig2: list[dict] | None, alpha: float) -> str:
    """Our Figure 2 numbers beside the paper's (CIFAR-10, ResNet-18, l_inf 8/255)."""
    if not fig2:
        return "Figure 2 did not run."

    def acc(model, attack, a=None):
        for r in fig2:
            if r["model"] == model and r["attack"] == attack and (a is None or math.isclose(r["alpha"], a)):
                return r["accuracy"]
        return None

    grid = sorted({r["alpha"] for r in fig2 if r["model"] == "mix"})
    closest = min(grid, key=lambda a: abs(a - alpha)) if grid else None
    p = PAPER["fig2"]
    body = [["g clean", pct(acc("g", "clean")), pct(p["g_clean"])],
            ["h clean", pct(acc("h", "clean")), pct(p["h_clean"])],
            [f"h, {attack_legend(fig2, 'rob')}", pct(acc("h", "rob")), pct(p["h_pgd"])],
            [f"mixture clean, alpha {_alpha(closest)}", pct(acc("mix", "clean", closest)), pct(p["mix_clean"])],
            [f"mixture MIX, alpha {_alpha(closest)}", pct(acc("mix", "mix", closest)), pct(p["mix_mix"])]]
    return md_table(["quantity", "ours", "paper"], body)


def _stage_times(plan: Plan, status: dict[str, dict]) -> str:
    body, total = [], 0.0
    for stage in plan.stages:
        s = status.get(stage.name, {})
        seconds = s.get("seconds")
        total += seconds or 0.0
        state = {"ran": "ran now", "skipped": "finished before"}.get(s.get("status"), "not run")
        body.append([stage.name, stage.task, state, "n/a" if seconds is None else duration(seconds),
                     stage.output_dir.relative_to(plan.root).as_posix()])
    body.append(["total", "", "", duration(total), ""])
    return md_table(["stage", "task", "this run", "time", "folder"], body)


def _settings(plan: Plan) -> str:
    parts = ["The study preset (`study.*`), then each stage's config as it ran (also in each stage's folder)."]
    parts.append("```yaml\n" + OmegaConf.to_yaml(OmegaConf.create({"study": OmegaConf.to_container(
        plan.cfg.study, resolve=True)})).rstrip() + "\n```")
    for stage in plan.stages:
        keys = ["data", "model", "objective", "threat", "attack", "mix", "certify", "trainer", "optimizer", "n",
                "split", "seed", "attacks", "batch_size"]
        shown = {k: OmegaConf.to_container(stage.cfg, resolve=True)[k] for k in keys if k in stage.cfg
                 and not (stage.task == "train" and k in ("attack", "mix", "certify"))
                 and not (stage.task == "mix" and k == "certify") and not (stage.task == "certify" and k == "mix")}
        parts.append(_folded(stage.name, "```yaml\n" + OmegaConf.to_yaml(OmegaConf.create(shown)).rstrip() + "\n```"))
    return "\n\n".join(parts)


def _folded(summary: str, text: str) -> str:
    """A collapsed block (GitHub markdown and the HTML page both show it folded)."""
    return f"<details><summary>{summary}</summary>\n\n{text}\n\n</details>"


def _figure(plan: Plan, stage: str, name: str, caption: str) -> str:
    path = plan.root / stage / name
    return f"![{caption}]({stage}/{name})" if path.is_file() else f"({caption}: no figure; the stage wrote none)"


def gather(plan: Plan, status: dict[str, dict]) -> dict:
    """The results files of every stage this run ran or found finished (`finished_stages`, under ``"done"``; None
    for any other stage)."""
    root, names = plan.root, finished_stages(plan, status)

    def stage(name: str, read, file: str):
        return read(root / name / file) if name in names else None

    fig3 = {}
    for mode in ("plugin", "sound"):
        summary = stage(f"fig3_{mode}", read_json, "certify_summary.json")
        if summary and "certified_accuracy" in summary:
            fig3[mode] = summary
    return {"fig2": stage("fig2", _rows, "results.csv"), "fig1": stage("fig1", _rows, "results.csv"),
            "autoattack": stage("autoattack", _rows, "results.csv"),
            "margins": stage("fig2", read_json, "margins.json"),
            "fig3": fig3 or None, "done": names}


def render(plan: Plan, status: dict[str, dict], data: dict, claims: list[Claim]) -> str:
    """The report's markdown."""
    keys, names = plan.keys, {s.name for s in plan.stages}
    out = [f"# {keys.title}: the paper's claims checked end to end",
           f"Bai, Anderson and Sojoudi, *Mixing Classifiers to Alleviate the Accuracy-Robustness Trade-Off* "
           f"(L4DC 2024), reproduced by mixrobust {package_version()} on "
           f"{datetime.date.today().isoformat()}; folder `{plan.root}`."]
    out += [f"- {note}" for note in keys.notes]
    out += ["## Claims", claims_table(claims),
            f"Verdict thresholds: accuracy differences within {100 * keys.tolerance:g} points count as equal "
            "(`study.tolerance`); each reason names its rule (`mixrobust.study.claims`)."]
    if keys.paper_setting:
        out += ["## Beside the paper", paper_table(data["fig2"], keys.paper_alpha)]
    out += ["## Stages", _stage_times(plan, status)]
    if any(s.task == "train" for s in plan.stages):
        out += ["## Base models", "Each model's own test after training (its `metrics.json`): on the test split, or "
                "the part of it `trainer.limit_test_batches` keeps (see the settings).",
                base_models_table(plan, data["done"])]
    sections = [
        ("fig2", "## Figure 2: accuracy against alpha", lambda: [
            _figure(plan, "fig2", "accuracy_vs_alpha.png", "Figure 2"), results_table(data["fig2"])], data["fig2"]),
        ("autoattack", "## AutoAttack on the mixture", lambda: [
            "The paper's PGD (MIX) beside AutoAttack (standard) on the mixture, same images; the worst case "
            "includes both.", results_table(data["autoattack"], models=("mix",))], data["autoattack"]),
        ("fig2", "## Table 1: confidence margins", lambda: [margins_table(data["margins"], keys.paper_setting)],
         data["margins"]),
        ("fig1", "## Figure 1: R_i options and mixing spaces", lambda: [
            _figure(plan, "fig1", "tradeoff.png", "Figure 1"),
            "Clean against worst-case attacked accuracy, one curve per option over gamma "
            "(alpha = gamma / (1 + gamma)).", _folded("every option and alpha", results_table(
                [r for r in data["fig1"] if r["model"] == "mix"]))],
         data["fig1"]),
    ]
    for stage, title, body, present in sections:
        if stage not in names and present is None:
            continue
        out += [title, *(body() if present else [f"The {stage} stage has not finished."])]
    for mode in keys.fig3_modes if "fig3" in keys.stages else ():
        summary = (data["fig3"] or {}).get(mode)
        out += [f"## Figure 3: certified accuracy ({'plug-in' if mode == 'plugin' else 'sound'} radii)",
                *([_figure(plan, f"fig3_{mode}", "certified_accuracy.png", f"Figure 3, {mode}"), certify_table(summary)]
                  if summary else [f"The fig3_{mode} stage has not finished."])]
    out += ["## Settings", _settings(plan)]
    return "\n\n".join(out) + "\n"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
       "table{border-collapse:collapse;margin:1em 0;font-size:0.92em}td,th{border:1px solid #ccc;padding:0.25em 0.6em}"
       "th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}")


def to_html(markdown: str, root: Path, title: str) -> str:
    """The markdown as one self-contained HTML page: the figures inline as data URIs."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)

    def inline(match: re.Match) -> str:
        path = root / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}</body></html>\n")


def _to_wandb(plan: Plan, claims: list[Claim], page: str, done: set[str]) -> None:
    """The claims table, the report page and the figures of the stages among `done` to one W&B run in the study's
    group."""
    node = OmegaConf.to_container(plan.cfg.logger, resolve=True)
    group = node.get("group") or f"study {plan.keys.title}"
    name = f"report {plan.keys.title}"
    with job_logger(node, plan.root, "study", group=group, name=name, job_type="report") as logger:
        import wandb

        fields = [f.name for f in dataclasses.fields(Claim)]
        images = {f"study/{p.parent.name}_{p.stem}": wandb.Image(str(p)) for p in sorted(plan.root.glob("*/*.png"))
                  if p.parent.name in done}
        logger.experiment.log({"study/claims": wandb.Table(columns=fields, data=[[getattr(c, f) for f in fields]
                                                                                 for c in claims]),
                               "study/report": wandb.Html(page), **images})


def write_report(plan: Plan, status: dict[str, dict]) -> tuple[list[Claim], dict[str, Path]]:
    """Check the claims, write claims.json, report.md and report.html into the study folder (atomically)."""
    data = gather(plan, status)
    keys = plan.keys
    claims = check_claims(data["fig2"], data["fig1"], data["margins"], data["fig3"], data["autoattack"],
                          paper_setting=keys.paper_setting, tolerance=keys.tolerance, paper_alpha=keys.paper_alpha)
    markdown = render(plan, status, data, claims)
    page = to_html(markdown, plan.root, keys.title)
    paths = {"claims.json": write_json(plan.root / "claims.json", [dataclasses.asdict(c) for c in claims]),
             "report.md": write_text(plan.root / "report.md", markdown),
             "report.html": write_text(plan.root / "report.html", page)}
    if is_wandb(plan.cfg.get("logger")):
        _to_wandb(plan, claims, page, data["done"])
    log.info("report: %s (claims: %s)", paths["report.md"],
             ", ".join(f"{c.key} {c.verdict}" for c in claims))
    return claims, paths
