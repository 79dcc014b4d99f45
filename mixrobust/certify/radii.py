"""Certified l_p radii of the mixture h^alpha (method.md, "Certified robustness").

Theorem 4 (Lipschitz h) and Theorem 5 (randomized-smoothing h, l_2) give a radius inside which
argmax h^alpha(x + d) = argmax h(x), whatever the accurate model g says. Both need alpha in
[1/2, 1]; below 1/2 nothing can be certified (radius 0, with a warning).

This module holds the closed-form radii on probability vectors (the paper's plug-in use); the
sound versions with confidence bounds are in `mixrobust.certify.sound`.

A radius of 0 means *nothing* is certified, not even the point itself. A point counts as
certified only where h (not h^alpha) is correct: the certificate says h^alpha agrees with h.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, get_args

import numpy as np
import torch

from mixrobust.certify.lipschitz import local_lipschitz  # noqa: F401  (feeds lipschitz_radius)
from mixrobust.errors import ConfigError


AlphaMethod = Literal["at_least", "closest", "interpolate"]
"""How `alpha_for_clean_accuracy` matches a target clean accuracy."""


def _np(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=np.float64)


def _out(arr: np.ndarray, ref):
    """Return `arr` as a float64 tensor on `ref`'s device if `ref` is a tensor, else as numpy."""
    if isinstance(ref, torch.Tensor):
        return torch.as_tensor(arr, dtype=torch.float64, device=ref.device)
    return arr


def check_alpha(alpha: float, warn: bool = True) -> bool:
    """Validate `alpha` in [0, 1] (ConfigError otherwise); return whether it can certify (>= 1/2).

    For alpha < 1/2 (and `warn`) a warning says every radius is 0: g can outvote h everywhere.
    """
    a = float(alpha)
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise ConfigError(f"alpha (the mixing weight) must lie in [0, 1], got {alpha}")
    if a < 0.5 and warn:
        warnings.warn(
            f"alpha={a} < 1/2: the mixture cannot be certified (Lemma 2 needs alpha >= 1/2); "
            "every radius is 0",
            stacklevel=3,
        )
    return a >= 0.5


def check_sigma(sigma: float) -> float:
    s = float(sigma)
    if not (s > 0.0) or not math.isfinite(s):
        raise ConfigError(f"the smoothing noise sigma must be a finite number > 0, got {sigma}")
    return s


def rs_lipschitz_constant(sigma: float) -> float:
    """l_2 Lipschitz constant sqrt(2/pi)/sigma of each probability output of a Gaussian-smoothed model."""
    return math.sqrt(2.0 / math.pi) / check_sigma(sigma)


def _labels(h: np.ndarray, y) -> np.ndarray:
    if h.ndim != 2 or h.shape[1] < 2:
        raise ConfigError(f"probabilities must have shape (N, K) with K >= 2, got {h.shape}")
    if y is None:
        return h.argmax(axis=1)
    y_np = _np(y).astype(np.int64).reshape(-1)
    if y_np.shape[0] != h.shape[0] or np.any((y_np < 0) | (y_np >= h.shape[1])):
        raise ConfigError(f"y must hold {h.shape[0]} class indices in [0, {h.shape[1]})")
    return y_np


def _others(upper: np.ndarray, y: np.ndarray, fill: float) -> np.ndarray:
    """Copy of (N, K) `upper` with the entry of class y replaced by `fill`."""
    out = upper.copy()
    out[np.arange(len(y)), y] = fill
    return out


def theorem4_radius(lower_y, upper, y, alpha: float, lipschitz) -> np.ndarray:
    """Theorem 4 on bounds: min_{i != y} [alpha (lower_y - upper_i) + alpha - 1] / [alpha (L_y + L_i)].

    `lower_y` (N,) is a lower bound on h_y, `upper` (N, K) upper bounds on every h_i (column y is
    ignored), `lipschitz` a scalar, (K,) or (N, K). The radius grows with h_y and shrinks with
    every h_i, so valid bounds give a valid radius. Negative values become 0 (so does everything
    for alpha < 1/2; no warning here, the public entry points warn).
    """
    lower_y, upper = _np(lower_y), _np(upper)
    n, k = upper.shape
    if not check_alpha(alpha, warn=False):
        return np.zeros(n)
    lip = np.broadcast_to(_np(lipschitz), (n, k))
    if np.any(lip <= 0) or not np.all(np.isfinite(lip)):
        raise ConfigError("Lipschitz constants must be finite and > 0")
    rows = np.arange(n)
    num = alpha * (lower_y[:, None] - upper) + alpha - 1.0  # (N, K)
    den = alpha * (lip[rows, y][:, None] + lip)  # (N, K)
    ratio = _others(num / den, y, np.inf)
    return np.maximum(ratio.min(axis=1), 0.0)


def theorem5_radius(lower_y, upper_other, alpha: float, sigma: float) -> np.ndarray:
    """Theorem 5 on bounds: (sigma/2) (Phi^-1(alpha lower_y) - Phi^-1(alpha upper_other + 1 - alpha)).

    `lower_y` (N,) bounds h_y from below, `upper_other` (N,) bounds max_{i != y} h_i from above.
    Negative (or undefined) values become 0. At alpha = 1 the radius is +inf where
    lower_y = 1 and upper_other = 0. No warning for alpha < 1/2 here (radius 0).
    """
    sigma = check_sigma(sigma)
    lower_y, upper_other = _np(lower_y), _np(upper_other)
    if not check_alpha(alpha, warn=False):
        return np.zeros(lower_y.shape)
    from scipy import stats  # on first use: scipy.stats takes a second to import

    with np.errstate(invalid="ignore"):
        r = 0.5 * sigma * (
            stats.norm.ppf(alpha * lower_y) - stats.norm.ppf(alpha * upper_other + 1.0 - alpha)
        )
    return np.where(np.isnan(r) | (r < 0), 0.0, r)


