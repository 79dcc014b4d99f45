"""The certify task (``python evaluate.py task=certify``): certified radii of the mixture of g and a smoothed h.

`settings` checks every ``certify.*`` value and the checkpoints' records (class count, input
shape, h's noise level) before any model is loaded. `run` then selects the images as the mix task
does, samples h once for every alpha (over ``distributed.devices`` processes), certifies every
alpha (Theorems 4 and 5, plug-in or sound) and, with ``certify.baseline_ckpt``, an RS baseline with
Cohen et al.'s CERTIFY on the same images. Results go to the output folder (see
`mixrobust.certify.report`) plus ``certify_summary.json``, written last (the resume marker):
settings, clean accuracies, certified accuracies at ``certify.report_radii`` and the alpha whose
clean accuracy matches the target (the baseline's, or ``certify.target_accuracy``).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from mixrobust.attacks import check_finite
from mixrobust.attacks.pgd import AutocastDtype
from mixrobust.certify.mixture import (
    Mode,
    certify_baseline,
    certify_mixture,
    clean_accuracy_by_alpha,
    concat_votes,
    smoothed_votes,
)
from mixrobust.certify.radii import AlphaMethod
from mixrobust.certify.report import curve_rows, radius_grid, select_alpha, write_certify_results
from mixrobust.certify.smoothing import Votes
from mixrobust.certify.sound import BoundSplit, SoftBound
from mixrobust.errors import ConfigError, NonFiniteError
from mixrobust.pipelines import inputs
from mixrobust.pipelines.fields import bounded, parse, plain, require
from mixrobust.runtime.loggers import is_wandb_logger, job_logger, log_to_files
from mixrobust.runtime.placement import placed_device
from mixrobust.runtime.resume import clear_marker, finished, fingerprint, with_examples, write_marker
from mixrobust.runtime.sharding import check_processes, map_shards

log = logging.getLogger(__name__)

MARKER = "certify_summary.json"


@dataclass(frozen=True)
class CertifyKeys:
    """``certify.*`` (conf/certify/default.yaml documents each)."""

    sigma: float | None = bounded(None, gt=0)
    alphas: tuple[float, ...] = bounded((0.5, 0.75, 1.0), ge=0, le=1, min_len=1)
    mode: Mode = "sound"
    votes: Votes = "hard"
    soft_bound: SoftBound = "hoeffding"
    bound: BoundSplit = "complement"
    n0: int = bounded(100, ge=1)
    n: int = bounded(10000, ge=1)
    failure_prob: float = bounded(0.001, gt=0, lt=1)
    lipschitz: float | None = bounded(None, gt=0)
    batch_size: int | None = bounded(None, ge=1)
    workers: int | None = bounded(None, ge=1)
    compile: bool = False
    autocast_dtype: AutocastDtype | None = None
    baseline_ckpt: Path | None = None
    require_baseline: bool = False
    baseline_sigma: float | None = bounded(None, gt=0)
    target_accuracy: float | None = bounded(None, ge=0, le=1)
    alpha_method: AlphaMethod = "at_least"
    alpha_step: float = bounded(0.01, gt=0, le=1)
    radius_max: float | None = bounded(None, gt=0)
    radius_points: int = bounded(201, ge=2)
    report_radii: tuple[float, ...] = bounded((), ge=0)

    def __post_init__(self):
        if self.n0 > self.n:
            raise ConfigError(f"certify.n0 (selection samples) must not exceed certify.n (estimation samples), "
                              f"got n0={self.n0} > n={self.n}")
        if self.require_baseline and self.baseline_ckpt is None:
            raise ConfigError("missing config value certify.baseline_ckpt: this preset compares with an RS baseline; "
                              "set certify.baseline_ckpt=<a gaussian_noise checkpoint>")
        low = sorted(a for a in set(self.alphas) if a < 0.5)
        if low:
            log.warning("certify.alphas holds %s < 1/2: the mixture cannot be certified there (Lemma 2 needs alpha "
                        ">= 1/2); their radii will be 0", ", ".join(map(str, low)))


@dataclass(frozen=True)
class CertifySettings(inputs.EvaluationJob):
    """Everything the task does, checked (see `settings`)."""

    baseline: inputs.ModelFile | None
    sigma: float
    baseline_sigma: float | None
    c: CertifyKeys

    @property
    def fingerprint(self) -> str:
        """What the results depend on: the config (every ``certify.*`` number, but the pass size, workers and
        compilation, which change votes by float rounding at most: each vote of a resumed run is a valid draw
        of the same smoothed classifier), the checkpoints' contents, the code, the data set and the sigmas."""
        config = inputs.numbers_config(self.config, ("mix", "attack", "attacks", "autoattack", "threat", "batch_size", "fit", "fits_dir"),
                                       {"certify": ("batch_size", "workers", "compile")})
        models = [self.g, self.h] + ([self.baseline] if self.baseline else [])
        return fingerprint(config, [m.path for m in models], data=self.data.name, sigma=self.sigma,
                           baseline_sigma=self.baseline_sigma, models=[m.identity for m in models])


