"""mixrobust: train, mix, attack and certify classifiers for the accuracy-robustness trade-off.

Public API: `load_classifier` (rebuild a trained base model from its checkpoint), `load_model` (a
checkpoint or a zoo source: ``robustbench:...``, ``timm:...``, ``torchvision:...``, ``arch:...``),
`MixedClassifier` (eq. 3/4 of Bai, Anderson and Sojoudi, L4DC 2024), `create_model`.

Importing the package is cheap: it registers the ``${mr.*}`` OmegaConf resolvers of the configs
(which need only omegaconf) and nothing else; torch and the modules behind the public names are
imported on first access of a name (PEP 562), so an entry point or the Hydra sweeper plugin that
only needs the configuration does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mixrobust.runtime.resolvers import register_resolvers

if TYPE_CHECKING:  # what static tools see; at run time `__getattr__` imports these on first use
    from mixrobust.checkpoint import load_classifier
    from mixrobust.mixing import MixedClassifier
    from mixrobust.models import available_models, create_model
    from mixrobust.zoo import load_model

    __version__: str

register_resolvers()

#: Public name -> the module that defines it (imported on first access).
_LAZY = {
    "MixedClassifier": "mixrobust.mixing",
    "available_models": "mixrobust.models",
    "create_model": "mixrobust.models",
    "load_classifier": "mixrobust.checkpoint",
    "load_model": "mixrobust.zoo",
}

__all__ = ["MixedClassifier", "__version__", "available_models", "create_model", "load_classifier", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from mixrobust.runtime.files import package_version

        value: Any = package_version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
