"""SmoothedClassifier: Monte Carlo votes, Cohen et al.'s PREDICT and CERTIFY, the differentiable forward."""

from __future__ import annotations

import math
import threading
from statistics import NormalDist

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from mixrobust.certify import SmoothedClassifier
from mixrobust.certify.smoothing import two_sided_binomial_pvalue
from mixrobust.errors import ConfigError
from mixrobust.models import create_model

PHI = NormalDist()


class Constant(nn.Module):
    """Always predicts class `c` of `k`, whatever the input."""

    def __init__(self, c: int, k: int = 4):
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(c), k).float() * 5)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class NoiseGuesser(nn.Module):
    """Argmax of the first k pixels: on a zero image under noise, a uniformly random class."""

    def __init__(self, k: int = 10):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x.flatten(1)[:, : self.k]


class MeanThreshold(nn.Module):
    """Logits [scale (mean(x) - 1/2), 0]: class 0 iff the mean pixel exceeds 1/2."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        s = self.scale * (x.flatten(1).mean(1, keepdim=True) - 0.5)
        return torch.cat([s, torch.zeros_like(s)], dim=1)


def soft_vote_truth(pixel: float, sigma: float, d: int, scale: float) -> float:
    """E[sigmoid(scale (m - 1/2))], m ~ N(pixel, sigma^2 / d), by quadrature: MeanThreshold's soft vote."""
    s = sigma / math.sqrt(d)
    f = lambda m: stats.norm.pdf(m, pixel, s) / (1 + math.exp(-scale * (m - 0.5)))  # noqa: E731
    return integrate.quad(f, pixel - 10 * s, pixel + 10 * s, points=[0.5])[0]


class Exploding(nn.Module):
    def forward(self, x):
        raise AssertionError("the base model was called: sampling started before validation")


class PerImageClass(nn.Module):
    """Predicts the class written in pixel 0 (noise-free enough at tiny sigma)."""

    def forward(self, x):
        c = x.flatten(1)[:, 0].round().long()
        return torch.nn.functional.one_hot(c, 4).float()


def test_counts_stay_with_their_image_across_chunks():
    x = torch.tensor([0.0, 3.0, 1.0, 2.0, 3.0]).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    sm = SmoothedClassifier(PerImageClass(), sigma=1e-4, batch_size=4)  # 4 does not divide 5*7
    counts = sm.sample_counts(x, 7)
    want = torch.zeros(5, 4, dtype=torch.long)
    want[torch.arange(5), torch.tensor([0, 3, 1, 2, 3])] = 7
    assert torch.equal(counts, want)


def test_hard_and_soft_votes_match_the_gaussian_integral():
    d, sigma, c, n = 16, 0.5, 0.55, 20000
    x = torch.full((2, 1, 4, 4), c)
    x[1] = 0.45
    # mean of d noisy pixels ~ N(pixel, sigma^2 / d): P(class 0) = Phi((pixel - 1/2) sqrt(d) / sigma)
    p_hard = [PHI.cdf((v - 0.5) * math.sqrt(d) / sigma) for v in (0.55, 0.45)]
    hard = SmoothedClassifier(MeanThreshold(), sigma, votes="hard", batch_size=3000, seed=1)
    counts = hard.sample_counts(x, n)
    assert counts.dtype == torch.long and counts.sum(1).tolist() == [n, n]
    tol = 5 * math.sqrt(0.25 / n)
    assert counts[:, 0].double().div(n).tolist() == pytest.approx(p_hard, abs=tol)
    p_soft = [soft_vote_truth(v, sigma, d, 20.0) for v in (0.55, 0.45)]
    soft = SmoothedClassifier(MeanThreshold(20.0), sigma, votes="soft", batch_size=3000, seed=1)
    probs = soft.probs(x, n)
    assert probs.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert probs[:, 0].tolist() == pytest.approx(p_soft, abs=tol)


