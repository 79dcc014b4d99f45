"""Sound (high-probability) and plug-in certified radii of the mixture from Monte Carlo votes.

Both radii (Theorems 4 and 5) grow with h_y and shrink with the largest other class, so a lower
confidence bound on h_y and an upper bound on max_{i != y} h_i give a radius that holds with
probability at least ``1 - failure_prob`` over the noise. The class y comes from *separate*
selection samples: choosing it from the estimation samples biases its count upwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from mixrobust.certify import bounds
from mixrobust.certify.radii import (
    _np,
    _others,
    _out,
    check_alpha,
    check_sigma,
    rs_lipschitz_constant,
    theorem4_radius,
    theorem5_radius,
)
from mixrobust.certify.smoothing import Votes
from mixrobust.errors import ConfigError, check_choice

BoundSplit = Literal["complement", "bonferroni", "runner_up"]
SoftBound = Literal["hoeffding", "bernstein"]


@dataclass
class MixtureRadii:
    """Radii of h^alpha per point (all (N,), tensors when the inputs were tensors, else numpy).

    `y` is h's class, `p_lower` a lower bound on h_y and `p_upper_other` an upper bound on
    max_{i != y} h_i (plain estimates for the plug-in version). `abstain` marks points where even
    h's own prediction is not established (p_lower <= p_upper_other); their radii are 0.
    """

    y: np.ndarray | torch.Tensor
    p_lower: np.ndarray | torch.Tensor
    p_upper_other: np.ndarray | torch.Tensor
    lipschitz: np.ndarray | torch.Tensor
    rs: np.ndarray | torch.Tensor
    abstain: np.ndarray | torch.Tensor

    @property
    def pred(self):
        """h's prediction, -1 where abstained (compare with labels for `certified_accuracy`)."""
        if isinstance(self.y, torch.Tensor):
            return torch.where(self.abstain, torch.full_like(self.y, -1), self.y)
        return np.where(self.abstain, -1, self.y)


def _pack(y, lo, hi_other, r4, r5, ref) -> MixtureRadii:
    abstain = lo <= hi_other
    r4, r5 = np.where(abstain, 0.0, r4), np.where(abstain, 0.0, r5)
    if isinstance(ref, torch.Tensor):
        dev = ref.device
        return MixtureRadii(
            torch.as_tensor(y, dtype=torch.long, device=dev), _out(lo, ref), _out(hi_other, ref),
            _out(r4, ref), _out(r5, ref), torch.as_tensor(abstain, device=dev),
        )
    return MixtureRadii(y, lo, hi_other, r4, r5, abstain)


