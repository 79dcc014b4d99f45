"""The fit_map task (``python evaluate.py task=fit_map g_ckpt=... h_ckpt=...``): MixedNUTS's map, fitted without training.

On `fit.n` held-out images of the training split (``fit.split``: the validation images carved from it,
by default; never the test split), it computes g's and h's clean logits, attacks h alone with a
minimum-margin PGD (margin loss, `fit.steps` steps, every iterate considered: the lowest-margin point
is kept), and searches the map's (s, p, c) on the grid and alpha per map (`mixrobust.mixing.fit`). It
writes into the output folder ``h_map.json`` (the map, alpha, the estimates, linear mixing's at the same
target, where the fit came from), ``fit_grid.csv`` (every grid point), ``fit_curves.csv`` and
``fit_curves.png`` (estimated clean vs robust accuracy as alpha varies, fitted map and identity), and saves
``h_map.json`` as ``<fits_dir>/<fit.name>.json``: ``python evaluate.py mix.h_map=[identity,<name>]`` then
evaluates the fitted map beside linear mixing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from omegaconf import DictConfig

from mixrobust.attacks import PGD, attack_in_batches
from mixrobust.data.loaders import subset_indices
from mixrobust.errors import ConfigError
from mixrobust.evaluation.plots import plot_fit_curves
from mixrobust.evaluation.sweep import model_outputs
from mixrobust.mixing.fit import BIASES, POWERS, SCALES, MapFit, fit_curves, fit_nonlinear_map
from mixrobust.mixing.maps import FIT_FILE, HMap
from mixrobust.pipelines import inputs
from mixrobust.pipelines.fields import bounded, parse
from mixrobust.pipelines.mix import FitsKeys
from mixrobust.runtime import progress
from mixrobust.runtime.files import csv_text, read_json, write_json, write_text
from mixrobust.runtime.placement import placed_device
from mixrobust.threat import Threat

log = logging.getLogger(__name__)

FILES = (FIT_FILE, "fit_grid.csv", "fit_curves.csv", "fit_curves.png")


@dataclass(frozen=True)
class FitKeys:
    """``fit.*``: the held-out images, the attack on h, the target and the grid."""

    name: str | None = None  # saved as <fits_dir>/<name>.json; null: the data set's name
    split: Literal["val", "train"] = "val"
    n: int = bounded(1000, ge=10)
    steps: int = bounded(50, ge=1)
    target: float = bounded(0.985, gt=0, le=1)
    scales: tuple[float, ...] = bounded(SCALES, gt=0, min_len=1)
    powers: tuple[float, ...] = bounded(POWERS, gt=0, min_len=1)
    biases: tuple[float, ...] = bounded(BIASES, min_len=1)
    top_k: int | None = bounded(None, ge=2)
    overwrite: bool = False  # replace <fits_dir>/<name>.json even when it holds another fit (`check_name_free`)

    def __post_init__(self):
        if self.name is not None and (not self.name or "/" in self.name or self.name.endswith(".json")):
            raise ConfigError(f"fit.name={self.name!r} must be a plain name (it becomes <fits_dir>/<name>.json)")


@dataclass(frozen=True)
class FitSettings:
    g: inputs.ModelFile
    h: inputs.ModelFile
    data: object
    threat: Threat
    fit: FitKeys
    name: str
    seed: int
    batch_size: int
    plots: bool
    output_dir: Path
    fits_dir: Path | None
    device: str


def settings(cfg: DictConfig) -> FitSettings:
    """Read and check the fit's configuration; no model is loaded, no image is read."""
    job = parse(inputs.JobKeys, cfg, strict=False)
    fit = parse(FitKeys, cfg.fit, "fit")
    seed = inputs.examples(cfg).seed
    cfg, g, h, data, threat = inputs.mixture_inputs(cfg)
    if fit.top_k is not None and fit.top_k > g.num_classes:
        raise ConfigError(f"fit.top_k={fit.top_k} exceeds the models' {g.num_classes} classes")
    check_held_out(fit.split, data, (g, h))
    s = FitSettings(g=g, h=h, data=data, threat=threat, fit=fit, name=fit.name or data.name, seed=seed,
                    batch_size=job.batch_size, plots=job.plots, output_dir=job.output_dir,
                    fits_dir=parse(FitsKeys, cfg, strict=False).fits_dir, device=inputs.device(cfg))
    check_name_free(s)
    return s