def smoothing_sigma(model: inputs.ModelFile, override: float | None, key: str) -> float:
    """The noise level to smooth `model` with: `override` (config `key`), else the sigma its checkpoint records.

    Warns when the model was not trained with Gaussian noise (the RS theorems certify its smoothed
    version, which such a model usually classifies badly) or when `override` differs from the record.
    """
    recorded = model.record.get("sigma")
    if model.objective != "gaussian_noise":
        how = f"objective {model.objective!r}" if model.source is None else f"no recorded noise ({model.source['spec']})"
        log.warning("%s was trained with %s, not gaussian_noise: Theorems 4 and 5 certify its Gaussian-smoothed "
                    "version, which a model not trained on noise usually gets wrong or abstains on", model.key, how)
    if override is None:
        if recorded is None:
            raise ConfigError(f"{model.key}'s checkpoint records no noise level sigma; set {key}=... (e.g. 0.25)")
        return float(recorded)
    if recorded is not None and not math.isclose(float(recorded), override):
        log.warning("%s was trained with sigma=%g but is smoothed with sigma=%g", model.key, float(recorded), override)
    return override


def _check_lipschitz(c: CertifyKeys, sigma: float) -> None:
    """A Lipschitz constant below the smoothed model's sqrt(2/pi)/sigma makes Theorem 4's radii too large."""
    floor = math.sqrt(2 / math.pi) / sigma
    if c.lipschitz is None or c.lipschitz >= floor:
        return
    message = (f"certify.lipschitz={c.lipschitz:g} is below the l_2 Lipschitz constant of the smoothed model, "
               f"sqrt(2/pi)/sigma = {floor:.6g}: Theorem 4's radii would not hold")
    if c.mode == "sound":
        raise ConfigError(message + "; leave certify.lipschitz=null (or give a constant >= it)")
    log.warning("%s (plug-in mode: these radii carry no guarantee anyway)", message)


def settings(cfg: DictConfig) -> CertifySettings:
    """Read and check the whole configuration of a certification job; no model is loaded, no image is read."""
    job = parse(inputs.JobKeys, cfg, strict=False)
    c = parse(CertifyKeys, cfg.certify, "certify")
    require(cfg, "g_ckpt", "h_ckpt")
    g, h = inputs.model_file(cfg, "g_ckpt"), inputs.model_file(cfg, "h_ckpt")
    baseline = inputs.model_file(cfg, "certify.baseline_ckpt") if c.baseline_ckpt is not None else None
    inputs.check_models(g, h, *([baseline] if baseline else []))
    sigma = smoothing_sigma(h, c.sigma, "certify.sigma")
    _check_lipschitz(c, sigma)
    baseline_sigma = smoothing_sigma(baseline, c.baseline_sigma, "certify.baseline_sigma") if baseline else None
    files = [g, h] + ([baseline] if baseline else [])
    cfg = inputs.with_data(cfg, files)
    data = inputs.datamodule(cfg, files)
    g, h, *rest = inputs.fit_models(files, data, cfg)
    return CertifySettings(
        g=g, h=h, baseline=rest[0] if rest else None, sigma=sigma, baseline_sigma=baseline_sigma,
        data=data, examples=inputs.examples(cfg), c=c, job=job, device=inputs.device(cfg),
        processes=inputs.processes(cfg), logger=inputs.logger(cfg),
        config=plain(cfg))


