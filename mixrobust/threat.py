"""The threat model shared by training, attacks and evaluation: a norm and a budget in pixel space."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum

import torch

from mixrobust.errors import ConfigError


class Norm(str, Enum):
    """Threat norm. `LINF` is l_inf, `L2` is l_2; values are the config spellings."""

    LINF = "linf"
    L2 = "l2"

    @classmethod
    def parse(cls, value: "Norm | str") -> "Norm":
        if isinstance(value, Norm):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ConfigError(
                f"unknown norm {value!r}; valid values: {', '.join(n.value for n in cls)}"
            ) from None

    @property
    def dual(self) -> float:
        """The exponent p* of the dual norm: 1 for l_inf, 2 for l_2."""
        return 1.0 if self is Norm.LINF else 2.0


def batch_norm(v: torch.Tensor, p: float) -> torch.Tensor:
    """Per-example l_p norm of a batch (N, ...) -> (N,)."""
    return torch.linalg.vector_norm(v.flatten(1), ord=p, dim=1)


@dataclass(frozen=True)
class Threat:
    """An l_p ball of radius `eps` around an image in [0,1]; `step_size` is PGD's step."""

    norm: Norm = Norm.LINF
    eps: float = 8 / 255
    step_size: float = 2 / 255

    def __post_init__(self):
        norm, eps, step_size = checked_values(self.norm, self.eps, self.step_size)
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "step_size", step_size)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["norm"] = self.norm.value
        return d


def checked_values(norm, eps, step_size, key: str = "threat") -> tuple[Norm, float, float]:
    """A threat's norm, eps and step size, checked; errors name the config node `key` (e.g. ``objective``)."""
    values = []
    for name, value in (("eps", eps), ("step_size", step_size)):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.{name} must be a finite number >= 0, got {value!r}") from None
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{key}.{name} must be a finite number >= 0, got {value!r}")
        values.append(v)
    try:
        return Norm.parse(norm), values[0], values[1]
    except ConfigError:
        raise ConfigError(f"unknown {key}.norm {norm!r}; valid values: {', '.join(n.value for n in Norm)}") from None


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, norm: Norm, step_size: float) -> torch.Tensor:
    """One steepest-ascent step of length `step_size` in `norm`: sign for l_inf, normalized gradient for l_2."""
    if norm is Norm.LINF:
        return x_adv + step_size * grad.sign()
    g_norm = batch_norm(grad, 2.0).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))  # (N, 1, 1, 1)
    return x_adv + step_size * grad / g_norm


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    """Project `x_adv` onto the `norm` ball of radius `eps` around `x`, then onto [0,1].

    Clamping to [0,1] after the ball projection never leaves the ball: each coordinate of the
    perturbation moves towards 0 when x is in [0,1].
    """
    delta = x_adv - x
    if norm is Norm.LINF:
        delta = delta.clamp(-eps, eps)
    else:
        d_norm = batch_norm(delta, 2.0).view(-1, *([1] * (delta.dim() - 1)))  # (N, 1, 1, 1)
        delta = delta * torch.clamp(eps / d_norm.clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(0.0, 1.0)
