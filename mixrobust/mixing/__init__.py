"""Mixing a standard classifier g and a robust classifier h (method.md eqs. (3) and (4))."""

from mixrobust.mixing.classifier import MixedClassifier, check_compatible
from mixrobust.mixing.formulas import mix_log_probs, mix_logits
from mixrobust.mixing.gradients import R_EPS, r_values
from mixrobust.mixing.maps import HMap, NonlinearMap, load_fit, nonlinear_map, parse_h_map
from mixrobust.mixing.options import (
    MixSpace,
    ROption,
    alpha_from_gamma,
    alphas_from_gammas,
    gamma_from_alpha,
)

__all__ = [
    "HMap",
    "NonlinearMap",
    "R_EPS",
    "MixSpace",
    "MixedClassifier",
    "ROption",
    "alpha_from_gamma",
    "alphas_from_gammas",
    "check_compatible",
    "gamma_from_alpha",
    "load_fit",
    "mix_log_probs",
    "mix_logits",
    "nonlinear_map",
    "parse_h_map",
    "r_values",
]