def sound_radii(
    counts_select,
    counts_est,
    n_est: int,
    alpha: float,
    sigma: float,
    failure_prob: float,
    votes: Votes = "hard",
    bound: BoundSplit = "complement",
    lipschitz=None,
    sq_est=None,
    soft_bound: SoftBound = "hoeffding",
) -> MixtureRadii:
    """Radii of h^alpha that hold with probability at least 1 - failure_prob over the noise samples.

    `counts_select` (N, K) picks y = argmax (Cohen et al.'s n0 selection samples); `counts_est`
    (N, K) from ``n_est`` independent samples gives the bounds: hard-vote counts (Clopper-Pearson)
    or summed soft-vote probabilities (Hoeffding, or empirical Bernstein with ``soft_bound=
    "bernstein"``, which needs the summed squared probabilities `sq_est`). `lipschitz` (scalar,
    (K,) or (N, K), l_2) defaults to the smoothed model's sqrt(2/pi)/sigma.

    Split of `failure_prob` (the probability that any bound used fails):

    - ``complement``: one lower bound on h_y at level failure_prob; max_{i != y} h_i <= 1 - h_y
      (probabilities sum to 1), so the upper bound is 1 - lower. As Cohen et al.'s CERTIFY.
    - ``bonferroni``: lower bound on h_y at failure_prob / 2 and simultaneous upper bounds on
      every other class at failure_prob / (2 (K - 1)) each; the max of them bounds the runner-up.
    - ``runner_up``: lower bound on h_y at failure_prob / 2 and one upper bound at failure_prob / 2,
      the largest of the per-class upper bounds over i != y (for Clopper-Pearson the bound at the
      largest other count; an empirical Bernstein bound also depends on each class's variance).
      Sound because y is fixed by the selection samples: the truly largest other class i* is then
      fixed, it fails its own bound with probability <= failure_prob / 2, and the max over i != y
      is at least i*'s bound. The radius uses this bound for every i != y.

    The returned y is the selection class; `abstain` where p_lower <= p_upper_other.
    """
    check_choice("votes", votes, get_args(Votes))
    check_choice("bound", bound, get_args(BoundSplit))
    check_choice("soft_bound", soft_bound, get_args(SoftBound))
    fp = bounds.check_failure_prob(failure_prob)
    sigma = check_sigma(sigma)
    check_alpha(alpha)
    sel, est = _np(counts_select), _np(counts_est)
    if sel.ndim != 2 or sel.shape != est.shape or sel.shape[1] < 2:
        raise ConfigError(f"counts must both be (N, K) with K >= 2, got {sel.shape} and {est.shape}")
    n_est = int(n_est)
    if n_est < 1:
        raise ConfigError(f"n_est must be >= 1, got {n_est}")
    if soft_bound == "bernstein" and votes == "soft" and sq_est is None:
        raise ConfigError("soft_bound='bernstein' needs sq_est, the summed squared probabilities")
    n, k = est.shape
    rows = np.arange(n)
    y = sel.argmax(axis=1)

    sq = None if sq_est is None else _np(sq_est)  # (N, K)

    def lower(level: float) -> np.ndarray:
        sq_y = None if sq is None else sq[rows, y]
        return _bound(est[rows, y], sq_y, n_est, level, votes, soft_bound, "lower")

    if bound == "complement":
        lo = lower(fp)
        hi = np.broadcast_to((1.0 - lo)[:, None], (n, k)).copy()
    else:
        lo = lower(fp / 2)
        level = fp / (2 * (k - 1)) if bound == "bonferroni" else fp / 2
        hi = _bound(est, sq, n_est, level, votes, soft_bound, "upper")
        if bound == "runner_up":
            hi = np.broadcast_to(_others(hi, y, -np.inf).max(axis=1)[:, None], (n, k)).copy()
    hi_other = _others(hi, y, -np.inf).max(axis=1)
    lip = rs_lipschitz_constant(sigma) if lipschitz is None else lipschitz
    r4 = theorem4_radius(lo, hi, y, alpha, lip)
    r5 = theorem5_radius(lo, hi_other, alpha, sigma)
    return _pack(y, lo, hi_other, r4, r5, counts_est)


def _bound(total, total_sq, n: int, level: float, votes: str, soft_bound: str, side: str):
    if votes == "hard":
        if np.any(np.abs(total - np.round(total)) > 1e-6):
            raise ConfigError("votes='hard' needs integer counts; use votes='soft' for summed probabilities")
        fn = bounds.clopper_pearson_lower if side == "lower" else bounds.clopper_pearson_upper
        return fn(np.round(total), n, level)
    mean = total / n
    if soft_bound == "bernstein":
        var = bounds.sample_variance(total, total_sq, n)
        fn = bounds.empirical_bernstein_lower if side == "lower" else bounds.empirical_bernstein_upper
        return fn(mean, var, n, level)
    fn = bounds.hoeffding_lower if side == "lower" else bounds.hoeffding_upper
    return fn(mean, n, level)


def plugin_radii(h_probs, alpha: float, sigma: float | None = None, lipschitz=None) -> MixtureRadii:
    """The paper's plug-in radii: Theorems 4 and 5 evaluated at Monte Carlo estimates `h_probs` (N, K).

    No confidence bound: the radii are estimates, not guarantees. Theorem 5 needs `sigma` (else its
    radius is 0 everywhere); `lipschitz` defaults to sqrt(2/pi)/sigma. y = argmax h_probs.
    """
    h = _np(h_probs)
    if h.ndim != 2 or h.shape[1] < 2:
        raise ConfigError(f"probabilities must have shape (N, K) with K >= 2, got {h.shape}")
    if sigma is None and lipschitz is None:
        raise ConfigError("plugin_radii needs sigma (randomized smoothing) or lipschitz constants")
    check_alpha(alpha)
    y = h.argmax(axis=1)
    lo = h[np.arange(len(y)), y]
    hi_other = _others(h, y, -np.inf).max(axis=1)
    lip = rs_lipschitz_constant(sigma) if lipschitz is None else lipschitz
    r4 = theorem4_radius(lo, h, y, alpha, lip)
    r5 = theorem5_radius(lo, hi_other, alpha, sigma) if sigma is not None else np.zeros(len(y))
    return _pack(y, lo, hi_other, r4, r5, h_probs)
