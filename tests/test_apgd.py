"""APGD and the adaptive attack on mixtures (`mixrobust.attacks.apgd`): contract, schedule, losses, early exit, strength."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from mixrobust.attacks import APGD, PGD, AdaptiveMixAttack, attack_in_batches
from mixrobust.attacks import apgd as apgd_module
from mixrobust.attacks.apgd import checkpoints, dlr_loss, dlr_targeted_loss, stalled, target_classes
from mixrobust.attacks.pgd import ladder_size
from mixrobust.errors import ConfigError
from mixrobust.mixing import MixedClassifier
from tests.small_models import cnn, digits, fit_cnns, mlp


def test_checkpoints_follow_the_papers_schedule():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (steps of max(previous - 0.03, 0.06))
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [0, 3, 5, 6, 7, 8, 9]


def test_step_halving_rule_of_the_reference_code():
    """Condition 1: at most rho of the interval's steps raised the loss (<=, as Croce and Hein's code tests it);
    condition 2 only where the step was not halved at the last checkpoint (the start counts as a halving)."""
    ups = torch.tensor([15.0, 16.0, 16.0, 16.0, 16.0])
    reduced = torch.tensor([False, False, True, False, True])
    then = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    now = torch.tensor([2.0, 2.0, 1.0, 1.0, 2.0])  # the best loss never falls
    #             15 <= 0.75 * 20 | not halved, improved | halved last time, unchanged | not halved, unchanged | halved
    assert stalled(ups, 20, reduced, then, now).tolist() == [True, False, False, True, False]
    assert stalled(ups, 20, reduced, then, now, rho=0.8).tolist() == [True, True, True, True, True]


def test_target_classes_leave_out_the_label_whatever_its_score():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0],   # label on top: the next ones
                           [5.0, 4.0, 3.0, 2.0, 1.0],   # label second (a surrogate's top may differ): skipped
                           [1.0, 1.0, 1.0, 1.0, 0.0]])  # ties with the label: never the label
    y = torch.tensor([0, 1, 2])
    got = target_classes(scores, y, 3)
    assert got[:2].tolist() == [[1, 2, 3], [0, 2, 3]]
    assert set(got[2].tolist()) == {0, 1, 3}


class Rolled(torch.nn.Module):
    """A model whose surrogate logits are its outputs shifted by one class: its top class is never the output's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def outputs_and_surrogate(self, x):
        out = self.model(x)
        return out, out.roll(1, dims=1)


def test_targeted_searches_never_aim_at_the_label_under_a_surrogate(trained_pair, monkeypatch):
    """With ``surrogate=True`` the clean ranking comes from the surrogate, whose top class can differ from the label
    on examples the true outputs classify right: no search may target the label there."""
    g, h, x, y = trained_pair
    model = Rolled(h)
    seen = []
    loss = apgd_module.dlr_targeted_loss
    monkeypatch.setattr(apgd_module, "dlr_targeted_loss",
                        lambda z, y_, t: seen.append(bool((t == y_).any())) or loss(z, y_, t))
    APGD(eps=0.2, steps=3, loss="dlr_targeted", targets=3, surrogate=True, early_exit=False)(model, x, y)
    assert len(seen) >= 4 and not any(seen)  # the first target's start and 3 steps at least


def test_steps_counts_gradient_steps_as_autoattack_does():
    """``steps=N``: the start and N iterates are evaluated (AutoAttack's n_iter); one step from x moves by the
    initial step 2 eps along the gradient sign, projected onto the eps box."""
    model = BatchSizes(mlp())
    x, y = torch.full((6, 3, 4, 4), 0.5), torch.arange(6) % 5
    APGD(eps=0.01, steps=4, early_exit=False)(model, x, y)
    assert len(model.sizes) == 1 + 5  # the clean pass, then x_0 .. x_4
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    with torch.no_grad():
        fooled = model(x).argmax(1) != y
    one = APGD(eps=0.01, steps=1)(model, x, y)  # early exit: an example x fools is not searched
    want = torch.where(fooled.view(-1, 1, 1, 1), x, x + 0.01 * grad.sign())
    assert torch.allclose(one, want, atol=1e-7)
    assert (~fooled).any() and not torch.equal(one, x)


