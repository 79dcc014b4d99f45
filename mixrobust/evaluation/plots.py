"""The paper's figures from result rows: accuracy vs alpha (Fig. 2) and the trade-off curve (Fig. 1).

Matplotlib runs with the non-interactive Agg backend; figures are written atomically.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mixrobust.runtime.files import atomic_write  # noqa: E402

STYLES = {"clean": ("C0", "o"), "std": ("C1", "s"), "rob": ("C2", "^"), "mix": ("C3", "D"),
          "autoattack": ("C4", "v"), "worst": ("k", "x")}


def _save(fig, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")


def _base(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["model"], r["attack"]): r["accuracy"] for r in rows if r["model"] in ("g", "h")}


def _options(rows: list[dict]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["r_option"], r["mix_space"]) for r in rows if r["model"] == "mix"))


def _series(rows: list[dict], option: tuple[str, str], attack: str) -> tuple[list[float], list[float]]:
    pts = sorted((r["alpha"], r["accuracy"]) for r in rows
                 if r["model"] == "mix" and (r["r_option"], r["mix_space"]) == option and r["attack"] == attack)
    return [p[0] for p in pts], [p[1] for p in pts]


def _title(rows: list[dict]) -> str:
    r = rows[0]
    steps = next((x["steps"] for x in rows if x["attack"] == "mix" and x["steps"]), None)
    return f"{r['norm']} eps={r['eps']:.4g}" + (f", PGD-{steps}" if steps else "") + f", n={r['n']}"


def plot_accuracy_vs_alpha(rows: list[dict], path: str | os.PathLike) -> Path:
    """Clean and attacked accuracy of h^alpha vs alpha, one panel per mixing option; g's and h's
    clean and own-PGD accuracies as dashed lines (the paper's Figure 2)."""
    options = _options(rows)
    cols = min(3, len(options))
    nrows = math.ceil(len(options) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    base = _base(rows)
    attacks = [a for a in STYLES if any(r["attack"] == a for r in rows if r["model"] == "mix")]
    for ax, option in zip(axes.flat, options):
        for attack in attacks:
            color, marker = STYLES[attack]
            xs, ys = _series(rows, option, attack)
            ax.plot(xs, ys, color=color, marker=marker, ms=4, lw=1.2 if attack != "worst" else 0.8,
                    ls="-" if attack != "worst" else ":", label=attack.upper() if attack != "clean" else "clean")
        for (model, attack), style in ((("g", "clean"), ("C0", "--")), (("h", "clean"), ("C0", ":")),
                                       (("g", "std"), ("C1", "--")), (("h", "rob"), ("C2", "--"))):
            if (model, attack) in base:
                label = f"{model} {'clean' if attack == 'clean' else 'PGD'}"
                ax.axhline(base[(model, attack)], color=style[0], ls=style[1], lw=0.9, alpha=0.7, label=label)
        ax.set(xlabel="alpha", ylabel="accuracy", ylim=(-0.02, 1.02), xlim=(-0.02, 1.02),
               title=f"{option[0]} / {option[1]}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(options):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Accuracy of the mixture vs alpha ({_title(rows)})", fontsize=10)
    return _save(fig, path)


def plot_tradeoff(rows: list[dict], path: str | os.PathLike, attacked: str = "worst") -> Path:
    """Attacked (`attacked`, default the per-example worst case) vs clean accuracy, one curve per
    (r_option, mix_space) traced by alpha (each point labelled with its alpha), with g and h as
    points (the paper's Figure 1)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for i, option in enumerate(_options(rows)):
        alphas, clean = _series(rows, option, "clean")
        _, robust = _series(rows, option, attacked)
        ax.plot(clean, robust, marker="o", ms=3, color=f"C{i}", label=f"{option[0]} / {option[1]}")
        for alpha, cx, cy in zip(alphas, clean, robust):
            ax.annotate(f"{alpha:.2g}", (cx, cy), textcoords="offset points", xytext=(3, 3), fontsize=6,
                        color=f"C{i}")
    base = _base(rows)
    for model, marker in (("g", "*"), ("h", "P")):
        if (model, "clean") in base and (model, attacked) in base:
            ax.scatter([base[(model, "clean")]], [base[(model, attacked)]], marker=marker, s=90,
                       color="k", zorder=3, label=model)
    ax.set(xlabel="clean accuracy", ylabel=f"attacked accuracy ({attacked})",
           title=f"Trade-off as alpha varies ({_title(rows)})")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_vs_eps(rows: list[dict], path: str | os.PathLike) -> Path:
    """Accuracy vs eps for rows of one norm (an eps sweep): one panel per attack (columns; clean
    only if there is no other) and mixing option (rows), one line per alpha of h^alpha (coloured
    by alpha) and g, h as black dashed / dotted lines where they have rows for that attack."""
    options = _options(rows) or [(None, None)]
    present = list(dict.fromkeys(r["attack"] for r in rows))
    attacks = [a for a in STYLES if a in present and a != "clean"] + [a for a in present if a not in STYLES]
    attacks = attacks or ["clean"]
    alphas = sorted({r["alpha"] for r in rows if r["model"] == "mix"})
    fig, axes = plt.subplots(len(options), len(attacks), figsize=(4.2 * len(attacks), 3.4 * len(options)),
                             squeeze=False, layout="constrained")
    for i, option in enumerate(options):
        for j, attack in enumerate(attacks):
            ax = axes[i, j]
            for alpha in alphas:
                pts = sorted((r["eps"], r["accuracy"]) for r in rows if r["model"] == "mix" and r["alpha"] == alpha
                             and (r["r_option"], r["mix_space"]) == option and r["attack"] == attack)
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
                   title=title if option == (None, None) else f"{title}, {option[0]} / {option[1]}")
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        axes[0, 0].legend(fontsize=6, loc="best")
    ns = sorted({r["n"] for r in rows if r["n"] is not None})
    fig.suptitle(f"Accuracy vs eps ({rows[0]['norm']}" + (f", n={ns[0]}" if len(ns) == 1 else "") + ")", fontsize=10)
    return _save(fig, path)
