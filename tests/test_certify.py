"""Certified radii of the mixture, confidence bounds and local Lipschitz estimates, against hand math."""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from mixrobust.certify import (
    alpha_for_clean_accuracy,
    certified_accuracy,
    clopper_pearson_lower,
    clopper_pearson_upper,
    empirical_bernstein_lower,
    empirical_bernstein_upper,
    hoeffding_lower,
    hoeffding_upper,
    lipschitz_radius,
    local_lipschitz,
    plugin_radii,
    rs_lipschitz_constant,
    rs_radius,
    sound_radii,
)
from mixrobust.errors import ConfigError

PHI_INV = NormalDist().inv_cdf  # independent of scipy


# ----------------------------------------------------------------------------- Theorem 4


def test_lipschitz_radius_scalar_constant_by_hand():
    h = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    # i=1: (0.8*0.5 + 0.8 - 1) / (0.8*4) = 0.0625 ; i=2: (0.8*0.6 - 0.2) / 3.2 = 0.0875
    r = lipschitz_radius(h, alpha=0.8, lipschitz=2.0)
    assert isinstance(r, torch.Tensor) and r.shape == (1,)
    assert r.item() == pytest.approx(0.0625, abs=1e-12)


def test_lipschitz_radius_per_class_constants_take_min_over_all_classes():
    h = np.array([[0.7, 0.2, 0.1]])
    lip = np.array([1.0, 0.5, 3.0])
    # i=1: 0.2 / (0.8*1.5) = 1/6 ; i=2: 0.28 / (0.8*4) = 0.0875 -> not the runner-up that binds
    r = lipschitz_radius(h, 0.8, lip)
    assert isinstance(r, np.ndarray)
    assert r[0] == pytest.approx(0.0875, abs=1e-12)
    # (N, K) constants: one row per point
    lip_nk = np.stack([lip, np.array([1.0, 1.0, 1.0])])
    r2 = lipschitz_radius(np.repeat(h, 2, axis=0), 0.8, lip_nk)
    assert r2[1] == pytest.approx((0.8 * 0.5 - 0.2) / (0.8 * 2), abs=1e-12)


def test_lipschitz_radius_alpha_one_is_usual_margin_radius():
    rng = np.random.default_rng(0)
    h = rng.dirichlet(np.ones(6), size=50)
    lip = rng.uniform(0.5, 3.0, size=6)
    r = lipschitz_radius(h, 1.0, lip)
    for n in range(50):
        y = h[n].argmax()
        want = min((h[n, y] - h[n, i]) / (lip[y] + lip[i]) for i in range(6) if i != y)
        assert r[n] == pytest.approx(max(want, 0.0), abs=1e-12)


def test_lipschitz_radius_given_label_and_clip():
    h = torch.tensor([[0.7, 0.2, 0.1], [0.9, 0.05, 0.05]], dtype=torch.float64)
    r = lipschitz_radius(h, 1.0, 1.0, y=torch.tensor([1, 0]), max_radius=0.3)
    assert r[0].item() == 0.0  # the label is not h's top class: negative margin -> 0
    assert r[1].item() == pytest.approx(0.3)  # 0.85 / 2 = 0.425 clipped at eps


def test_rs_lipschitz_constant():
    assert rs_lipschitz_constant(0.5) == pytest.approx(math.sqrt(2 / math.pi) / 0.5)
    with pytest.raises(ConfigError, match="sigma"):
        rs_lipschitz_constant(0.0)


# ----------------------------------------------------------------------------- Theorem 5


def test_rs_radius_by_hand():
    h = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    r = rs_radius(h, alpha=0.8, sigma=0.5)
    want0 = 0.25 * (PHI_INV(0.8 * 0.7) - PHI_INV(0.8 * 0.2 + 0.2))
    want1 = 0.25 * (PHI_INV(0.8 * 0.6) - PHI_INV(0.8 * 0.3 + 0.2))
    assert r.tolist() == pytest.approx([want0, want1], abs=1e-10)


