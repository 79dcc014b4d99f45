"""Gaussian randomized smoothing (Cohen, Rosenfeld & Kolter 2019) around a frozen base classifier.

The smoothed classifier is h(x) = E_{xi ~ N(0, sigma^2 I)}[ hbar(x + xi) ] with hbar the one-hot
argmax of the base model ("hard" votes, as Cohen et al.) or its softmax ("soft" votes). Noise is
added in pixel space and the noisy image is not clipped.

A base model that returns NaN or inf on noisy inputs casts no valid votes: the vote passes count
such outputs per image on the device and a sampling call raises `NonFiniteError` at its end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from mixrobust.attacks.pgd import NONFINITE_ADVICE, nonfinite_rows, parse_autocast_dtype
from mixrobust.certify.bounds import check_failure_prob, clopper_pearson_lower, hoeffding_lower
from mixrobust.certify.radii import check_sigma
from mixrobust.errors import ConfigError, NonFiniteError, check_choice, check_count

Votes = Literal["hard", "soft"]

#: Noisy images per forward pass when `batch_size` is None: large batches keep a GPU busy; on a
#: CPU, passes whose activations fit in a core's cache run about twice as fast as passes of 1,000.
DEFAULT_BATCH = {"cuda": 4000, "cpu": 64}


def noise_block(numel: int) -> int:
    """Noise samples drawn per generator call for images of `numel` values: at most 1,024 and 64 MiB."""
    return int(min(1024, max(16, 2**24 // max(1, numel))))


def two_sided_binomial_pvalue(n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """p-value of ``scipy.stats.binomtest(n_a, n_a + n_b, 0.5)`` (two-sided), vectorized.

    Binomial(m, 1/2) is symmetric, so the two-sided p-value is min(1, 2 P(X >= max(n_a, n_b))),
    and 1 on a tie.
    """
    n_a, n_b = np.asarray(n_a, dtype=np.int64), np.asarray(n_b, dtype=np.int64)
    from scipy import stats  # on first use: scipy.stats takes a second to import

    hi = np.maximum(n_a, n_b)
    p = np.minimum(1.0, 2.0 * stats.binom.sf(hi - 1, n_a + n_b, 0.5))
    return np.where(n_a == n_b, 1.0, p)


class SmoothedClassifier(nn.Module):
    """Monte Carlo randomized smoothing of `base` (images in [0,1] -> logits) with noise level `sigma`.

    `votes` picks hard (one-hot argmax counts) or soft (softmax sums) votes for `sample_counts`,
    `probs`, `certify`; `forward` always averages softmaxes (it must be differentiable).
    `batch_size` noisy images go through the base model per forward pass (None: `DEFAULT_BATCH`
    for the device). Votes use per-image noise streams (see `_accumulate`): a fresh object with
    the same seed reproduces the same numbers, successive calls draw fresh noise, and an image's
    votes do not depend on the batch size or on the other images. `forward` draws from one
    generator per device seeded with `seed`. `n_forward` is the number of noise samples per image
    in `forward`. The base model is put in eval mode and frozen; with `channels_last` (default) its
    weights are converted to channels-last memory format on the first vote, which changes no
    value beyond float rounding and makes convolutions faster on CPUs and GPUs.

    On a CPU the votes' forward passes run `workers` at a time (None: torch's intra-op thread
    count), each on a single thread: independent passes keep every core busy without the
    synchronisation of one pass split over cores (about 1.2x the throughput on 2 cores). The
    passes and the order in which their votes are added are the same for any `workers`, so the
    votes are too, up to the float rounding of single- versus multi-threaded kernels. The base
    model must then be safe to call from several threads (plain modules in eval mode are).

    `compile=True` runs the votes' passes through ``torch.compile(base, dynamic=False)`` (one
    compilation per distinct pass shape, typically the full pass and a remainder), one pass at a
    time: on a GPU it fuses the eval-mode layers (1.5x for a CIFAR ResNet-110 in bf16 on an H200),
    at the cost of compiling first and of float rounding that can differ from the eager model's.
    `forward` always runs the eager model.

    `autocast_dtype` ("bfloat16"/"float16") runs the votes' passes under ``torch.autocast``: the
    certificates then hold for the base model as computed at that precision, whose votes can
    differ from the float32 model's near its decision boundaries.

    If the base model returns NaN or inf logits (at its computed precision) on any noisy copy,
    `sample_counts`, `sample_soft_moments` and everything built on them (`probs`, `predict`,
    `certify`) raise `NonFiniteError` naming how many images were concerned, instead of counting
    such outputs as votes. The check costs one host sync per sampling call, none per pass.
    `forward` does not check (its output feeds attacks, which check their own model's outputs).
    """

    def __init__(
        self,
        base: nn.Module,
        sigma: float,
        votes: Votes = "hard",
        batch_size: int | None = None,
        seed: int = 0,
        n_forward: int = 8,
        channels_last: bool = True,
        workers: int | None = None,
        compile: bool = False,
        autocast_dtype: torch.dtype | str | None = None,
    ):
        super().__init__()
        self.sigma = check_sigma(sigma)
        self.votes = check_choice("votes", votes, get_args(Votes))
        self.batch_size = None if batch_size is None else check_count("batch_size", batch_size)
        self.channels_last = bool(channels_last)
        self._channels_last_done = False
        self._calls = 0
        self.n_forward = check_count("n_forward", n_forward)
        self.workers = None if workers is None else check_count("workers", workers)
        self.compile = bool(compile)
        self.autocast_dtype = parse_autocast_dtype(autocast_dtype)
        self._compiled = {}  # {"base": compiled base}, a plain dict so it is not registered as a submodule
        self.seed = int(seed)
        self.base = base.eval()
        self.base.requires_grad_(False)
        self._generators: dict[torch.device, torch.Generator] = {}
        #: called with the number of noisy copies of each forward pass once its votes are counted (progress)
        self.on_pass: Callable[[int], None] | None = None

    def train(self, mode: bool = True) -> "SmoothedClassifier":
        """Keep the base model in eval mode whatever mode the wrapper is put in."""
        super().train(mode)
        self.base.eval()
        return self

    def manual_seed(self, seed: int) -> None:
        """Restart every noise stream from `seed`."""
        self.seed = int(seed)
        self._generators.clear()
        self._calls = 0

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _noise(self, shape, like: torch.Tensor) -> torch.Tensor:
        gen = self._generator(like.device)
        return self.sigma * torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)

    def _batch(self, x: torch.Tensor) -> int:
        return self.batch_size or DEFAULT_BATCH.get(x.device.type, DEFAULT_BATCH["cpu"])

    def _noise_stream(self, x: torch.Tensor, n: int, key: int, call: int, block: int):
        """Image `x` (C, H, W) plus its n noise samples, in blocks of `block`, from the image's own generator."""
        seed = int(np.random.SeedSequence([self.seed, call, key]).generate_state(1, dtype=np.uint64)[0] >> 1)
        gen = torch.Generator(device=x.device).manual_seed(seed)
        for start in range(0, n, block):
            noise = torch.randn((min(block, n - start), *x.shape), generator=gen, device=x.device, dtype=x.dtype)
            yield noise.mul_(self.sigma).add_(x)

    def _noisy_batches(self, x: torch.Tensor, n: int, keys: list[int], call: int):
        """Yield (image index (B,), noisy images (B, C, H, W)) with B <= the forward batch size.

        Small n: whole images are packed together (batch // n per pass); large n: each image's
        samples fill passes of their own, so no pass mixes two images' samples.
        """
        batch = self._batch(x)
        block = noise_block(x[0].numel())
        per = max(1, batch // n) if n < batch else 1
        memory = torch.channels_last if x.ndim == 4 and self.channels_last else torch.contiguous_format
        for first in range(0, x.shape[0], per):
            parts = ((i, blk) for i in range(first, min(first + per, x.shape[0]))
                     for blk in self._noise_stream(x[i], n, keys[i], call, block))
            pending, size = [], 0
            for i, part in parts:
                while part.shape[0]:
                    take = min(batch - size, part.shape[0])
                    pending.append((i, part[:take]))
                    size, part = size + take, part[take:]
                    if size == batch:
                        yield self._pack(pending, memory)
                        pending, size = [], 0
            if pending:
                yield self._pack(pending, memory)

    @staticmethod
    def _pack(pending, memory):
        img = torch.cat([torch.full((p.shape[0],), i, dtype=torch.long, device=p.device) for i, p in pending])
        noisy = pending[0][1] if len(pending) == 1 else torch.cat([p for _, p in pending])
        return img, noisy.contiguous(memory_format=memory)

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor, n: int, soft: bool, squares: bool = False, keys=None):
        """Sum of votes over n noise samples per input, in forward passes of at most `batch_size` noisy images.

        Image i's noise comes from its own generator, seeded from (seed, the number of sampling
        calls so far, keys[i]) and drawn in blocks whose size depends only on the image size, so its
        votes do not depend on the batch size, on which other images are sampled with it, or on
        how a run is sharded across processes (keys: the images' positions in the evaluated split).
        Raises `NonFiniteError` after the last pass if the base model returned NaN or inf on any
        noisy copy (counted per image on the device, checked once).
        """
        n = check_count("n", n)
        if x.shape[0] == 0:
            raise ConfigError("got an empty batch of images")
        keys = list(range(x.shape[0])) if keys is None else [int(k) for k in keys]
        if len(keys) != x.shape[0]:
            raise ConfigError(f"got {len(keys)} keys for {x.shape[0]} images")
        call, self._calls = self._calls, self._calls + 1
        self._prepare(x)
        num = x.shape[0]
        totals = sq = None
        bad = torch.zeros(num, dtype=torch.long, device=x.device)  # (N,) noisy copies with non-finite logits
        with self._vote_runner(x.device, soft) as run:
            for img, (votes, k, nonfinite) in run(self._noisy_batches(x, n, keys, call)):
                bad.index_add_(0, img, nonfinite.long())
                if totals is None:
                    dtype = torch.float64 if soft else torch.long
                    totals = torch.zeros(num, k, dtype=dtype, device=x.device)  # (N, K)
                    sq = torch.zeros(num, k, dtype=torch.float64, device=x.device) if squares else None
                if soft:
                    totals.index_add_(0, img, votes)
                    if squares:
                        sq.index_add_(0, img, votes * votes)
                else:
                    flat = img * totals.shape[1] + votes  # (B,)
                    totals.view(-1).index_add_(0, flat, torch.ones_like(flat))
                if self.on_pass is not None:
                    self.on_pass(int(img.shape[0]))
        self._check_finite(bad, n)
        return totals, sq

    def _check_finite(self, bad: torch.Tensor, n: int) -> None:
        """Raise `NonFiniteError` if any image had noisy copies with non-finite logits (`bad` (N,) counts); one sync."""
        images, copies = torch.stack([(bad > 0).sum(), bad.sum()]).tolist()
        if images:
            raise NonFiniteError(
                f"the base model returned NaN or inf outputs on noisy copies of {images} of {bad.numel()} images "
                f"({copies} of {bad.numel() * n} noisy copies) during smoothing (sigma={self.sigma:g}); "
                f"{NONFINITE_ADVICE}"
            )

    @torch.no_grad()  # grad mode is per thread: pool workers need it too
    def _votes(self, noisy: torch.Tensor, soft: bool) -> tuple[torch.Tensor, int, torch.Tensor]:
        """One forward pass -> (softmax (B, K) in float64 if soft, else argmax (B,); the number of classes K;
        which rows of the logits held a NaN or an inf (B,) bool). No host sync."""
        if self.compile and "base" not in self._compiled:
            self._compiled["base"] = torch.compile(self.base, dynamic=False)
        model = self._compiled["base"] if self.compile else self.base
        if self.autocast_dtype is None:
            logits = model(noisy)  # (B, K)
        else:  # autocast is per thread too
            with torch.autocast(noisy.device.type, dtype=self.autocast_dtype):
                logits = model(noisy)
        votes = torch.softmax(logits.float(), dim=1).double() if soft else logits.argmax(dim=1)
        return votes, logits.shape[1], nonfinite_rows(logits)

    @contextmanager
    def _vote_runner(self, device: torch.device, soft: bool):
        """Yields run(batches) -> iterator of (image index, `_votes` output) in batch order.

        On a CPU with more than one worker (and no compilation), passes run concurrently in a
        thread pool, each worker on one intra-op thread, with at most 2 passes per worker in
        flight; torch's thread count is restored afterwards (threads started later inherit it).
        """
        workers = 1 if device.type != "cpu" or self.compile else (self.workers or torch.get_num_threads())
        if workers == 1:
            yield lambda batches: ((img, self._votes(noisy, soft)) for img, noisy in batches)
            return
        threads = torch.get_num_threads()

        def single_threaded():
            torch.set_num_threads(1)

        def passes(pool, batches):
            pending = deque()
            for img, noisy in batches:
                pending.append((img, pool.submit(self._votes, noisy, soft)))
                if len(pending) >= 2 * workers:
                    img, done = pending.popleft()
                    yield img, done.result()
            while pending:
                img, done = pending.popleft()
                yield img, done.result()

        try:
            with ThreadPoolExecutor(workers, initializer=single_threaded) as pool:
                yield lambda batches: passes(pool, batches)
        finally:
            torch.set_num_threads(threads)

    def _prepare(self, x: torch.Tensor) -> None:
        """Channels-last weights for image batches (once): oneDNN and cuDNN convolutions run faster."""
        if self.channels_last and x.ndim == 4 and not self._channels_last_done:
            self.base.to(memory_format=torch.channels_last)
            self._channels_last_done = True

    def sample_counts(self, x: torch.Tensor, n: int, keys=None) -> torch.Tensor:
        """Votes from n noise samples per image -> (N, K) on x's device (`keys`: see `_accumulate`).

        Hard votes: integer counts of the base model's argmax (each row sums to n). Soft votes:
        summed softmax probabilities (float64; each row sums to n up to rounding).
        """
        return self._accumulate(x, n, soft=self.votes == "soft", keys=keys)[0]

    def sample_soft_moments(self, x: torch.Tensor, n: int, keys=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed softmax probabilities and summed squares (N, K) each, for empirical Bernstein bounds."""
        return self._accumulate(x, n, soft=True, squares=True, keys=keys)

    @torch.no_grad()
    def probs(self, x: torch.Tensor, n: int, keys=None) -> torch.Tensor:
        """Monte Carlo estimate of the smoothed probabilities h(x) -> (N, K), float32, no gradient."""
        n = check_count("n", n)
        return (self.sample_counts(x, n, keys).double() / n).float()

    def predict(self, x: torch.Tensor, n: int, failure_prob: float, keys=None) -> torch.Tensor:
        """Cohen et al.'s PREDICT -> (N,) classes on x's device, -1 for abstain.

        With hard votes, the top-two counts nA, nB are tested with a two-sided binomial test
        (nA out of nA + nB at 1/2, as scipy.stats.binomtest); p-value > failure_prob -> abstain.
        With probability at least 1 - failure_prob over the noise, a returned class (not -1) is
        the smoothed classifier's prediction argmax_c P(f(x + xi) = c).
        """
        n = check_count("n", n)
        fp = check_failure_prob(failure_prob)
        if self.votes != "hard":
            raise ConfigError("predict's binomial test needs votes='hard' (counts of base predictions)")
        counts = self.sample_counts(x, n, keys)  # (N, K)
        top2 = counts.topk(2, dim=1)
        n_a, n_b = top2.values[:, 0].cpu().numpy(), top2.values[:, 1].cpu().numpy()
        pvals = two_sided_binomial_pvalue(n_a, n_b)
        pred = top2.indices[:, 0].clone()
        pred[torch.as_tensor(pvals > fp, device=pred.device)] = -1
        return pred

    def certify(
        self, x: torch.Tensor, n0: int, n: int, failure_prob: float, keys=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cohen et al.'s CERTIFY for a batch -> (pred (N,), radius (N,), p_lower (N,)) on x's device.

        The class cA is the top class of `n0` selection samples; `n` fresh samples give a one-sided
        lower bound pA on P(hbar(x + xi) = cA) at level `failure_prob` (Clopper-Pearson for hard
        votes; Hoeffding for soft votes, which bounds the mean softmax of cA). If pA > 1/2 the
        prediction is cA with l_2 radius sigma * Phi^-1(pA), else -1 with radius 0.
        For each point, with probability at least 1 - failure_prob over its noise: if its prediction is
        not -1, the smoothed classifier predicts cA at every x + d with ||d||_2 < radius (a guarantee per
        point, not for all points of a set at once).
        """
        n0, n = check_count("n0", n0), check_count("n", n)
        if n0 > n:
            raise ConfigError(
                f"n0 (selection samples) must not exceed n (estimation samples), got n0={n0} > n={n}"
            )
        fp = check_failure_prob(failure_prob)
        c_a = self.sample_counts(x, n0, keys).argmax(dim=1)  # (N,)
        counts = self.sample_counts(x, n, keys)  # (N, K)
        hits = counts.gather(1, c_a[:, None]).squeeze(1).double().cpu().numpy()
        if self.votes == "hard":
            p_lower = clopper_pearson_lower(hits, n, fp)
        else:
            p_lower = hoeffding_lower(hits / n, n, fp)
        ok = p_lower > 0.5
        from scipy import stats

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
        chunks = [torch.softmax(self.base(c).float(), dim=1) for c in noisy.split(self._batch(x))]
        p = torch.cat(chunks).view(x.shape[0], m, -1).mean(dim=1)  # (N, K)
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()