@dataclass
class CertifyResult:
    summary: dict
    files: dict[str, str]
    output_dir: Path
    skipped: bool
    certificate: Any = None
    baseline: Any = None

    def text(self) -> str:
        """The console summary: certified accuracy at ``certify.report_radii`` per alpha and theorem (the run's mode,
        sound or plug-in) and of the baseline, the clean accuracies, and the selected alpha or why none was."""
        return certify_text(self.summary)


#: The theorems of ``cert/<key>_acc@<r>``, as the table names them.
THEOREMS = {"lipschitz": "Thm 4", "rs": "Thm 5"}


def certify_text(summary: dict) -> str:
    """`CertifyResult.text` of a summary (``certify_summary.json``): a header saying what the numbers are, one
    line per alpha and theorem (the selected alpha marked ``*``), the baseline's line, then the clean
    accuracies of g and the smoothed h and the alpha selection."""
    st, acc, table = summary["settings"], summary["clean_accuracy"], summary["certified_accuracy"]
    sel = summary["alpha_selection"]
    mix = table["mix"]
    first = next(iter(mix.values()), {})
    radii = [key.rpartition("@")[2] for key in first if key.startswith("cert/rs_acc@")]
    how = (f"sound: each radius holds with probability >= 1 - {st['failure_prob']:g} (n0={st['n0']}, n={st['n']}"
           if st["mode"] == "sound" else f"plug-in: Monte Carlo estimates, no guarantee (n={st['n']}")
    lines = [f"certified accuracy at l_2 radius r, {summary['n_examples']} images, h sigma={summary['sigma']:g} "
             "(Thm 4: Lipschitz, Thm 5: randomized smoothing)", f"{how}, {st['votes']} votes)"]
    lines.append(f"{'alpha':<9}{'clean':>7}  {'bound':<8}" + "".join(f"{'r=' + r:>9}" for r in radii))
    chosen = sel["alpha"]
    for alpha, metrics in sorted(mix.items(), key=lambda kv: float(kv[0])):
        mark = "*" if chosen is not None and math.isclose(float(alpha), chosen) else ""
        for theorem, name in THEOREMS.items():
            cells = "".join(f"{metrics[f'cert/{theorem}_acc@{r}']:>9.4f}" for r in radii)
            lines.append(f"{f'{float(alpha):g}{mark}':<9}{acc['mix'][alpha]:>7.4f}  {name:<8}{cells}")
    if "baseline" in table:
        cells = "".join(f"{table['baseline'][f'cert/baseline_acc@{r}']:>9.4f}" for r in radii)
        sigma = summary.get("baseline_sigma")
        lines.append(f"{'baseline':<9}{acc['baseline']:>7.4f}  {'CERTIFY':<8}{cells}"
                     + (f"   (RS model, sigma={sigma:g})" if sigma is not None else ""))
    lines.append(f"clean accuracy: g {acc['g']:.4f}, smoothed h {acc['h']:.4f}")
    if chosen is None:
        lines.append(f"no alpha selected: {sel['reason']}")
    else:
        source = "the baseline's" if st.get("target_accuracy") is None else "certify.target_accuracy"
        lines.append(f"selected alpha {chosen:g} (*): {sel['method']} target clean accuracy {sel['target']:.4f} "
                     f"({source})")
    return "\n".join(lines)


def _votes(s: CertifySettings, device: torch.device, x: torch.Tensor, keys: torch.Tensor, models: list) -> list:
    """The votes of each smoothed model: h's, and the baseline's (Cohen et al.'s CERTIFY: hard votes with
    selection samples), each sampled once."""
    c, seed = s.c, s.examples.seed
    common = dict(n0=c.n0, n=c.n, soft_bound=c.soft_bound, batch_size=c.batch_size, workers=c.workers,
                  compile=c.compile, autocast_dtype=c.autocast_dtype)
    out = []
    for (file, model), sigma, votes, offset, mode in zip(models, (s.sigma, s.baseline_sigma), (c.votes, "hard"),
                                                        (0, 1), (c.mode, "sound")):
        fn = functools.partial(smoothed_votes, model, sigma, votes=votes, seed=seed + offset, mode=mode, **common)
        try:
            out.append(concat_votes(map_shards(fn, [x, keys], device, s.processes)))
        except NonFiniteError as exc:
            raise NonFiniteError(f"{file.key} ({file.path}): {exc}") from None
    return out