def test_rs_radius_alpha_one_is_cohen_form_and_negative_is_zero():
    h = np.array([[0.8, 0.15, 0.05]])
    assert rs_radius(h, 1.0, 0.25)[0] == pytest.approx(0.125 * (PHI_INV(0.8) - PHI_INV(0.15)))
    assert rs_radius(h, 1.0, 0.25, y=np.array([1]))[0] == 0.0
    # alpha < 1 with a small margin: the mixture cannot be certified
    assert rs_radius(np.array([[0.5, 0.45, 0.05]]), 0.6, 0.25)[0] == 0.0


@settings(max_examples=200, deadline=None)
@given(
    w=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8).filter(lambda v: sum(v) > 1e-3),
    alpha=st.floats(0.5, 0.999),
    sigma=st.floats(0.05, 2.0),
)
def test_rs_radius_never_exceeds_sigma_phi_inv_alpha(w, alpha, sigma):
    h = np.array([w]) / sum(w)
    r = rs_radius(h, alpha, sigma)[0]
    assert r <= sigma * PHI_INV(alpha) + 1e-9


def test_rs_radius_attains_its_maximum_for_one_hot():
    h = np.array([[1.0, 0.0, 0.0]])
    assert rs_radius(h, 0.7, 0.5)[0] == pytest.approx(0.5 * PHI_INV(0.7), abs=1e-12)


# ----------------------------------------------------------------------------- alpha checks


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_config_error(alpha):
    h = np.array([[0.7, 0.3]])
    for fn in (lambda: rs_radius(h, alpha, 0.5), lambda: lipschitz_radius(h, alpha, 1.0)):
        with pytest.raises(ConfigError, match="alpha"):
            fn()
    with pytest.raises(ConfigError, match="alpha"):
        sound_radii(np.array([[10, 0]]), np.array([[90, 10]]), 100, alpha, 0.5, 0.01)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.49])
def test_alpha_below_half_gives_zero_radius_with_warning(alpha):
    h = np.array([[1.0, 0.0], [0.9, 0.1]])
    with pytest.warns(UserWarning, match="alpha"):
        assert np.all(rs_radius(h, alpha, 0.5) == 0)
    with pytest.warns(UserWarning, match="alpha"):
        assert np.all(lipschitz_radius(h, alpha, 1.0) == 0)
    with pytest.warns(UserWarning, match="alpha"):
        res = sound_radii(np.array([[10, 0]]), np.array([[100, 0]]), 100, alpha, 0.5, 0.01)
    assert res.rs[0] == 0 and res.lipschitz[0] == 0


# ----------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("fp", [0.001, 0.05])
def test_clopper_pearson_matches_beta_quantiles_and_statsmodels(fp):
    k = np.array([0, 1, 37, 500, 999, 1000])
    n = 1000
    lo, hi = clopper_pearson_lower(k, n, fp), clopper_pearson_upper(k, n, fp)
    for j, kk in enumerate(k):
        want_lo = 0.0 if kk == 0 else stats.beta.ppf(fp, kk, n - kk + 1)
        want_hi = 1.0 if kk == n else stats.beta.ppf(1 - fp, kk + 1, n - kk)
        assert lo[j] == pytest.approx(want_lo, abs=1e-12)
        assert hi[j] == pytest.approx(want_hi, abs=1e-12)
    sm_lo, sm_hi = proportion_confint(k, n, alpha=2 * fp, method="beta")  # one-sided fp each side
    np.testing.assert_allclose(lo, sm_lo, atol=1e-10)
    np.testing.assert_allclose(hi, sm_hi, atol=1e-10)
    # closed forms at the ends: P(all n hits | p) = p^n
    assert lo[-1] == pytest.approx(fp ** (1 / n), abs=1e-12)
    assert hi[0] == pytest.approx(1 - fp ** (1 / n), abs=1e-12)


def test_bounds_keep_torch_type_and_check_inputs():
    lo = clopper_pearson_lower(torch.tensor([5, 10]), 10, 0.01)
    assert isinstance(lo, torch.Tensor) and lo.dtype == torch.float64
    assert isinstance(clopper_pearson_upper(3, 10, 0.01), float)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match="failure_prob"):
            clopper_pearson_lower(5, 10, bad)
    with pytest.raises(ConfigError):
        clopper_pearson_lower(11, 10, 0.01)


