"""Mixing a standard classifier g and a robust classifier h (method.md eqs. (3) and (4))."""

from mixrobust.mixing.classifier import MixedClassifier, check_compatible
from mixrobust.mixing.formulas import mix_log_probs, mix_logits
from mixrobust.mixing.gradients import R_EPS, r_values
from mixrobust.mixing.options import (
    MixSpace,
    ROption,
    alpha_from_gamma,
    alphas_from_gammas,
    gamma_from_alpha,
)

__all__ = [
    "R_EPS",
    "MixSpace",
    "MixedClassifier",
    "ROption",
    "alpha_from_gamma",
    "alphas_from_gammas",
    "check_compatible",
    "gamma_from_alpha",
    "mix_log_probs",
    "mix_logits",
    "r_values",
]
