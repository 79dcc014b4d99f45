"""The files a certification run leaves in its output folder, all written atomically.

- ``certify.csv``: one row per (example, alpha) with `CERTIFY_COLUMNS`;  ``mode`` says whether its radii are
  ``sound`` (they hold with probability >= 1 - failure_prob) or ``plugin`` (Monte Carlo estimates, no guarantee);
- ``baseline_certify.csv``: one row per example for the RS baseline (if any), `BASELINE_COLUMNS`;
- ``certified_accuracy.csv``: certified accuracy against radius, `CURVE_COLUMNS`; ``model`` is
  ``mix`` (``theorem`` lipschitz = Theorem 4, rs = Theorem 5) or ``baseline`` (``cohen``, always sound), and
  ``mode`` as in certify.csv;
- ``certified_accuracy.png``: the curves, like the paper's Figure 3;
- ``certify_summary.json``: written by the pipeline (settings, accuracies, the alpha selection).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixrobust.runtime.files import atomic_write, csv_text, write_text
from mixrobust.certify.mixture import BaselineCertificate, MixtureCertificate
from mixrobust.certify.radii import alpha_for_clean_accuracy
from mixrobust.errors import ConfigError

CERTIFY_COLUMNS = ("index", "label", "alpha", "mode", "h_pred", "mix_pred", "p_y", "p_runner_up", "lipschitz_radius",
                   "rs_radius", "correct", "mix_correct")
BASELINE_COLUMNS = ("index", "label", "pred", "clean_pred", "p_lower", "radius", "correct")
CURVE_COLUMNS = ("model", "alpha", "theorem", "mode", "radius", "certified_accuracy")
_INT = {"index", "label", "h_pred", "mix_pred", "pred", "clean_pred"}
_BOOL = {"correct", "mix_correct"}


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Parse any of the CSV files above back into typed rows (ints, floats incl. inf, bools, strings)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, cell in raw.items():
                if key in _INT:
                    row[key] = int(cell)
                elif key in _BOOL:
                    row[key] = cell == "True"
                elif key in ("model", "theorem", "mode"):
                    row[key] = cell
                else:
                    row[key] = float(cell) if cell else None
            rows.append(row)
    return rows


def certify_rows(cert: MixtureCertificate, index: Sequence[int]) -> list[dict]:
    """Rows of ``certify.csv``, example-major (every alpha of the first example, then the next)."""
    index = np.asarray(index).reshape(-1)
    rows = []
    for j in range(len(cert.labels)):
        for i, alpha in enumerate(cert.alphas):
            rows.append({
                "index": int(index[j]), "label": int(cert.labels[j]), "alpha": float(alpha), "mode": cert.mode,
                "h_pred": int(cert.h_pred[j]), "mix_pred": int(cert.mix_pred[i, j]),
                "p_y": float(cert.p_y[j]), "p_runner_up": float(cert.p_runner_up[j]),
                "lipschitz_radius": float(cert.lipschitz_radius[i, j]), "rs_radius": float(cert.rs_radius[i, j]),
                "correct": bool(cert.correct[j]), "mix_correct": bool(cert.mix_pred[i, j] == cert.labels[j]),
            })
    return rows


def baseline_rows(base: BaselineCertificate, index: Sequence[int]) -> list[dict]:
    """Rows of ``baseline_certify.csv``."""
    index = np.asarray(index).reshape(-1)
    return [{"index": int(index[j]), "label": int(base.labels[j]), "pred": int(base.pred[j]),
             "clean_pred": int(base.clean_pred[j]), "p_lower": float(base.p_lower[j]),
             "radius": float(base.radius[j]), "correct": bool(base.correct[j])} for j in range(len(base.labels))]


def radius_grid(cert: MixtureCertificate, baseline: BaselineCertificate | None, radius_max: float | None,
                points: int) -> np.ndarray:
    """`points` radii from 0 to `radius_max` (default: the largest finite radius found, at least 0.1)."""
    if int(points) < 2:
        raise ConfigError(f"radius_points must be >= 2, got {points}")
    if radius_max is None:
        found = [cert.lipschitz_radius, cert.rs_radius] + ([baseline.radius] if baseline is not None else [])
        finite = np.concatenate([r[np.isfinite(r)].ravel() for r in found])
        radius_max = max(0.1, float(finite.max()) * 1.02 if finite.size else 0.0)
    elif not float(radius_max) > 0:
        raise ConfigError(f"radius_max must be > 0 (or null for the largest radius found), got {radius_max}")
    return np.linspace(0.0, float(radius_max), int(points))


def curve_rows(cert: MixtureCertificate, baseline: BaselineCertificate | None, grid) -> list[dict]:
    """Rows of ``certified_accuracy.csv``: every alpha x theorem x radius, then the baseline's curve."""
    grid = np.asarray(grid, dtype=np.float64)
    rows = []
    for theorem in ("lipschitz", "rs"):
        acc = cert.certified_accuracy(theorem, grid)  # (A, G)
        for i, alpha in enumerate(cert.alphas):
            rows += [{"model": "mix", "alpha": float(alpha), "theorem": theorem, "mode": cert.mode,
                      "radius": float(r), "certified_accuracy": float(a)} for r, a in zip(grid, acc[i])]
    if baseline is not None:
        rows += [{"model": "baseline", "alpha": None, "theorem": "cohen", "mode": "sound", "radius": float(r),
                  "certified_accuracy": float(a)} for r, a in zip(grid, baseline.certified_accuracy(grid))]
    return rows