def test_certify_constant_classifier_gives_the_closed_form_radius():
    n, fp, sigma = 1000, 0.001, 0.5
    sm = SmoothedClassifier(Constant(2), sigma, batch_size=256)
    pred, radius, p_lower = sm.certify(torch.rand(3, 1, 4, 4), n0=50, n=n, failure_prob=fp)
    cp = fp ** (1 / n)  # Clopper-Pearson lower bound with k = n
    assert pred.tolist() == [2, 2, 2]
    assert p_lower.tolist() == pytest.approx([cp] * 3, abs=1e-12)
    assert radius.tolist() == pytest.approx([sigma * PHI.inv_cdf(cp)] * 3, abs=1e-9)
    assert sm.predict(torch.rand(3, 1, 4, 4), 100, fp).tolist() == [2, 2, 2]


def test_soft_certify_uses_hoeffding():
    n, fp, sigma = 400, 0.01, 0.25
    sm = SmoothedClassifier(Constant(1, k=3), sigma, votes="soft")
    pred, radius, p_lower = sm.certify(torch.rand(2, 1, 2, 2), 10, n, fp)
    top = math.exp(5) / (math.exp(5) + 2)  # the softmax of the constant logits
    want = top - math.sqrt(math.log(1 / fp) / (2 * n))
    assert pred.tolist() == [1, 1]
    assert p_lower.tolist() == pytest.approx([want] * 2, abs=1e-6)
    assert radius.tolist() == pytest.approx([sigma * PHI.inv_cdf(want)] * 2, abs=1e-5)


def test_uniform_guesser_abstains():
    x = torch.zeros(6, 1, 4, 4)
    sm = SmoothedClassifier(NoiseGuesser(10), sigma=1.0, batch_size=500, seed=3)
    assert sm.predict(x, 1000, 0.001).tolist() == [-1] * 6
    pred, radius, p_lower = sm.certify(x, 100, 1000, 0.001)
    assert pred.tolist() == [-1] * 6 and radius.tolist() == [0.0] * 6
    assert bool((p_lower < 0.5).all())
    counts = sm.sample_counts(x, 2000)
    assert counts.min().item() > 120 and counts.max().item() < 280  # about 200 each


def test_binomial_pvalue_matches_scipy_binomtest():
    pairs = [(a, b) for a in range(0, 40, 3) for b in range(0, 40, 5) if a + b > 0] + [(5000, 4800)]
    a, b = np.array(pairs).T
    want = [stats.binomtest(int(i), int(i + j), 0.5).pvalue for i, j in pairs]
    np.testing.assert_allclose(two_sided_binomial_pvalue(a, b), want, rtol=1e-9, atol=1e-14)


X0 = torch.zeros(1, 1, 2, 2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda sm: SmoothedClassifier(Exploding(), sigma=0.0), "sigma must be"),
        (lambda sm: SmoothedClassifier(Exploding(), sigma=-0.25), "sigma must be"),
        (lambda sm: SmoothedClassifier(Exploding(), sigma=0.5, votes="mean"), "valid values: hard, soft"),
        (lambda sm: sm.certify(X0, n0=200, n=100, failure_prob=0.001), "n0=200 > n=100"),
        (lambda sm: sm.certify(X0, n0=0, n=100, failure_prob=0.001), "n0 must be a whole number >= 1"),
        (lambda sm: sm.certify(X0, n0=10, n=100, failure_prob=0.0), "failure_prob must lie strictly"),
        (lambda sm: sm.certify(X0, n0=10, n=100, failure_prob=1.0), "failure_prob must lie strictly"),
        (lambda sm: sm.predict(X0, n=100, failure_prob=1.0), "failure_prob must lie strictly"),
        (lambda sm: sm.predict(X0, n=0, failure_prob=0.01), "n must be a whole number >= 1"),
        (lambda sm: SmoothedClassifier(Exploding(), sigma=0.5, workers=0), "workers must be a whole number"),
    ],
)
def test_bad_inputs_fail_before_sampling(make, match):
    sm = SmoothedClassifier(Exploding(), sigma=0.5)
    with pytest.raises(ConfigError, match=match):
        make(sm)