def test_the_full_search_returns_the_highest_loss_fooling_point():
    """``early_exit=False`` (transfer images): every example is searched, those x already fools too, and each gets
    the fooling point of highest loss among those visited (x and x_1 here), else its highest-loss point."""
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.rand(64, 3, 4, 4), torch.randint(0, 5, (64,))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    x1 = (x + 0.3 * grad.sign()).clamp(0, 1)  # eps 0.15: the first step is 2 eps
    x1 = torch.min(torch.max(x1, x - 0.15), x + 0.15)
    with torch.no_grad():
        (l0, l1), (f0, f1) = zip(*[(torch.nn.functional.cross_entropy(model(p), y, reduction="none"),
                                    model(p).argmax(1) != y) for p in (x, x1)])
    first = torch.where(f0 | ~f1 & (l0 >= l1), 0, 1)  # early exit keeps x where it fools, else the better point
    deepest = torch.where(f0 & f1, torch.where(l1 > l0, 1, 0), torch.where(f1 | ~f0 & (l1 > l0), 1, 0))
    assert (deepest != first).any() and (f0 & f1).any()  # the two rules part on examples both points fool
    for early_exit, pick in ((True, first), (False, deepest)):
        out = APGD(eps=0.15, steps=1, early_exit=early_exit)(model, x, y)
        assert torch.allclose(out, torch.where(pick.view(-1, 1, 1, 1) == 1, x1, x), atol=1e-6), early_exit


def test_dlr_losses_against_hand_computed_values():
    z = torch.tensor([[3.0, 1.0, 0.5, -1.0], [0.0, 2.0, 1.0, 4.0]])
    y = torch.tensor([0, 1])
    # row 0: -(3 - 1) / (3 - 0.5); row 1: -(2 - 4) / (4 - 1)
    assert torch.allclose(dlr_loss(z, y), torch.tensor([-2 / 2.5, 2 / 3]))
    t = torch.tensor([2, 0])
    # row 0: -(3 - 0.5) / (3 - (0.5 - 1) / 2); row 1: -(2 - 0) / (4 - (1 + 0) / 2)
    assert torch.allclose(dlr_targeted_loss(z, y, t), torch.tensor([-2.5 / 3.25, -2 / 3.5]))
    assert torch.allclose(dlr_loss(10 * z + 3, y), dlr_loss(z, y), atol=1e-6)  # scale and shift invariant


@pytest.fixture(scope="module")
def trained_pair(one_thread):
    """Small digits CNNs: g fitted on clean images, h adversarially (PGD-2 at l_inf 0.15, 80 full-batch steps; at 0.2
    this small CNN does not learn); 120 test images. h: 80% clean, 19% under PGD-20 at 0.2."""
    from mixrobust.data import DigitsDataModule

    xt, yt = DigitsDataModule().eval_tensors("train")
    g = fit_cnns()[0]
    h = cnn(2, width=8).train()
    opt = torch.optim.Adam(h.parameters(), lr=1e-2)
    pgd = PGD(eps=0.15, step_size=0.075, steps=2)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(h(pgd(h, xt, yt)), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = digits(120)
    return g, h.eval(), x, y


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 1.5)])
def test_points_stay_in_the_ball_and_the_model_untouched(norm, eps):
    torch.manual_seed(0)
    model = mlp().train()
    x, y = torch.rand(32, 3, 4, 4), torch.randint(0, 5, (32,))
    x_adv = APGD(norm, eps=eps, steps=12)(model, x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="adaptive.losses"):
        APGD(eps=0.1, loss="cw")
    with pytest.raises(ConfigError, match="needs random_start=true"):
        APGD(eps=0.1, restarts=2)
    with pytest.raises(ConfigError, match="early_exit must be true or false"):
        APGD(eps=0.1, early_exit=2)
    with pytest.raises(ConfigError, match="at least one"):
        AdaptiveMixAttack(eps=0.1, losses=[])
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="targets=5, but the model has 5 classes: at most 4"):
        APGD(eps=0.1, loss="dlr_targeted", targets=5, steps=2)(mlp().eval(), torch.rand(4, 3, 4, 4), torch.zeros(4).long())


