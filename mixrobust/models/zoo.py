"""Architectures of other libraries' model zoos: RobustBench, timm and torchvision, as registered model ``zoo``.

``create_model("zoo", num_classes, input_shape, mean, std, source=..., native_size=..., interpolation=...)``
builds, without weights and without any file or network access, the network that a model source names
(`mixrobust.zoo` reads the weights): ``source`` is ``"<kind>:<name>"`` with kind

- ``robustbench``: ``<dataset>/<threat model>/<entry>`` of RobustBench's model zoo, built by the entry's own
  constructor. These networks take images in [0,1] and normalize inside where their authors did, so
  their mean is 0 and std 1 here;
- ``timm``: a timm model name (``resnet18``, ``resnet18.a1_in1k``), ``timm.create_model(pretrained=False)``;
- ``torchvision``: a torchvision classification builder (``resnet50``), ``get_model(weights=None)``.

The network behind the normalization layer is a `ZooNet`: a resize to ``native_size`` x ``native_size``
pixels (only when the images have another size; `mixrobust.zoo` allows it with ``zoo.resize=true``) and the
zoo's network as ``backbone``. A checkpoint fine-tuned from a zoo model records these arguments and is
rebuilt from them, like any registered architecture.

Importing RobustBench: its package ``__init__`` imports its data loaders (``pkg_resources``, which
setuptools >= 81 no longer ships) and AutoAttack under the module name ``autoattack`` (PyPI's package is
``pyautoattack``), neither of which the model zoo needs. `robustbench_zoo` therefore imports
``robustbench.model_zoo`` under an unexecuted parent package when the normal import fails. torchattacks
ships an old copy of ``robustbench`` of its own; installing it after ``robustbench`` overwrites that
package's files, which `robustbench_zoo` reports.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from mixrobust.errors import ConfigError
from mixrobust.models.registry import register_model

KINDS = ("robustbench", "timm", "torchvision")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_INSTALL = "pip install -e '.[zoo]' (robustbench and timm)"


class ZooNet(nn.Module):
    """x (N, C, H, W), normalized -> resized to ``size`` x ``size`` if it is not -> ``backbone`` -> (N, K) logits.

    The resize has no antialiasing, so it is a fixed linear map (cheap to differentiate, no randomness).
    """

    def __init__(self, backbone: nn.Module, size: int | None = None, interpolation: str = "bilinear"):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.backbone = backbone
        self.size = None if size is None else int(size)
        self.interpolation = interpolation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode=self.interpolation,
                              **({} if self.interpolation == "nearest" else {"align_corners": False}))
        return self.backbone(x)


def split_source(source: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; an unknown kind raises ConfigError."""
    kind, sep, name = str(source).partition(":")
    if not sep or kind not in KINDS or not name:
        raise ConfigError(f"zoo source {source!r} must be <kind>:<name> with kind one of {', '.join(KINDS)}")
    return kind, name


def robustbench_zoo() -> tuple[dict, type, type]:
    """RobustBench's model zoo: ``(model_dicts, BenchmarkDataset, ThreatModel)`` (see the module doc)."""
    try:
        spec = importlib.util.find_spec("robustbench")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(f"robustbench: sources need the robustbench package: {_INSTALL}")
    try:
        dist = importlib.metadata.distribution("robustbench")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("the importable robustbench package is the old copy that torchattacks bundles, not "
                          f"RobustBench itself: {_INSTALL} (after torchattacks, whose copy it replaces)") from None
    if not _intact(dist, "robustbench/model_zoo/cifar10.py"):
        raise ConfigError("robustbench's model zoo files are not the ones it installed (torchattacks, installed after "
                          "it, overwrites them with its old bundled copy): pip install --force-reinstall --no-deps "
                          "'robustbench>=1.1'")
    if "robustbench" not in sys.modules:
        try:
            with _quiet():
                importlib.import_module("robustbench")
        except Exception:  # its data/eval imports (see the module doc): load only the zoo, below
            sys.modules.pop("robustbench", None)
            parent = importlib.util.module_from_spec(spec)  # not executed: a plain package with __path__
            sys.modules["robustbench"] = parent
    try:
        with _quiet():
            models = importlib.import_module("robustbench.model_zoo.models")
            enums = importlib.import_module("robustbench.model_zoo.enums")
    except Exception as exc:
        raise ConfigError(f"robustbench's model zoo cannot be imported ({type(exc).__name__}: {exc}); "
                          f"reinstall it: {_INSTALL}") from None
    return models.model_dicts, enums.BenchmarkDataset, enums.ThreatModel


def _intact(dist: importlib.metadata.Distribution, name: str) -> bool:
    """Whether installed file `name` of `dist` still has the sha256 its RECORD lists (True when it lists none)."""
    import base64
    import hashlib

    entry = next((f for f in dist.files or () if str(f) == name), None)
    if entry is None or entry.hash is None or entry.hash.mode != "sha256":
        return True
    try:
        digest = hashlib.sha256(entry.locate().read_bytes()).digest()
    except OSError:
        return False
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == entry.hash.value


