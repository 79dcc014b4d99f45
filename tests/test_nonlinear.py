"""Nonlinear mixing (MixedNUTS): the map, mixing with it, the fit, and the matched-accuracy table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixrobust.attacks import PGD, AdaptiveMixAttack, attack_in_batches
from mixrobust.errors import ConfigError
from mixrobust.evaluation import MixOption, aggregate, load_outcomes, mix_cached, run_sweep, save_outcomes
from mixrobust.evaluation.matched import matched_rows
from mixrobust.mixing import (
    HMap,
    MixedClassifier,
    NonlinearMap,
    ROption,
    load_fit,
    nonlinear_map,
    parse_h_map,
    r_values,
)
from mixrobust.mixing.fit import (
    clean_estimate,
    fit_curves,
    fit_nonlinear_map,
    prob_margins,
    robust_estimate,
    smallest_alpha,
)
from tests.small_models import cnn, digits


def reference_map(z: np.ndarray, s: float, p: float, c: float, k: int | None = None) -> np.ndarray:
    """The map written out in float64 numpy, row by row (the clamps as documented in mixrobust.mixing.maps)."""
    out = np.empty_like(z, dtype=np.float64)
    for i, row in enumerate(z.astype(np.float64)):
        top = np.sort(row)[::-1][: k or len(row)]
        std = max(math.sqrt(np.mean((top - top.mean()) ** 2)), 1e-12)
        u = np.clip((row - top.mean()) / std, -1e3, 1e3) + c
        v = np.array([0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in u])
        out[i] = np.clip(s * np.sign(v) * np.maximum(np.abs(v), 1e-12) ** p, -1e6, 1e6)
    return out


@pytest.mark.parametrize("scale, power, bias, top_k", [(1.0, 1.0, 0.0, None), (4.0, 2.0, -0.5, None),
                                                       (0.5, 0.5, 1.0, 3), (32.0, 4.0, -2.0, 5)])
@pytest.mark.parametrize("magnitude", [1.0, 1e4, 1e30])
def test_map_matches_a_float64_formula(scale, power, bias, top_k, magnitude):
    z = torch.randn(16, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * magnitude
    got = nonlinear_map(z, scale, power, bias, top_k)
    np.testing.assert_allclose(got.numpy(), reference_map(z.numpy(), scale, power, bias, top_k), rtol=1e-10,
                               atol=1e-12)
    assert nonlinear_map(z.float(), scale, power, bias, top_k).dtype == torch.float32  # computed in float64


@pytest.mark.parametrize("magnitude", [1e4, 1e30])
def test_map_outputs_and_gradients_are_finite_on_extreme_and_tied_logits(magnitude):
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(1)) * magnitude
    z[0] = 0.0  # every logit tied: standard deviation 0
    z[1, :9] = -magnitude  # one huge gap
    for params in ((1.0, 0.5, 0.0, None), (32.0, 4.0, -2.0, 2), (8.0, 3.0, 1.0, None)):
        x = z.clone().requires_grad_(True)
        out = nonlinear_map(x, *params)
        (grad,) = torch.autograd.grad(torch.log_softmax(out, -1).sum(), x)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_grid_parameters_broadcast_like_one_map_at_a_time():
    z = torch.randn(20, 10, generator=torch.Generator().manual_seed(2))
    s, p, c = torch.tensor([1.0, 8.0]), torch.tensor([0.5, 3.0]), torch.tensor([-1.0, 0.5])
    grid = nonlinear_map(z, s.view(-1, 1, 1), p.view(-1, 1, 1), c.view(-1, 1, 1))  # (2, 20, 10)
    for i in range(2):
        assert torch.equal(grid[i], nonlinear_map(z, float(s[i]), float(p[i]), float(c[i])))
    assert torch.equal(NonlinearMap(8.0, 3.0, 0.5)(z), nonlinear_map(z, 8.0, 3.0, 0.5))


def test_identity_map_gives_todays_mixture_bit_for_bit():
    g, h = cnn(0), cnn(1)
    x, _ = digits(32)
    for r_option, space in (("one", "prob"), ("one", "logit"), ("grad_g_i", "prob")):
        plain = MixedClassifier(g, h, [0.0, 0.3, 1.0], r_option, space)(x)
        mapped = MixedClassifier(g, h, [0.0, 0.3, 1.0], r_option, space, h_map=HMap())(x)
        assert torch.equal(plain, mapped)
    gl, hl = g(x), h(x)
    assert torch.equal(mix_cached(gl, hl, [0.2, 0.9], "prob"), mix_cached(gl, hl, [0.2, 0.9], "prob", HMap()))


def test_mapped_mixture_is_the_formula_and_cached_logits_serve_it():
    g, h = cnn(0), cnn(1)
    x, _ = digits(32)
    m = HMap("nonlinear", 4.0, 2.0, -0.5)
    mixture = MixedClassifier(g, h, [0.0, 0.4, 1.0], h_map=m)
    out = mixture(x)
    with torch.no_grad():
        q = [torch.softmax(g(x).double(), -1), torch.softmax(nonlinear_map(h(x), 4.0, 2.0, -0.5).double(), -1)]
    for i, a in enumerate((0.0, 0.4, 1.0)):
        torch.testing.assert_close(out[i].double(), torch.log((1 - a) * q[0] + a * q[1]), rtol=1e-5, atol=1e-5)
    assert torch.allclose(out, mix_cached(g(x), h(x), [0.0, 0.4, 1.0], "prob", m), atol=1e-6)
    x = x.clone().requires_grad_(True)  # the attack differentiates through the map
    (grad,) = torch.autograd.grad(MixedClassifier(g, h, 0.7, h_map=m)(x).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("value, params, pattern", [
    ("nonlinear", {"scale": 0}, "scale must be a finite number > 0"),
    ("nonlinear", {"power": -1}, "power must be a finite number > 0"),
    ("nonlinear", {"temperature": 1}, "unknown mix.h_map_params keys"),
    ("nonlinear", {"top_k": 1}, "top_k must be null"),
    ("no_such_fit", None, r"no fitted map at .*no_such_fit.json.*task=fit_map"),
])
def test_bad_maps_are_named(tmp_path, value, params, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_h_map(value, params, tmp_path)


def test_top_k_beyond_the_classes_is_refused():
    with pytest.raises(ConfigError, match="top_k=11 exceeds the models' 10 classes"):
        MixedClassifier(cnn(0), cnn(1), 0.5, h_map=HMap("nonlinear", 2.0, 2.0, 0.0, 11))


# --- the fit --------------------------------------------------------------------------------------------------


def fit_inputs(n: int = 300, k: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=gen)
    onehot = torch.nn.functional.one_hot(y, k).double()
    g = torch.randn(n, k, generator=gen, dtype=torch.float64) * 2 + 5 * onehot
    h = torch.randn(n, k, generator=gen, dtype=torch.float64) * 2 + 3 * onehot
    h_adv = h - (2.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2) * onehot
    return g, h, h_adv, y


def test_estimates_match_loops():
    g, h, h_adv, y = fit_inputs(50)
    q = torch.softmax(h_adv, -1)
    margins = prob_margins(h_adv, y)
    for i in range(5):
        others = [q[i, j] for j in range(10) if j != y[i]]
        assert math.isclose(float(margins[i]), float(q[i, y[i]] - max(others)), rel_tol=1e-12)
    alphas = torch.tensor([0.3, 0.8, 1.0], dtype=torch.float64)
    robust = robust_estimate(margins, alphas)
    for j, a in enumerate(alphas.tolist()):
        assert math.isclose(float(robust[j]), sum(a * float(m) > 1 - a for m in margins) / 50)
        mix = (1 - a) * torch.softmax(g, -1) + a * torch.softmax(h, -1)
        assert math.isclose(float(clean_estimate(g, h, y, torch.tensor(a, dtype=torch.float64))),
                            float((mix.argmax(-1) == y).double().mean()))


def test_smallest_alpha_is_the_first_alpha_of_a_fine_grid_that_reaches_the_count():
    margins = torch.tensor([[0.9, 0.5, 0.2, -0.1, 0.7], [0.1, -0.5, -0.2, 0.05, 0.3]], dtype=torch.float64)
    fine = torch.arange(0, 10001, dtype=torch.float64) / 10000
    for needed in (1, 2, 3):
        got = smallest_alpha(margins, needed)
        for row in range(2):
            reach = robust_estimate(margins[row], fine) * 5 >= needed - 1e-9
            want = float(fine[reach][0]) if reach.any() else math.nan
            assert (math.isnan(want) and math.isnan(float(got[row]))) or abs(float(got[row]) - want) <= 1e-4 + 1e-12
    assert math.isnan(float(smallest_alpha(margins, 5)[0]))  # a negative margin never counts


def test_fit_is_the_best_of_a_brute_force_search_and_deterministic():
    g, h, h_adv, y = fit_inputs(200)
    grid = dict(scales=(1.0, 4.0), powers=(1.0, 2.0), biases=(-0.5, 0.5))
    fit = fit_nonlinear_map(g, h, h_adv, y, target=0.9, **grid)
    again = fit_nonlinear_map(g, h, h_adv, y, target=0.9, **grid)
    assert fit.summary() == again.summary() and fit.grid == again.grid
    h_robust = float(((h_adv.argmax(-1) == y) & (h.argmax(-1) == y)).double().mean())
    assert fit.h_robust == h_robust
    fine = torch.arange(0, 10001, dtype=torch.float64) / 10000
    best = None
    for s in grid["scales"]:
        for p in grid["powers"]:
            for c in grid["biases"]:
                m = prob_margins(nonlinear_map(h_adv, s, p, c), y).masked_fill(h.argmax(-1) != y, -1.0)
                reach = robust_estimate(m, fine) >= 0.9 * h_robust - 1e-9
                if not reach.any():
                    continue
                a = float(fine[reach][0])
                clean = float(clean_estimate(g, nonlinear_map(h, s, p, c), y, torch.tensor(a, dtype=torch.float64)))
                if best is None or clean > best[0]:
                    best = (clean, s, p, c, a)
    assert fit.clean == pytest.approx(best[0])
    assert (fit.h_map.scale, fit.h_map.power, fit.h_map.bias) == best[1:4]
    assert fit.alpha == pytest.approx(best[4], abs=1.01e-4)
    assert fit.robust >= 0.9 * h_robust
    curves = fit_curves(g, h, h_adv, y, [HMap(), fit.h_map], points=11)
    assert len(curves) == 22 and curves[10]["robust"] == pytest.approx(h_robust)  # identity at alpha 1 is h


def test_fit_refuses_a_target_no_map_reaches():
    g, h, _, y = fit_inputs(100)
    with pytest.raises(ConfigError, match="h is right on none"):
        fit_nonlinear_map(g, h, -10 * torch.nn.functional.one_hot(y, 10).double(), y)
    with pytest.raises(ConfigError, match="fit.target must be in"):
        fit_nonlinear_map(g, h, h, y, target=1.5)


# --- the sweep -----------------------------------------------------------------------------------------------


def test_sweep_with_a_map_beside_linear_mixing():
    g, h = cnn(0, width=8), cnn(1, width=8)
    x, y = digits(40)
    m = HMap("nonlinear", 8.0, 2.0, 0.0)
    options = [MixOption(), MixOption("one", "prob", m)]
    attack = PGD("linf", eps=0.1, step_size=0.025, steps=3, early_exit=True)
    adaptive = AdaptiveMixAttack("linf", eps=0.1, steps=5, targets=2)
    result = run_sweep(g, h, x, y, alphas=[0.0, 0.6, 1.0], attack=attack, options=options,
                       attacks=["std", "rob", "mix", "apgd"], adaptive=adaptive, batch_size=16, preflight=False)
    out = result.outcomes
    # clean: the mapped mixture by the formula, from the same (map-free) base logits
    with torch.no_grad():
        want = MixedClassifier(g, h, [0.0, 0.6, 1.0], h_map=m)(x).argmax(-1) == y
    assert np.array_equal(out.mix["clean"][1], want.numpy())
    # alpha 1 of the mapped option is attacked as a mixture, not copied from h's own PGD
    mapped_h = MixedClassifier(g, h, 1.0, h_map=m)
    x_adv = attack_in_batches(attack, mapped_h, x, y, 16)
    with torch.no_grad():
        direct = (mapped_h(x_adv).argmax(-1) == y).numpy() | ~out.mix["clean"][1, 2]
    assert np.array_equal(out.mix["mix"][1, 2] | ~out.mix["clean"][1, 2], direct)
    # each option's apgd column: the adaptive attack on the mixture, and its images on g and on h alone, judged
    # by the mixture (mapped or not)
    own = [attack_in_batches(adaptive, model, x, y, 16) for model in (g, h)]
    for k, option in enumerate(options):
        mixture = MixedClassifier(g, h, 0.6, h_map=option.h_map)
        with torch.no_grad():
            want = mixture(x).argmax(-1) == y
            for x_adv in [*own, attack_in_batches(adaptive, mixture, x, y, 16)]:
                want &= mixture(x_adv).argmax(-1) == y
        assert np.array_equal(out.mix["apgd"][k, 1], want.numpy()), k
    rows = aggregate(out)
    assert {r["h_map"] for r in rows if r["model"] == "mix"} == {"identity", m.label}
    assert {r["h_map"] for r in rows if r["model"] != "mix"} == {None}


def test_outcomes_file_keeps_the_maps(tmp_path):
    g, h = cnn(0), cnn(1)
    x, y = digits(16)
    m = HMap("nonlinear", 2.0, 1.5, -1.0, 3, name="fitted")
    result = run_sweep(g, h, x, y, alphas=[0.5], attack=PGD("linf", eps=0.1, step_size=0.05, steps=1),
                       options=[MixOption(), MixOption("one", "prob", m)], attacks=["mix"], preflight=False)
    back = load_outcomes(save_outcomes(tmp_path / "o.npz", result.outcomes))
    assert back.options == result.outcomes.options and aggregate(back) == aggregate(result.outcomes)


def test_matched_rows_pair_each_mapped_point_with_the_nearest_clean_linear_one():
    def rows(h_map, points):
        return [{"model": "mix", "alpha": a, "r_option": "one", "mix_space": "prob", "h_map": h_map,
                 "attack": k, "accuracy": v} for a, clean, rob in points for k, v in (("clean", clean), ("worst", rob))]

    linear = rows("identity", [(0.0, 0.99, 0.0), (0.5, 0.965, 0.20), (0.8, 0.95, 0.40), (1.0, 0.90, 0.50)])
    mapped = rows("nonlinear(s=2,p=2,c=0)", [(0.0, 0.99, 0.0), (0.6, 0.96, 0.45), (1.0, 0.91, 0.52)])
    got = matched_rows(linear + mapped)
    assert [(r["alpha_nonlinear"], r["alpha_linear"]) for r in got] == [(0.6, 0.5), (1.0, 1.0)]
    assert got[0]["worst_nonlinear"] == 0.45 and got[0]["worst_linear"] == 0.20
    assert got[0]["clean_linear"] == 0.965 and got[1]["clean_linear"] == 0.90
    assert matched_rows(linear) == []
    # equally near in clean accuracy: the more robust linear point, so a tie never flatters the map
    tie = rows("identity", [(0.5, 0.98, 0.10), (0.6, 0.96, 0.30)]) + rows("nonlinear(s=2,p=2,c=0)", [(0.7, 0.97, 0.2)])
    assert [(r["alpha_linear"], r["worst_linear"]) for r in matched_rows(tie)] == [(0.6, 0.30)]


def test_fit_files_load_by_name_and_path(tmp_path):
    import json

    record = {"h_map": {"kind": "nonlinear", "scale": 4.0, "power": 2.0, "bias": 0.5}, "alpha": 0.8}
    (tmp_path / "mnist.json").write_text(json.dumps(record))
    assert parse_h_map("mnist", None, tmp_path) == HMap("nonlinear", 4.0, 2.0, 0.5)
    assert load_fit(str(tmp_path / "mnist.json"))["alpha"] == 0.8
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a fitted map"):
        parse_h_map("broken", None, tmp_path)


def test_gradient_r_options_take_the_mapped_logits():
    g, h = cnn(0), cnn(1)
    x, _ = digits(8)
    m = HMap("nonlinear", 4.0, 2.0, 0.0)
    mapped = MixedClassifier(g, h, 0.5, "grad_g_i", h_map=m)(x)
    linear = MixedClassifier(g, h, 0.5, "grad_g_i")(x)
    assert torch.isfinite(mapped).all() and not torch.allclose(mapped, linear)
    with torch.no_grad():  # R_i = ||grad g_i|| does not involve h, so the mixture is eq. (3) with softmax(M(h))
        gp, hp = torch.softmax(g(x), -1), torch.softmax(m(h(x)), -1)
    xg = x.clone().requires_grad_(True)
    r = r_values(ROption.GRAD_G_I, torch.softmax(g(xg), -1), torch.softmax(m(h(xg)), -1), xg, 1.0, False).detach()
    a = r / (1 + r)  # eq. (3) at alpha = 0.5: h's weight alpha R_i / ((1 - alpha) + alpha R_i)
    want = torch.log((1 - a) * gp + a * hp)
    torch.testing.assert_close(mapped, want.float(), rtol=1e-4, atol=1e-4)