def _identity(s: FitSettings) -> dict:
    """The entries of the fit record (`_fit`) that this run's settings fix: what makes two fits the same fit."""
    fit = {k: v for k, v in dataclasses.asdict(s.fit).items() if k not in ("name", "overwrite")}
    return {"models": {"g": s.g.identity, "h": s.h.identity}, "fit": fit, "data": s.data.name, "split": s.fit.split,
            "seed": s.seed, "val_size": s.data.val_size, "threat": s.threat.as_dict()}


def _differs(saved, mine) -> bool:
    """Whether `saved` and `mine` differ where both say something (an older record lacks some keys)."""
    if isinstance(saved, dict) and isinstance(mine, dict):
        return any(_differs(saved[k], v) for k, v in mine.items() if k in saved)
    return saved != mine


def check_name_free(s: FitSettings) -> None:
    """Refuse to replace ``<fits_dir>/<name>.json`` when it holds a fit of other models or settings (a sweep over
    fit settings under one name, or another pair's fit under the data set's name): ``mix.h_map=<name>`` would
    evaluate the last one written, not the one asked for. The same fit again, or ``fit.overwrite=true``, replaces it."""
    if s.fits_dir is None or s.fit.overwrite:
        return
    path = s.fits_dir / f"{s.name}.json"
    saved = read_json(path)
    if not isinstance(saved, dict):
        return
    mine = json.loads(json.dumps(_identity(s), default=str))  # as the record file holds it
    differ = [k for k, v in mine.items() if k in saved and _differs(saved[k], v)]
    if differ:
        raise ConfigError(f"{path} holds another fit named {s.name!r} (it differs from this run's in: "
                          f"{', '.join(differ)}): give this one its own name with fit.name=<name>, or replace that one "
                          "with fit.overwrite=true")


def check_held_out(split: str, data, models) -> None:
    """Refuse a fit on validation images the models trained on; warn where that cannot be checked.

    Training carves its validation images out of the training split by ``seed`` and ``data.val_size`` (the first
    val_size of a permutation drawn with the seed), which the checkpoint records (``split``): the fit's are held out
    of a model's training if the seed is the same and the fit's val_size at most the model's (both counts or both
    fractions). Fit images a model trained on have wider margins than unseen ones: the estimated robust accuracy
    rises and the fitted alpha comes out too small. A slice that some seed and val_size would hold out of every
    model with a record is a ConfigError naming them; otherwise (models of different seeds, one that held nothing
    out) a warning, as for a model whose record has no split (zoo models, which trained on the whole training
    split; checkpoints of an earlier mixrobust or fine-tuned from other weights) and for a count compared with a
    fraction.
    """
    if split == "train":
        log.warning("fit.split=train: the fit's images are the models' training images, where their margins are wider "
                    "than on unseen images, so the fitted alpha may come out too small; fit.split=val holds them out")
        return
    here = data.val_split
    trained = {f.key: f.record.get("split") for f in models}
    verdicts = {key: None if s is None else _held_out(here, s) for key, s in trained.items()}
    outside = {key: trained[key] for key, held in verdicts.items() if held is False}
    if outside:
        seen = ", ".join(f"{key} trained with seed={s['seed']} data.val_size={s['val_size']}"
                         for key, s in outside.items())
        recorded = [s for s in trained.values() if s is not None]
        if len({(s["seed"], isinstance(s["val_size"], numbers.Integral)) for s in recorded}) == 1:
            fix = min(recorded, key=lambda s: s["val_size"])
            if fix["val_size"] > 0:
                raise ConfigError(f"the fit's validation images (seed={here['seed']}, data.val_size="
                                  f"{here['val_size']}) are in part training images ({seen}); pass seed={fix['seed']} "
                                  f"data.val_size={fix['val_size']}, which holds them out of every model")
        log.warning("the fit's validation images (seed=%s, data.val_size=%s) are in part training images of %s; no "
                    "setting holds them out of every model, so the fitted alpha may come out too small",
                    here["seed"], here["val_size"], seen)
    unknown = [key for key, s in trained.items() if s is None]
    if unknown:
        log.warning("%s: the record does not say which training images were held out (a zoo model, trained on the "
                    "whole training split, or a checkpoint of an earlier mixrobust or fine-tuned from other weights), "
                    "so the fit's validation images may be its training images and the fitted alpha too small",
                    " and ".join(unknown))
    for key in (k for k, held in verdicts.items() if held is None and trained[k] is not None):
        log.warning("data.val_size=%s here and %s in %s's training: a count and a fraction cannot be compared "
                    "without the split's size, so the fit's images may be its training images; pass data.val_size=%s",
                    here["val_size"], trained[key]["val_size"], key, trained[key]["val_size"])


