"""Linear versus nonlinear mixing at matched clean accuracy (``matched.csv``; README, "Nonlinear mixing").

A sweep whose options include linear mixing (``h_map`` identity) and a map on h's logits for the same
(r_option, mix_space) traces two trade-off curves. For every alpha of the mapped mixture, `matched_rows`
pairs it with the linear mixture of the *nearest measured clean accuracy* (ties: the more robust linear
point by the worst case, so a tie never flatters the map; then the larger alpha) and puts their
accuracies under each attack side by side, with both clean accuracies, so the match's quality is in
the table: nothing is interpolated, every number was measured on the same test images.
"""

from __future__ import annotations

import math

from mixrobust.evaluation.options import CLEAN, WORST, option_key

#: Columns of a matched row before the per-attack pairs.
KEY_COLUMNS = ("option", "h_map", "alpha_nonlinear", "alpha_linear", "clean_nonlinear", "clean_linear")


def _mixtures(rows: list[dict]) -> dict[tuple, dict[float, dict[str, float]]]:
    """option key -> alpha -> attack -> accuracy, for the mixture rows."""
    out: dict[tuple, dict[float, dict[str, float]]] = {}
    for r in rows:
        if r["model"] == "mix":
            out.setdefault(option_key(r), {}).setdefault(float(r["alpha"]), {})[r["attack"]] = r["accuracy"]
    return out


def matched_attacks(rows: list[dict]) -> list[str]:
    """The attacks of the mixture rows but clean, in order of appearance (worst last, as in the results)."""
    return [a for a in dict.fromkeys(r["attack"] for r in rows if r["model"] == "mix") if a != CLEAN]


def matched_rows(rows: list[dict]) -> list[dict]:
    """One row per (mapped option, alpha > 0): the mapped mixture beside the linear one of nearest clean accuracy
    (see the module docstring); empty when the rows hold no linear and mapped option of the same kind."""
    mixtures, attacks = _mixtures(rows), matched_attacks(rows)
    out = []
    for key, points in mixtures.items():
        r_option, mix_space, h_map = key
        linear = mixtures.get((r_option, mix_space, "identity"))
        if h_map == "identity" or not linear:
            continue
        for alpha in sorted(points):
            if alpha == 0.0:  # g alone, the same for every map
                continue
            clean = points[alpha][CLEAN]
            lin_alpha = min(linear, key=lambda a: (round(abs(linear[a][CLEAN] - clean), 12),
                                                   -(linear[a].get(WORST) or 0.0), -a))
            row = {"option": f"{r_option}/{mix_space}", "h_map": h_map, "alpha_nonlinear": alpha,
                   "alpha_linear": lin_alpha, "clean_nonlinear": clean, "clean_linear": linear[lin_alpha][CLEAN]}
            for attack in attacks:
                row[f"{attack}_nonlinear"] = points[alpha].get(attack)
                row[f"{attack}_linear"] = linear[lin_alpha].get(attack)
            out.append(row)
    return out


def matched_columns(rows: list[dict]) -> tuple[str, ...]:
    return KEY_COLUMNS + tuple(f"{a}_{kind}" for a in matched_attacks(rows) for kind in ("nonlinear", "linear"))


def format_matched(rows: list[dict]) -> str:
    """`matched_rows` as a text table (accuracies in %, nonlinear / linear per attack); empty without a pair."""
    matched = matched_rows(rows)
    if not matched:
        return ""
    attacks = matched_attacks(rows)

    def pct(v):
        return "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"

    head = "alpha nl/lin    clean nl/lin  " + " ".join(f"{a + ' nl/lin':>14}" for a in attacks)
    lines = ["linear vs nonlinear mixing at matched clean accuracy (nearest measured point):", head]
    for r in matched:
        lines.append(f"{r['alpha_nonlinear']:<5.3g} / {r['alpha_linear']:<5.3g}  {pct(r['clean_nonlinear'])} / "
                     f"{pct(r['clean_linear'])}  " + " ".join(
                         f"{pct(r[a + '_nonlinear']):>6} / {pct(r[a + '_linear'])}" for a in attacks))
    maps = sorted({r["h_map"] for r in matched})
    return "\n".join(lines + [f"nonlinear: {', '.join(maps)}"])
