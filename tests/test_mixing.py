"""MixedClassifier against hand-computed numbers and independent (looped, float64) references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixrobust.errors import ConfigError
from mixrobust.mixing import (
    MixedClassifier,
    MixSpace,
    ROption,
    alpha_from_gamma,
    alphas_from_gammas,
    gamma_from_alpha,
)
from mixrobust.models import create_model

R_OPTIONS = [o.value for o in ROption]


class Map(nn.Module):
    """A parameter-free 'classifier' x -> fn(x), for fixed, hand-chosen logits."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def cnn(seed: int, num_classes: int = 10, input_shape=(1, 8, 8)) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes, input_shape, [0.5] * input_shape[0],
                        [0.25] * input_shape[0], width=4, hidden=16)


def mlp(seed: int, d: int = 6, k: int = 3, scale: float = 1.0) -> nn.Module:
    """A smooth (tanh) float64 model, for finite differences."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def images(n: int = 4, shape=(1, 8, 8), seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=gen, dtype=dtype)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- eq. (4), the default


def test_alpha_endpoints_are_exact_log_softmax():
    g, h = cnn(0), cnn(1)
    x = images()
    want_g, want_h = torch.log_softmax(g(x), -1), torch.log_softmax(h(x), -1)
    assert torch.equal(MixedClassifier(g, h, alpha=0.0)(x), want_g)
    assert torch.equal(MixedClassifier(g, h, alpha=1.0)(x), want_h)
    both = MixedClassifier(g, h, alpha=[0.0, 0.5, 1.0])(x)
    assert both.shape == (3, 4, 10)
    assert torch.equal(both[0], want_g) and torch.equal(both[2], want_h)
    for option in R_OPTIONS:  # R_i is irrelevant at the endpoints
        m = MixedClassifier(g, h, alpha=[0.0, 0.5, 1.0], r_option=option)
        out = m(x.clone().requires_grad_(True))
        assert torch.equal(out[0], want_g) and torch.equal(out[2], want_h)


FIXED_G = np.array([[2.0, -1.0, 0.5, 0.0], [-3.0, 4.0, 1.0, 1.0]])
FIXED_H = np.array([[0.0, 1.5, -2.0, 3.0], [1.0, 1.0, 1.0, -5.0]])


def fixed_models():
    """g(x) = x and h(x) = FIXED_H, with the input x = FIXED_G (float32)."""
    hl = torch.tensor(FIXED_H, dtype=torch.float32)
    x = torch.tensor(FIXED_G, dtype=torch.float32)
    return Map(lambda z: z), Map(lambda z: hl.expand(z.shape[0], -1)), x


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9])
def test_intermediate_alpha_matches_numpy_formula(alpha):
    g, h, x = fixed_models()
    want = np.log((1 - alpha) * np_softmax(FIXED_G) + alpha * np_softmax(FIXED_H))
    got = MixedClassifier(g, h, alpha=alpha)(x)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    # the mixture is a distribution: its exp sums to 1
    np.testing.assert_allclose(got.exp().sum(-1).numpy(), 1.0, rtol=1e-6)


def test_logit_space_vs_prob_space():
    g, h, x = fixed_models()
    alpha = 0.3
    logit = MixedClassifier(g, h, alpha=alpha, mix_space="logit")(x)
    np.testing.assert_allclose(logit.numpy(), (1 - alpha) * FIXED_G + alpha * FIXED_H, rtol=1e-6, atol=1e-6)
    prob = MixedClassifier(g, h, alpha=alpha, mix_space=MixSpace.PROB)(x)
    assert not torch.allclose(prob, logit, atol=1e-2)
    # logit endpoints are the raw logits, exactly
    assert torch.equal(MixedClassifier(g, h, alpha=0.0, mix_space="logit")(x), x)
    assert torch.equal(MixedClassifier(g, h, alpha=1.0, mix_space="logit")(x), h(x))


def extreme_models():
    """Linear models with weights +-1e4: logits of order 1e4 on inputs in [0.2, 1]^4."""
    def lin(rows):
        m = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.tensor(rows) * 1e4)
        return m
    ones, zero = [1.0] * 4, [0.0] * 4
    g = lin([ones, [-v for v in ones], zero])  # predicts class 0
    h = lin([[-v for v in ones], ones, zero])  # predicts class 1
    x = 0.2 + 0.8 * images(3, (4,), seed=3)
    return g, h, x


def test_extreme_logits_hand_computed_values():
    g, h, x = extreme_models()
    s = x.sum(1)
    out = MixedClassifier(g, h, alpha=0.5)(x)
    # log(0.5 * 1 + 0.5 * e^{-2e4 s}) = log 0.5 for classes 0 and 1; class 2 has log-prob -1e4 s in both
    want = torch.stack([torch.full_like(s, math.log(0.5)), torch.full_like(s, math.log(0.5)), -1e4 * s], 1)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("option", R_OPTIONS)
@pytest.mark.parametrize("space", ["prob", "logit"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_extreme_logits_finite_values_and_input_gradients(option, space, alpha):
    g, h, x = extreme_models()
    x = x.requires_grad_(True)
    out = MixedClassifier(g, h, alpha=alpha, r_option=option, mix_space=space)(x)
    assert torch.isfinite(out).all()
    for y in (0, 1, 2):
        loss = F.cross_entropy(out, torch.full((3,), y))
        (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
        assert torch.isfinite(grad).all()


# ---------------------------------------------------------------- eq. (3) and the R_i options


def pnorm(v: torch.Tensor, p: float) -> torch.Tensor:
    v = v.flatten(1).abs()
    return v.pow(p).sum(1).pow(1 / p)


def reference_eq3(g, h, x, alpha, option, space, p):
    """Eq. (3) computed directly: per-class gradients in a Python loop, float64."""
    x = x.detach().double().requires_grad_(True)
    gl, hl = g(x), h(x)
    qg, qh = (gl.softmax(-1), hl.softmax(-1)) if space == "prob" else (gl, hl)
    n, k = qg.shape

    def per_class(q):
        return torch.stack(
            [pnorm(torch.autograd.grad(q[:, i].sum(), x, retain_graph=True)[0], p) for i in range(k)], 1
        )

    def top_class(q):
        top = q.argmax(1)
        rows = [torch.autograd.grad(q[j, top[j]], x, retain_graph=True)[0][j : j + 1] for j in range(n)]
        return pnorm(torch.cat(rows), p).unsqueeze(1)

    if option == "one":
        r = torch.ones(n, k, dtype=x.dtype)
    elif option == "grad_g_i":
        r = per_class(qg)
    elif option == "grad_max_g":
        r = top_class(qg)
    elif option == "grad_ratio":
        r = per_class(qg) / per_class(qh).clamp_min(1e-12)
    else:
        r = top_class(qg) / top_class(qh).clamp_min(1e-12)
    gamma = alpha / (1 - alpha)
    mixed = (qg + gamma * r * qh) / (1 + gamma * r)
    return (mixed.log() if space == "prob" else mixed).detach()


@pytest.mark.parametrize("option", R_OPTIONS)
@pytest.mark.parametrize("space", ["prob", "logit"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_r_options_match_direct_eq3(option, space, norm):
    g, h = cnn(0).double(), cnn(1).double()
    x = images(3, dtype=torch.float64)
    p = 1.0 if norm == "linf" else 2.0
    m = MixedClassifier(g, h, alpha=[0.4, 0.8], r_option=option, mix_space=space, norm=norm)
    for attacked in (False, True):
        out = m(x.clone().requires_grad_(attacked))
        assert out.dtype == torch.float64 and out.requires_grad == attacked
        for i, alpha in enumerate((0.4, 0.8)):
            want = reference_eq3(g, h, x, alpha, option, space, p)
            torch.testing.assert_close(out[i].detach(), want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("option", ["grad_g_i", "grad_max_g", "grad_ratio", "grad_ratio_max"])
def test_zero_gradient_means_pure_g(option):
    # saturated softmax: probabilities are exactly one-hot, their input gradients exactly 0, so
    # R_i = 0 (and 0 / max(0, eps) = 0 for the ratios) and eq. (3) gives g_i itself
    g, h, x = extreme_models()
    out = MixedClassifier(g, h, alpha=0.3, r_option=option)(x.clone().requires_grad_(True))
    assert torch.equal(out.detach(), torch.log_softmax(g(x), -1))


def test_flat_h_gets_full_weight_under_grad_ratio():
    # h does not depend on x: ||grad h_i|| = 0, R_i = ||grad g_i|| / 1e-12, w_i ~ 1: nearly pure h
    g = cnn(0)
    hl = torch.tensor([[3.0, -1.0] + [0.0] * 8])
    h = Map(lambda x: hl.expand(x.shape[0], -1))
    x = images(2)
    out = MixedClassifier(g, h, alpha=0.3, r_option="grad_ratio")(x)
    torch.testing.assert_close(out, torch.log_softmax(hl, -1).expand(2, -1), rtol=0, atol=1e-5)


def test_r_one_with_prob_mixing_is_eq4():
    g, h = cnn(0), cnn(1)
    x = images()
    alpha = 0.6
    eq4 = torch.log((1 - alpha) * g(x).softmax(-1) + alpha * h(x).softmax(-1))
    out = MixedClassifier(g, h, alpha=alpha, r_option="one")(x)
    torch.testing.assert_close(out, eq4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", ["grad_ratio", "grad_max_g"])
def test_batched_gradients_are_per_example(option):
    g, h = cnn(0), cnn(1)
    x = images(5)
    m = MixedClassifier(g, h, alpha=0.5, r_option=option)
    whole = m(x)
    single = torch.cat([m(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", ["grad_g_i", "grad_ratio", "grad_ratio_max"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_double_backprop_matches_finite_differences(option, norm):
    g, h = mlp(0, scale=2.0), mlp(1, scale=2.0)
    x = images(2, (6,), seed=1, dtype=torch.float64)
    y = torch.tensor([0, 2])
    m = MixedClassifier(g, h, alpha=0.5, r_option=option, norm=norm)

    def loss(z):
        return F.cross_entropy(m(z), y, reduction="sum")

    xa = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xa), xa)
    step = 1e-6
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for idx in np.ndindex(*x.shape):
            e = torch.zeros_like(x)
            e[idx] = step
            fd[idx] = (loss(x + e) - loss(x - e)) / (2 * step)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)

    m.detach_r = True
    xd = x.clone().requires_grad_(True)
    (grad_detached,) = torch.autograd.grad(loss(xd), xd)
    torch.testing.assert_close(loss(xd).detach(), loss(x))  # same values, different gradient
    assert (grad_detached - fd).abs().max() > 1e-3 * fd.abs().max()


def test_inference_without_grad_gives_same_values():
    g, h = cnn(0), cnn(1)
    x = images()
    m = MixedClassifier(g, h, alpha=0.5, r_option="grad_ratio")
    with torch.no_grad():
        a = m(x)
    b = m(x)  # grad enabled, x does not require grad
    c = m(x.clone().requires_grad_(True))
    assert not a.requires_grad and not b.requires_grad and c.requires_grad
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c.detach(), rtol=0, atol=0)
    with torch.inference_mode():  # as in Lightning's validation and test loops
        d = m(images())
    assert torch.equal(a, d)


# ---------------------------------------------------------------- vector alpha, gamma


@pytest.mark.parametrize("option", ["one", "grad_ratio"])
@pytest.mark.parametrize("space", ["prob", "logit"])
def test_vector_alpha_equals_stacked_scalars(option, space):
    g, h = cnn(0), cnn(1)
    x = images()
    alphas = [0.0, 0.25, 0.5, 0.9, 1.0]
    vec = MixedClassifier(g, h, alpha=torch.tensor(alphas), r_option=option, mix_space=space)(x)
    stacked = torch.stack(
        [MixedClassifier(g, h, alpha=a, r_option=option, mix_space=space)(x) for a in alphas]
    )
    assert vec.shape == (5, 4, 10)
    torch.testing.assert_close(vec, stacked, rtol=1e-6, atol=1e-6)
    assert torch.equal(vec[0], stacked[0]) and torch.equal(vec[-1], stacked[-1])


def test_alpha_shapes():
    g, h = cnn(0), cnn(1)
    x = images()
    assert MixedClassifier(g, h, alpha=torch.tensor(0.3))(x).shape == (4, 10)
    assert MixedClassifier(g, h, alpha=[0.3])(x).shape == (1, 4, 10)
    m = MixedClassifier(g, h, alpha=0.3)
    m.alpha = (0.1, 0.2)
    assert m.alpha == (0.1, 0.2) and m(x).shape == (2, 4, 10)


def test_from_gamma_and_helpers():
    g, h = cnn(0), cnn(1)
    assert MixedClassifier.from_gamma(g, h, 3.0).alpha == 0.75
    assert MixedClassifier.from_gamma(g, h, [0.0, 1.0, math.inf]).alpha == (0.0, 0.5, 1.0)
    assert MixedClassifier.from_gamma(g, h, 1.0, r_option="grad_ratio").r_option is ROption.GRAD_RATIO
    assert alpha_from_gamma(0.0) == 0.0 and alpha_from_gamma(math.inf) == 1.0
    assert alpha_from_gamma(4.0) == pytest.approx(0.8)
    assert gamma_from_alpha(0.8) == pytest.approx(4.0) and gamma_from_alpha(1.0) == math.inf
    assert gamma_from_alpha(0.0) == 0.0
    assert alphas_from_gammas(torch.tensor([1.0, 3.0])) == [0.5, 0.75]
    x = images()
    torch.testing.assert_close(MixedClassifier.from_gamma(g, h, 1.5)(x), MixedClassifier(g, h, 0.6)(x))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan"), [0.5, 2.0]])
def test_bad_alpha(alpha):
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\].*from_gamma"):
        MixedClassifier(cnn(0), cnn(1), alpha=alpha)


@pytest.mark.parametrize("gamma", [-1.0, float("nan")])
def test_bad_gamma(gamma):
    with pytest.raises(ConfigError, match="gamma.*>= 0"):
        MixedClassifier.from_gamma(cnn(0), cnn(1), gamma)


def test_bad_alpha_types():
    with pytest.raises(ConfigError, match="1-d"):
        MixedClassifier(cnn(0), cnn(1), alpha=torch.ones(2, 2))
    with pytest.raises(ConfigError, match="empty"):
        MixedClassifier(cnn(0), cnn(1), alpha=[])
    with pytest.raises(ConfigError, match="number"):
        MixedClassifier(cnn(0), cnn(1), alpha="half")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"r_option": "grad_h"}, "unknown r_option 'grad_h'; valid values: one, grad_g_i, grad_max_g, "
                                 "grad_ratio, grad_ratio_max"),
        ({"mix_space": "probs"}, "unknown mix_space 'probs'; valid values: prob, logit"),
        ({"norm": "l3"}, "unknown norm 'l3'; valid values: linf, l2"),
    ],
)
def test_unknown_names(kwargs, pattern):
    with pytest.raises(ConfigError) as err:
        MixedClassifier(cnn(0), cnn(1), **kwargs)
    assert str(err.value) == pattern


def test_mismatched_classifiers():
    with pytest.raises(ConfigError, match="g has 10 classes but h has 5"):
        MixedClassifier(cnn(0, 10), cnn(1, 5))
    with pytest.raises(ConfigError, match=r"g takes inputs of shape \(1, 8, 8\) but h takes \(3, 8, 8\)"):
        MixedClassifier(cnn(0), cnn(1, input_shape=(3, 8, 8)))
    with pytest.raises(ConfigError, match=r"input_shape=\(1, 28, 28\).*\(1, 8, 8\)"):
        MixedClassifier(cnn(0), cnn(1), input_shape=(1, 28, 28))
    # models without attributes: probed on one zero input of the given shape
    a = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    b = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    c = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    with pytest.raises(ConfigError, match=r"g outputs 10 classes but h outputs 5"):
        MixedClassifier(a, b, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"h does not accept inputs of shape \(1, 8, 8\)"):
        MixedClassifier(a, c, input_shape=(1, 8, 8))
    ok = MixedClassifier(a, nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), input_shape=(1, 8, 8))
    assert ok.num_classes == 10 and ok.input_shape == (1, 8, 8)
    # nothing to check at construction: the mismatch is caught at the first forward
    unchecked = MixedClassifier(a, b)
    with pytest.raises(ConfigError, match=r"g outputs shape \(2, 10\) but h outputs \(2, 5\)"):
        unchecked(images(2))


# ---------------------------------------------------------------- frozen base models, precision


def bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    return m


def test_base_models_stay_frozen_in_eval_mode():
    g, h = bn_model(0), bn_model(1)
    g.train(), h.train()
    m = MixedClassifier(g, h, alpha=0.5, r_option="grad_ratio", input_shape=(1, 8, 8))
    stats = [t.clone() for t in (g[1].running_mean, g[1].running_var, h[1].running_mean, h[1].running_var)]
    assert m.train() is m and m.training
    assert not any(mod.training for mod in list(g.modules()) + list(h.modules()))
    x = images(3).requires_grad_(True)
    out = m(x)
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    after = (g[1].running_mean, g[1].running_var, h[1].running_mean, h[1].running_var)
    assert all(torch.equal(a, b) for a, b in zip(stats, after))
    for p in m.parameters():
        assert not p.requires_grad and p.grad is None
    m.eval()
    assert not m.training and not g.training


@pytest.mark.parametrize("option", ["one", "grad_g_i"])
def test_float32_output_under_bfloat16_autocast(option):
    g, h = cnn(0), cnn(1)
    x = images()
    plain = MixedClassifier(g, h, alpha=[0.0, 0.5], r_option=option)
    ref = plain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert g(x).dtype == torch.bfloat16  # the base models do run in bfloat16
        out = plain(x)
        want_g = torch.log_softmax(g(x).float(), -1)
        xa = x.clone().requires_grad_(True)
        out_attacked = plain(xa)
    assert out.dtype == torch.float32 and out_attacked.dtype == torch.float32
    assert torch.equal(out[0], want_g)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.1)
    (grad,) = torch.autograd.grad(out_attacked[1].logsumexp(-1).sum() - out_attacked[1][:, 0].sum(), xa)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