def test_hoeffding_and_bernstein_by_hand():
    w = math.sqrt(math.log(1 / 0.01) / 200)
    assert hoeffding_lower(0.9, 100, 0.01) == pytest.approx(0.9 - w)
    assert hoeffding_upper(0.2, 100, 0.01) == pytest.approx(0.2 + w)
    assert hoeffding_upper(0.99, 100, 0.01) == 1.0  # clipped
    lg = math.log(2 / 0.01)
    width = math.sqrt(2 * 0.04 * lg / 100) + 7 * lg / (3 * 99)
    assert empirical_bernstein_lower(0.9, 0.04, 100, 0.01) == pytest.approx(0.9 - width)
    assert empirical_bernstein_upper(0.5, 0.04, 100, 0.01) == pytest.approx(0.5 + width)


# ----------------------------------------------------------------------------- sound radii


def test_sound_complement_at_alpha_one_is_cohen_radius():
    sel = np.array([[2, 95, 3], [40, 30, 30]])
    est = np.array([[10, 980, 10], [400, 350, 250]])
    res = sound_radii(sel, est, 1000, alpha=1.0, sigma=0.5, failure_prob=0.001)
    p0 = stats.beta.ppf(0.001, 980, 21)
    assert res.y.tolist() == [1, 0]
    assert res.p_lower[0] == pytest.approx(p0, abs=1e-12)
    assert res.p_upper_other[0] == pytest.approx(1 - p0, abs=1e-12)
    assert res.rs[0] == pytest.approx(0.5 * PHI_INV(p0), abs=1e-9)
    lip = math.sqrt(2 / math.pi) / 0.5
    assert res.lipschitz[0] == pytest.approx((2 * p0 - 1) / (2 * lip), abs=1e-9)
    assert res.abstain.tolist() == [False, True]  # 400/1000 cannot exceed 1/2
    assert res.rs[1] == 0 and res.lipschitz[1] == 0 and res.pred.tolist() == [1, -1]


def test_sound_bonferroni_and_runner_up_by_hand():
    sel = torch.tensor([[1, 90, 9]])
    est = torch.tensor([[30, 900, 70]])
    fp, alpha, sigma = 0.01, 0.9, 0.25
    lo = stats.beta.ppf(fp / 2, 900, 101)
    up_bonf = max(stats.beta.ppf(1 - fp / 4, 31, 970), stats.beta.ppf(1 - fp / 4, 71, 930))
    up_ru = stats.beta.ppf(1 - fp / 2, 71, 930)
    for bound, up in (("bonferroni", up_bonf), ("runner_up", up_ru)):
        res = sound_radii(sel, est, 1000, alpha, sigma, fp, bound=bound)
        assert isinstance(res.rs, torch.Tensor)
        assert res.p_lower.item() == pytest.approx(lo, abs=1e-12)
        assert res.p_upper_other.item() == pytest.approx(up, abs=1e-12)
        want = 0.5 * sigma * (PHI_INV(alpha * lo) - PHI_INV(alpha * up + 1 - alpha))
        assert res.rs.item() == pytest.approx(want, abs=1e-9)
        lip = math.sqrt(2 / math.pi) / sigma
        want4 = (alpha * (lo - up) + alpha - 1) / (alpha * 2 * lip)
        assert res.lipschitz.item() == pytest.approx(want4, abs=1e-9)
    assert up_ru < up_bonf


def _failure_rate(sel, est, n, truth, fp, **kw) -> float:
    """How often the bounds miss: h_y < p_lower or max_{i != y} h_i > p_upper_other."""
    res = sound_radii(sel, est, n, 1.0, 0.5, fp, **kw)
    rows = np.arange(len(res.y))
    others = truth.copy()
    others[rows, res.y] = -np.inf
    miss = (truth[rows, res.y] < res.p_lower) | (others.max(axis=1) > res.p_upper_other)
    return float(miss.mean())