def select_alpha(alphas: Sequence[float], accuracies: Sequence[float], target: float | None,
                 method: str = "at_least") -> dict:
    """The alpha at which the mixture's clean accuracy matches `target` (`alpha_for_clean_accuracy`).

    Returns ``{"target", "method", "alpha", "reason"}``; alpha is None (and `reason` says why)
    when there is no target or no alpha reaches it, so a finished certification is never lost.
    """
    out = {"target": None if target is None else float(target), "method": method, "alpha": None, "reason": None}
    if target is None:
        out["reason"] = "no target: set certify.baseline_ckpt or certify.target_accuracy"
        return out
    try:
        out["alpha"] = alpha_for_clean_accuracy((list(alphas), list(accuracies)), target, method=method)
    except ConfigError as err:
        out["reason"] = str(err)
    return out


def plot_certified_accuracy(rows: list[dict], path: str | os.PathLike, selected_alpha: float | None = None,
                            title: str = "") -> Path:
    """Certified accuracy vs l_2 radius: per certifiable alpha, Theorem 5 (solid) and Theorem 4
    (dashed) in one colour, the selected alpha drawn thicker, and the RS baseline in black. Plug-in
    curves (``mode`` plugin) say so in their legend entries."""
    import matplotlib  # on the first plot, not with this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    alphas = sorted({r["alpha"] for r in rows if r["model"] == "mix" and r["alpha"] >= 0.5})
    for k, alpha in enumerate(alphas):
        chosen = selected_alpha is not None and math.isclose(alpha, selected_alpha)
        for theorem, style in (("rs", "-"), ("lipschitz", "--")):
            curve = [r for r in rows if r["model"] == "mix" and r["alpha"] == alpha and r["theorem"] == theorem]
            plugin = any(r.get("mode") == "plugin" for r in curve)
            label = (f"alpha={alpha:.3g} Thm {5 if theorem == 'rs' else 4}" + (" plug-in" if plugin else "")
                     + (" (selected)" if chosen else ""))
            pts = [(r["radius"], r["certified_accuracy"]) for r in curve]
            ax.plot(*zip(*pts), color=f"C{k % 10}", ls=style, lw=2.4 if chosen else 1.1, label=label)
    base = [(r["radius"], r["certified_accuracy"]) for r in rows if r["model"] == "baseline"]
    if base:
        ax.plot(*zip(*base), color="k", lw=1.8, ls=":", label="RS baseline (CERTIFY)")
    ax.set(xlabel="l_2 radius", ylabel="certified accuracy", ylim=(-0.02, 1.02), title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")


def write_certify_results(output_dir: str | os.PathLike, cert: MixtureCertificate, index: Sequence[int],
                          curves: list[dict], baseline: BaselineCertificate | None = None,
                          selected_alpha: float | None = None, plots: bool = True, title: str = "") -> dict[str, Path]:
    """Write certify.csv, baseline_certify.csv (with a baseline), certified_accuracy.csv/.png."""
    out = Path(output_dir)
    paths = {"certify.csv": write_text(out / "certify.csv", csv_text(CERTIFY_COLUMNS, certify_rows(cert, index))),
             "certified_accuracy.csv": write_text(out / "certified_accuracy.csv", csv_text(CURVE_COLUMNS, curves))}
    if baseline is not None:
        paths["baseline_certify.csv"] = write_text(out / "baseline_certify.csv",
                                                   csv_text(BASELINE_COLUMNS, baseline_rows(baseline, index)))
    if plots:
        paths["certified_accuracy.png"] = plot_certified_accuracy(curves, out / "certified_accuracy.png",
                                                                  selected_alpha, title)
    return paths
