"""One-sided confidence bounds on a probability or on the mean of a [0,1]-bounded variable.

Every bound here holds with probability at least ``1 - failure_prob`` on its own (one-sided
level ``failure_prob``); splitting ``failure_prob`` over several bounds is the caller's job
(see `mixrobust.certify.sound.sound_radii`).

Inputs may be Python numbers, numpy arrays or torch tensors (any shape, broadcast together);
the result has the type of the first array argument (a torch tensor keeps its device, as
float64), and a float for scalar inputs.

- Clopper-Pearson (exact binomial, Clopper & Pearson 1934): hard votes, ``k`` successes in ``n``.
- Hoeffding (1963): the mean of ``n`` i.i.d. variables in [0,1], e.g. soft votes.
- Empirical Bernstein (Maurer & Pontil 2009, Thm. 4): as Hoeffding but uses the sample variance;
  much tighter when the variance is small (confident soft votes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mixrobust.errors import ConfigError


def check_failure_prob(failure_prob: float) -> float:
    """Return `failure_prob` as a float if it lies strictly inside (0, 1), else raise ConfigError."""
    fp = float(failure_prob)
    if not (0.0 < fp < 1.0):
        raise ConfigError(
            f"failure_prob must lie strictly between 0 and 1 (e.g. 0.001), got {failure_prob}"
        )
    return fp


def _as_numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=np.float64)


def _like(result: np.ndarray, *refs):
    """Convert `result` back to the type of the first array-like reference."""
    for ref in refs:
        if isinstance(ref, torch.Tensor):
            return torch.as_tensor(result, dtype=torch.float64, device=ref.device)
    for ref in refs:
        if isinstance(ref, np.ndarray):
            return np.asarray(result, dtype=np.float64)
    return float(result)


def _check_counts(k: np.ndarray, n: np.ndarray) -> None:
    if np.any(n < 1):
        raise ConfigError(f"the number of samples n must be >= 1, got min {n.min()}")
    if np.any(k < 0) or np.any(k > n):
        raise ConfigError("counts k must satisfy 0 <= k <= n")


def clopper_pearson_lower(k, n, failure_prob: float):
    """One-sided Clopper-Pearson lower bound p_lo on a binomial proportion.

    With probability at least ``1 - failure_prob`` over the ``n`` Bernoulli draws, the true
    proportion is >= p_lo. It is the ``failure_prob`` quantile of Beta(k, n - k + 1), and 0 at k = 0.
    """
    fp = check_failure_prob(failure_prob)
    k_np, n_np = np.broadcast_arrays(_as_numpy(k), _as_numpy(n))
    _check_counts(k_np, n_np)
    from scipy import stats  # on first use: scipy.stats takes a second to import

    with np.errstate(invalid="ignore"):
        lo = stats.beta.ppf(fp, k_np, n_np - k_np + 1)
    lo = np.where(k_np == 0, 0.0, lo)
    return _like(lo, k, n)


def clopper_pearson_upper(k, n, failure_prob: float):
    """One-sided Clopper-Pearson upper bound p_hi on a binomial proportion.

    With probability at least ``1 - failure_prob``, the true proportion is <= p_hi. It is the
    ``1 - failure_prob`` quantile of Beta(k + 1, n - k), and 1 at k = n.
    """
    fp = check_failure_prob(failure_prob)
    k_np, n_np = np.broadcast_arrays(_as_numpy(k), _as_numpy(n))
    _check_counts(k_np, n_np)
    from scipy import stats

    with np.errstate(invalid="ignore"):
        hi = stats.beta.ppf(1.0 - fp, k_np + 1, n_np - k_np)
    hi = np.where(k_np == n_np, 1.0, hi)
    return _like(hi, k, n)


def _hoeffding_width(n: np.ndarray, fp: float) -> np.ndarray:
    return np.sqrt(math.log(1.0 / fp) / (2.0 * n))


def hoeffding_lower(mean, n, failure_prob: float):
    """Lower bound on E[Z] for Z in [0,1] from the mean of ``n`` i.i.d. draws (Hoeffding).

    With probability at least ``1 - failure_prob``: E[Z] >= mean - sqrt(log(1/failure_prob) / (2n)),
    clipped to [0, 1].
    """
    fp = check_failure_prob(failure_prob)
    m, n_np = np.broadcast_arrays(_as_numpy(mean), _as_numpy(n))
    if np.any(n_np < 1):
        raise ConfigError(f"the number of samples n must be >= 1, got min {n_np.min()}")
    return _like(np.clip(m - _hoeffding_width(n_np, fp), 0.0, 1.0), mean, n)


def hoeffding_upper(mean, n, failure_prob: float):
    """Upper bound on E[Z] for Z in [0,1]: mean + sqrt(log(1/failure_prob) / (2n)), clipped to [0,1].

    Holds with probability at least ``1 - failure_prob``.
    """
    fp = check_failure_prob(failure_prob)
    m, n_np = np.broadcast_arrays(_as_numpy(mean), _as_numpy(n))
    if np.any(n_np < 1):
        raise ConfigError(f"the number of samples n must be >= 1, got min {n_np.min()}")
    return _like(np.clip(m + _hoeffding_width(n_np, fp), 0.0, 1.0), mean, n)


def _bernstein_width(var: np.ndarray, n: np.ndarray, fp: float) -> np.ndarray:
    if np.any(n < 2):
        raise ConfigError("the empirical Bernstein bound needs n >= 2 samples")
    log_term = math.log(2.0 / fp)
    return np.sqrt(2.0 * np.maximum(var, 0.0) * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))


def empirical_bernstein_lower(mean, var, n, failure_prob: float):
    """Lower bound on E[Z] for Z in [0,1] (Maurer & Pontil 2009, Theorem 4).

    `var` is the unbiased sample variance of the ``n`` draws. With probability at least
    ``1 - failure_prob``: E[Z] >= mean - sqrt(2 var log(2/failure_prob) / n)
    - 7 log(2/failure_prob) / (3 (n - 1)), clipped to [0, 1].
    """
    fp = check_failure_prob(failure_prob)
    m, v, n_np = np.broadcast_arrays(_as_numpy(mean), _as_numpy(var), _as_numpy(n))
    return _like(np.clip(m - _bernstein_width(v, n_np, fp), 0.0, 1.0), mean, var, n)


def empirical_bernstein_upper(mean, var, n, failure_prob: float):
    """Upper bound on E[Z] for Z in [0,1], the mirror image of `empirical_bernstein_lower`."""
    fp = check_failure_prob(failure_prob)
    m, v, n_np = np.broadcast_arrays(_as_numpy(mean), _as_numpy(var), _as_numpy(n))
    return _like(np.clip(m + _bernstein_width(v, n_np, fp), 0.0, 1.0), mean, var, n)


def sample_variance(total, total_sq, n):
    """Unbiased sample variance from the sum and the sum of squares of ``n`` draws (n >= 2)."""
    s, s2, n_np = np.broadcast_arrays(_as_numpy(total), _as_numpy(total_sq), _as_numpy(n))
    var = (s2 - s * s / n_np) / np.maximum(n_np - 1, 1)
    return _like(np.maximum(var, 0.0), total, total_sq, n)