@torch.no_grad()
def _log_probs(model, x: torch.Tensor, batch_size: int, key: str) -> np.ndarray:
    """The model's log-probabilities on the clean images (N, K); NaN or inf outputs stop the run, naming `key`."""
    device = next(model.parameters()).device
    out = torch.cat([torch.log_softmax(model(b.to(device)).double(), dim=1) for b in x.split(batch_size)])  # (N, K)
    check_finite(out, f"{key} (its clean pass)")
    return out.cpu().numpy()


def run(cfg: DictConfig) -> CertifyResult:
    """Check, load, sample h once, certify every alpha (and the baseline), write the files."""
    s = settings(cfg)
    x, y, index = s.examples.select(s.data)
    out, fp = s.job.output_dir, with_examples(s.fingerprint, x, y, index)
    files = ["certify.csv", "certified_accuracy.csv"] + (["certified_accuracy.png"] if s.job.plots else []) + (
        ["baseline_certify.csv"] if s.baseline else [])
    if s.job.resume and (done := finished(out, MARKER, fp, files)):
        return inputs.logged(CertifyResult(done, {f: str(out / f) for f in files}, out, True), log)
    clear_marker(out, MARKER)
    with placed_device(s.device, s.processes) as device, job_logger(s.logger, out, "certify") as logger:
        g = s.g.load(device)
        where = device if s.processes == 1 else torch.device("cpu")  # several processes: each moves its copy
        smoothed = [(f, f.load(where)) for f in (s.h, s.baseline) if f is not None]
        check_processes(s.processes, device, len(y))
        log.info("certifying %s (%s split, %d examples) on %s: sigma=%g, %s mode, n0=%d, n=%d, failure_prob=%g",
                 s.data.name, s.examples.split, len(y), device, s.sigma, s.c.mode, s.c.n0, s.c.n, s.c.failure_prob)
        g_log_probs = _log_probs(g, x, s.job.batch_size, "g_ckpt")
        for file, model in smoothed:  # a model with NaN weights fails here, before any sampling
            _log_probs(model.to(device), x, s.job.batch_size, file.key)
            model.to(where)
        start = time.perf_counter()
        sampled = _votes(s, device, x, index, smoothed)
        timings = {"sample": time.perf_counter() - start}
        summary, paths, cert, base = _certify(s, sampled, g_log_probs, y.numpy(), index.numpy(), out)
        summary.update(device=str(device), timings=timings, fingerprint=fp)
        _log(logger, summary, paths, {**s.config, "models": summary["models"]})
        write_marker(out, MARKER, summary, fp, list(paths))
        log.info("certification done (%.1f s sampling); results in %s", timings["sample"], out)
    return inputs.logged(CertifyResult(summary, {k: str(v) for k, v in paths.items()}, out, False, cert, base), log)



