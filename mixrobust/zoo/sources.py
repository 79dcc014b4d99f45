"""Model sources: other libraries' models, from local weight files, as frozen mixrobust classifiers.

A source is written ``<kind>:<name>[@<file>]``:

============  ==========================================  ===========================================
kind          name                                        weights file in the zoo folder (``zoo.dir``)
============  ==========================================  ===========================================
robustbench   ``<dataset>/<threat model>/<entry>``,        ``<dataset>/<threat model>/<entry>.pt``
              e.g. ``cifar10/Linf/Wong2020Fast``           (RobustBench's own layout)
timm          a timm model name, e.g. ``resnet18.a1_in1k`` ``timm/<name>.safetensors`` (or .pth/.pt/.bin)
torchvision   a torchvision builder, e.g. ``resnet50``     ``torchvision/<name>.pth`` (or .pt/.safetensors)
arch          a registered mixrobust architecture          ``arch/<name>.safetensors`` (or .pt/.pth)
============  ==========================================  ===========================================

``@<file>`` names the weights file instead. Anything without one of these prefixes is a mixrobust
checkpoint path. Weights come from local files only; with ``zoo.download=true`` a missing file is
fetched once by the library's own download function (RobustBench's Google Drive ids, the Hugging
Face hub for timm, torchvision's URLs) into the zoo folder's layout.

`describe` turns a source into a record like a checkpoint's (`mixrobust.checkpoint`): the network
(``arch: zoo`` with the source's architecture, or the registered ``arch``), its class count, input
shape and normalization, and a ``source`` entry: kind, name, weights file, its sha256, the library
version, the data set and the threat model the zoo states. It reads the file (never its pickled
code) to learn the class count and to check, on the meta device where the library allows, that the
weights fit the network, all before any image is attacked. `fit` checks the record against the
evaluated data (image shape, resize, data set, ImageNet class order) and `load` builds the frozen
classifier: images in [0,1] in, logits out, normalization and any resize inside.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mixrobust.checkpoint import freeze
from mixrobust.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from mixrobust.errors import CheckpointError, ConfigError
from mixrobust.models import ImageClassifier, available_models, create_model
from mixrobust.models.zoo import (
    INTERPOLATIONS,
    import_timm,
    robustbench_entry,
    robustbench_timm_name,
    zoo_network,
)
from mixrobust.runtime.cache import file_digest
from mixrobust.zoo.weights import fit_names, load_into, mismatch, read_weights

log = logging.getLogger(__name__)

KINDS = ("robustbench", "timm", "torchvision", "arch")
#: Weights file names tried in the zoo folder, in order.
SUFFIXES = {"robustbench": (".pt", ".safetensors"), "timm": (".safetensors", ".pth", ".pt", ".bin"),
            "torchvision": (".pth", ".pt", ".safetensors"), "arch": (".safetensors", ".pt", ".pth")}
#: RobustBench's data sets: classes, image shape, and the budget of each threat model.
ROBUSTBENCH_DATA = {
    "cifar10": (10, (3, 32, 32), {"Linf": 8 / 255, "L2": 0.5}),
    "cifar100": (100, (3, 32, 32), {"Linf": 8 / 255, "L2": 0.5}),
    "imagenet": (1000, (3, 224, 224), {"Linf": 4 / 255}),
}
ZOO_ENV = "MIXROBUST_ZOO_DIR"


def default_dir() -> Path:
    """``$MIXROBUST_ZOO_DIR``, else ``~/.cache/mixrobust/zoo``."""
    return Path(os.environ.get(ZOO_ENV) or Path.home() / ".cache" / "mixrobust" / "zoo").expanduser()


@dataclass(frozen=True)
class ZooSettings:
    """``zoo.*``: the zoo folder, whether a missing file may be downloaded, whether images may be resized."""

    dir: Path | None = None  # None: `default_dir`
    download: bool = False
    resize: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dir", default_dir() if self.dir is None else Path(self.dir).expanduser())


@dataclass(frozen=True)
class Source:
    """A parsed ``<kind>:<name>[@<file>]``."""

    kind: str
    name: str
    file: Path | None = None

    @property
    def architecture(self) -> str:
        return f"{self.kind}:{self.name}"

    def __str__(self) -> str:
        return self.architecture + (f"@{self.file}" if self.file else "")


def parse(value: object) -> Source | None:
    """The `Source` that `value` names, or None for a mixrobust checkpoint path (no known ``<kind>:`` prefix)."""
    text = str(value)
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        if sep and re.fullmatch(r"[a-z_]{2,}", kind) and not Path(text).exists():
            raise ConfigError(f"unknown model source kind {kind!r} in {text!r}: write <kind>:<name>[@<file>] with kind "
                              f"one of {', '.join(KINDS)}, or give the path of a mixrobust checkpoint")
        return None
    name, at, file = rest.partition("@")
    if not name or (at and not file):
        raise ConfigError(f"model source {text!r}: write {kind}:<name> or {kind}:<name>@<weights file>")
    return Source(kind, name, Path(file).expanduser() if at else None)


def candidates(source: Source, zoo: ZooSettings) -> list[Path]:
    """Where the weights of `source` may be: its explicit file, else the zoo folder's names for it."""
    if source.file is not None:
        return [source.file]
    if source.kind == "robustbench":
        dataset, threat_model, entry = source.name.split("/")
        stem = zoo.dir / dataset / threat_model / entry
    else:
        stem = zoo.dir / source.kind / source.name
    return [stem.with_name(stem.name + suffix) for suffix in SUFFIXES[source.kind]]


