"""Training objectives: losses against direct computations, BatchNorm mode handling, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixrobust.errors import ConfigError
from mixrobust.threat import Norm, ascent_step, project
from mixrobust.training.objectives import PGDAT, TRADES, GaussianNoise, Standard


class ModeRecorder(nn.Module):
    """A BatchNorm model that records the train/eval mode of every forward pass."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.net(x)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(12, 1, 4, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


def test_standard_is_cross_entropy(batch):
    x, y = batch
    model = ModeRecorder().train()
    loss, logits, _ = Standard()(model, x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y))


@pytest.mark.parametrize("objective", [PGDAT(eps=0.1, step_size=0.03, steps=3), TRADES(eps=0.1, step_size=0.03, steps=3)])
def test_search_in_eval_mode_loss_in_train_mode(batch, objective):
    x, y = batch
    model = ModeRecorder().train()
    running = model.net[2].running_mean.clone()
    objective(model, x, y)
    assert model.training
    # the search passes ran in eval mode; the loss passes (last ones) in train mode
    assert False in model.modes and model.modes[-1] is True
    n_search = 3 + (1 if isinstance(objective, TRADES) else 0)  # TRADES: one clean eval pass for p(x)
    assert model.modes[:n_search] == [False] * n_search
    # BatchNorm statistics moved only through the train-mode loss passes
    assert not torch.equal(model.net[2].running_mean, running)


@pytest.mark.parametrize("objective", [PGDAT(eps=0.1, step_size=0.03, steps=3),
                                       TRADES(eps=0.1, step_size=0.03, steps=3)])
def test_a_layer_kept_in_eval_mode_stays_there(batch, objective):
    x, y = batch
    model = ModeRecorder().train()
    model.net[2].eval()  # a frozen BatchNorm, e.g. while fine-tuning
    running = model.net[2].running_mean.clone()
    objective(model, x, y)
    assert model.training and model.net[1].training and not model.net[2].training
    assert torch.equal(model.net[2].running_mean, running)


def test_pgd_at_loss_is_ce_on_adversarial_examples(batch):
    x, y = batch
    model = ModeRecorder().train()
    seen = []
    model.net.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    loss, logits, _ = PGDAT(norm="linf", eps=0.1, step_size=0.03, steps=5)(model, x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y))
    x_loss = seen[-1]  # the images the loss was computed on
    assert (x_loss - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_loss, x)
    model.eval()
    assert F.cross_entropy(model(x_loss), y) > F.cross_entropy(model(x), y)


def test_trades_reduces_to_ce_with_beta_zero(batch):
    x, y = batch
    torch.manual_seed(0)
    model = ModeRecorder().train()
    loss, logits, logs = TRADES(eps=0.1, step_size=0.03, steps=2, beta=0.0)(model, x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y))
    assert logs["robust_loss"] >= 0


def test_trades_kl_term_matches_direct_computation(batch):
    x, y = batch
    model = ModeRecorder().eval()  # eval: clean and adversarial passes see the same BatchNorm
    objective = TRADES(eps=0.1, step_size=0.03, steps=2, beta=6.0)
    torch.manual_seed(1)
    loss, logits, logs = objective(model, x, y)
    natural = F.cross_entropy(logits, y)
    assert torch.allclose(loss, natural + 6.0 * logs["robust_loss"])


def test_gaussian_noise_uses_sigma():
    x, y = torch.full((400, 1, 8, 8), 0.5), torch.zeros(400, dtype=torch.long)
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()))
    GaussianNoise(sigma=0.5)(model, x, y)
    noise = seen[0] - x
    assert noise.std().item() == pytest.approx(0.5, rel=0.02) and abs(noise.mean().item()) < 0.01


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_ascent_and_projection_stay_in_ball(norm):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 5, 5, generator=g)
    x_adv = x.clone()
    for _ in range(10):
        x_adv = project(ascent_step(x_adv, torch.randn(x.shape, generator=g), norm, 0.3), x, norm, 0.25)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= 0.25 + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1


def test_l2_ascent_step_has_step_size_length():
    grad = torch.tensor([[[[3.0, 4.0]]]])
    step = ascent_step(torch.zeros_like(grad), grad, Norm.L2, 0.5)
    assert torch.allclose(step, torch.tensor([[[[0.3, 0.4]]]]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GaussianNoise(sigma=0.0), "sigma must be > 0"),
        (lambda: GaussianNoise(sigma=-1.0), "sigma must be > 0"),
        (lambda: PGDAT(eps=-0.1), "eps must be a finite number >= 0"),
        (lambda: PGDAT(steps=0), "steps must be >= 1"),
        (lambda: TRADES(beta=-1.0), "beta must be >= 0"),
        (lambda: PGDAT(norm="l1"), "unknown objective.norm 'l1'"),
    ],
)
def test_bad_objective_settings(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
