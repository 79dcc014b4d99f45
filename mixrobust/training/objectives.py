"""Training objectives: ``objective(model, x, y) -> (loss, logits, logs)``.

Objectives are pure (no optimizer calls) and handle BatchNorm explicitly: any adversarial search
runs with the model in eval mode (BatchNorm statistics are not updated by the search) and the
training loss is computed in the mode the caller left the model in (train mode during fitting).
`logits` are the outputs the loss was computed on, for the training accuracy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mixrobust.attacks import PGD
from mixrobust.attacks.pgd import eval_mode
from mixrobust.errors import ConfigError
from mixrobust.threat import Norm, Threat, ascent_step, checked_values, project

Output = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class Objective(ABC):
    """Base class. `name` is the config name; `monitor` the validation metric that picks the best checkpoint."""

    name: ClassVar[str]
    monitor: ClassVar[str] = "val/acc"
    robust: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Output:
        """The training loss on (x, y), the logits it was computed on, and extra values to log."""

    def spec(self) -> dict:
        """Plain-dict description stored in checkpoints."""
        return {"name": self.name}


class Standard(Objective):
    """Cross-entropy on clean images."""

    name = "standard"

    def __call__(self, model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits, {}


class _ThreatObjective(Objective):
    robust = True
    monitor = "val/robust_acc"

    def __init__(self, norm: Norm | str, eps: float, step_size: float, steps: int = 10, random_start: bool = True):
        self.threat = Threat(*checked_values(norm, eps, step_size, key="objective"))
        if int(steps) < 1:
            raise ConfigError(f"objective.steps must be >= 1 for adversarial training, got {steps}")
        self.steps = int(steps)
        self.random_start = bool(random_start)

    def spec(self) -> dict:
        return {"name": self.name, "threat": self.threat.as_dict(), "steps": self.steps, "random_start": self.random_start}


class PGDAT(_ThreatObjective):
    """Madry et al.: cross-entropy on PGD examples (l_inf or l_2), found in eval mode from a random start.

    Each example trains on the point `PGD` returns: of the points its search visited (the final iterate
    included), a misclassified one of highest loss if any, else the highest-loss one. That is never weaker
    than Madry et al.'s final iterate (it fools the model whenever the final iterate does, with at least its
    loss), and equal to it wherever the loss rises along the search."""

    name = "pgd_at"

    def __init__(self, norm="linf", eps=8 / 255, step_size=2 / 255, steps=10, random_start=True):
        super().__init__(norm, eps, step_size, steps, random_start)
        # seed=None: a fresh random start every batch (a fixed seed would reuse one start pattern)
        self.attack = PGD.from_threat(self.threat, steps=self.steps, random_start=self.random_start, seed=None)

    def __call__(self, model, x, y):
        x_adv = self.attack(model, x, y)
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits, {}


class TRADES(_ThreatObjective):
    """Zhang et al.: CE(f(x), y) + beta * KL(p(x) || p(x')), x' maximising the KL in the threat ball.

    The inner maximisation starts at x + 0.001 * N(0, I), as in the reference recipe, and runs in eval mode.
    """

    name = "trades"

    def __init__(self, norm="linf", eps=8 / 255, step_size=2 / 255, steps=10, beta: float = 6.0):
        super().__init__(norm, eps, step_size, steps, random_start=True)
        if not math.isfinite(beta) or beta < 0:
            raise ConfigError(f"objective.beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def spec(self) -> dict:
        return {**super().spec(), "beta": self.beta}

    def _kl_ball_search(self, model: nn.Module, x: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
        t = self.threat
        with eval_mode(model):  # each layer's own mode comes back (a frozen BatchNorm stays frozen)
            x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    log_q = F.log_softmax(model(x_adv).float(), dim=1)
                    kl = F.kl_div(log_q, p_clean, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
                x_adv = project(ascent_step(x_adv.detach(), grad, t.norm, t.step_size), x, t.norm, t.eps)
        return x_adv.detach()

    def __call__(self, model, x, y):
        with torch.no_grad(), eval_mode(model):
            p_clean = F.softmax(model(x).float(), dim=1)
        x_adv = self._kl_ball_search(model, x, p_clean)
        logits = model(x)
        logits_adv = model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits.float(), 1), reduction="batchmean")
        return natural + self.beta * robust, logits, {"natural_loss": natural.detach(), "robust_loss": robust.detach()}


class GaussianNoise(Objective):
    """Cohen et al.: cross-entropy on x + N(0, sigma^2 I) (noise in pixel space, not clipped)."""

    name = "gaussian_noise"
    monitor = "val/noise_acc"

    def __init__(self, sigma: float = 0.25):
        if not math.isfinite(sigma) or sigma <= 0:
            raise ConfigError(f"objective.sigma must be > 0 for gaussian_noise training, got {sigma}")
        self.sigma = float(sigma)

    def spec(self) -> dict:
        return {"name": self.name, "sigma": self.sigma}

    def __call__(self, model, x, y):
        logits = model(x + self.sigma * torch.randn_like(x))
        return F.cross_entropy(logits, y), logits, {}


OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (Standard, PGDAT, TRADES, GaussianNoise)}