def lipschitz_radius(h_probs, alpha: float, lipschitz, y=None, max_radius: float | None = None):
    """Theorem 4: the radius of h^alpha from h's probabilities `h_probs` (N, K) and Lipschitz constants.

    r = min_{i != y} [alpha (h_y - h_i) + alpha - 1] / [alpha (L_y + L_i)], 0 where negative.
    `lipschitz` is a scalar (same constant for every class), (K,) or (N, K) per-class constants
    in the threat norm; `y` defaults to argmax h. alpha = 1 gives the usual margin radius
    min (h_y - h_i) / (L_y + L_i). With local constants valid on an eps-ball, pass
    ``max_radius=eps``: the radius is clipped there. Returns (N,) like `h_probs` (tensor or numpy).
    """
    h = _np(h_probs)
    yy = _labels(h, y)
    check_alpha(alpha)
    r = theorem4_radius(h[np.arange(len(yy)), yy], h, yy, alpha, lipschitz)
    if max_radius is not None:
        r = np.minimum(r, float(max_radius))
    return _out(r, h_probs)


def rs_radius(h_probs, alpha: float, sigma: float, y=None):
    """Theorem 5: the l_2 radius of h^alpha for a Gaussian-smoothed h with probabilities `h_probs` (N, K).

    r = (sigma/2) (Phi^-1(alpha h_y) - Phi^-1(alpha h_y' + 1 - alpha)), y' the largest class other
    than y (y defaults to argmax h), 0 where negative. For alpha < 1 it never exceeds
    sigma Phi^-1(alpha). Returns (N,) like `h_probs`.
    """
    h = _np(h_probs)
    yy = _labels(h, y)
    check_alpha(alpha)
    runner_up = _others(h, yy, -np.inf).max(axis=1)
    return _out(theorem5_radius(h[np.arange(len(yy)), yy], runner_up, alpha, sigma), h_probs)


def certified_accuracy(radii, correct, grid):
    """Certified accuracy at each radius r in `grid` (G,): the fraction of points with correct,
    radius >= r and radius > 0.

    `correct` (N,) must already say whether h's (non-abstained) prediction is right. A radius of 0
    certifies nothing, so such points do not count even at r = 0. Returns (G,) like `radii`.
    """
    r, c, g = _np(radii), _np(correct).astype(bool), _np(grid).reshape(-1)
    if r.shape != c.shape:
        raise ConfigError(f"radii {r.shape} and correct {c.shape} must have the same shape")
    cert = c[None, :] & (r[None, :] > 0) & (r[None, :] >= g[:, None])  # (G, N)
    return _out(cert.mean(axis=1) if r.size else np.zeros(len(g)), radii)


def alpha_for_clean_accuracy(clean_acc_by_alpha, target: float, method: AlphaMethod = "at_least") -> float:
    """The alpha at which h^alpha's clean accuracy matches `target` (e.g. an RS baseline's).

    `clean_acc_by_alpha` is ``{alpha: accuracy}`` or a pair ``(alphas, accuracies)``. Methods:

    - ``at_least`` (default): the largest grid alpha whose accuracy is >= target. Radii grow with
      alpha, so this is the most robust mixture that is at least as accurate as the target.
      ConfigError if no alpha reaches the target.
    - ``closest``: the grid alpha whose accuracy is closest to the target (ties: larger alpha).
    - ``interpolate``: the largest alpha at which the piecewise-linear interpolation of the
      accuracy curve is >= target (an alpha between grid points; a grid point if none crosses).
    """
    if isinstance(clean_acc_by_alpha, dict):
        alphas, accs = zip(*sorted(clean_acc_by_alpha.items()))
    else:
        alphas, accs = clean_acc_by_alpha
    a, acc = _np(alphas).reshape(-1), _np(accs).reshape(-1)
    if a.size == 0 or a.shape != acc.shape:
        raise ConfigError("need one clean accuracy per alpha (and at least one alpha)")
    order = np.argsort(a)
    a, acc = a[order], acc[order]
    t = float(target)
    if method == "closest":
        gap = np.abs(acc - t)
        return float(a[np.flatnonzero(gap == gap.min())[-1]])
    if method not in get_args(AlphaMethod):
        raise ConfigError(f"unknown method {method!r}; valid values: {', '.join(get_args(AlphaMethod))}")
    ok = np.flatnonzero(acc >= t)
    if ok.size == 0:
        best = f"best is {acc.max()} at alpha={a[acc.argmax()]}"
        raise ConfigError(f"no alpha reaches clean accuracy {t}; {best}")
    j = ok[-1]
    if method == "at_least" or j == len(a) - 1:
        return float(a[j])
    # accuracy falls below the target between a[j] and a[j + 1]: linear crossing
    frac = (acc[j] - t) / (acc[j] - acc[j + 1])
    return float(a[j] + frac * (a[j + 1] - a[j]))
