"""mixrobust.attacks: the attack contract, closed-form optima, and agreement with torchattacks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mixrobust.attacks import FGSM, PGD, attack_chunks, attack_in_batches, attack_loss, margin_loss
from mixrobust.attacks.pgd import ladder_size, shrink
from mixrobust.errors import ConfigError
from mixrobust.models import create_model
from mixrobust.threat import Threat
from tests.small_models import mlp

pytestmark = pytest.mark.usefixtures("one_thread")


# --- small models ---------------------------------------------------------------------------


MLP = mlp()


def _images(seed: int, n: int, shape=(3, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images with some pixels exactly 0 or 1 (so the [0,1] clamp is exercised)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g)
    x = torch.where(x < 0.1, 0.0, torch.where(x > 0.9, 1.0, x))
    return x, torch.randint(0, 5, (n,), generator=g)


class ModeRecorder(nn.Module):
    """Conv-BN-Dropout net that records the BatchNorm's mode at every forward pass."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.drop = nn.Dropout(0.5)
            self.head = nn.Linear(64, 5)
        self.seen: list[bool] = []
        self.fail_at = fail_at

    def forward(self, x):
        self.seen.append(self.bn.training)
        if self.fail_at is not None and len(self.seen) >= self.fail_at:
            raise RuntimeError("boom")
        return self.head(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


def _linear2(seed: int, d: int = 16) -> nn.Module:
    """A 2-class linear model on (N, 1, 4, 4) images with a bias that makes a mix of cases."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn((2, d), generator=g))
        lin.bias.copy_(torch.tensor([0.0, 0.3]))
    return nn.Sequential(nn.Flatten(), lin).eval()


def _margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return margin_loss(model(x), y)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"step_size": -1.0}, "step_size"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"restarts": 0, "random_start": True}, "restarts"),
        ({"restarts": 2}, "random_start"),
        ({"loss": "hinge"}, "valid values: ce, margin"),
        ({"norm": "l1"}, "valid values: linf, l2"),
        ({"autocast_dtype": "int8"}, "valid values: bfloat16, float16, float32"),
        ({"random_start": "yes"}, "random_start"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    args = {"eps": 0.1, "step_size": 0.01} | kwargs
    with pytest.raises(ConfigError, match=match):
        PGD(**args)


def test_from_threat_and_fgsm_settings():
    pgd = PGD.from_threat(Threat(norm="l2", eps=0.5, step_size=0.1), steps=7, loss="margin")
    assert (pgd.norm.value, pgd.eps, pgd.step_size, pgd.steps, pgd.loss) == ("l2", 0.5, 0.1, 7, "margin")
    assert PGD(eps=0.1, step_size=0.1, autocast_dtype="bfloat16").autocast_dtype is torch.bfloat16
    assert PGD(eps=0.1, step_size=0.1, autocast_dtype=torch.float32).autocast_dtype is None
    fgsm = FGSM.from_threat(Threat(eps=0.25, step_size=0.01))
    assert (fgsm.step_size, fgsm.steps, fgsm.random_start) == (0.25, 1, False)


def test_bad_inputs_raise():
    pgd = PGD(eps=0.1, step_size=0.05, steps=2)
    x, y = _images(0, 4)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        pgd(MLP, x * 2 - 0.5, y)
    with pytest.raises(ValueError, match="labels"):
        pgd(MLP, x, y[:3])
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        pgd(nn.Identity(), x, y)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pgd(MLP, x, y)


# --- losses -------------------------------------------------------------------------------------


def test_losses_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    y = torch.tensor([1, 1, 2])
    margin = margin_loss(logits, y)
    assert margin.dtype == torch.float32
    assert margin.tolist() == [-1.0, 4.0, 0.0]
    ce = attack_loss("ce", torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([0]))
    assert ce.item() == pytest.approx(math.log(4.0), abs=1e-6)


# --- the contract: box, ball, modes, gradients --------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    loss=st.sampled_from(["ce", "margin"]),
    random_start=st.booleans(),
    restarts=st.integers(1, 3),
    eps=st.floats(0.0, 1.5),
    step_ratio=st.floats(0.0, 2.0),
    steps=st.integers(0, 5),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_stays_in_box_and_ball(norm, loss, random_start, restarts, eps, step_ratio, steps, n, seed):
    pgd = PGD(norm, eps=eps, step_size=eps * step_ratio, steps=steps, loss=loss,
              random_start=random_start, restarts=restarts if random_start else 1, seed=seed)
    x, y = _images(seed, n)
    x_adv = pgd(MLP, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("start_mode", ["train", "eval", "mixed"])
def test_search_runs_in_eval_mode_and_restores_modes(start_mode):
    model = ModeRecorder()
    model.train(start_mode != "eval")
    if start_mode == "mixed":
        model.drop.eval()
    before = {name: m.training for name, m in model.named_modules()}
    running_mean = model.bn.running_mean.clone()
    x, y = _images(0, 8)
    PGD(eps=0.1, step_size=0.05, steps=3)(model, x, y)
    assert model.seen == [False] * 4  # 3 gradient passes and the final iterate's check, all in eval mode
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(model.bn.running_mean, running_mean)


def test_modes_restored_on_exception():
    model = ModeRecorder(fail_at=2).train()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(eps=0.1, step_size=0.05, steps=3)(model, *_images(0, 4))
    assert all(m.training for m in model.modules())


def test_parameter_grads_untouched():
    model = ModeRecorder()
    x, y = _images(0, 8)
    PGD(eps=0.1, step_size=0.05, steps=3)(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    PGD("l2", eps=0.5, step_size=0.2, steps=3, loss="margin")(model, x, y)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(p.requires_grad for p in model.parameters())


def test_works_under_no_grad_and_is_deterministic():
    pgd = PGD("l2", eps=1.0, step_size=0.3, steps=4, random_start=True, restarts=2, seed=5)
    x, y = _images(3, 6)
    x_adv = pgd(MLP, x, y)
    with torch.no_grad():
        assert torch.equal(pgd(MLP, x, y), x_adv)
    assert not torch.equal(PGD("l2", eps=1.0, step_size=0.3, steps=4, random_start=True, seed=6)(MLP, x, y),
                           PGD("l2", eps=1.0, step_size=0.3, steps=4, random_start=True, seed=5)(MLP, x, y))
    unseeded = PGD(eps=0.2, step_size=0.1, steps=2, random_start=True, seed=None)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        first = unseeded(MLP, x, y)
        torch.manual_seed(11)
        assert torch.equal(unseeded(MLP, x, y), first)
        assert not torch.equal(unseeded(MLP, x, y), first)  # the global generator moved on


def test_trivial_budgets_return_a_copy_without_calling_the_model():
    x, y = _images(0, 3)
    failing = ModeRecorder(fail_at=1)
    for pgd in (PGD(eps=0.0, step_size=0.1, random_start=True), PGD(eps=0.3, step_size=0.1, steps=0)):
        x_adv = pgd(failing, x, y)
        assert torch.equal(x_adv, x) and x_adv.data_ptr() != x.data_ptr()
    x_adv = PGD(eps=0.3, step_size=0.1, steps=0, random_start=True)(MLP, x, y)
    assert not torch.equal(x_adv, x) and (x_adv - x).abs().max() <= 0.3 + 1e-6


def test_per_example_search_does_not_depend_on_the_batch():
    pgd = PGD("l2", eps=1.0, step_size=0.25, steps=5)
    x, y = _images(2, 9)
    together = pgd(MLP, x, y)
    alone = torch.cat([pgd(MLP, x[i : i + 1], y[i : i + 1]) for i in (0, 4, 8)])
    torch.testing.assert_close(together[[0, 4, 8]], alone, atol=1e-6, rtol=0)


def test_restarts_keep_each_examples_worst_case():
    """restarts=3 is per example at least as strong as the best of 3 single runs on the same starts."""
    kw = {"eps": 0.3, "step_size": 0.05, "steps": 3, "random_start": True, "loss": "margin"}
    x, y = _images(4, 64)
    combined = PGD(restarts=3, seed=9, **kw)(MLP, x, y)
    single = PGD(seed=9, **kw)
    gen = single.make_generator(x.device)
    runs = torch.stack([single(MLP, x, y, generator=gen) for _ in range(3)])  # (3, N, C, H, W)
    margins = torch.stack([_margin(MLP, r, y) for r in runs])  # (3, N); margin > 0 means fooled
    best_single = margins.max(dim=0).values  # (N,)
    combined_margin = _margin(MLP, combined, y)
    assert (combined_margin >= best_single - 1e-6).all()
    assert ((combined_margin > 0) | (best_single <= 0)).all()  # fooled by one restart: fooled
    assert (margins.argmax(dim=0) > 0).any(), "a later restart should win somewhere, or this test checks nothing"


def test_zero_and_tiny_l2_gradients():
    x, y = _images(0, 4, shape=(1, 4, 4))
    constant = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        constant[1].weight.zero_()
    assert torch.equal(PGD("l2", eps=0.5, step_size=0.2, steps=3)(constant, x, y % 2), x)
    # Gradients around 1e-31: their squares underflow float32, the unit step must not.
    x = 0.25 + 0.5 * x
    tiny = _linear2(3)
    with torch.no_grad():
        tiny[1].weight.mul_(1e-30)
        tiny[1].bias.copy_(torch.tensor([1e-27, 0.0]))  # class 0 wins everywhere in the ball: never fooled
    y = torch.zeros(4, dtype=torch.long)
    # (the margin loss, as cross-entropy is log 2 to float precision everywhere here)
    x_adv = PGD("l2", eps=0.2, step_size=0.2, steps=1, loss="margin")(tiny, x, y)
    v = (tiny[1].weight[1] - tiny[1].weight[0]).detach().double()
    expected = x + 0.2 * (v / v.norm()).float().view(1, 1, 4, 4)
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)


# --- closed-form optimum on a 2-class linear model ------------------------------------------------


def _worst_margin_linear(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float):
    """max over the ball (and the [0,1] box) of z_other - z_y for a 2-class linear model."""
    w, b = model[1].weight, model[1].bias
    sign = (1 - 2 * y).float()[:, None]  # +1 for y = 0, -1 for y = 1
    v = sign * (w[1] - w[0])  # (N, d): gradient of the margin
    c = sign[:, 0] * (b[1] - b[0])
    xf = x.flatten(1)
    if norm == "linf":
        low, high = torch.clamp(-xf, min=-eps), torch.clamp(1 - xf, max=eps)
        gain = torch.maximum(v * low, v * high).sum(1)
    else:  # images chosen so that the l_2 ball stays inside the box
        gain = eps * v.norm(dim=1)
    return (v * xf).sum(1) + c + gain


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_linear_model_reaches_closed_form_worst_margin(norm, loss, attack):
    eps = 0.1 if norm == "linf" else 0.4
    model = _linear2(0)
    x, _ = _images(1, 200, shape=(1, 4, 4))
    if norm == "l2":
        x = eps + (1 - 2 * eps) * x
    y = model(x).argmax(1).detach()  # clean-correct labels
    if attack == "pgd":
        x_adv = PGD(norm, eps=eps, step_size=eps / 4, steps=6, loss=loss)(model, x, y)
    else:
        x_adv = FGSM(norm, eps=eps, loss=loss)(model, x, y)
    expected = _worst_margin_linear(model, x, y, norm, eps).detach()
    assert (expected > 0).any() and (expected < 0).any()  # both fooled and robust examples
    torch.testing.assert_close(_margin(model, x_adv, y), expected, atol=2e-5, rtol=0)


# --- batched helper -----------------------------------------------------------------------------


def test_early_exit_ladder():
    """Sizes 1 .. 9, then each the ceiling of 9/8 of the one before: a count gets the smallest size holding it."""
    assert [ladder_size(n) for n in (0, 1, 9, 10, 11, 12, 13, 14, 107, 108, 121, 122)] == \
        [0, 1, 9, 11, 11, 13, 13, 15, 107, 121, 121, 137]
    sizes = [ladder_size(n) for n in range(1, 5001)]
    assert all(n <= size <= n * 9 / 8 + 1 for n, size in enumerate(sizes, start=1))
    assert all(ladder_size(size) == size for size in sizes) and len(set(sizes)) < 80  # few sizes, reused


def test_shrink_keeps_every_live_row_and_fills_with_the_first_decided_ones():
    live = torch.zeros(30, dtype=torch.bool)
    live[1:20:2] = True  # 10 live rows: ladder size 11, so one decided row (the first, row 0) fills it
    keep = shrink(live)
    assert torch.equal(keep.nonzero().flatten(), torch.tensor([0, *range(1, 20, 2)]))
    live[21] = True  # 11 live: exactly a ladder size
    assert torch.equal(shrink(live), live)
    assert shrink(torch.ones(30, dtype=torch.bool)) is None and shrink(torch.arange(30) != 3) is None  # 29 -> 30
    assert not shrink(torch.zeros(30, dtype=torch.bool)).any()


def test_attack_in_batches():
    x, y = _images(6, 23)
    pgd = PGD("l2", eps=0.8, step_size=0.2, steps=4)
    chunked = attack_in_batches(pgd, MLP, x, y, batch_size=5)
    assert chunked.shape == x.shape and chunked.device == x.device
    torch.testing.assert_close(chunked, pgd(MLP, x, y), atol=1e-6, rtol=0)
    # With random start every chunk draws fresh starts, reproducibly for a fixed seed.
    same = x[:1].expand(8, -1, -1, -1).contiguous()
    rand = PGD(eps=0.2, step_size=0.0, steps=1, random_start=True, seed=3)
    out = attack_in_batches(rand, MLP, same, y[:1].expand(8), batch_size=4)
    assert not torch.equal(out[:4], out[4:])
    assert torch.equal(out, attack_in_batches(rand, MLP, same, y[:1].expand(8), batch_size=4))
    assert torch.equal(attack_in_batches(lambda m, a, b: a * 0.5, MLP, x, y, batch_size=10), x * 0.5)
    with pytest.raises(ConfigError, match="batch_size"):
        attack_in_batches(pgd, MLP, x, y, batch_size=0)


def test_attack_chunks_attack_the_selected_rows_one_chunk_at_a_time():
    x, y = _images(6, 23)
    pgd = PGD("l2", eps=0.8, step_size=0.2, steps=4)
    index = torch.tensor([22, 3, 7, 0, 19, 11, 5])
    seen = []

    def spy(model, xb, yb):
        seen.append(len(xb))
        return pgd(model, xb, yb)

    starts, parts = [], []
    for start, x_adv in attack_chunks(spy, MLP, x, y, 3, index):
        starts.append(start)
        parts.append(x_adv)
        assert sum(seen) == start + len(x_adv)  # the next chunk is attacked only once this one is consumed
    assert starts == [0, 3, 6] and seen == [3, 3, 1]
    torch.testing.assert_close(torch.cat(parts), pgd(MLP, x[index], y[index]), atol=1e-6, rtol=0)
    assert [s for s, _ in attack_chunks(spy, MLP, x, y, 10)] == [0, 10, 20]  # no index: all rows, in order
    with pytest.raises(ConfigError, match="batch_size"):
        next(attack_chunks(pgd, MLP, x, y, 0))


# --- a standard CNN trained on sklearn digits ------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """small_cnn trained for a few seconds on digits; returns (model, x_all, y_all, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1437], perm[1437:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.5])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(8):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.eval()
    return model, x, y, x[test], y[test]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def test_standard_model_breaks_under_linf_03(digits):
    model, _, _, x_test, y_test = digits
    assert _accuracy(model, x_test, y_test) > 95
    assert _accuracy(model, PGD(eps=0.3, step_size=0.03, steps=20)(model, x_test, y_test), y_test) < 10


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_agrees_with_torchattacks(digits, norm, eps):
    import torchattacks  # a test dependency (the README's test command installs it with --no-deps)

    model, x, y, _, _ = digits
    step, steps = eps / 4, 10
    ours = _accuracy(model, PGD(norm, eps=eps, step_size=step, steps=steps)(model, x, y), y)
    ref_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    ref_attack = ref_cls(model, eps=eps, alpha=step, steps=steps, random_start=False)
    ref = _accuracy(model, ref_attack(x, y), y)
    assert 20 < ref < 80, "pick a budget where the comparison is informative"
    assert abs(ours - ref) <= 0.5, f"ours {ours:.2f}% vs torchattacks {ref:.2f}%"