@pytest.mark.parametrize("bound", ["complement", "bonferroni", "runner_up"])
def test_sound_bounds_cover_the_truth_hard_votes(bound):
    rng = np.random.default_rng(1)
    trials, n0, n, fp = 4000, 20, 200, 0.2
    p = np.array([0.5, 0.2, 0.2, 0.1])  # a close runner-up: selection sometimes picks it
    truth = np.tile(p, (trials, 1))
    sel = rng.multinomial(n0, p, size=trials)
    est = rng.multinomial(n, p, size=trials)
    assert _failure_rate(sel, est, n, truth, fp, bound=bound) <= fp + 3 * math.sqrt(fp * (1 - fp) / trials)


def test_selecting_from_the_estimation_samples_breaks_coverage():
    """The check above can fail: picking y from the same counts inflates its bound (10 equal classes)."""
    rng = np.random.default_rng(2)
    trials, n, fp = 2000, 200, 0.2
    p = np.full(10, 0.1)
    est = rng.multinomial(n, p, size=trials)
    rate = _failure_rate(est, est, n, np.tile(p, (trials, 1)), fp, bound="bonferroni")
    assert rate > 2 * fp
    sel = rng.multinomial(n, p, size=trials)
    assert _failure_rate(sel, est, n, np.tile(p, (trials, 1)), fp, bound="bonferroni") <= fp + 0.03


@pytest.mark.parametrize("soft_bound", ["hoeffding", "bernstein"])
@pytest.mark.parametrize("bound", ["complement", "bonferroni", "runner_up"])
def test_sound_bounds_cover_the_truth_soft_votes(bound, soft_bound):
    rng = np.random.default_rng(3)
    trials, n, fp = 1500, 100, 0.2
    conc = np.array([8.0, 6.0, 1.0])  # softmax outputs ~ Dirichlet: known mean conc / sum
    truth = np.tile(conc / conc.sum(), (trials, 1))
    probs = rng.dirichlet(conc, size=(trials, n))  # (T, n, K)
    est, sq = probs.sum(axis=1), (probs**2).sum(axis=1)
    sel = rng.dirichlet(conc, size=(trials, 10)).sum(axis=1)
    rate = _failure_rate(sel, est, n, truth, fp, votes="soft", bound=bound, sq_est=sq, soft_bound=soft_bound)
    assert rate <= fp + 3 * math.sqrt(fp * (1 - fp) / trials)


def test_sound_radii_input_checks():
    sel, est = np.array([[5, 5]]), np.array([[50, 50]])
    with pytest.raises(ConfigError, match="bound"):
        sound_radii(sel, est, 100, 0.8, 0.5, 0.01, bound="union")
    with pytest.raises(ConfigError, match="votes"):
        sound_radii(sel, est, 100, 0.8, 0.5, 0.01, votes="mean")
    with pytest.raises(ConfigError, match="failure_prob"):
        sound_radii(sel, est, 100, 0.8, 0.5, 1.0)
    with pytest.raises(ConfigError, match="integer"):
        sound_radii(sel, est + 0.5, 100, 0.8, 0.5, 0.01)
    with pytest.raises(ConfigError, match="sq_est"):
        sound_radii(sel, est, 100, 0.8, 0.5, 0.01, votes="soft", soft_bound="bernstein")


def test_plugin_radii_match_the_theorems():
    h = np.array([[0.7, 0.2, 0.1], [0.34, 0.33, 0.33]])
    res = plugin_radii(h, 0.8, sigma=0.5)
    np.testing.assert_allclose(res.rs, rs_radius(h, 0.8, 0.5))
    np.testing.assert_allclose(res.lipschitz, lipschitz_radius(h, 0.8, rs_lipschitz_constant(0.5)))
    assert res.abstain.tolist() == [False, False]
    res2 = plugin_radii(h, 1.0, lipschitz=2.0)
    assert res2.lipschitz[0] == pytest.approx(0.5 / 4) and np.all(res2.rs == 0)


