"""Architectures. Importing this package registers every built-in model.

Registering is cheap: torchvision's model zoo (which also loads torchvision.ops and torch._dynamo)
is imported only when an ImageNet-scale architecture (`mixrobust.models.imagenet`) is built or its
pretrained weights are read.
"""

from mixrobust.models import imagenet  # noqa: F401  (registers convnext_tiny, resnet50, resnet18_imagenet)
from mixrobust.models import resnet  # noqa: F401  (registers resnet18, preact_resnet18, resnet20, resnet110)
from mixrobust.models import small  # noqa: F401  (registers small_cnn)
from mixrobust.models import wrn  # noqa: F401  (registers wrn_28_10, wrn_34_10)
from mixrobust.models import zoo  # noqa: F401  (registers zoo: RobustBench, timm and torchvision networks)
from mixrobust.models.registry import (
    ImageClassifier,
    Normalize,
    available_models,
    create_model,
    register_model,
)

__all__ = ["ImageClassifier", "Normalize", "available_models", "create_model", "register_model"]