@pytest.fixture(scope="module")
def torchattacks_points(digits):
    """``points(norm, eps, step, steps)``: every point torchattacks' PGD visits without random start (its k-step
    result is its longer run's k-th iterate, so its runs of 0 .. steps steps), computed once per setting."""
    import torchattacks

    model, x, y, _, _ = digits
    found = {}

    def points(norm: str, eps: float, step: float, steps: int) -> list[torch.Tensor]:
        if (norm, eps, step, steps) not in found:
            ref_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
            found[norm, eps, step, steps] = [x] + [ref_cls(model, eps=eps, alpha=step, steps=k, random_start=False)(x, y)
                                                   for k in range(1, steps + 1)]
        return found[norm, eps, step, steps]

    return points


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_broken_examples_are_those_any_torchattacks_iterate_breaks(digits, torchattacks_points, norm, eps):
    """Ours counts an example broken if any point its search visited fools the model; torchattacks returns its last
    iterate only. Without random start, torchattacks' k-step result is its longer run's k-th iterate, so runs of
    0 .. steps steps give every point it visits: the examples they break are exactly the ones ours breaks."""
    model, x, y, _, _ = digits
    step, steps = eps / 2, 10  # large steps overshoot: some examples are fooled mid-search and recover at the end
    iterates = torchattacks_points(norm, eps, step, steps)
    with torch.no_grad():
        robust_ref = torch.stack([model(point).argmax(1) == y for point in iterates]).all(0)
        last = model(iterates[-1]).argmax(1) == y
    assert 0.2 < robust_ref.float().mean() < 0.8, "pick a budget where the comparison is informative"
    assert bool((last & ~robust_ref).any()), "some example recovers at torchattacks' last iterate"
    for early_exit in (False, True):
        ours = PGD(norm, eps=eps, step_size=step, steps=steps, early_exit=early_exit)(model, x, y)
        with torch.no_grad():
            robust = model(ours).argmax(1) == y
        assert int((robust != robust_ref).sum()) <= len(y) // 200, "float rounding may flip at most 0.5% of examples"