def locate(source: Source, zoo: ZooSettings) -> Path:
    """The weights file of `source`: the first candidate that exists, else (``zoo.download``) a downloaded one,
    else one ConfigError naming the exact path to put the file at."""
    paths = candidates(source, zoo)
    found = next((p for p in paths if p.exists()), None)
    if found is not None:
        return found
    if source.file is not None:
        raise ConfigError(f"{source}: the weights file {source.file} does not exist; check the path after @")
    if zoo.download:
        return download(source, paths[0])
    others = f" (or {', '.join(p.suffix for p in paths[1:])})" if len(paths) > 1 else ""
    raise ConfigError(
        f"{source}: no weights file at {paths[0]}{others}. Put the file there, point zoo.dir (or ${ZOO_ENV}) at the "
        f"folder that holds it, give it as {source.architecture}@<file>, or set zoo.download=true to fetch it once")


# ------------------------------------------------------------------------------------------------ describe


@dataclass(frozen=True)
class _Native:
    """What a source's network expects and what its zoo says about it."""

    num_classes: int
    shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"
    data: str | None = None
    threat: dict | None = None
    objective: str | None = None
    library: str | None = None
    extra: dict = field(default_factory=dict)


def describe(source: Source, zoo: ZooSettings, data=None) -> dict:
    """The record of `source` (see the module doc); `data` (a data module) is needed by ``arch:`` sources,
    which take the class count, image shape and normalization of the data set they are evaluated on."""
    _check_name(source)  # an unknown name is reported before the zoo folder is looked at
    path = locate(source, zoo)
    what = f"{source.architecture} weights"
    state = read_weights(path, what)
    native = _DESCRIBE[source.kind](source, state, path, data)
    model = {"arch": source.name if source.kind == "arch" else "zoo", "num_classes": native.num_classes,
             "input_shape": list(native.shape), "mean": native.mean, "std": native.std,
             "kwargs": {} if source.kind == "arch" else
             {"source": source.architecture, "native_size": native.shape[-1], "interpolation": native.interpolation}}
    return {
        "format": 1, "model": model,
        "objective": {"name": native.objective} if native.objective else None,
        "threat": native.threat, "sigma": None, "data": native.data, "optimizer": None, "max_epochs": None,
        "source": {"spec": str(source), "kind": source.kind, "name": source.name, "file": str(path.resolve()),
                   "sha256": file_digest(path), "library": native.library, **native.extra},
    }


def _check_name(source: Source) -> None:
    """Raise one ConfigError naming what exists when the library has no model `source.name`."""
    if source.kind == "robustbench":
        robustbench_entry(source.name)
    elif source.kind == "arch":
        if source.name not in available_models() or source.name == "zoo":
            raise ConfigError(f"arch:{source.name}: no registered architecture {source.name!r}; registered: "
                              f"{', '.join(m for m in available_models() if m != 'zoo')}")
    elif source.kind == "timm":
        if not import_timm().is_model(source.name):
            zoo_network(2, (3, 224, 224), source.architecture)  # its error names close matches
    else:
        import torchvision.models

        if source.name not in torchvision.models.list_models(module=torchvision.models):
            zoo_network(2, (3, 224, 224), source.architecture)  # its error names the list


