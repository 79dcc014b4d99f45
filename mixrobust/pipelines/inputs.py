"""Settings the evaluation tasks share: checkpoints, the evaluated images, the threat and the device.

Everything here is checked before any model is loaded: a checkpoint's record (not its weights)
is enough to check class counts, input shapes, the data set and the threat model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mixrobust import zoo
from mixrobust.checkpoint import load_classifier, read_record
from mixrobust.data import subset_indices
from mixrobust.data.base import Split
from mixrobust.errors import CheckpointError, ConfigError
from mixrobust.pipelines.fields import bounded, build, check_arguments, convert, parse, require, value_at
from mixrobust.runtime.cache import file_digest
from mixrobust.runtime.hydra_job import current_job
from mixrobust.runtime.loggers import is_wandb, log_to_files, wandb_init_timeout
from mixrobust.runtime.placement import check_processes_launcher, host_checks, resolve_device, visible_gpus
from mixrobust.runtime.sharding import check_gpu_processes
from mixrobust.threat import Norm, Threat
from mixrobust.training.objectives import OBJECTIVES

log = logging.getLogger(__name__)

#: The adversarial-training objectives: a model trained with one of them is a robust model h.
ROBUST_OBJECTIVES = tuple(name for name, objective in OBJECTIVES.items() if objective.robust)


@dataclass(frozen=True)
class ModelFile:
    """The model named by config key `key`: a mixrobust checkpoint or a zoo source (`mixrobust.zoo`), its
    weights file `path` and its record (a checkpoint's, or the zoo's description with a ``source`` entry)."""

    key: str
    path: Path
    record: dict

    @property
    def source(self) -> dict | None:
        """The zoo record's ``source`` entry (kind, name, file, sha256, library, ...); None for a checkpoint."""
        return self.record.get("source")

    @property
    def objective(self) -> str | None:
        return (self.record.get("objective") or {}).get("name")

    @property
    def robust(self) -> bool:
        """Adversarially trained: by a robust objective, or a RobustBench entry of an l_p threat model."""
        return self.objective in ROBUST_OBJECTIVES or (self.source is not None and self.record.get("threat") is not None)

    @property
    def num_classes(self) -> int:
        return int(self.record["model"]["num_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.record["model"]["input_shape"])

    @property
    def identity(self) -> dict:
        """What the model's outputs depend on, without where its file lies: fingerprints, results rows, W&B."""
        model = self.record["model"]
        out = {"arch": model["arch"], "num_classes": model["num_classes"], "input_shape": model["input_shape"],
               "kwargs": model.get("kwargs") or {}}
        if self.source is None:
            return {"source": "checkpoint", "sha256": file_digest(self.path), **out}
        keep = ("kind", "name", "sha256", "library", "resized")
        return {"source": self.source["kind"], **{k: self.source.get(k) for k in keep}, **out}

    @property
    def label(self) -> str:
        """A short name for results rows: the source (or checkpoint path) and the weights' sha256 prefix."""
        name = f"{self.source['kind']}:{self.source['name']}" if self.source else str(self.path)
        return f"{name} sha256:{self.identity['sha256'][:12]}"

    def load(self, map_location: str | torch.device = "cpu"):
        """The frozen classifier (images in [0,1] -> logits) on `map_location`."""
        if self.source is not None:
            return zoo.load(self.record, map_location)
        return load_classifier(self.path, map_location=map_location)


def zoo_settings(cfg: DictConfig) -> zoo.ZooSettings:
    """``zoo.*`` (a config without the node gets the defaults: $MIXROBUST_ZOO_DIR, no download, no resize)."""
    node = cfg.get("zoo") if isinstance(cfg, DictConfig) else None
    return parse(zoo.ZooSettings, node, "zoo") if node is not None else zoo.ZooSettings()


def model_file(cfg: DictConfig, key: str) -> ModelFile:
    """The model at dotted config key `key` of `cfg`: a checkpoint path or a zoo source (``<kind>:<name>``).

    A zoo source is described now (its file read, never its pickled code; its weights checked against its
    network); an ``arch:`` source takes the class count, shape and normalization of ``cfg.data``."""
    prefix, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, prefix) if prefix else cfg
    value = value_at(node, name, prefix)
    settings = zoo_settings(cfg)  # checked whatever the source: a bad zoo.* value is named as itself
    try:
        source = zoo.parse(value)
        if source is None:
            path = convert(value, Path, key)
            return ModelFile(key, path, read_record(path))
        data = None
        if source.kind == "arch" and cfg.get("data") is not None:
            data = build(cfg.data, "data")
        record = zoo.describe(source, settings, data)
    except (CheckpointError, ConfigError) as exc:
        raise type(exc)(f"{key}: {exc}") from None
    return ModelFile(key, Path(record["source"]["file"]), record)


def fit_models(files: list[ModelFile], data, cfg: DictConfig) -> list[ModelFile]:
    """`files` with each zoo record fitted to the evaluated `data` (`mixrobust.zoo.fit`: image shape, resize,
    data set, ImageNet class order), then checked pairwise (class count and input shape)."""
    settings = zoo_settings(cfg)
    fitted = [dataclasses.replace(f, record=zoo.fit(f.record, data, settings, f.key)) if f.source else f for f in files]
    for f in fitted:
        if f.source:
            log.info("%s: %s", f.key, zoo.summary(f.record))
    for other in fitted[1:]:
        check_pair(fitted[0], other)
    return fitted


def check_models(first: ModelFile, *others: ModelFile) -> None:
    """Models to mix or compare, before the data set is resolved: the same class count and, between checkpoints,
    the same input shape (a zoo model's shape is checked once fitted to the data: it may be resized inside)."""
    for b in others:
        if first.num_classes != b.num_classes:
            raise ConfigError(f"{first.key} has {first.num_classes} classes but {b.key} has {b.num_classes}; "
                              "mix classifiers of the same label set")
        if first.source is None and b.source is None:
            check_pair(first, b)


def check_pair(a: ModelFile, b: ModelFile) -> None:
    """Two models to mix or compare must agree on class count and input shape."""
    if a.num_classes != b.num_classes:
        raise ConfigError(f"{a.key} has {a.num_classes} classes but {b.key} has {b.num_classes}; "
                          "mix classifiers of the same label set")
    if a.input_shape != b.input_shape:
        raise ConfigError(f"{a.key} takes inputs of shape {a.input_shape} but {b.key} takes {b.input_shape}; "
                          "mix classifiers of the same data")


def warn_if_swapped(g: ModelFile, h: ModelFile) -> None:
    """g is the accurate model, h the robust one: warn when the records say the opposite."""
    if g.robust and h.objective == "standard":
        log.warning("g_ckpt was trained with %s and h_ckpt with standard training: h^alpha puts weight alpha on h, "
                    "the robust model of the paper; swap g_ckpt and h_ckpt unless this is what you meant",
                    g.objective or "adversarial training (its zoo's threat model)")


#: Keys of every evaluation config that change no reported number (device: only in float rounding,
#: and a local multi-GPU sweep hands a resumed job another GPU); left out of the resume fingerprint.
JOB_KEYS = ("output_dir", "resume", "logger", "plots", "cache", "distributed", "device", "debug", "task", "report",
            "data_root", "preflight", "skip_misclassified", "progress")
#: Settings of the zoo node that only say where weights are found (their contents count, by sha256).
ZOO_KEYS = ("dir", "download")
#: Settings of the data node that only say how images are loaded.
LOADER_KEYS = ("num_workers", "pin_memory", "persistent_workers", "batch_size", "eval_batch_size", "download",
               "in_memory")


def numbers_config(config: dict, drop: tuple[str, ...], nested: dict[str, tuple[str, ...]] | None = None) -> dict:
    """The part of a plain config a task's numbers depend on, for its resume fingerprint: without `JOB_KEYS`,
    the task's own `drop` keys, the data loader's settings and the `nested` keys of sub-nodes. Anything
    not left out counts, so a setting added later is fingerprinted until it is listed here."""
    nested = {"data": LOADER_KEYS, "zoo": ZOO_KEYS, **(nested or {})}
    out = {k: v for k, v in config.items() if k not in JOB_KEYS + drop}
    for node, keys in nested.items():
        if isinstance(out.get(node), dict):
            out[node] = {k: v for k, v in out[node].items() if k not in keys}
    return out


@dataclass(frozen=True)
class JobKeys:
    """The top-level switches every evaluation task reads."""

    batch_size: int = bounded(500, ge=1)
    plots: bool = True
    resume: bool = True
    output_dir: Path = Path(".")


@dataclass(frozen=True)
class DistributedKeys:
    """``distributed.devices``: processes per job (one per GPU, or CPU processes with device=cpu)."""

    devices: int = bounded(1, ge=1)


@dataclass(frozen=True)
class EvaluationJob:
    """What every evaluation task's settings hold: the two models, the data, the images, the job's switches."""

    g: ModelFile
    h: ModelFile
    data: Any  # the data module, not loaded yet
    examples: "Examples"
    job: JobKeys
    device: str
    processes: int
    logger: Any
    config: dict  # the whole configuration, plain and resolved (fingerprints, logger hyperparameters)


@dataclass(frozen=True)
class Examples:
    """Which images are evaluated: the split, and its first `n` or `n_per_class` per class (drawn with `seed`)."""

    split: Split = "test"
    n: int | None = bounded(None, ge=1)
    n_per_class: int | None = bounded(None, ge=1)
    seed: int = bounded(0, ge=0)

    def __post_init__(self):
        if self.n is not None and self.n_per_class is not None:
            raise ConfigError(f"set at most one of n={self.n} and n_per_class={self.n_per_class}")

    def select(self, datamodule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (N, C, H, W) in [0,1], labels (N,) and their positions in the split (N,). (That the images fit
        the models was checked with the settings, `datamodule`; the data module checks its files' shapes.)"""
        x, y = datamodule.eval_tensors(self.split)
        index = subset_indices(y, n=self.n, n_per_class=self.n_per_class, seed=self.seed)
        return x[index], y[index], index


def examples(cfg: DictConfig) -> Examples:
    return parse(Examples, cfg, strict=False)


def device(cfg: DictConfig) -> str:
    """The ``device`` setting, checked now (a CUDA device on a machine without one is refused)."""
    name = convert(value_at(cfg, "device", ""), str, "device")
    resolve_device(name)
    return name


def logged(result, task_log: logging.Logger):
    """`result` (a task's result with ``text()`` and ``skipped``), its text written by `task_log` to the job's
    log file only: evaluate.py prints it on the console, once."""
    log_to_files(task_log, logging.INFO, "%s:\n%s", "finished before, skipped" if result.skipped else "result",
                 result.text())
    return result


def logger(cfg: DictConfig):
    """The ``logger`` node, its target and arguments checked (it is built when the job starts)."""
    node = cfg.get("logger")
    check_arguments(node, "logger", ("save_dir",))
    if is_wandb(node):
        wandb_init_timeout(node)
    return node


def processes(cfg: DictConfig) -> int:
    """``distributed.devices``, refused under a parallel joblib launcher when above 1, and above the GPUs visible
    when the job runs on GPUs (checked here, before the models and images are loaded)."""
    count = parse(DistributedKeys, cfg.distributed, "distributed").devices
    check_processes_launcher(count)
    if count > 1 and host_checks():
        name = convert(value_at(cfg, "device", ""), str, "device") if "device" in cfg else "auto"
        if name.split(":")[0] in ("auto", "cuda") and (gpus := visible_gpus()) > 0:  # none: auto is the CPU
            check_gpu_processes(count, gpus)
    return count


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        raise ConfigError("data is not set: pass data=<name> (outside a Hydra app the data set recorded in the "
                          "checkpoints cannot be composed from conf/data/)")
    return compose(config_name=current_job().config_name or "evaluate", overrides=overrides)


def with_data(cfg: DictConfig, files: list[ModelFile]) -> DictConfig:
    """`cfg` with its ``data`` node: the one given (``data=<name>``), else the data set the checkpoints were
    trained on, composed by Hydra from conf/data/ with its threat defaults (conf/data_threat/)."""
    trained_on = {f.key: f.record.get("data") for f in files}
    if cfg.get("data") is not None:
        return cfg
    names = set(trained_on.values())
    if None in names or len(names) != 1:
        listed = ", ".join(f"{k} on {v!r}" for k, v in trained_on.items())
        raise ConfigError(f"the checkpoints were trained on different or unknown data sets ({listed}): choose the "
                          "evaluation data with data=<name> (e.g. data=digits)")
    name = names.pop()
    norm = convert(value_at(cfg.threat, "norm", "threat"), Norm, "threat.norm").value
    try:
        composed = _compose([f"data={name}", f"threat={norm}"])
    except ConfigError:
        raise
    except Exception as exc:  # Hydra: no conf/data/<name>.yaml
        raise ConfigError(f"the checkpoints were trained on {name!r}, which has no config in conf/data/ "
                          f"({str(exc).splitlines()[0]}); pass data=<name>") from None
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    with open_dict(out):
        out.data = OmegaConf.to_container(composed.data, resolve=False)
        for k in ("eps", "step_size"):
            if out.threat.get(k) is None:
                out.threat[k] = composed.threat.get(k)
    return out


def datamodule(cfg: DictConfig, files: list[ModelFile]):
    """The data module of ``cfg.data`` (its constructor checks that the files exist; nothing is loaded).

    Its class count and image shape must be the models'; a checkpoint trained on another data set of
    the same shape is allowed (e.g. a model trained on a superset), with a warning.
    """
    module = build(cfg.data, "data")
    for model in files:  # a zoo model's image shape is checked by fit_models (it may be resized inside)
        if module.num_classes != model.num_classes or (
                model.source is None and tuple(module.input_shape) != model.input_shape):
            raise ConfigError(f"data={module.name} has {module.num_classes} classes and {tuple(module.input_shape)} "
                              f"images but {model.key} takes {model.num_classes} classes and {model.input_shape} "
                              "images; pass the data set it was trained on (data=...)")
    for f in files:
        trained = f.record.get("data")
        if trained is not None and trained != module.name and f.source is None:
            log.warning("%s was trained on %r but is evaluated on %r (data=...)", f.key, trained, module.name)
    return module


@dataclass(frozen=True)
class ThreatKeys:
    norm: Norm = Norm.LINF
    eps: float | None = bounded(None, ge=0)
    step_size: float | None = bounded(None, gt=0)


def threat(cfg: DictConfig, input_shape) -> Threat:
    """The threat of ``cfg.threat``, checked against the input: an l_inf eps above 1 or an l_2 eps above
    the diameter of [0,1]^d leaves nothing to defend and is refused; eps = 0 is warned about."""
    keys = parse(ThreatKeys, cfg.threat, "threat")
    for name in ("eps", "step_size"):
        if getattr(keys, name) is None:
            raise ConfigError(f"threat.{name} is not set and this data set has no default for norm "
                              f"{keys.norm.value}; pass threat.{name}=...")
    dims = math.prod(input_shape)
    limit = 1.0 if keys.norm is Norm.LINF else math.sqrt(dims)
    if keys.eps > limit:
        raise ConfigError(f"threat.eps={keys.eps:g} exceeds the input range: an {'l_inf' if keys.norm is Norm.LINF else 'l_2'} ball of radius "
                          f"{limit:g} already covers every image in [0,1]^{dims}; pixel-space budgets are e.g. "
                          "8/255 (l_inf) or 0.5 (l_2)")
    if keys.eps == 0:
        log.warning("threat.eps=0: every attack returns the clean images, so robust accuracy equals clean accuracy")
    return Threat(keys.norm, keys.eps, keys.step_size)


def warn_unreachable(steps: int, step_size: float, eps: float, random_start: bool, what: str) -> None:
    """Warn when `steps` steps of `step_size` cannot reach the boundary of the eps-ball from x."""
    if eps > 0 and steps * step_size < eps and not random_start:
        log.warning("%s: %d steps of %g reach at most %g from the clean image, less than eps=%g: the attack "
                    "searches a smaller ball than the threat model, so robust accuracy may be overstated (raise the "
                    "steps or threat.step_size, e.g. step_size = 2.5 * eps / steps = %g)",
                    what, steps, step_size, steps * step_size, eps, 2.5 * eps / steps)


def warn_threat_mismatch(h: ModelFile, threat: Threat) -> None:
    """Warn when an adversarially trained h is evaluated in another ball than it trained in (the record of a standard
    or Gaussian-noise model holds the config's threat, which it was not trained against: no warning)."""
    trained = h.record.get("threat")
    if h.robust and trained and (trained.get("norm") != threat.norm.value or abs(float(trained.get("eps", -1)) - threat.eps) > 1e-9):
        log.warning("%s was trained against %s eps=%g but is evaluated at %s eps=%g", h.key, trained.get("norm"),
                    float(trained.get("eps", float("nan"))), threat.norm.value, threat.eps)


def mixture_inputs(cfg: DictConfig) -> tuple[DictConfig, ModelFile, ModelFile, Any, Threat]:
    """What a task on the mixture of ``g_ckpt`` and ``h_ckpt`` reads first, checked: (cfg with the data set
    resolved, g, h fitted to the data, the data module, the threat); warnings for swapped models and a threat
    other than h's. Nothing is loaded but the checkpoints' records."""
    require(cfg, "g_ckpt", "h_ckpt")
    g, h = model_file(cfg, "g_ckpt"), model_file(cfg, "h_ckpt")
    check_models(g, h)
    warn_if_swapped(g, h)
    cfg = with_data(cfg, [g, h])
    data = datamodule(cfg, [g, h])
    g, h = fit_models([g, h], data, cfg)
    found = threat(cfg, g.input_shape)
    warn_threat_mismatch(h, found)
    return cfg, g, h, data, found
