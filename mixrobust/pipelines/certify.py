"""Certify the mixture of g and a Gaussian-smoothed h: ``run(cfg)`` is what ``python evaluate.py task=certify`` calls.

Order of work: every ``cfg.certify`` value is validated (sigma, n0 <= n, failure_prob, alphas,
the closed vocabularies), then the checkpoints are loaded and checked (class count, input
shape, h's noise level), the examples are selected as in the mixing evaluation (the official
test split, first n or n_per_class of it; see `mixrobust.pipelines.evaluate`), and only then is
h sampled: once, for every alpha. The optional RS baseline is certified with Cohen et al.'s
CERTIFY on the same images. Results go to ``cfg.output_dir`` (see `mixrobust.certify.report`)
plus ``certify_summary.json``: settings, clean accuracies, certified accuracies at
``certify.report_radii`` and the alpha whose clean accuracy matches the target (the baseline's
clean accuracy, or ``certify.target_accuracy``).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mixrobust.atomic import write_json
from mixrobust.attacks import parse_autocast_dtype
from mixrobust.certify.bounds import check_failure_prob
from mixrobust.certify.mixture import (
    certify_baseline,
    certify_mixture,
    clean_accuracy_by_alpha,
    concat_votes,
    sample_votes,
)
from mixrobust.certify.radii import check_alpha, check_sigma
from mixrobust.certify.report import curve_rows, radius_grid, select_alpha, write_certify_results
from mixrobust.certify.smoothing import SmoothedClassifier
from mixrobust.checkpoint import load_classifier
from mixrobust.errors import ConfigError, check_choice, check_count
from mixrobust.mixing import check_compatible
from mixrobust.pipelines.common import (
    build_logger,
    finish_wandb,
    finished_run,
    job_overrides,
    log,
    require_keys,
    run_fingerprint,
)
from mixrobust.pipelines.distributed import check_devices, run_sharded
from mixrobust.pipelines.evaluate import resolve_data, resolve_device, select_examples


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"certify.{name} must be true or false, got {value!r}")
    return value


def _autocast_name(value) -> str | None:
    """certify.autocast_dtype validated, as JSON-friendly text ("bfloat16", "float16") or None for float32."""
    dtype = parse_autocast_dtype(value, key="certify.autocast_dtype")
    return None if dtype is None else str(dtype).removeprefix("torch.")


def certify_settings(cfg: DictConfig) -> dict:
    """Validated ``cfg.certify`` values; one ConfigError per bad value, before any checkpoint is read."""
    c = cfg.certify
    n0, n = check_count("certify.n0", c.n0), check_count("certify.n", c.n)
    if n0 > n:
        raise ConfigError(f"certify.n0 (selection samples) must not exceed certify.n (estimation samples), "
                          f"got n0={n0} > n={n}")
    s = {
        "mode": check_choice("certify.mode", c.mode, ("sound", "plugin")),
        "votes": check_choice("certify.votes", c.votes, ("hard", "soft")),
        "bound": check_choice("certify.bound", c.bound, ("complement", "bonferroni", "runner_up")),
        "soft_bound": check_choice("certify.soft_bound", c.soft_bound, ("hoeffding", "bernstein")),
        "alpha_method": check_choice("certify.alpha_method", c.alpha_method, ("at_least", "closest", "interpolate")),
        "n0": n0, "n": n, "failure_prob": check_failure_prob(c.failure_prob),
        "batch_size": None if c.get("batch_size") is None else check_count("certify.batch_size", c.batch_size),
        "workers": None if c.get("workers") is None else check_count("certify.workers", c.workers),
        "compile": _flag("compile", c.get("compile", False)),
        "autocast_dtype": _autocast_name(c.get("autocast_dtype")),
        "sigma": None if c.sigma is None else check_sigma(c.sigma),
        "baseline_sigma": None if c.get("baseline_sigma") is None else check_sigma(c.baseline_sigma),
        "lipschitz": None if c.get("lipschitz") is None else float(c.lipschitz),
        "report_radii": [float(r) for r in c.get("report_radii") or []],
    }
    if s["lipschitz"] is not None and not (s["lipschitz"] > 0 and math.isfinite(s["lipschitz"])):
        raise ConfigError(f"certify.lipschitz must be a finite constant > 0 (or null for sqrt(2/pi)/sigma), "
                          f"got {c.lipschitz}")
    alphas = c.alphas if c.alphas is not None else []
    alphas = [float(a) for a in ([alphas] if isinstance(alphas, (int, float)) else alphas)]
    if not alphas:
        raise ConfigError("certify.alphas is empty: give the mixing weights to certify, e.g. [0.5,0.75,1.0]")
    for alpha in alphas:
        check_alpha(alpha, warn=False)
    for alpha in sorted(a for a in set(alphas) if a < 0.5):
        warnings.warn(f"certify.alphas holds {alpha} < 1/2: the mixture cannot be certified there (Lemma 2 needs "
                      "alpha >= 1/2); its radii will be 0", stacklevel=2)
    s["alphas"] = sorted(set(alphas))
    target = c.get("target_accuracy")
    if target is not None and not 0.0 <= float(target) <= 1.0:
        raise ConfigError(f"certify.target_accuracy must be a clean accuracy in [0, 1], got {target}")
    s["target_accuracy"] = None if target is None else float(target)
    step = float(c.get("alpha_step", 0.01))
    if not 0.0 < step <= 1.0:
        raise ConfigError(f"certify.alpha_step must lie in (0, 1], got {step}")
    s["alpha_step"] = step
    s["radius_points"] = check_count("certify.radius_points", c.get("radius_points", 201))
    radius_max = c.get("radius_max")
    if radius_max is not None and not 0 < float(radius_max) < math.inf:
        raise ConfigError(f"certify.radius_max must be a radius > 0 (or null for the largest one found), got {radius_max}")
    s["radius_max"] = None if radius_max is None else float(radius_max)
    if s["radius_points"] < 2:
        raise ConfigError(f"certify.radius_points must be >= 2, got {s['radius_points']}")
    return s


def smoothing_sigma(name: str, model, override: float | None) -> float:
    """The noise level to smooth `model` with: `override`, else the sigma its checkpoint records.

    Warns when the model was not trained with Gaussian noise (the RS theorems certify the smoothed
    model, which such a model usually classifies badly) or when `override` differs from the record.
    """
    record = getattr(model, "record", {}) or {}
    objective = (record.get("objective") or {}).get("name")
    recorded = record.get("sigma")
    if objective != "gaussian_noise":
        msg = (f"{name} was trained with objective {objective!r}, not gaussian_noise: Theorems 4 and 5 certify its "
               "Gaussian-smoothed version, which a model not trained on noise usually gets wrong or abstains on")
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    if override is None:
        if recorded is None:
            raise ConfigError(f"{name}'s checkpoint records no noise level sigma; set certify."
                              f"{'sigma' if name == 'h' else 'baseline_sigma'}=... (e.g. 0.25)")
        return check_sigma(recorded)
    if recorded is not None and not math.isclose(float(recorded), override):
        log.warning("%s was trained with sigma=%g but is smoothed with sigma=%g", name, float(recorded), override)
    return override


@torch.no_grad()
def _log_probs(model, x: torch.Tensor, batch_size: int) -> np.ndarray:
    out = [torch.log_softmax(model(b).double(), dim=1) for b in x.split(batch_size)]
    return torch.cat(out).cpu().numpy()  # (N, K)


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


def _log_to_logger(logger, summary: dict, paths: dict, cfg: DictConfig) -> None:
    if not logger:
        return
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    for step, (alpha, metrics) in enumerate(summary["certified_accuracy"]["mix"].items()):
        clean = summary["clean_accuracy"]["mix"][alpha]
        logger.log_metrics({"cert/alpha": float(alpha), "cert/clean_acc": clean, **metrics}, step=step)
    final = {"cert/h_clean_acc": summary["clean_accuracy"]["h"], "cert/g_clean_acc": summary["clean_accuracy"]["g"],
             **summary["certified_accuracy"].get("baseline", {})}
    if summary["alpha_selection"]["alpha"] is not None:
        final["cert/selected_alpha"] = summary["alpha_selection"]["alpha"]
    logger.log_metrics(final, step=len(summary["certified_accuracy"]["mix"]))
    if type(logger).__name__ == "WandbLogger":
        import wandb

        logger.experiment.log({"cert/certified_accuracy": wandb.Image(str(paths["certified_accuracy.png"]))}
                              if "certified_accuracy.png" in paths else {})
    logger.save()
    logger.finalize("success")


def _vote_shard(payload: dict, start: int, stop: int, device: torch.device) -> list:
    """Votes of every smoothed model in ``payload["models"]`` on images [start, stop), sampled on `device`."""
    x, keys, s = payload["x"][start:stop].to(device), payload["keys"][start:stop], payload["settings"]
    out = []
    for model, sigma, votes, seed, mode in payload["models"]:
        smoothed = SmoothedClassifier(model.to(device), sigma, votes=votes, batch_size=s["batch_size"], seed=seed,
                                      workers=s["workers"], compile=s["compile"], autocast_dtype=s["autocast_dtype"])
        out.append(sample_votes(smoothed, x, s["n0"], s["n"], mode, s["soft_bound"], keys=keys))
    return out


def run(cfg: DictConfig) -> dict:
    """Validate, load, sample h once, certify every alpha (and the baseline), write the files; returns the summary.

    Skips the work when ``cfg.output_dir`` already holds a finished run of the same configuration
    (``resume: true``); ``distributed.devices: k`` samples the votes in k processes.
    """
    require_keys(cfg, "g_ckpt", "h_ckpt", "certify", "output_dir")
    if cfg.certify.get("require_baseline", False) or OmegaConf.is_missing(cfg.certify, "baseline_ckpt"):
        require_keys(cfg, "certify.baseline_ckpt")
    s = certify_settings(cfg)
    output_dir = Path(cfg.output_dir)
    device = resolve_device(str(cfg.get("device", "auto")))
    g, h = (load_classifier(cfg[k], map_location=device) for k in ("g_ckpt", "h_ckpt"))
    check_compatible(g, h)
    sigma = smoothing_sigma("h", h, s["sigma"])
    baseline, baseline_sigma = None, None
    if cfg.certify.get("baseline_ckpt"):
        baseline = load_classifier(cfg.certify.baseline_ckpt, map_location=device)
        check_compatible(g, baseline)
        baseline_sigma = smoothing_sigma("the baseline", baseline, s["baseline_sigma"])
    ckpts = [cfg.g_ckpt, cfg.h_ckpt] + ([cfg.certify.baseline_ckpt] if baseline is not None else [])
    fingerprint = run_fingerprint(cfg, *ckpts)
    files = ["certify.csv", "certified_accuracy.csv", "certify_summary.json"] + (
        ["certified_accuracy.png"] if cfg.get("plots", True) else []) + (
        ["baseline_certify.csv"] if baseline is not None else [])
    if cfg.get("resume", True) and finished_run(output_dir, fingerprint, files, marker="certify_summary.json"):
        summary = json.loads((output_dir / "certify_summary.json").read_text())
        return {"summary": summary, "certificate": None, "baseline": None, "files": summary["files"],
                "output_dir": str(output_dir), "skipped": True}
    (output_dir / "certify_summary.json").unlink(missing_ok=True)  # an old marker must not vouch for new files
    datamodule = resolve_data(cfg, {"g": g.record, "h": h.record})
    x, y, index = select_examples(cfg, datamodule, g)
    devices = check_devices(OmegaConf.select(cfg, "distributed.devices", default=1), device,
                            len(y))
    x, y = x.to(device), y.to(device)
    log.info("certifying %s (%s split, %d examples) on %s: sigma=%g, %s mode, n0=%d, n=%d, failure_prob=%g",
             datamodule.name, cfg.split, len(y), device, sigma, s["mode"], s["n0"], s["n"], s["failure_prob"])

    with finish_wandb():
        logger = build_logger(cfg, str(output_dir))
        timings = {}
        start = time.perf_counter()
        models = [(h, sigma, s["votes"], int(cfg.seed), s["mode"])]
        if baseline is not None:  # Cohen et al.'s CERTIFY: hard votes, selection samples
            models.append((baseline, baseline_sigma, "hard", int(cfg.seed) + 1, "sound"))
        if devices > 1:  # each process moves its copy to its own device
            models = [(m.cpu(), *rest) for m, *rest in models]
        payload = {"x": x.cpu() if devices > 1 else x, "keys": index.tolist(), "settings": s, "models": models}
        parts = run_sharded(_vote_shard, payload, len(y), devices, device)
        sampled = [concat_votes([p[i] for p in parts]) for i in range(len(models))]
        votes = sampled[0]
        timings["sample"] = time.perf_counter() - start
        labels = y.cpu().numpy()
        base_cert = None
        if baseline is not None:
            base_cert = certify_baseline(sampled[1], labels, baseline_sigma, s["failure_prob"])
        g_log_probs = _log_probs(g, x, int(cfg.get("batch_size", 500)))

        # alpha selection on a fine grid (cheap: no sampling), then certify the chosen alpha as well
        fine = sorted(set(np.round(np.arange(0.0, 1.0 + 1e-9, s["alpha_step"]), 10).tolist()) | set(s["alphas"]))
        fine_acc = clean_accuracy_by_alpha(g_log_probs, votes.probs, labels, fine)
        target = s["target_accuracy"] if s["target_accuracy"] is not None else (
            base_cert.clean_accuracy if base_cert is not None else None)
        selection = select_alpha(fine, fine_acc, target, s["alpha_method"])
        if selection["reason"]:
            (log.warning if target is not None else log.info)("alpha selection: %s", selection["reason"])
        alphas = sorted(set(s["alphas"]) | ({selection["alpha"]} if selection["alpha"] is not None else set()))
        with warnings.catch_warnings():  # alphas < 1/2 were warned about in certify_settings
            warnings.filterwarnings("ignore", message=r"alpha=.* < 1/2")
            cert = certify_mixture(votes, g_log_probs, labels, alphas, sigma, s["mode"], s["failure_prob"],
                                   s["bound"], s["soft_bound"], s["lipschitz"])
        grid = radius_grid(cert, base_cert, s["radius_max"], s["radius_points"])
        curves = curve_rows(cert, base_cert, grid)
        title = (f"{datamodule.name}, h sigma={sigma:g}, {s['mode']} ({s['votes']} votes, n={s['n']}"
                 + (f", failure_prob={s['failure_prob']:g}" if s["mode"] == "sound" else "") + f"), {len(labels)} images")
        paths = write_certify_results(output_dir, cert, index.numpy(), curves, base_cert, selection["alpha"],
                                      plots=bool(cfg.get("plots", True)), title=title)
        table = _accuracy_table(s["report_radii"], cert, base_cert)
        if selection["alpha"] is not None:
            selection["certified_accuracy"] = table["mix"][repr(float(selection["alpha"]))]
        summary = {
            "g_ckpt": str(cfg.g_ckpt), "h_ckpt": str(cfg.h_ckpt), "baseline_ckpt": cfg.certify.get("baseline_ckpt"),
            "data": datamodule.name, "split": cfg.split, "n_examples": len(labels), "device": str(device),
            "seed": int(cfg.seed), "sigma": sigma, "baseline_sigma": baseline_sigma,
            "settings": {k: v for k, v in s.items() if k not in ("sigma", "baseline_sigma")},
            "lipschitz_constant": s["lipschitz"] if s["lipschitz"] is not None else math.sqrt(2 / math.pi) / sigma,
            "baseline_radius": "Cohen et al.'s CERTIFY (sound) in both modes" if base_cert is not None else None,
            "clean_accuracy": {
                "g": float((g_log_probs.argmax(1) == labels).mean()),
                "h": float((votes.probs.argmax(1) == labels).mean()),
                "mix": {repr(float(a)): float(v) for a, v in zip(cert.alphas, cert.clean_accuracy)},
                "baseline": base_cert.clean_accuracy if base_cert is not None else None,
            },
            "alpha_selection": {**selection, "grid_accuracy": {repr(float(a)): float(v) for a, v in zip(fine, fine_acc)}},
            "certified_accuracy": table, "processes": devices, "fingerprint": fingerprint, "overrides": job_overrides(),
            "timings": timings, "files": {k: str(v) for k, v in paths.items()},
        }
        summary["files"]["certify_summary.json"] = str(output_dir / "certify_summary.json")
        _log_to_logger(logger, summary, paths, cfg)
        # last: its fingerprint marks the run finished (see resume)
        paths["certify_summary.json"] = write_json(output_dir / "certify_summary.json", summary)
        log.info("certification done (%.1f s sampling); selected alpha %s; results in %s",
                 sum(timings.values()), selection["alpha"], output_dir)
    return {"summary": summary, "certificate": cert, "baseline": base_cert, "files": summary["files"],
            "output_dir": str(output_dir), "skipped": False}
