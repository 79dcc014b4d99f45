"""Eq. (3) / eq. (4) on precomputed base outputs, vectorized over a vector of mixing weights.

Eq. (3) with gamma = alpha / (1 - alpha) is written with the effective weight

    w_i = gamma R_i / (1 + gamma R_i) = alpha R_i / (1 - alpha + alpha R_i),
    h^gamma_i = (1 - w_i) g_i + w_i h_i,

so alpha = 1 (gamma = inf) is pure h, alpha = 0 or R_i = 0 is pure g, and R_i = 1 gives
w_i = alpha, i.e. eq. (4). These endpoints are returned exactly (selected, not computed), and
every other entry is computed without log(0) so that values and gradients stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, 1, 1)  # (A, 1, 1)


def _interior(alphas: Sequence[float], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(alpha, alpha==0, alpha==1, alpha with the endpoints replaced by 1/2), each (A, 1, 1)."""
    a = _column(alphas, like)
    at_zero, at_one = a == 0, a == 1
    a_in = torch.where(at_zero | at_one, torch.full_like(a, 0.5), a)
    return a, at_zero, at_one, a_in


def mix_log_probs(
    lg: torch.Tensor, lh: torch.Tensor, alphas: Sequence[float], r: torch.Tensor | None = None
) -> torch.Tensor:
    """log((1 - w) g + w h) from log-probabilities `lg`, `lh` (N, K): returns (A, N, K).

    `r` (N, K) or (N, 1) is R_i(x) (None means R_i = 1, i.e. eq. (4)). Computed as a
    logaddexp of log(1 - w) + lg and log(w) + lh, stable for logits of any size.
    """
    a, at_zero, at_one, a_in = _interior(alphas, lg)
    log_a = _column([math.log(v) if v > 0 else 0.0 for v in alphas], lg)
    log_1ma = _column([math.log1p(-v) if v < 1 else 0.0 for v in alphas], lg)
    if r is None:
        log_wg, log_wh, pure_g = log_1ma, log_a, at_zero
    else:
        r_pos = r > 0
        log_den = torch.log((1 - a_in) + a_in * r)  # (A, N, K|1)
        log_r = torch.log(torch.where(r_pos, r, torch.ones_like(r)))  # no log(0) in the graph
        log_wg = log_1ma - log_den
        log_wh = log_a + log_r - log_den
        pure_g = at_zero | ~r_pos
    mixed = torch.logaddexp(log_wg + lg, log_wh + lh)  # (A, N, K)
    return torch.where(at_one, lh, torch.where(pure_g, lg, mixed))


def mix_logits(
    gl: torch.Tensor, hl: torch.Tensor, alphas: Sequence[float], r: torch.Tensor | None = None
) -> torch.Tensor:
    """(1 - w) gl + w hl on logits `gl`, `hl` (N, K): returns (A, N, K); `r` as in `mix_log_probs`."""
    a, at_zero, at_one, a_in = _interior(alphas, gl)
    if r is None:
        w_g, w_h, pure_g = _column([1.0 - v for v in alphas], gl), a, at_zero
    else:
        den = (1 - a_in) + a_in * r  # (A, N, K|1)
        w_g, w_h = (1 - a_in) / den, a_in * r / den
        pure_g = at_zero | (r == 0)
    mixed = w_g * gl + w_h * hl  # (A, N, K)
    return torch.where(at_one, hl, torch.where(pure_g, gl, mixed))