def _certify(s: CertifySettings, sampled, g_log_probs: np.ndarray, labels: np.ndarray, index: np.ndarray, out: Path):
    """Certificates of every alpha (and the baseline), the alpha selection, the files and the summary."""
    c, votes = s.c, sampled[0]
    base = certify_baseline(sampled[1], labels, s.baseline_sigma, c.failure_prob) if s.baseline else None
    # alpha selection on a fine grid (cheap: no sampling), then certify the chosen alpha as well
    fine = sorted(set(np.round(np.arange(0.0, 1.0 + 1e-9, c.alpha_step), 10).tolist()) | set(c.alphas))
    fine_acc = clean_accuracy_by_alpha(g_log_probs, votes.probs, labels, fine)
    target = c.target_accuracy if c.target_accuracy is not None else (base.clean_accuracy if base else None)
    selection = select_alpha(fine, fine_acc, target, c.alpha_method)
    if selection["reason"]:
        if target is not None:
            log.warning("alpha selection: %s", selection["reason"])
        else:  # no target asked for: the summary evaluate.py prints says so; the log file gets it here
            log_to_files(log, logging.INFO, "alpha selection: %s", selection["reason"])
    alphas = sorted(set(c.alphas) | ({selection["alpha"]} if selection["alpha"] is not None else set()))
    with warnings.catch_warnings():  # alphas < 1/2 were warned about when the settings were read
        warnings.filterwarnings("ignore", message=r"alpha=.* < 1/2")
        cert = certify_mixture(votes, g_log_probs, labels, alphas, s.sigma, c.mode, c.failure_prob, c.bound,
                               c.soft_bound, c.lipschitz)
    grid = radius_grid(cert, base, c.radius_max, c.radius_points)
    title = (f"{s.data.name}, h sigma={s.sigma:g}, {c.mode} ({c.votes} votes, n={c.n}"
             + (f", failure_prob={c.failure_prob:g}" if c.mode == "sound" else "") + f"), {len(labels)} images")
    paths = write_certify_results(out, cert, index, curve_rows(cert, base, grid), base, selection["alpha"],
                                  plots=s.job.plots, title=title)
    table = _accuracy_table(c.report_radii, cert, base)
    if selection["alpha"] is not None:
        selection["certified_accuracy"] = table["mix"][repr(float(selection["alpha"]))]
    summary = {
        "g_ckpt": str(s.g.path), "h_ckpt": str(s.h.path), "baseline_ckpt": str(s.baseline.path) if s.baseline else None,
        "models": {name: f.identity for name, f in (("g", s.g), ("h", s.h), ("baseline", s.baseline)) if f is not None},
        "data": s.data.name, "split": s.examples.split, "n_examples": len(labels), "seed": s.examples.seed,
        "sigma": s.sigma, "baseline_sigma": s.baseline_sigma, "processes": s.processes,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()
                     if k not in ("sigma", "baseline_sigma")},
        "lipschitz_constant": c.lipschitz if c.lipschitz is not None else math.sqrt(2 / math.pi) / s.sigma,
        "baseline_radius": "Cohen et al.'s CERTIFY (sound) in both modes" if base is not None else None,
        "clean_accuracy": {
            "g": float((g_log_probs.argmax(1) == labels).mean()), "h": float((votes.probs.argmax(1) == labels).mean()),
            "mix": {repr(float(a)): float(v) for a, v in zip(cert.alphas, cert.clean_accuracy)},
            "baseline": base.clean_accuracy if base is not None else None},
        "alpha_selection": {**selection, "grid_accuracy": {repr(float(a)): float(v) for a, v in zip(fine, fine_acc)}},
        "certified_accuracy": table, "files": {k: str(v) for k, v in paths.items()},
    }
    return summary, paths, cert, base


def _accuracy_table(grid, cert, baseline) -> dict:
    """``cert/<theorem>_acc@<r>`` per alpha and ``cert/baseline_acc@<r>`` at the report radii."""
    table = {"mix": {}}
    for theorem in ("lipschitz", "rs"):
        acc = cert.certified_accuracy(theorem, grid)
        for i, alpha in enumerate(cert.alphas):
            table["mix"].setdefault(repr(float(alpha)), {}).update(
                {f"cert/{theorem}_acc@{r:g}": float(a) for r, a in zip(grid, acc[i])})
    if baseline is not None:
        table["baseline"] = {f"cert/baseline_acc@{r:g}": float(a) for r, a in zip(grid, baseline.certified_accuracy(grid))}
    return table


def _log(logger, summary: dict, paths: dict, config: dict) -> None:
    if not logger:
        return
    logger.log_hyperparams(config)
    for step, (alpha, metrics) in enumerate(summary["certified_accuracy"]["mix"].items()):
        clean = summary["clean_accuracy"]["mix"][alpha]
        logger.log_metrics({"cert/alpha": float(alpha), "cert/clean_acc": clean, **metrics}, step=step)
    final = {"cert/h_clean_acc": summary["clean_accuracy"]["h"], "cert/g_clean_acc": summary["clean_accuracy"]["g"],
             **summary["certified_accuracy"].get("baseline", {})}
    if summary["alpha_selection"]["alpha"] is not None:
        final["cert/selected_alpha"] = summary["alpha_selection"]["alpha"]
    logger.log_metrics(final, step=len(summary["certified_accuracy"]["mix"]))
    if is_wandb_logger(logger) and "certified_accuracy.png" in paths:
        import wandb

        logger.experiment.log({"cert/certified_accuracy": wandb.Image(str(paths["certified_accuracy.png"]))})
    logger.save()
    logger.finalize("success")