def robustbench_entry(name: str) -> tuple[dict, str, str, str]:
    """The zoo entry of ``<dataset>/<threat model>/<entry>``: ``(entry dict, dataset, threat model, entry)``,
    spelled as RobustBench spells them (``cifar10``, ``Linf``); an unknown part names the ones that exist."""
    import difflib

    parts = name.split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"robustbench:{name}: write robustbench:<dataset>/<threat model>/<entry>, e.g. "
                          "robustbench:cifar10/Linf/Standard")
    dataset, threat_model, entry = parts
    zoo, datasets, threats = robustbench_zoo()
    by_dataset = {d.value: d for d in zoo}
    if dataset not in by_dataset:
        raise ConfigError(f"robustbench:{name}: RobustBench has no data set {dataset!r}; it has "
                          f"{', '.join(sorted(by_dataset))}")
    entries_of = {t.value: zoo[by_dataset[dataset]][t] for t in zoo[by_dataset[dataset]]}
    if threat_model not in entries_of:
        raise ConfigError(f"robustbench:{name}: RobustBench has no {dataset} threat model {threat_model!r}; it has "
                          f"{', '.join(sorted(entries_of))}")
    entries = entries_of[threat_model]
    if entry not in entries:
        close = difflib.get_close_matches(entry, list(entries), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"it has {len(entries)} entries, e.g. {', '.join(list(entries)[:3])}"
        raise ConfigError(f"robustbench:{name}: RobustBench has no {dataset}/{threat_model} entry {entry!r} ({hint}); "
                          "its leaderboard at robustbench.github.io lists the names")
    return entries[entry], dataset, threat_model, entry


def robustbench_timm_name(dataset: str, threat_model: str, entry: str) -> str | None:
    """The timm model name RobustBench loads an entry as (newer entries live on the Hugging Face hub), if any."""
    timm = import_timm(required=False)
    if timm is None:
        return None
    name = f"{entry.lower().replace('-', '_')}_{dataset.lower()}_{threat_model.lower()}"
    return name if timm.is_model(name) else None


def import_timm(required: bool = True) -> ModuleType | None:
    """timm (imported quietly: it warns about torch.jit.interface on import); None or a ConfigError if absent."""
    try:
        with _quiet():
            import timm
    except ImportError:
        if required:
            raise ConfigError(f"timm: sources need the timm package: {_INSTALL}") from None
        return None
    return timm


def _robustbench_backbone(name: str, num_classes: int) -> nn.Module:
    entry, dataset, threat_model, key = robustbench_entry(name)
    timm_name = robustbench_timm_name(dataset, threat_model, key)
    if timm_name is not None:
        return import_timm().create_model(timm_name, pretrained=False, num_classes=num_classes)
    if isinstance(entry.get("gdrive_id"), list):
        raise ConfigError(f"robustbench:{name} is an ensemble of {len(entry['gdrive_id'])} networks with one weights "
                          "file each; mixrobust loads entries of one network (mix the networks themselves, or choose "
                          "another entry)")
    with _quiet():
        net = entry["model"]()
    return net


def _timm_backbone(name: str, num_classes: int) -> nn.Module:
    timm = import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise ConfigError(f"timm:{name}: timm has no model {name!r}" + (f" (e.g. {', '.join(close)})" if close else "")
                          + "; timm.list_models() lists them")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _torchvision_backbone(name: str, num_classes: int) -> nn.Module:
    import torchvision.models

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"torchvision:{name}: torchvision has no classification model {name!r}; "
                          "torchvision.models.list_models() lists them (e.g. resnet50, convnext_tiny)")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


BACKBONES: dict[str, Callable[[str, int], nn.Module]] = {
    "robustbench": _robustbench_backbone,
    "timm": _timm_backbone,
    "torchvision": _torchvision_backbone,
}


@register_model("zoo")
def zoo_network(num_classes: int, input_shape: tuple[int, int, int], source: str, native_size: int | None = None,
                interpolation: str = "bilinear") -> ZooNet:
    """The network of zoo `source` (random weights) with a `num_classes` head, behind a resize from the
    images' ``input_shape`` to ``native_size`` (when it differs); see the module doc."""
    kind, name = split_source(source)
    size = None if native_size is None or int(native_size) == int(input_shape[-1]) == int(input_shape[-2]) \
        else int(native_size)
    return ZooNet(BACKBONES[kind](name, int(num_classes)), size, interpolation)


class _quiet(warnings.catch_warnings):
    """Library import-time deprecation chatter (timm: torch.jit.interface) hidden; errors are not."""

    def __enter__(self):
        super().__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return self