def _robustbench(source: Source, state: dict, path: Path, data) -> _Native:
    entry, dataset, threat_model, key = robustbench_entry(source.name)
    if dataset == "imagenet" and key.startswith("Standard"):
        raise ConfigError(f"robustbench:{source.name} is torchvision's ImageNet model, which RobustBench downloads "
                          f"itself: use torchvision:{'resnet50' if 'R50' in key else '<arch>'} with its weights file")
    classes, shape, budgets = ROBUSTBENCH_DATA.get(dataset, (None, None, {}))
    if classes is None:
        raise ConfigError(f"robustbench:{source.name}: mixrobust knows RobustBench's "
                          f"{', '.join(ROBUSTBENCH_DATA)} entries, not {dataset}")
    timm_name = robustbench_timm_name(dataset, threat_model, key)
    norm = {"Linf": "linf", "L2": "l2"}.get(threat_model)
    standard = key.startswith("Standard")
    _check_fit(lambda: zoo_network(classes, shape, source.architecture), state, source, path,
               allow_constant_buffers=True)
    return _Native(
        classes, shape, [0.0] * 3, [1.0] * 3, data=dataset,
        threat=None if norm is None or standard else {"norm": norm, "eps": budgets[threat_model]},
        objective="standard" if standard else None, library=_version("robustbench"),
        extra={"dataset": dataset, "threat_model": threat_model, **({"timm_name": timm_name} if timm_name else {})})


def _timm(source: Source, state: dict, path: Path, data) -> _Native:
    cfg = import_timm().models.get_pretrained_cfg(source.name)
    cfg = cfg.to_dict() if cfg is not None else {}
    head = cfg.get("classifier") or "fc"
    head = head[0] if isinstance(head, (list, tuple)) else head
    classes = _head_classes(state, head) or int(cfg.get("num_classes") or 1000)
    shape = tuple(int(s) for s in cfg.get("input_size") or (3, 224, 224))
    interpolation = cfg.get("interpolation") if cfg.get("interpolation") in INTERPOLATIONS else "bilinear"
    _check_fit(lambda: zoo_network(classes, shape, source.architecture), state, source, path)
    return _Native(classes, shape, list(cfg.get("mean") or IMAGENET_MEAN), list(cfg.get("std") or IMAGENET_STD),
                   interpolation, data="imagenet" if classes == 1000 else None, library=_version("timm"))


def _torchvision(source: Source, state: dict, path: Path, data) -> _Native:
    import torchvision.models

    try:
        weights = torchvision.models.get_model_weights(source.name).DEFAULT
    except (ValueError, AttributeError):
        weights = None
    transforms = weights.transforms() if weights is not None else None
    size = int(transforms.crop_size[0]) if transforms is not None else 224
    mean = list(transforms.mean if transforms is not None else IMAGENET_MEAN)
    std = list(transforms.std if transforms is not None else IMAGENET_STD)
    interpolation = transforms.interpolation.value if transforms is not None else "bilinear"
    skeleton = _skeleton(lambda: zoo_network(1000, (3, size, size), source.architecture))
    heads = [n for n, m in (skeleton.backbone.named_modules() if skeleton is not None else []) if isinstance(m, nn.Linear)]
    default = len(weights.meta["categories"]) if weights is not None else 1000
    classes = (_head_classes(state, heads[-1]) if heads else None) or default
    _check_fit(lambda: zoo_network(classes, (3, size, size), source.architecture), state, source, path)
    return _Native(classes, (3, size, size), mean, std,
                   interpolation if interpolation in INTERPOLATIONS else "bilinear",
                   data="imagenet" if classes == 1000 else None, library=_version("torchvision"))


def _arch(source: Source, state: dict, path: Path, data) -> _Native:
    if data is None:
        raise ConfigError(f"{source}: arch: sources take their class count, image shape and normalization from the "
                          "data set they are evaluated on: pass data=<name>")
    mean, std = list(map(float, data.mean)), list(map(float, data.std))
    normalize = {k.rpartition("normalize.")[2]: v for k, v in state.items() if re.search(r"(^|\.)normalize\.(mean|std)$", k)}
    if {"mean", "std"} <= normalize.keys():  # a whole ImageClassifier's state: its own normalization
        mean, std = normalize["mean"].flatten().tolist(), normalize["std"].flatten().tolist()
    shape = tuple(int(s) for s in data.input_shape)
    model = create_model(source.name, data.num_classes, shape, mean, std)
    problem = mismatch(_target(model, state), fit_names(state, _target(model, state).state_dict()))
    if problem:
        raise CheckpointError(f"{source}: the weights in {path} do not fit {source.name} with {data.num_classes} "
                              f"classes and {list(shape)} images ({data.name}): {problem}")
    return _Native(data.num_classes, shape, mean, std, data=None)