def test_predict_needs_hard_votes():
    sm = SmoothedClassifier(Exploding(), sigma=0.5, votes="soft")
    with pytest.raises(ConfigError, match="hard"):
        sm.predict(torch.zeros(1, 1, 2, 2), 10, 0.01)


class ThreadRecorder(nn.Module):
    """A small CNN that records torch's intra-op thread count and the thread of every pass; fails on pass `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.25])
        self.fail_at, self.calls, self.autocast = fail_at, [], []

    def forward(self, x):
        self.calls.append((threading.get_ident(), torch.get_num_threads()))
        self.autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        if len(self.calls) == self.fail_at:
            raise RuntimeError("pass failed")
        return self.net(x)


@pytest.mark.parametrize("votes", ["hard", "soft"])
def test_cpu_worker_passes_give_the_votes_of_one_pass_at_a_time(votes):
    torch.manual_seed(0)
    base = ThreadRecorder()
    x = torch.rand(3, 1, 8, 8)
    threads = torch.get_num_threads()
    serial = SmoothedClassifier(base, 0.5, votes=votes, batch_size=16, seed=7, workers=1)
    want = serial.sample_counts(x, 70)
    assert {n for _, n in base.calls} == {threads} and {t for t, _ in base.calls} == {threading.get_ident()}
    base.calls.clear()
    pooled = SmoothedClassifier(base, 0.5, votes=votes, batch_size=16, seed=7, workers=3)
    got = pooled.sample_counts(x, 70)
    # the same 3 x 5 passes, their votes added in the same order; single-threaded kernels may round differently
    assert len(base.calls) == 3 * math.ceil(70 / 16)
    assert {n for _, n in base.calls} == {1} and threading.get_ident() not in {t for t, _ in base.calls}
    if votes == "hard":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.get_num_threads() == threads  # restored for the caller


@pytest.mark.parametrize("workers", [1, 2])
def test_autocast_dtype_applies_in_every_pass_thread(workers):
    base = ThreadRecorder()
    sm = SmoothedClassifier(base, 0.5, batch_size=8, workers=workers, autocast_dtype="bfloat16")
    sm.sample_counts(torch.rand(2, 1, 8, 8), 40)
    assert len(base.autocast) == 10 and set(base.autocast) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")
    base.autocast.clear()
    SmoothedClassifier(base, 0.5, batch_size=8, workers=workers).sample_counts(torch.rand(2, 1, 8, 8), 40)
    assert set(base.autocast) == {None}


def test_compiled_passes_give_the_eager_votes_and_stay_out_of_the_state_dict():
    torch.manual_seed(0)
    base = create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.25])
    x = torch.rand(3, 1, 8, 8)
    eager = SmoothedClassifier(base, 0.5, batch_size=16, seed=2, workers=1)
    compiled = SmoothedClassifier(base, 0.5, batch_size=16, seed=2, compile=True)
    assert torch.equal(compiled.sample_counts(x, 40), eager.sample_counts(x, 40))
    assert set(compiled.state_dict()) == {f"base.{k}" for k in base.state_dict()}


def test_a_failing_worker_pass_raises_and_restores_the_thread_count():
    threads = torch.get_num_threads()
    sm = SmoothedClassifier(ThreadRecorder(fail_at=5), 0.5, batch_size=8, workers=2)
    with pytest.raises(RuntimeError, match="pass failed"):
        sm.sample_counts(torch.rand(2, 1, 8, 8), 100)
    assert torch.get_num_threads() == threads


def test_same_seed_reproduces_and_calls_draw_fresh_noise():
    torch.manual_seed(0)
    base = create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.25])
    x = torch.rand(3, 1, 8, 8)
    a = SmoothedClassifier(base, 0.5, votes="soft", batch_size=16, seed=7)
    b = SmoothedClassifier(base, 0.5, votes="soft", batch_size=16, seed=7)
    c = SmoothedClassifier(base, 0.5, votes="soft", batch_size=16, seed=8)
    first = a.sample_counts(x, 10)
    assert torch.equal(first, b.sample_counts(x, 10))
    assert not torch.equal(first, c.sample_counts(x, 10))
    assert not torch.equal(first, a.sample_counts(x, 10))  # the stream moves on
    a.manual_seed(7)
    assert torch.equal(first, a.sample_counts(x, 10))


def test_forward_wraps_a_frozen_base_and_returns_log_probs():
    torch.manual_seed(0)
    base = create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.25])
    sm = SmoothedClassifier(base, 0.25, n_forward=4, batch_size=5)
    sm.train()  # the base must stay in eval mode and frozen
    assert not sm.base.training and not any(p.requires_grad for p in sm.base.parameters())
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    out = sm(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))
    torch.testing.assert_close(torch.log_softmax(out, 1), out)  # usable as h in the mixture
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_forward_is_an_unbiased_estimate_with_fresh_noise():
    d, sigma, scale = 16, 0.5, 20.0
    x = torch.full((2, 1, 4, 4), 0.55)
    x[1] = 0.45
    sm = SmoothedClassifier(MeanThreshold(scale), sigma, n_forward=16)
    assert not torch.equal(sm(x), sm(x))  # expectation over transformation: new noise each call
    with torch.no_grad():
        mean = torch.stack([sm(x).exp() for _ in range(100)]).mean(0)  # 1600 noise samples
    want = [soft_vote_truth(v, sigma, d, scale) for v in (0.55, 0.45)]
    assert mean[:, 0].tolist() == pytest.approx(want, abs=0.05)
    # the gradient points where the smoothed probability grows: towards brighter images
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sm(xg)[:, 0].sum(), xg)
    assert bool((grad.flatten(1).sum(1) > 0).all())


def test_forward_log_is_finite_for_confident_models():
    sm = SmoothedClassifier(Constant(0, k=3), 0.1, n_forward=2)
    sm.base.logits.mul_(200)  # softmax underflows to exactly 0 for the other classes
    out = sm(torch.rand(2, 1, 2, 2))
    assert torch.isfinite(out).all()


def test_soft_moments_feed_empirical_bernstein_radii():
    from mixrobust.certify import sound_radii

    n, fp, sigma = 1000, 0.001, 0.5
    sm = SmoothedClassifier(Constant(1, k=3), sigma, votes="soft")
    x = torch.rand(2, 1, 2, 2)
    total, sq = sm.sample_soft_moments(x, n)
    top = math.exp(5) / (math.exp(5) + 2)
    torch.testing.assert_close(sq[:, 1], torch.full((2,), n * top**2, dtype=torch.float64))
    sel = sm.sample_counts(x, 10)
    bern = sound_radii(sel, total, n, 1.0, sigma, fp, votes="soft", sq_est=sq, soft_bound="bernstein")
    hoef = sound_radii(sel, total, n, 1.0, sigma, fp, votes="soft")
    # zero variance: only the 7 log(2/fp) / (3 (n - 1)) term of Maurer & Pontil remains
    want = top - 7 * math.log(2 / fp) / (3 * (n - 1))
    assert bern.p_lower.tolist() == pytest.approx([want] * 2, abs=1e-6)
    assert hoef.p_lower.tolist() == pytest.approx([top - math.sqrt(math.log(1 / fp) / (2 * n))] * 2, abs=1e-6)
    assert bool((bern.rs > hoef.rs).all()) and bern.y.tolist() == [1, 1]
    assert bern.rs.tolist() == pytest.approx([sigma * PHI.inv_cdf(want)] * 2, abs=1e-5)
