"""Randomized smoothing and certified radii of the mixture (method.md, "Certified robustness")."""

from mixrobust.certify.bounds import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    empirical_bernstein_lower,
    empirical_bernstein_upper,
    hoeffding_lower,
    hoeffding_upper,
)
from mixrobust.certify.lipschitz import local_lipschitz
from mixrobust.certify.mixture import (
    BaselineCertificate,
    MixtureCertificate,
    Votes,
    certify_baseline,
    certify_mixture,
    sample_votes,
)
from mixrobust.certify.radii import (
    alpha_for_clean_accuracy,
    certified_accuracy,
    lipschitz_radius,
    rs_lipschitz_constant,
    rs_radius,
)
from mixrobust.certify.smoothing import SmoothedClassifier
from mixrobust.certify.sound import MixtureRadii, plugin_radii, sound_radii

__all__ = [
    "BaselineCertificate",
    "MixtureCertificate",
    "MixtureRadii",
    "SmoothedClassifier",
    "Votes",
    "alpha_for_clean_accuracy",
    "certified_accuracy",
    "certify_baseline",
    "certify_mixture",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "empirical_bernstein_lower",
    "empirical_bernstein_upper",
    "hoeffding_lower",
    "hoeffding_upper",
    "lipschitz_radius",
    "local_lipschitz",
    "plugin_radii",
    "rs_lipschitz_constant",
    "rs_radius",
    "sample_votes",
    "sound_radii",
]