def robust(model, x, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


@pytest.mark.parametrize("loss", ["ce", "dlr_targeted"])
def test_early_exit_reports_exactly_the_full_search(trained_pair, loss):
    """Same seed, no random start: the same examples are robust with and without early exit, and the early-exit
    points fool the model wherever the full search's do."""
    g, h, x, y = trained_pair
    mix = MixedClassifier(g, h, 0.7)
    full = APGD(eps=0.2, steps=20, loss=loss, early_exit=False)(mix, x, y)
    fast = APGD(eps=0.2, steps=20, loss=loss)(mix, x, y)
    assert torch.equal(robust(mix, x, full, y), robust(mix, x, fast, y))
    assert 0 < robust(mix, x, fast, y).float().mean() < (mix(x).argmax(1) == y).float().mean()


def test_adaptive_attack_is_at_least_as_strong_as_pgd_on_the_mixture(trained_pair):
    """The log of averaged softmaxes flattens PGD's cross-entropy gradient; the surrogate-guided APGD finds at
    least every error PGD-20 finds here, and more."""
    g, h, x, y = trained_pair
    counts = []
    for alpha in (0.6, 0.8):
        mix = MixedClassifier(g, h, alpha)
        pgd = attack_in_batches(PGD(eps=0.2, step_size=0.025, steps=20), mix, x, y, 64)
        ours = attack_in_batches(AdaptiveMixAttack(eps=0.2, steps=30), mix, x, y, 64)
        counts.append((int(robust(mix, x, ours, y).sum()), int(robust(mix, x, pgd, y).sum())))
    assert all(a <= p for a, p in counts) and any(a < p for a, p in counts), counts


def test_surrogate_is_the_logit_mixture_and_success_is_judged_on_the_outputs(trained_pair):
    g, h, x, y = trained_pair
    mix = MixedClassifier(g, h, 0.7)
    with torch.no_grad():
        out, surrogate = mix.outputs_and_surrogate(x[:8])
        assert torch.equal(out, mix(x[:8]))
        assert torch.allclose(surrogate, 0.3 * g(x[:8]) + 0.7 * h(x[:8]), atol=1e-5)
        logit = MixedClassifier(g, h, 0.7, mix_space="logit")
        assert torch.equal(*logit.outputs_and_surrogate(x[:8]))


@pytest.mark.parametrize("norm, eps, step_size", [("linf", 0.2, 0.05), ("l2", 1.5, 0.4)])
def test_pgd_early_exit_reports_exactly_the_full_search(trained_pair, norm, eps, step_size):
    g, h, x, y = trained_pair
    mix = MixedClassifier(g, h, 0.7, norm=norm)
    full = PGD(norm, eps=eps, step_size=step_size, steps=10)(mix, x, y)
    fast = PGD(norm, eps=eps, step_size=step_size, steps=10, early_exit=True)(mix, x, y)
    assert torch.equal(robust(mix, x, full, y), robust(mix, x, fast, y))
    delta = (fast - x).flatten(1)
    assert ((delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)) <= eps + 1e-5).all()


def test_pgd_under_autocast_runs_the_full_search(trained_pair):
    """A first fooling point found in bf16 lies on the boundary and may not fool the float32 model that judges it:
    under autocast early exit is off, so the points are the full search's (the highest-loss fooling point)."""
    g, h, x, y = trained_pair
    mix = MixedClassifier(g, h, 0.7)
    kw = dict(eps=0.2, step_size=0.05, steps=10, autocast_dtype="bfloat16")
    full = PGD(**kw)(mix, x, y)
    assert torch.equal(PGD(**kw, early_exit=True)(mix, x, y), full)
    first = PGD(eps=0.2, step_size=0.05, steps=10, early_exit=True)(mix, x, y)  # float32: the first fooling point
    assert not torch.equal(first, PGD(eps=0.2, step_size=0.05, steps=10)(mix, x, y))