def test_the_point_returned_is_the_highest_loss_visited_one(digits, torchattacks_points):
    """Per example, of the points torchattacks' search visits (its runs of 0 .. steps steps): the fooling one of
    highest loss if any fools, else the one of highest loss; the final iterate included (a PGD-K training example
    is never weaker than Madry et al.'s K-th iterate). l_inf: sign steps make the two searches' points equal (l_2
    steps of near-zero gradients, normalized, drift apart in float rounding)."""
    model, x, y, _, _ = digits
    eps, step, steps = 0.1, 0.05, 10
    iterates = torchattacks_points("linf", eps, step, steps)
    with torch.no_grad():
        logits = [model(point) for point in iterates]
        loss = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])  # (steps + 1, N)
        fooled = torch.stack([z.argmax(1) != y for z in logits])
        any_fooled = fooled.any(0)  # (N,) then only fooling points compete
        chosen = torch.where(any_fooled, torch.where(fooled, loss, -math.inf).argmax(0), loss.argmax(0))  # (N,)
        expected = loss.gather(0, chosen[None]).squeeze(0)
        got = F.cross_entropy(model(PGD(eps=eps, step_size=step, steps=steps)(model, x, y)), y, reduction="none")
    assert bool(((chosen == steps) & fooled[-1]).any()), "some fooled example's best point is the final iterate"
    assert bool(((chosen < steps) & ~fooled.any(0)).any()), "some robust example's best point is not the last"
    moved = ~torch.isclose(got, expected, rtol=1e-4, atol=1e-5)
    assert int(moved.sum()) <= len(y) // 200, "float rounding may move at most 0.5% of examples"


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_bf16_autocast_matches_float32(digits, norm, eps):
    model, x, y, _, _ = digits
    kw = {"eps": eps, "step_size": eps / 4, "steps": 10, "random_start": True, "seed": 0}
    full = _accuracy(model, PGD(norm, **kw)(model, x, y), y)
    half = PGD(norm, autocast_dtype="bfloat16", **kw)(model, x, y)
    assert half.dtype == torch.float32
    assert abs(_accuracy(model, half, y) - full) <= 0.5


def test_more_steps_never_raise_accuracy(digits):
    model, _, _, x, y = digits
    correct_before = torch.ones_like(y, dtype=torch.bool)
    for steps in (0, 1, 2, 4, 7):
        pgd = PGD(eps=0.06, step_size=0.02, steps=steps, random_start=True, restarts=2, seed=1)
        with torch.no_grad():
            correct = model(pgd(model, x, y)).argmax(1) == y
        assert not (correct & ~correct_before).any(), f"steps={steps} fixed an example fooled before"
        correct_before = correct
    assert correct.float().mean() < 0.9  # the budget is large enough for the steps to matter
