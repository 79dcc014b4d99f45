"""The files a sweep leaves in its run directory, all written atomically.

- ``results.csv`` / ``results.json``: one row per (model, alpha, r_option, mix_space, norm, eps,
  attack) with `COLUMNS`; base-model rows have model g / h, an empty alpha (JSON null) and no
  mixing option;
- ``outcomes.npz``: the per-example outcomes (`save_outcomes`), from which `aggregate`
  reproduces the rows exactly;
- ``margins.json``: the Table-1 confidence margins;
- ``accuracy_vs_alpha.png`` and ``tradeoff.png``: the paper's Figures 2 and 1;
- ``matched.csv``, where the sweep holds linear and nonlinear mixing of one kind: both at matched clean
  accuracy (`mixrobust.evaluation.matched`).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from mixrobust.runtime.files import csv_text, write_json, write_text
from mixrobust.evaluation.matched import matched_columns, matched_rows
from mixrobust.evaluation.options import WORST, option_key, option_text
from mixrobust.evaluation.outcomes import COLUMNS, OPTIONAL_COLUMNS, save_outcomes
from mixrobust.evaluation.plots import attack_legend, plot_accuracy_vs_alpha, plot_tradeoff

FILES = ("results.csv", "results.json", "outcomes.npz", "margins.json", "accuracy_vs_alpha.png", "tradeoff.png")


def _plain(value):
    """NaN -> None (JSON null, empty CSV cell); everything else unchanged."""
    return None if isinstance(value, float) and math.isnan(value) else value


def rows_to_csv(rows: list[dict]) -> str:
    """CSV text with a header of `COLUMNS` (`mixrobust.runtime.files.csv_text`); `OPTIONAL_COLUMNS` may be absent."""
    return csv_text(COLUMNS, [{**dict.fromkeys(OPTIONAL_COLUMNS), **r} for r in rows])


def read_results_csv(path: str | os.PathLike) -> list[dict]:
    """Parse results.csv back into typed rows (alpha NaN and None where the cell is empty or the column absent)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, cell in raw.items():
                if key in ("alpha", "eps", "accuracy"):
                    row[key] = float(cell) if cell else (math.nan if key == "alpha" else None)
                elif key in ("steps", "n"):
                    row[key] = int(cell) if cell else None
                else:
                    row[key] = cell or None
            rows.append({**dict.fromkeys(OPTIONAL_COLUMNS), **row})  # files of earlier versions lack these
    return rows


def write_results(output_dir: str | os.PathLike, result, plots: bool = True) -> dict[str, Path]:
    """Write every results file of `result` (a `SweepResult`) into `output_dir`; returns name -> path."""
    out = Path(output_dir)
    rows = result.rows()
    paths = {
        "results.csv": write_text(out / "results.csv", rows_to_csv(rows)),
        "results.json": write_json(out / "results.json", [{k: _plain(v) for k, v in r.items()} for r in rows]),
        "outcomes.npz": save_outcomes(out / "outcomes.npz", result.outcomes),
        "margins.json": write_json(out / "margins.json", result.margins),
    }
    matched = matched_rows(rows)
    if matched:
        paths["matched.csv"] = write_text(out / "matched.csv", csv_text(matched_columns(rows), matched))
    if plots:
        paths["accuracy_vs_alpha.png"] = plot_accuracy_vs_alpha(rows, out / "accuracy_vs_alpha.png")
        paths["tradeoff.png"] = plot_tradeoff(rows, out / "tradeoff.png")
    return paths


def _option(row: dict) -> str | None:
    """A row's mixing option as tables name it (`option_text`), None for the base models."""
    return option_text(option_key(row)) if row["r_option"] else None


def pivot(rows: list[dict]) -> tuple[list[str], list[tuple[str, float | None, str | None, list]]]:
    """Results rows as a table: the attacks in order of appearance but the worst case last, and one line per (model,
    alpha, mixing option) with its accuracy under each attack (None where it did not run); alpha and option None for
    base models."""
    attacks = sorted(dict.fromkeys(r["attack"] for r in rows), key=lambda a: a == WORST)  # stable: the rest keep order
    keys = list(dict.fromkeys((r["model"], _plain(r["alpha"]), _option(r)) for r in rows))
    acc = {(r["model"], _plain(r["alpha"]), _option(r), r["attack"]): r["accuracy"] for r in rows}
    return attacks, [(*key, [acc.get((*key, a)) for a in attacks]) for key in keys]


def format_table(rows: list[dict]) -> str:
    """A compact text table: one line per (model, alpha, option), one column per attack, and a legend naming
    each column's attack (its steps and implementation, from the rows)."""
    attacks, lines_of = pivot(rows)
    lines = ["model alpha  option      " + " ".join(f"{a:>10}" for a in attacks)]
    for model, alpha, option, cells in lines_of:
        option = option or "-"
        alpha_s = "-" if alpha is None else f"{alpha:.3g}"
        lines.append(f"{model:<5} {alpha_s:<6} {option:<11} " + " ".join(
            f"{c:>10.4f}" if c is not None else f"{'':>10}" for c in cells))
    legend = [f"{a}: {attack_legend(rows, a)}" for a in attacks if a != "clean"]
    return "\n".join(lines + (["columns: " + "; ".join(legend)] if legend else []))