_DESCRIBE: dict[str, Callable[..., _Native]] = {
    "robustbench": _robustbench, "timm": _timm, "torchvision": _torchvision, "arch": _arch}


def _head_classes(state: dict, head: str) -> int | None:
    """The class count of the head layer `head` in `state` (names may carry a wrapper prefix)."""
    weight = next((v for k, v in state.items() if k == f"{head}.weight" or k.endswith(f".{head}.weight")), None)
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _skeleton(build: Callable[[], nn.Module]) -> nn.Module | None:
    """The network built on the meta device (no memory, no time), or None where the library cannot."""
    try:
        with torch.device("meta"):
            return build()
    except ConfigError:
        raise
    except Exception:  # e.g. a constructor that reads a tensor's value (timm's ViTs): checked when loaded
        return None


def _check_fit(build: Callable[[], nn.Module], state: dict, source: Source, path: Path,
               allow_constant_buffers: bool = False) -> None:
    """Refuse now, before any image is attacked, weights that do not fit the source's network."""
    net = _skeleton(build)
    if net is None:
        return
    wanted = net.backbone.state_dict()
    problem = mismatch(wanted, fit_names(state, wanted), allow_constant_buffers)
    if problem:
        raise CheckpointError(f"{source}: the weights in {path} do not fit its network: {problem}. The file holds "
                              "another network's weights (or another entry's): check the name and the file")


def _target(model: ImageClassifier, state: dict) -> nn.Module:
    """Where a file's weights go: the whole classifier if it holds the normalization too, else the network."""
    return model if any(re.search(r"(^|\.)normalize\.mean$", k) for k in state) else model.net


def _version(package: str) -> str | None:
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------- fit to data, load


def fit(record: dict, data, zoo: ZooSettings, key: str) -> dict:
    """`record` as evaluated on `data`: the data set's image shape (resized inside when allowed), checked against
    the data set the zoo model was trained on and, for 1000 classes, ImageNet's class order."""
    source = record["source"]
    model = dict(record["model"])
    native, shape = tuple(model["input_shape"]), tuple(int(s) for s in data.input_shape)
    trained = record.get("data")
    if trained in ("cifar10", "cifar100") and data.name != trained:
        raise ConfigError(f"{key}={source['spec']} was trained on {trained} but data={data.name}; pass "
                          f"data={trained}")
    if model["num_classes"] == 1000 and trained == "imagenet":
        _check_imagenet_order(data, key, source["spec"])
    if native[0] != shape[0]:
        raise ConfigError(f"{key}={source['spec']} takes {native[0]}-channel images but data={data.name} has "
                          f"{shape[0]} channels; mix models of the same kind of images")
    if native != shape:
        if not zoo.resize or source["kind"] == "arch":
            raise ConfigError(
                f"{key}={source['spec']} takes {'x'.join(map(str, native))} images but data={data.name} has "
                f"{'x'.join(map(str, shape))}: set zoo.resize=true to resize them inside the model "
                f"({model['kwargs'].get('interpolation', 'bilinear')}, no antialiasing; attacks stay in the data "
                "set's pixels), or evaluate on data of the model's size")
        if native[1] != native[2]:
            raise ConfigError(f"{key}={source['spec']} takes non-square {native[1]}x{native[2]} images; "
                              "mixrobust resizes to square inputs only")
    model["input_shape"] = list(shape)
    out = dict(record, model=model)
    out["source"] = dict(source, resized=None if native == shape else list(native))
    return out