def test_plugin_infinite_radius_is_warned():
    """Plug-in Theorem 5 at alpha 1 on unanimous votes: (sigma/2)(Phi^-1(1) - Phi^-1(0)) is infinite; said."""
    from mixrobust.certify.mixture import Votes, certify_mixture

    votes = Votes(None, np.array([[100.0, 0, 0], [90, 10, 0]]), 100, "hard")
    g_lp = np.log(np.full((2, 3), 1 / 3))
    with pytest.warns(UserWarning, match="infinite on 1 of 2 images"):
        cert = certify_mixture(votes, g_lp, [0, 0], [0.8, 1.0], 0.5, "plugin")
    assert np.isinf(cert.rs_radius[1, 0]) and np.isfinite(cert.rs_radius[0]).all()
    assert cert.rs_radius[1, 1] == pytest.approx(0.25 * (PHI_INV(0.9) - PHI_INV(0.1)))


# ----------------------------------------------------------------------------- curves and alpha


def test_certified_accuracy_by_hand():
    radii = torch.tensor([0.0, 0.3, 0.5, 1.0])
    correct = torch.tensor([True, True, False, True])
    acc = certified_accuracy(radii, correct, [0.0, 0.25, 0.5, 1.0, 1.5])
    assert acc.tolist() == pytest.approx([0.5, 0.5, 0.25, 0.25, 0.0])


def test_alpha_for_clean_accuracy():
    curve = {0.5: 0.95, 0.6: 0.92, 0.7: 0.88, 0.8: 0.85}
    assert alpha_for_clean_accuracy(curve, 0.9) == 0.6
    assert alpha_for_clean_accuracy(curve, 0.9, method="closest") == 0.7  # tie -> larger alpha
    assert alpha_for_clean_accuracy(curve, 0.9, method="interpolate") == pytest.approx(0.65)
    assert alpha_for_clean_accuracy((list(curve), list(curve.values())), 0.85) == 0.8
    with pytest.raises(ConfigError, match="no alpha"):
        alpha_for_clean_accuracy(curve, 0.99)
    with pytest.raises(ConfigError, match="method"):
        alpha_for_clean_accuracy(curve, 0.9, method="nearest")


# ----------------------------------------------------------------------------- local Lipschitz


@pytest.mark.parametrize("norm, dual", [("l2", 2), ("linf", 1)])
def test_local_lipschitz_linear_model_is_dual_norm_of_weight_rows(norm, dual):
    torch.manual_seed(0)
    w = torch.randn(4, 12, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    x = torch.rand(3, 3, 2, 2, dtype=torch.float64)
    lip = local_lipschitz(lambda z: z.flatten(1) @ w.T + b, x, eps=0.1, norm=norm, steps=3, random_start=True)
    want = torch.linalg.vector_norm(w, ord=dual, dim=1).expand(3, 4)
    torch.testing.assert_close(lip, want)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_local_lipschitz_ascent_finds_the_max_gradient_norm(norm):
    """h_i(x) = a_i ||x - c||^2 / 2: grad norm a_i ||x - c||_{p*}, largest on the far side of the ball."""
    a = torch.tensor([1.0, 3.0], dtype=torch.float64)
    c = torch.full((1, 1, 2, 2), 0.2, dtype=torch.float64)
    x = torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64)
    x[1] = 0.3
    eps = 0.1

    def h_fn(z):
        return 0.5 * a * ((z - c).flatten(1) ** 2).sum(1, keepdim=True)

    lip = local_lipschitz(h_fn, x, eps, norm=norm, steps=10, clamp=False)
    if norm == "l2":
        dist = torch.linalg.vector_norm((x - c).flatten(1), dim=1) + eps
    else:
        dist = (x - c).flatten(1).abs().sum(1) + 4 * eps
    torch.testing.assert_close(lip, dist[:, None] * a)
    # no search (eps = 0): the gradient norm at x itself
    lip0 = local_lipschitz(h_fn, x, 0.0, norm=norm)
    torch.testing.assert_close(lip0, (dist[:, None] - (eps if norm == "l2" else 4 * eps)) * a)


def test_local_lipschitz_leaves_parameter_grads_alone():
    lin = torch.nn.Linear(4, 3)
    x = torch.rand(2, 1, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local_lipschitz(lambda z: torch.softmax(lin(z.flatten(1)), 1), x, 0.05, steps=2)
    assert lin.weight.grad is None