class BatchSizes(torch.nn.Module):
    """A model that records the batch size of every forward pass of the one it wraps."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("attack", [PGD(eps=0.2, step_size=0.05, steps=10, early_exit=True),
                                    APGD(eps=0.2, steps=20, loss="dlr_targeted", targets=3),
                                    AdaptiveMixAttack(eps=0.2, steps=10, targets=3)])
def test_early_exit_searches_batches_of_ladder_sizes_only(trained_pair, attack):
    """The batch shrinks to ladder sizes (the host allocator and the backend's kernel caches see a few sizes again and
    again), and it does shrink; a chain of APGD stages runs each on the whole batch, not on the examples left."""
    g, h, x, y = trained_pair
    spy = BatchSizes(MixedClassifier(g, h, 0.7))
    attack(spy, x, y)
    assert all(size == len(y) or ladder_size(size) == size for size in spy.sizes), sorted(set(spy.sizes))
    assert min(spy.sizes) < len(y) // 2


def test_pgd_early_exit_with_restarts_is_as_strong(trained_pair):
    """Random starts: later restarts draw for fewer examples, so the numbers may differ by a few examples only."""
    g, h, x, y = trained_pair
    mix = MixedClassifier(g, h, 0.7)
    kw = dict(eps=0.2, step_size=0.05, steps=5, random_start=True, restarts=3, seed=1)
    full = robust(mix, x, PGD(**kw)(mix, x, y), y).sum()
    fast = robust(mix, x, PGD(**kw, early_exit=True)(mix, x, y), y).sum()
    assert abs(int(full) - int(fast)) <= 3


def test_sweep_numbers_do_not_change_with_early_exit(trained_pair):
    """The sweep's MIX attack exits early, its STD / ROB images (judged by every mixture) never do: every row is
    the same as without early exit."""
    from mixrobust.evaluation import run_sweep

    g, h, x, y = trained_pair
    kw = dict(alphas=[0.0, 0.5, 0.7, 1.0], batch_size=64, preflight=False)
    rows = [run_sweep(g, h, x, y, attack=PGD(eps=0.2, step_size=0.05, steps=8, early_exit=flag), **kw).rows()
            for flag in (False, True)]
    strip = [[{k: v for k, v in r.items() if k != "implementation"} for r in rs] for rs in rows]
    assert strip[0] == strip[1]


def _sweep_rows(g, h, x, y, **kw):
    from mixrobust.evaluation import run_sweep

    attack = PGD(eps=0.2, step_size=0.05, steps=8, early_exit=True)
    adaptive = AdaptiveMixAttack("linf", eps=0.2, steps=10, targets=2)
    result = run_sweep(copy.deepcopy(g), copy.deepcopy(h), x, y, alphas=[0.0, 0.6, 1.0], attack=attack,
                       attacks=["std", "rob", "mix", "apgd"], adaptive=adaptive, batch_size=64, preflight=False, **kw)
    return [(r["model"], r["alpha"], r["attack"], r["accuracy"]) for r in result.rows()]


def test_sweep_apgd_column_counts_the_adaptive_attack_on_g_and_h_alone(trained_pair):
    """A linear mixture's apgd column: the adaptive attack on the mixture and its points on g and on h alone, each
    judged by the mixture (at alpha 0.9 the points on h break examples the attack on the mixture misses)."""
    from mixrobust.evaluation import run_sweep

    g, h, x, y = trained_pair
    adaptive = AdaptiveMixAttack("linf", eps=0.2, steps=10, targets=2)
    result = run_sweep(g, h, x, y, alphas=[0.0, 0.9, 1.0], attack=PGD(eps=0.2, step_size=0.05, steps=2),
                       attacks=["std", "rob", "apgd"], adaptive=adaptive, batch_size=64, preflight=False)
    own = [attack_in_batches(adaptive, model, x, y, 64) for model in (g, h)]
    for a, alpha in enumerate((0.0, 0.9, 1.0)):
        mix = MixedClassifier(g, h, alpha)
        with torch.no_grad():
            # at alpha 0 / 1 the mixture is g / h, whose own points are the attack on it (reused, not rerun)
            on_mix = robust(mix, x, own[0] if alpha == 0 else own[1] if alpha == 1 else
                            attack_in_batches(adaptive, mix, x, y, 64), y)
            want = on_mix.clone()
            for x_own in own:
                want &= mix(x_own).argmax(1) == y
        assert np.array_equal(result.outcomes.mix["apgd"][0, a], want.numpy()), alpha
        if alpha == 0.9:
            assert want.sum() < on_mix.sum()


class OnlyOnH:
    """An "adaptive attack" that attacks h whatever model it is given, except h itself, where it leaves x alone."""

    def __init__(self, h):
        self.h, self.pgd = h, PGD(eps=0.2, step_size=0.05, steps=10)

    def __call__(self, model, x, y):
        return x.clone() if model is self.h else self.pgd(self.h, x, y)


def test_reused_endpoints_of_the_apgd_column_count_both_models_points(trained_pair):
    """At alpha 1 the mixture is h and its apgd column reuses the attack on h (here: no perturbation), but the points
    found on g (here: PGD on h) count against it too, as at every other alpha."""
    from mixrobust.evaluation import run_sweep

    g, h, x, y = trained_pair
    adaptive = OnlyOnH(h)
    result = run_sweep(g, h, x, y, alphas=[0.5, 1.0], attack=PGD(eps=0.2, step_size=0.05, steps=2),
                       attacks=["std", "rob", "apgd"], adaptive=adaptive, batch_size=64, preflight=False)
    with torch.no_grad():
        want = robust(h, x, adaptive(g, x, y), y)
    assert want.sum() < (h(x).argmax(1) == y).sum()
    assert np.array_equal(result.outcomes.mix["apgd"][0, 1], want.numpy())


def test_the_apgd_column_counts_full_searches_on_g_and_h(trained_pair):
    """The adaptive attack's images on g and on h, judged by every mixture, come from full searches (each example's
    deepest fooling point, not its first, which lies on that model's boundary): the column is the mixture's own
    attack and those images, here stronger than with the first fooling points."""
    from mixrobust.evaluation import run_sweep

    g, h, x, y = trained_pair
    alphas = [0.6, 0.8, 0.9]
    adaptive = AdaptiveMixAttack("linf", eps=0.2, steps=4, targets=2)
    result = run_sweep(g, h, x, y, alphas=alphas, attack=PGD(eps=0.2, step_size=0.05, steps=2),
                       attacks=["apgd"], adaptive=adaptive, batch_size=64, preflight=False)
    full, first = adaptive.with_early_exit(False), adaptive
    assert all(not stage.early_exit for stage in full.stages) and all(stage.early_exit for stage in first.stages)
    points = {name: [attack(m, x, y) for m in (g, h)] for name, attack in (("full", full), ("first", first))}
    weaker = 0
    for a, alpha in enumerate(alphas):
        mix = MixedClassifier(g, h, alpha)
        with torch.no_grad():
            own = robust(mix, x, attack_in_batches(adaptive, mix, x, y, 64), y)
            want, old = (own & (mix(p[0]).argmax(1) == y) & (mix(p[1]).argmax(1) == y) for p in points.values())
        got = result.outcomes.mix["apgd"][0, a] & result.outcomes.mix["clean"][0, a]
        assert np.array_equal(got, want.numpy()), alpha
        weaker += int(old.sum() - want.sum())
    assert weaker > 0


def test_skipping_is_off_with_adaptive_random_starts(trained_pair, caplog):
    """Skipping changes which examples share a batch, hence the random starts drawn for each: off, with a warning."""
    from mixrobust.evaluation import run_sweep

    g, h, x, y = trained_pair
    adaptive = AdaptiveMixAttack("linf", eps=0.2, steps=2, targets=2, random_start=True, seed=3)
    with caplog.at_level(logging.WARNING):
        result = run_sweep(g, h, x[:32], y[:32], alphas=[0.5], attack=PGD(eps=0.2, step_size=0.05, steps=2),
                           attacks=["std", "rob", "apgd"], adaptive=adaptive, batch_size=32, preflight=False)
    assert result.outcomes.meta["skip_misclassified"] is False
    assert "skip_misclassified is ignored with random_start (attack or adaptive)" in caplog.text


def test_channels_last_sweep_reports_the_same_accuracies(trained_pair):
    g, h, x, y = trained_pair
    assert _sweep_rows(g, h, x, y, channels_last=True) == _sweep_rows(g, h, x, y)


@pytest.mark.slow
def test_compiled_sweep_reports_the_same_accuracies(trained_pair):
    """``compile=True`` (inductor, dynamic shapes as early exit shrinks the batch): the same rows as eager."""
    g, h, x, y = trained_pair
    assert _sweep_rows(g, h, x, y, compile=True) == _sweep_rows(g, h, x, y)