def _check_imagenet_order(data, key: str, spec: str) -> None:
    """An ImageNet model's logit k is synset k of the sorted 1000 synsets: the data's folders must be those."""
    names = getattr(data, "class_names", None)
    if names is None:
        return
    timm = import_timm(required=False)
    expected = list(timm.data.ImageNetInfo().label_names()) if timm is not None else None
    wrong = names != expected if expected is not None else (
        names != sorted(names) or not all(re.fullmatch(r"n\d{8}", n) for n in names))
    if wrong:
        first = next((i for i, n in enumerate(names) if expected is None or i >= len(expected) or n != expected[i]), 0)
        raise ConfigError(f"{key}={spec} is an ImageNet model, whose output k is ImageNet synset k (n01440764, "
                          f"n01443537, ...); data={data.name}'s class folders differ (e.g. {names[first]!r} at "
                          f"position {first}): name the folders by synset id, all 1000 of them")


def load(record: dict, map_location: str | torch.device = "cpu") -> ImageClassifier:
    """The frozen classifier of a zoo record (from `describe`, possibly `fit`): weights from its file."""
    source, spec = record["source"], record["model"]
    model = create_model(spec["arch"], spec["num_classes"], spec["input_shape"], spec["mean"], spec["std"],
                         **spec.get("kwargs", {}))
    path = Path(source["file"])
    state = read_weights(path, f"{source['kind']}:{source['name']} weights")
    target = model.net.backbone if spec["arch"] == "zoo" else _target(model, state)
    load_into(target, fit_names(state, target.state_dict()), f"{source['spec']}", path,
              allow_constant_buffers=source["kind"] == "robustbench")
    model.record = record
    return freeze(model.to(map_location))


def load_model(spec: str | os.PathLike, data=None, map_location: str | torch.device = "cpu",
               **settings) -> ImageClassifier:
    """The frozen classifier that `spec` names, from Python: a zoo source (``robustbench:cifar10/Linf/Standard``,
    ``timm:...``, ``torchvision:...``, ``arch:...``, each with an optional ``@<file>``) or a checkpoint path.

    `settings` are `ZooSettings`' (``dir``, ``download``, ``resize``); with a data module `data` the model is
    fitted to its images (`fit`; ``arch:`` sources need it)."""
    from mixrobust.checkpoint import load_classifier

    source = parse(spec)
    if source is None:
        return load_classifier(spec, map_location=map_location)
    zoo = ZooSettings(**settings)
    record = describe(source, zoo, data)
    return load(fit(record, data, zoo, str(source)) if data is not None else record, map_location)


# ------------------------------------------------------------------------------------------------- download


def download(source: Source, path: Path) -> Path:
    """Fetch `source`'s weights to `path` with the library's own download function (``zoo.download=true``)."""
    from mixrobust.runtime.files import atomic_write

    log.info("downloading the weights of %s to %s (zoo.download=true)", source, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if source.kind == "robustbench":
            entry, dataset, threat_model, key = robustbench_entry(source.name)
            timm_name = robustbench_timm_name(dataset, threat_model, key)
            if timm_name is not None:
                state = import_timm().create_model(timm_name, pretrained=True).state_dict()
            else:
                if isinstance(entry.get("gdrive_id"), list) or entry.get("gdrive_id") is None:
                    raise ConfigError(f"{source} has no single weights file to download")
                from robustbench.utils import download_gdrive_new

                partial = path.with_name(path.name + ".part")
                download_gdrive_new(entry["gdrive_id"], partial)
                os.replace(partial, path)
                return path
        elif source.kind == "timm":
            state = import_timm().create_model(source.name, pretrained=True).state_dict()
        elif source.kind == "torchvision":
            import torchvision.models

            weights = torchvision.models.get_model_weights(source.name).DEFAULT
            state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)  # no pickled code
        else:
            raise ConfigError(f"{source}: arch: weights are your own files; there is nothing to download")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{source}: the download failed ({type(exc).__name__}: {str(exc)[:160]}); download the "
                          f"weights elsewhere and put them at {path}") from None
    tensors = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write(path, lambda f: f.write(save(tensors)), mode="wb")
    else:
        atomic_write(path, lambda f: torch.save(tensors, f), mode="wb")
    return path


def summary(record: dict) -> str:
    """One line naming a zoo record's model: source, classes, input, file hash."""
    s, m = record["source"], record["model"]
    resized = f", resized from {'x'.join(map(str, m['input_shape']))} to {s['resized'][-1]}" if s.get("resized") else ""
    return (f"{s['spec']} ({m['num_classes']} classes, {'x'.join(map(str, s.get('resized') or m['input_shape']))} "
            f"input{resized}, sha256 {s['sha256'][:12]}, {s.get('library') or 'no library version'})")

