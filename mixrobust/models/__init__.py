"""Architectures. Importing this package registers every built-in model."""

from mixrobust.models import imagenet  # noqa: F401  (registers convnext_tiny, resnet50, resnet18_imagenet)
from mixrobust.models import resnet  # noqa: F401  (registers resnet18, preact_resnet18, resnet20, resnet110)
from mixrobust.models import small  # noqa: F401  (registers small_cnn)
from mixrobust.models import wrn  # noqa: F401  (registers wrn_28_10, wrn_34_10)
from mixrobust.models.registry import (
    ImageClassifier,
    Normalize,
    available_models,
    create_model,
    register_model,
)

__all__ = ["ImageClassifier", "Normalize", "available_models", "create_model", "register_model"]
