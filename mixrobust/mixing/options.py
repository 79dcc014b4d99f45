"""The closed vocabularies of the mixture (R_i option, mixing space) and the alpha <-> gamma maps.

`alpha` in [0, 1] is the mixing weight of eq. (4); `gamma` >= 0 is the smoothing strength of
eq. (3). They are related by ``alpha = gamma / (1 + gamma)`` (gamma = inf <-> alpha = 1).
(The authors' later code uses ``alpha = sigmoid(gamma)``; that map is *not* offered here.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch

from mixrobust.errors import ConfigError


class _Parse(str, Enum):
    """A str Enum whose `parse` raises a ConfigError listing the valid values."""

    @classmethod
    def parse(cls, value):
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            valid = ", ".join(v.value for v in cls)
            raise ConfigError(f"unknown {cls._label()} {value!r}; valid values: {valid}") from None

    @classmethod
    def _label(cls) -> str:
        return cls.__name__


class ROption(_Parse):
    """R_i(x) of eq. (3) (Figure 1 of the paper); gradients are of what is mixed, in the dual norm.

    - ``one``: R_i = 1 (with prob mixing this is eq. (4), the default).
    - ``grad_g_i``: ||grad_x g_i(x)||_{p*}, one value per class.
    - ``grad_max_g``: ||grad_x max_j g_j(x)||_{p*}, shared by all classes.
    - ``grad_ratio``: ||grad_x g_i(x)||_{p*} / ||grad_x h_i(x)||_{p*}, one value per class.
    - ``grad_ratio_max``: the appendix variant, ||grad_x max_j g_j(x)||_{p*} /
      ||grad_x max_j h_j(x)||_{p*} (each model's own top class), shared by all classes.
    """

    ONE = "one"
    GRAD_G_I = "grad_g_i"
    GRAD_MAX_G = "grad_max_g"
    GRAD_RATIO = "grad_ratio"
    GRAD_RATIO_MAX = "grad_ratio_max"

    @classmethod
    def _label(cls) -> str:
        return "r_option"


class MixSpace(_Parse):
    """What eq. (3) mixes: softmax probabilities (``prob``, then log) or raw logits (``logit``)."""

    PROB = "prob"
    LOGIT = "logit"

    @classmethod
    def _label(cls) -> str:
        return "mix_space"


def _as_floats(value, name: str) -> tuple[list[float], bool]:
    """Scalar / 0-d tensor -> ([v], False); sequence / 1-d tensor -> (list, True)."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 1:
            raise ConfigError(
                f"{name} must be a number or a 1-d sequence, got a tensor of shape {tuple(value.shape)}"
            )
        is_vector = value.ndim == 1
        values = value.detach().double().cpu().reshape(-1).tolist()
    elif isinstance(value, Sequence) and not isinstance(value, str):
        is_vector, values = True, list(value)
    else:
        is_vector, values = False, [value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number or a sequence of numbers, got {value!r}") from None
    if not values:
        raise ConfigError(f"{name} must not be empty")
    return values, is_vector


def check_alphas(alpha) -> tuple[tuple[float, ...], bool]:
    """Validate mixing weight(s): returns (alphas, is_vector); each alpha must lie in [0, 1]."""
    values, is_vector = _as_floats(alpha, "alpha")
    for a in values:
        if not 0.0 <= a <= 1.0:  # also rejects NaN
            raise ConfigError(
                f"alpha must be in [0, 1] (the mixing weight of eq. (4)), got {a}; to give the "
                "smoothing strength gamma >= 0 of eq. (3) instead, use "
                "MixedClassifier.from_gamma(g, h, gamma) (alpha = gamma / (1 + gamma))"
            )
    return tuple(values), is_vector


def alpha_from_gamma(gamma: float) -> float:
    """alpha = gamma / (1 + gamma) for gamma in [0, inf]; gamma = inf gives alpha = 1."""
    gamma = float(gamma)
    if not gamma >= 0.0:  # also rejects NaN
        raise ConfigError(
            f"gamma (the smoothing strength of eq. (3)) must be >= 0 (inf allowed), got {gamma}"
        )
    if math.isinf(gamma):
        return 1.0
    return gamma / (1.0 + gamma)


def gamma_from_alpha(alpha: float) -> float:
    """gamma = alpha / (1 - alpha) for alpha in [0, 1]; alpha = 1 gives gamma = inf."""
    (a,), _ = check_alphas(float(alpha))
    return math.inf if a == 1.0 else a / (1.0 - a)


def alphas_from_gammas(gamma) -> float | list[float]:
    """`alpha_from_gamma` over a scalar, a sequence or a (0-d / 1-d) tensor; keeps scalar vs vector."""
    values, is_vector = _as_floats(gamma, "gamma")
    alphas = [alpha_from_gamma(v) for v in values]
    return alphas if is_vector else alphas[0]
