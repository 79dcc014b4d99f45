"""The paper's figures from result rows: accuracy vs alpha (Fig. 2) and the trade-off curve (Fig. 1).

Matplotlib runs with the non-interactive Agg backend; figures are written atomically. It is
imported on the first plot, not with this module.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from mixrobust.evaluation.options import option_key, option_text
from mixrobust.runtime.files import atomic_write

#: The narrowest clean-accuracy axis of the trade-off plot: a narrower one would blow up a few test
#: images' worth of noise into a trade-off.
MIN_CLEAN_SPAN = 0.05
#: Points closer than these fractions of the x and y axis spans share one alpha label (labels are
#: wider than they are tall).
LABEL_MERGE = (0.12, 0.04)


STYLES = {"clean": ("C0", "o"), "std": ("C1", "s"), "rob": ("C2", "^"), "mix": ("C3", "D"),
          "apgd": ("C5", "P"), "autoattack": ("C4", "v"), "worst": ("k", "x")}


#: How tables and plots name the attacks (the ``attack`` column's values).
ATTACK_NAMES = {"clean": "clean", "std": "STD", "rob": "ROB", "mix": "MIX", "apgd": "APGD", "autoattack": "AutoAttack",
                "worst": "worst case"}


def attack_legend(rows: list[dict], attack: str) -> str:
    """The name of an attack's column or curve with what ran, from the rows: ``MIX (PGD-20)``, ``APGD (100 steps)``, ``AutoAttack (pyautoattack 0.2.0)``, ``worst case (of STD, ROB, MIX, APGD)``."""
    row = next((r for r in rows if r["attack"] == attack), None)
    name = ATTACK_NAMES.get(attack, attack)
    if attack == "worst":  # the mixture's worst case is over its own columns; g's and h's over theirs
        def ran(models):
            return [ATTACK_NAMES.get(a, a) for a in dict.fromkeys(r["attack"] for r in rows if r["model"] in models)
                    if a not in ("clean", "worst")]

        mix, base = ran({"mix"}), ran({"g", "h"})
        extra = [a for a in base if a not in mix] if mix else []  # e.g. STD and ROB under attacks=[mix,apgd]
        text = ", ".join(mix or base) + (f"; g's and h's also of {', '.join(extra)}" if extra else "")
        return f"{name} (of {text})" if text else name
    if row is None or attack == "clean":
        return name
    what = row.get("implementation") or ""
    if attack in ("std", "rob", "mix") and row.get("steps"):
        what = f"PGD-{row['steps']}"
    elif attack == "apgd" and row.get("steps"):
        what = f"{row['steps']} steps"
    return f"{name} ({what})" if what else name


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")


def _base(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["model"], r["attack"]): r["accuracy"] for r in rows if r["model"] in ("g", "h")}


