"""Fitting the nonlinear map and alpha without training (MixedNUTS's search; method.md, "Nonlinear mixing").

Inputs: on a held-out slice of training images, g's clean logits, h's clean logits, and h's logits on
minimum-margin attacked images (an attack on h alone that keeps, per example, its lowest-margin point).

Estimates, for a map M and a weight alpha (prob mixing):

- robust: the fraction of the slice on which the mixture stays right *whatever g outputs* on h's attacked
  image. With q = softmax(M(h(x_adv))), g can at worst put all its mass on the strongest other class, so the
  mixture is right iff ``alpha (q_y - max_{j != y} q_j) > 1 - alpha``: h's mapped probability margin must
  exceed (1 - alpha) / alpha. At alpha = 1 with the identity map this is h's own robust accuracy.
- clean: the mixture's accuracy on the clean images, ``argmax((1 - alpha) softmax(g) + alpha softmax(M(h)))``.

Search: for each (s, p, c) of the grid, the smallest alpha whose robust estimate reaches `target` times h's
robust accuracy (robust estimates grow with alpha, so it is one order statistic of the margins:
alpha = 1 / (1 + m_(T)) just above, with m_(T) the T-th largest margin); then the combination with the
highest clean estimate (ties: the higher robust estimate, then the first in grid order). Everything is
batched over the grid: (P, N, K) tensors in chunks of parameters, no loop over examples.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mixrobust.errors import ConfigError
from mixrobust.mixing.maps import HMap, nonlinear_map

#: alpha is rounded up to this resolution (so the chosen alpha strictly clears the margin it is computed from).
ALPHA_RESOLUTION = 1e-4
#: Default grid (6 x 6 x 6 = 216 maps).
SCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
POWERS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
BIASES = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0)
#: Points of the saved curves (alpha from 0 to 1).
CURVE_POINTS = 101


@dataclass
class MapFit:
    """A fit's outcome: the chosen map and alpha, the estimates, linear mixing's at the same target, the grid."""

    h_map: HMap
    alpha: float
    clean: float  # estimated clean accuracy of the chosen mixture
    robust: float  # estimated robust accuracy of the chosen mixture
    h_robust: float  # h's accuracy on its attacked images (the target's base)
    h_clean: float
    g_clean: float
    target: float  # the fraction of h_robust the robust estimate must reach
    linear: dict  # identity map at the same target: alpha, clean, robust (alpha None where unreachable)
    grid: list[dict] = field(default_factory=list)  # every (scale, power, bias): alpha, clean, robust (None: unreachable)
    n: int = 0

    def summary(self) -> dict:
        return {"h_map": self.h_map.as_dict(), "alpha": self.alpha, "clean": self.clean, "robust": self.robust,
                "h_robust": self.h_robust, "h_clean": self.h_clean, "g_clean": self.g_clean, "target": self.target,
                "linear": self.linear, "n": self.n}


def prob_margins(logits: Tensor, y: Tensor) -> Tensor:
    """``softmax(z)_y - max_{j != y} softmax(z)_j`` over the last dim: (..., N, K), (N,) -> (..., N), float64."""
    q = torch.softmax(logits.double(), dim=-1)
    label = torch.nn.functional.one_hot(y, q.shape[-1]).bool().expand_as(q)
    own = q.masked_fill(~label, 0.0).sum(-1)
    other = q.masked_fill(label, -1.0).amax(-1)
    return own - other


def robust_estimate(margins: Tensor, alphas: Tensor) -> Tensor:
    """Fraction robust for margins (..., N) and alphas (A,) or (..., 1): ``alpha * m > 1 - alpha`` -> (..., A)."""
    a = alphas.double()
    return (a.unsqueeze(-1) * margins.unsqueeze(-2) > (1 - a).unsqueeze(-1)).double().mean(-1)


def clean_estimate(g_logits: Tensor, h_mapped: Tensor, y: Tensor, alphas: Tensor) -> Tensor:
    """Clean accuracy of ``(1 - alpha) softmax(g) + alpha softmax(h_mapped)``: g (N, K), h_mapped (..., N, K),
    alphas broadcasting against (..., 1, 1) -> (...)."""
    mix = (1 - alphas) * torch.softmax(g_logits.double(), -1) + alphas * torch.softmax(h_mapped.double(), -1)
    return (mix.argmax(-1) == y).double().mean(-1)


def smallest_alpha(margins: Tensor, needed: int) -> Tensor:
    """Per row of margins (P, N): the smallest alpha (rounded up to `ALPHA_RESOLUTION`) at which at least `needed`
    examples have ``alpha * m > 1 - alpha``; NaN where even alpha = 1 leaves fewer."""
    if needed <= 0:
        return torch.zeros(margins.shape[0], dtype=torch.float64)
    m = margins.double().topk(needed, dim=-1).values[:, -1]  # the needed-th largest margin
    alpha = 1.0 / (1.0 + m.clamp_min(1e-300))
    alpha = torch.ceil(alpha / ALPHA_RESOLUTION + 1e-9) * ALPHA_RESOLUTION
    alpha = alpha.clamp(max=1.0)
    # rounding may still leave alpha * m == 1 - alpha at alpha = 1 only when m == 0: unreachable
    ok = (m > 0) & (alpha * m > 1 - alpha)
    return torch.where(ok, alpha, torch.full_like(alpha, math.nan))


def fit_nonlinear_map(g_clean: Tensor, h_clean: Tensor, h_adv: Tensor, y: Tensor, *,
                      scales: Sequence[float] = SCALES, powers: Sequence[float] = POWERS,
                      biases: Sequence[float] = BIASES, top_k: int | None = None, target: float = 0.985,
                      chunk: int = 64) -> MapFit:
    """Search (s, p, c) on the grid and alpha per map (see the module docstring).

    `g_clean`, `h_clean`, `h_adv`: (N, K) logits on the same N held-out images (h_adv: h on its minimum-margin
    attacked images), labels `y` (N,). Deterministic. ConfigError when no map reaches the target at any alpha.
    """
    if not 0 < target <= 1:
        raise ConfigError(f"fit.target must be in (0, 1] (a fraction of h's robust accuracy), got {target}")
    if not (g_clean.shape == h_clean.shape == h_adv.shape) or g_clean.ndim != 2 or y.shape != g_clean.shape[:1]:
        raise ValueError(f"expected (N, K) logits and (N,) labels, got {tuple(g_clean.shape)}, "
                         f"{tuple(h_clean.shape)}, {tuple(h_adv.shape)}, {tuple(y.shape)}")
    n = y.shape[0]
    y = y.long()
    h_robust = float(((h_adv.argmax(-1) == y) & (h_clean.argmax(-1) == y)).double().mean())
    if h_robust == 0:
        raise ConfigError("h is right on none of the attacked fit images: there is no robustness to keep; check h_ckpt "
                          "and the threat")
    needed = math.ceil(target * h_robust * n - 1e-9)
    clean_ok = h_clean.argmax(-1) == y  # an example counts as robust only if h is right on it clean, too
    params = torch.tensor(list(itertools.product(scales, powers, biases)), dtype=torch.float64)  # (P, 3)
    alphas, cleans, robusts = [], [], []
    for start in range(0, params.shape[0], chunk):
        s, p, c = (params[start:start + chunk, i].view(-1, 1, 1) for i in range(3))
        adv = nonlinear_map(h_adv.double(), s, p, c, top_k)  # (P, N, K)
        margins = prob_margins(adv, y).masked_fill(~clean_ok, -1.0)  # (P, N)
        alpha = smallest_alpha(margins, needed)  # (P,)
        a = alpha.nan_to_num(1.0).view(-1, 1, 1)
        cleans.append(clean_estimate(g_clean, nonlinear_map(h_clean.double(), s, p, c, top_k), y, a))
        robusts.append(robust_estimate(margins, a.view(-1, 1)).squeeze(-1))
        alphas.append(alpha)
    alpha, clean, robust = torch.cat(alphas), torch.cat(cleans), torch.cat(robusts)
    feasible = ~alpha.isnan()
    if not feasible.any():
        raise ConfigError(f"no map of the grid keeps {target:.1%} of h's robust accuracy ({h_robust:.1%}) at any alpha; "
                          "lower fit.target or widen the grid (fit.scales / fit.powers / fit.biases)")
    # highest clean estimate, then highest robust estimate, then first in grid order
    top = feasible & (clean == clean[feasible].max())
    top &= robust == robust[top].max()
    best = int(torch.nonzero(top)[0])
    s, p, c = params[best].tolist()
    h_map = HMap("nonlinear", s, p, c, top_k)
    grid = [{"scale": sv, "power": pv, "bias": cv, **({"alpha": None, "clean": None, "robust": None} if math.isnan(av)
                                                       else {"alpha": av, "clean": cl, "robust": rb})}
            for (sv, pv, cv), av, cl, rb in zip(params.tolist(), alpha.tolist(), clean.tolist(), robust.tolist())]
    return MapFit(h_map=h_map, alpha=float(alpha[best]), clean=float(clean[best]), robust=float(robust[best]),
                  h_robust=h_robust, h_clean=float(clean_ok.double().mean()),
                  g_clean=float((g_clean.argmax(-1) == y).double().mean()), target=target,
                  linear=_linear(g_clean, h_clean, h_adv, y, clean_ok, needed), grid=grid, n=n)


def _linear(g_clean, h_clean, h_adv, y, clean_ok, needed) -> dict:
    """Linear mixing (identity map) at the same target: its alpha and estimates."""
    margins = prob_margins(h_adv, y).masked_fill(~clean_ok, -1.0).unsqueeze(0)
    alpha = float(smallest_alpha(margins, needed)[0])
    if math.isnan(alpha):
        return {"alpha": None, "clean": None, "robust": None}
    a = torch.tensor(alpha, dtype=torch.float64)
    return {"alpha": alpha, "clean": float(clean_estimate(g_clean, h_clean, y, a)),
            "robust": float(robust_estimate(margins, a.view(1))[0, 0])}


def fit_curves(g_clean: Tensor, h_clean: Tensor, h_adv: Tensor, y: Tensor, maps: Sequence[HMap],
               points: int = CURVE_POINTS) -> list[dict]:
    """Estimated clean and robust accuracy of each map's mixture at `points` alphas in [0, 1] (the fit's curves):
    rows ``{h_map, alpha, clean, robust}``."""
    y = y.long()
    alphas = torch.linspace(0, 1, points, dtype=torch.float64)
    clean_ok = h_clean.argmax(-1) == y
    rows = []
    for h_map in maps:
        margins = prob_margins(h_map(h_adv.double()), y).masked_fill(~clean_ok, -1.0)
        robust = robust_estimate(margins, alphas)
        clean = clean_estimate(g_clean, h_map(h_clean.double()).unsqueeze(0), y, alphas.view(-1, 1, 1))
        rows += [{"h_map": h_map.label, "alpha": a, "clean": c, "robust": r}
                 for a, c, r in zip(alphas.tolist(), clean.tolist(), robust.tolist())]
    return rows
