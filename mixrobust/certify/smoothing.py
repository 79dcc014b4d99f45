"""Gaussian randomized smoothing (Cohen, Rosenfeld & Kolter 2019) around a frozen base classifier.

The smoothed classifier is h(x) = E_{xi ~ N(0, sigma^2 I)}[ hbar(x + xi) ] with hbar the one-hot
argmax of the base model ("hard" votes, as Cohen et al.) or its softmax ("soft" votes). Noise is
added in pixel space and the noisy image is not clipped.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy import stats
from torch import nn

from mixrobust.certify.bounds import check_failure_prob, clopper_pearson_lower, hoeffding_lower
from mixrobust.certify.radii import check_sigma
from mixrobust.errors import ConfigError, check_choice

Votes = Literal["hard", "soft"]


def _check_n(name: str, n: int) -> int:
    if int(n) != n or int(n) < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {n}")
    return int(n)


def two_sided_binomial_pvalue(n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """p-value of ``scipy.stats.binomtest(n_a, n_a + n_b, 0.5)`` (two-sided), vectorized.

    Binomial(m, 1/2) is symmetric, so the two-sided p-value is min(1, 2 P(X >= max(n_a, n_b))),
    and 1 on a tie.
    """
    n_a, n_b = np.asarray(n_a, dtype=np.int64), np.asarray(n_b, dtype=np.int64)
    hi = np.maximum(n_a, n_b)
    p = np.minimum(1.0, 2.0 * stats.binom.sf(hi - 1, n_a + n_b, 0.5))
    return np.where(n_a == n_b, 1.0, p)


class SmoothedClassifier(nn.Module):
    """Monte Carlo randomized smoothing of `base` (images in [0,1] -> logits) with noise level `sigma`.

    `votes` picks hard (one-hot argmax counts) or soft (softmax sums) votes for `sample_counts`,
    `probs`, `certify`; `forward` always averages softmaxes (it must be differentiable).
    `batch_size` noisy images go through the base model per forward pass. Noise comes from a
    torch.Generator seeded once with `seed` per device, so a fresh object with the same seed
    reproduces the same numbers; successive calls draw fresh noise. `n_forward` is the number of
    noise samples per image in `forward`. The base model is put in eval mode and frozen.
    """

    def __init__(
        self,
        base: nn.Module,
        sigma: float,
        votes: Votes = "hard",
        batch_size: int = 1000,
        seed: int = 0,
        n_forward: int = 8,
    ):
        super().__init__()
        self.sigma = check_sigma(sigma)
        self.votes = check_choice("votes", votes, ("hard", "soft"))
        self.batch_size = _check_n("batch_size", batch_size)
        self.n_forward = _check_n("n_forward", n_forward)
        self.seed = int(seed)
        self.base = base.eval()
        self.base.requires_grad_(False)
        self._generators: dict[torch.device, torch.Generator] = {}

    def train(self, mode: bool = True) -> "SmoothedClassifier":
        """Keep the base model in eval mode whatever mode the wrapper is put in."""
        super().train(mode)
        self.base.eval()
        return self

    def manual_seed(self, seed: int) -> None:
        """Restart every noise stream from `seed`."""
        self.seed = int(seed)
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _noise(self, shape, like: torch.Tensor) -> torch.Tensor:
        gen = self._generator(like.device)
        return self.sigma * torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor, n: int, soft: bool, squares: bool = False):
        """Sum of votes over n noise samples per input, in chunks of `batch_size` noisy images.

        The N*n (image, sample) pairs are laid out flat; each chunk is a slice of them, so one
        forward pass may mix several images and no Python loop runs over images.
        """
        n = _check_n("n", n)
        if x.shape[0] == 0:
            raise ConfigError("got an empty batch of images")
        num, total = x.shape[0], x.shape[0] * n
        totals = sq = None
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            img = torch.arange(start, stop, device=x.device) // n  # (B,) image index of each sample
            batch = x[img]  # (B, C, H, W)
            logits = self.base(batch + self._noise(batch.shape, batch))  # (B, K)
            if totals is None:
                k = logits.shape[1]
                dtype = torch.float64 if soft else torch.long
                totals = torch.zeros(num, k, dtype=dtype, device=x.device)  # (N, K)
                sq = torch.zeros(num, k, dtype=torch.float64, device=x.device) if squares else None
            if soft:
                p = torch.softmax(logits.float(), dim=1).double()  # (B, K)
                totals.index_add_(0, img, p)
                if squares:
                    sq.index_add_(0, img, p * p)
            else:
                flat = img * totals.shape[1] + logits.argmax(dim=1)  # (B,)
                totals.view(-1).index_add_(0, flat, torch.ones_like(flat))
        return totals, sq

    def sample_counts(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Votes from n noise samples per image -> (N, K) on x's device.

        Hard votes: integer counts of the base model's argmax (each row sums to n). Soft votes:
        summed softmax probabilities (float64; each row sums to n up to rounding).
        """
        return self._accumulate(x, n, soft=self.votes == "soft")[0]

    def sample_soft_moments(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed softmax probabilities and summed squares (N, K) each, for empirical Bernstein bounds."""
        return self._accumulate(x, n, soft=True, squares=True)

    @torch.no_grad()
    def probs(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Monte Carlo estimate of the smoothed probabilities h(x) -> (N, K), float32, no gradient."""
        n = _check_n("n", n)
        return (self.sample_counts(x, n).double() / n).float()

    def predict(self, x: torch.Tensor, n: int, failure_prob: float) -> torch.Tensor:
        """Cohen et al.'s PREDICT -> (N,) classes on x's device, -1 for abstain.

        With hard votes, the top-two counts nA, nB are tested with a two-sided binomial test
        (nA out of nA + nB at 1/2, as scipy.stats.binomtest); p-value > failure_prob -> abstain.
        With probability at least 1 - failure_prob over the noise, a returned class (not -1) is
        the smoothed classifier's prediction argmax_c P(f(x + xi) = c).
        """
        n = _check_n("n", n)
        fp = check_failure_prob(failure_prob)
        if self.votes != "hard":
            raise ConfigError("predict's binomial test needs votes='hard' (counts of base predictions)")
        counts = self.sample_counts(x, n)  # (N, K)
        top2 = counts.topk(2, dim=1)
        n_a, n_b = top2.values[:, 0].cpu().numpy(), top2.values[:, 1].cpu().numpy()
        pvals = two_sided_binomial_pvalue(n_a, n_b)
        pred = top2.indices[:, 0].clone()
        pred[torch.as_tensor(pvals > fp, device=pred.device)] = -1
        return pred

    def certify(
        self, x: torch.Tensor, n0: int, n: int, failure_prob: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cohen et al.'s CERTIFY for a batch -> (pred (N,), radius (N,), p_lower (N,)) on x's device.

        The class cA is the top class of `n0` selection samples; `n` fresh samples give a one-sided
        lower bound pA on P(hbar(x + xi) = cA) at level `failure_prob` (Clopper-Pearson for hard
        votes; Hoeffding for soft votes, which bounds the mean softmax of cA). If pA > 1/2 the
        prediction is cA with l_2 radius sigma * Phi^-1(pA), else -1 with radius 0.
        With probability at least 1 - failure_prob over the noise, every point whose prediction is
        not -1 has the smoothed classifier predicting cA at every x + d with ||d||_2 < radius.
        """
        n0, n = _check_n("n0", n0), _check_n("n", n)
        if n0 > n:
            raise ConfigError(
                f"n0 (selection samples) must not exceed n (estimation samples), got n0={n0} > n={n}"
            )
        fp = check_failure_prob(failure_prob)
        c_a = self.sample_counts(x, n0).argmax(dim=1)  # (N,)
        counts = self.sample_counts(x, n)  # (N, K)
        hits = counts.gather(1, c_a[:, None]).squeeze(1).double().cpu().numpy()
        if self.votes == "hard":
            p_lower = clopper_pearson_lower(hits, n, fp)
        else:
            p_lower = hoeffding_lower(hits / n, n, fp)
        ok = p_lower > 0.5
        radius = np.where(ok, self.sigma * stats.norm.ppf(np.where(ok, p_lower, 0.75)), 0.0)
        dev = x.device
        pred = torch.where(torch.as_tensor(ok, device=dev), c_a, torch.full_like(c_a, -1))
        return pred, torch.as_tensor(radius, device=dev), torch.as_tensor(p_lower, device=dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable estimate of log h(x) -> (N, K): log of the mean softmax over `n_forward` noises.

        Fresh noise on every call (expectation over transformation for attacks). The output is
        log-probabilities, so it can serve as h in the mixture (log_softmax of it is itself);
        probabilities are floored at the smallest positive float so the log stays finite.
        """
        m = self.n_forward
        rep = x.repeat_interleave(m, dim=0)  # (N*m, C, H, W)
        noisy = rep + self._noise(rep.shape, rep)
        chunks = [torch.softmax(self.base(c).float(), dim=1) for c in noisy.split(self.batch_size)]
        p = torch.cat(chunks).view(x.shape[0], m, -1).mean(dim=1)  # (N, K)
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()