def _options(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The mixing options of the rows, (r_option, mix_space, h_map), in order of appearance."""
    return list(dict.fromkeys(option_key(r) for r in rows if r["model"] == "mix"))


def _series(rows: list[dict], option: tuple[str, str, str], attack: str) -> tuple[list[float], list[float]]:
    pts = sorted((r["alpha"], r["accuracy"]) for r in rows
                 if r["model"] == "mix" and option_key(r) == option and r["attack"] == attack)
    return [p[0] for p in pts], [p[1] for p in pts]


def _title(rows: list[dict]) -> str:
    r = rows[0]
    steps = next((x["steps"] for x in rows if x["attack"] == "mix" and x["steps"]), None)
    return f"{r['norm']} eps={r['eps']:.4g}" + (f", PGD-{steps}" if steps else "") + f", n={r['n']}"


def model_pair(row: dict) -> tuple[str | None, str | None]:
    """The row's base models, (``g_model``, ``h_model``); None where it does not say."""
    return row.get("g_model"), row.get("h_model")


def models_line(rows: list[dict]) -> str:
    """A title line naming the base models, ``\ng: <g_model>, h: <h_model>``, when the rows hold exactly one pair
    (empty otherwise: rows of an earlier version, or of several pairs)."""
    pairs = {model_pair(r) for r in rows}
    if len(pairs) != 1:
        return ""
    g, h = pairs.pop()
    return f"\ng: {g}, h: {h}" if g and h else ""


def _zoomed(values: list[float], span: float) -> tuple[float, float]:
    """Axis limits around `values` at least `span` wide, padded by 10%, inside [0, 1] plus the padding."""
    low, high = min(values), max(values)
    if high - low < span:
        middle = (high + low) / 2
        low = max(0.0, min(middle - span / 2, 1.0 - span))
        high = low + span
    pad = 0.1 * (high - low)
    return low - pad, high + pad


def plot_accuracy_vs_alpha(rows: list[dict], path: str | os.PathLike) -> Path:
    """Accuracy of h^alpha vs alpha, per mixing option: clean accuracy in a zoomed upper panel (g's and
    h's as dashed lines: the cost the mixture avoids is often a few points), attacked accuracies below
    on [0, 1] with g's and h's own-PGD accuracies as dashed lines (the paper's Figure 2)."""
    options = _options(rows)
    cols = min(3, len(options))
    nrows = math.ceil(len(options) / cols)
    plt = _pyplot()
    fig, axes = plt.subplots(2 * nrows, cols, figsize=(5.2 * cols, 4.6 * nrows), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 2.3] * nrows, "hspace": 0.08}, sharex="col")
    base = _base(rows)
    attacks = [a for a in STYLES if a != "clean" and any(r["attack"] == a for r in rows if r["model"] == "mix")]
    for i, option in enumerate(options):
        top, ax = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        alphas, clean = _series(rows, option, "clean")
        top.plot(alphas, clean, color=STYLES["clean"][0], marker=STYLES["clean"][1], ms=4, lw=1.2, label="clean")
        for model, ls in (("g", "--"), ("h", ":")):
            if (model, "clean") in base:
                top.axhline(base[(model, "clean")], color="C0", ls=ls, lw=0.9, alpha=0.7, label=f"{model} clean")
        top.set(ylabel="clean", ylim=_zoomed(clean + [base[(m, "clean")] for m in "gh" if (m, "clean") in base],
                                              MIN_CLEAN_SPAN), title=option_text(option))
        top.grid(alpha=0.3)
        top.legend(fontsize=7, loc="lower left")
        for attack in attacks:
            color, marker = STYLES[attack]
            xs, ys = _series(rows, option, attack)
            ax.plot(xs, ys, color=color, marker=marker, ms=4, lw=1.2 if attack != "worst" else 0.8,
                    ls="-" if attack != "worst" else ":", label=attack_legend(rows, attack))
        for model, attack, color in (("g", "std", "C1"), ("h", "rob", "C2")):
            if (model, attack) in base:
                ax.axhline(base[(model, attack)], color=color, ls="--", lw=0.9, alpha=0.7, label=f"{model} PGD")
        ax.set(xlabel="alpha", ylabel="attacked accuracy", ylim=(-0.02, 1.02), xlim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for i in range(len(options), nrows * cols):
        axes[2 * (i // cols), i % cols].axis("off")
        axes[2 * (i // cols) + 1, i % cols].axis("off")
    fig.suptitle(f"Accuracy of the mixture vs alpha ({_title(rows)}){models_line(rows)}", fontsize=10, y=0.99,
                 va="bottom")  # above the panels however many lines
    return _save(fig, path)


def merged_labels(points: list[tuple[float, float, float]], x_span: float, y_span: float) -> list[tuple[str, float, float]]:
    """One label per group of (alpha, x, y) points that would overlap: (text, x, y) at the group's first
    point, the text listing its alphas (``0, 0.1, 0.2``; more than three as ``0 ... 0.4 (5)``)."""
    groups: list[list[tuple[float, float, float]]] = []
    for point in points:
        for group in groups:
            if (abs(point[1] - group[0][1]) <= LABEL_MERGE[0] * x_span
                    and abs(point[2] - group[0][2]) <= LABEL_MERGE[1] * y_span):
                group.append(point)
                break
        else:
            groups.append([point])
    out = []
    for group in groups:
        alphas = sorted(p[0] for p in group)
        text = (", ".join(f"{a:.3g}" for a in alphas) if len(alphas) <= 3
                else f"{alphas[0]:.3g} ... {alphas[-1]:.3g} ({len(alphas)})")
        out.append((text, group[0][1], group[0][2]))
    return out


def plot_tradeoff(rows: list[dict], path: str | os.PathLike, attacked: str = "worst") -> Path:
    """Attacked (`attacked`, default the per-example worst case) vs clean accuracy, one curve per
    (r_option, mix_space, h_map) traced by alpha (its points labelled with their alphas, overlapping labels
    merged), with g and h as points (the paper's Figure 1). The clean axis spans at least
    `MIN_CLEAN_SPAN`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    curves = []
    for option in _options(rows):
        alphas, clean = _series(rows, option, "clean")
        curves.append((option, list(zip(alphas, clean, _series(rows, option, attacked)[1]))))
    base = _base(rows)
    shown = [(m, base[(m, "clean")], base[(m, attacked)]) for m in ("g", "h")
             if (m, "clean") in base and (m, attacked) in base]
    xs = [p[1] for _, pts in curves for p in pts] + [p[1] for p in shown]
    ys = [p[2] for _, pts in curves for p in pts] + [p[2] for p in shown]
    x_span = max(max(xs) - min(xs), MIN_CLEAN_SPAN) if xs else 1.0
    y_span = max(max(ys) - min(ys), 0.05) if ys else 1.0
    for i, (option, points) in enumerate(curves):
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", ms=3, color=f"C{i}",
                label=option_text(option))
        for text, cx, cy in merged_labels(points, x_span, y_span):
            ax.annotate(text, (cx, cy), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
    for model, cx, cy in shown:
        ax.scatter([cx], [cy], marker="*" if model == "g" else "P", s=90, color="k", zorder=3, label=model)
    if xs and max(xs) - min(xs) < MIN_CLEAN_SPAN:
        ax.set_xlim(*_zoomed(xs, MIN_CLEAN_SPAN))
    ax.set(xlabel="clean accuracy", ylabel=f"attacked accuracy ({attack_legend(rows, attacked)})",
           title=f"Trade-off as alpha varies ({_title(rows)}){models_line(rows)}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_vs_eps(rows: list[dict], path: str | os.PathLike) -> Path:
    """Accuracy vs eps for rows of one norm (an eps sweep): one panel per attack (columns; clean
    only if there is no other) and mixing option (rows), one line per alpha of h^alpha (coloured
    by alpha) and g, h as black dashed / dotted lines where they have rows for that attack."""
    options = _options(rows) or [None]
    present = list(dict.fromkeys(r["attack"] for r in rows))
    attacks = [a for a in STYLES if a in present and a != "clean"] + [a for a in present if a not in STYLES]
    attacks = attacks or ["clean"]
    alphas = sorted({r["alpha"] for r in rows if r["model"] == "mix"})
    plt = _pyplot()
    fig, axes = plt.subplots(len(options), len(attacks), figsize=(4.2 * len(attacks), 3.4 * len(options)),
                             squeeze=False, layout="constrained")
    for i, option in enumerate(options):
        for j, attack in enumerate(attacks):
            ax = axes[i, j]
            for alpha in alphas:
                pts = sorted((r["eps"], r["accuracy"]) for r in rows if r["model"] == "mix" and r["alpha"] == alpha
                             and option_key(r) == option and r["attack"] == attack)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=plt.cm.viridis(0.9 * alpha),
                            label=f"alpha={alpha:.3g}")
            for model, ls in (("g", "--"), ("h", ":")):
                pts = sorted((r["eps"], r["accuracy"]) for r in rows if r["model"] == model and r["attack"] == attack)
                if pts:
                    ax.plot(*zip(*pts), color="k", ls=ls, marker="x", ms=4, lw=1.0, label=model)
            title = attack.upper() if attack != "clean" else attack
            ax.set(xlabel=f"eps ({rows[0]['norm']})" if i == len(options) - 1 else "", ylabel="accuracy",
                   ylim=(-0.02, 1.02),
                   title=title if option is None else f"{title}, {option_text(option)}")
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        axes[0, 0].legend(fontsize=6, loc="best")
    ns = sorted({r["n"] for r in rows if r["n"] is not None})
    fig.suptitle(f"Accuracy vs eps ({rows[0]['norm']}" + (f", n={ns[0]}" if len(ns) == 1 else "") + ")"
                 + models_line(rows), fontsize=10)
    return _save(fig, path)


def plot_fit_curves(curves: list[dict], fit, path: str | os.PathLike) -> Path:
    """A map fit's curves (`mixrobust.mixing.fit.fit_curves`): estimated robust vs clean accuracy as alpha varies,
    one curve per map, the fitted point and linear mixing's at the same target marked (`fit`: a ``MapFit``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for i, label in enumerate(dict.fromkeys(r["h_map"] for r in curves)):
        pts = [r for r in curves if r["h_map"] == label]
        ax.plot([r["clean"] for r in pts], [r["robust"] for r in pts], color=f"C{i}", lw=1.2,
                label="linear (identity)" if label == "identity" else label)
    ax.scatter([fit.clean], [fit.robust], color="C1", marker="o", zorder=3,
               label=f"fitted alpha={fit.alpha:.3g}")
    if fit.linear["alpha"] is not None:
        ax.scatter([fit.linear["clean"]], [fit.linear["robust"]], color="C0", marker="s", zorder=3,
                   label=f"linear at the target, alpha={fit.linear['alpha']:.3g}")
    ax.axhline(fit.target * fit.h_robust, color="k", ls=":", lw=0.9, label=f"target ({fit.target:.3g} x h)")
    ax.set(xlabel="estimated clean accuracy", ylabel="estimated robust accuracy (g broken)",
           title=f"Map fit on {fit.n} held-out images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