def _held_out(fit: dict, trained: dict) -> bool | None:
    """Whether validation images `fit` ({seed, val_size}) lie inside the ones a run of split `trained` held out;
    None when a count is compared with a fraction."""
    if fit["seed"] != trained["seed"]:
        return False
    a, b = fit["val_size"], trained["val_size"]
    if a == b:
        return True
    return a <= b if isinstance(a, numbers.Integral) == isinstance(b, numbers.Integral) else None


@dataclass
class FitResult:
    fit: MapFit
    files: dict[str, str]
    output_dir: Path
    seconds: dict[str, float]
    saved: Path | None
    skipped: bool = False

    def text(self) -> str:
        f, lin = self.fit, self.fit.linear
        lines = [
            f"fitted on {f.n} held-out images: {f.h_map.label}, alpha={f.alpha:.4g}",
            f"estimated clean {f.clean:.4f}, robust {f.robust:.4f} (target {f.target:.3g} x h's {f.h_robust:.4f}; "
            f"h clean {f.h_clean:.4f}, g clean {f.g_clean:.4f})",
            "linear mixing at the same target: " + (f"alpha={lin['alpha']:.4g}, clean {lin['clean']:.4f}, robust "
                                                    f"{lin['robust']:.4f}" if lin["alpha"] is not None
                                                    else "unreachable"),
            f"time: logits and attack on h {self.seconds['attack']:.1f} s, grid search {self.seconds['search']:.2f} s",
        ]
        if self.saved is not None:
            lines.append(f"saved as {self.saved} (use: mix.h_map=[identity,{self.saved.stem}])")
        return "\n".join(lines)


def held_out(s: FitSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fit's images, labels and their positions in `fit.split`: its first `fit.n` (all, with a warning, when
    the split is smaller)."""
    x, y = s.data.eval_tensors(s.fit.split)
    if len(y) < s.fit.n:
        log.warning("the %s split of %s has %d images, fewer than fit.n=%d: fitting on all of them", s.fit.split,
                    s.data.name, len(y), s.fit.n)
    index = subset_indices(y, n=min(s.fit.n, len(y)), seed=s.seed)
    return x[index], y[index], index


def run(cfg: DictConfig) -> FitResult:
    """Logits, the minimum-margin attack on h, the grid search; the files; the named copy in `fits_dir`."""
    s = settings(cfg)
    with placed_device(s.device) as device:
        return _fit(s, device)


def _fit(s: FitSettings, device: torch.device) -> FitResult:
    g, h = s.g.load(device), s.h.load(device)
    x, y, index = held_out(s)
    t0 = time.perf_counter()
    attack = PGD.from_threat(s.threat, steps=s.fit.steps, loss="margin", seed=s.seed)
    g_clean, h_clean = (model_outputs(m, x, s.batch_size, device, k) for k, m in (("g", g), ("h", h)))
    with progress.stage(f"minimum-margin attack on h (PGD-{s.fit.steps}, margin loss)", len(y)) as shown:
        x_adv = attack_in_batches(attack, h, x, y, s.batch_size, on_batch=shown.advance)
    h_adv = model_outputs(h, x_adv, s.batch_size, device, "h (attacked)")
    t1 = time.perf_counter()
    fit = fit_nonlinear_map(g_clean, h_clean, h_adv, y, scales=s.fit.scales, powers=s.fit.powers,
                            biases=s.fit.biases, top_k=s.fit.top_k, target=s.fit.target)
    fit.h_map = dataclasses.replace(fit.h_map, name=s.name)
    seconds = {"attack": t1 - t0, "search": time.perf_counter() - t1}
    curves = fit_curves(g_clean, h_clean, h_adv, y, [HMap(), fit.h_map])
    record = {**fit.summary(), "name": s.name, **_identity(s), "index_first": int(index[0]), "attack": repr(attack),
              "seconds": seconds}
    out = s.output_dir
    paths = {FIT_FILE: write_json(out / FIT_FILE, record),
             "fit_grid.csv": write_text(out / "fit_grid.csv", csv_text(("scale", "power", "bias", "alpha", "clean",
                                                                          "robust"), fit.grid)),
             "fit_curves.csv": write_text(out / "fit_curves.csv", csv_text(("h_map", "alpha", "clean", "robust"),
                                                                           curves))}
    if s.plots:
        paths["fit_curves.png"] = plot_fit_curves(curves, fit, out / "fit_curves.png")
    saved = write_json(s.fits_dir / f"{s.name}.json", record) if s.fits_dir is not None else None
    return inputs.logged(FitResult(fit, {k: str(v) for k, v in paths.items()}, out, seconds, saved), log)

