"""mixrobust: train, mix, attack and certify classifiers for the accuracy-robustness trade-off.

Public API: `load_classifier` (rebuild a trained base model from its checkpoint),
`MixedClassifier` (eq. 3/4 of Bai, Anderson and Sojoudi, L4DC 2024), `create_model`.
"""

from mixrobust.runtime.cache import package_version
from mixrobust.runtime.resolvers import register_resolvers
from mixrobust.checkpoint import load_classifier
from mixrobust.mixing import MixedClassifier
from mixrobust.models import available_models, create_model

register_resolvers()
__version__ = package_version()

__all__ = ["MixedClassifier", "__version__", "available_models", "create_model", "load_classifier"]
