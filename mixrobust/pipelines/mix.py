"""The mix task (``python evaluate.py``, ``task=mix``): sweep alpha under clean, STD, ROB, MIX and AutoAttack.

`settings` reads and checks every value the task uses (alphas, mixing options, attack names, the
attack, the threat, the checkpoints' records against each other and against the data) before
any model is loaded; `run` then loads the models, selects the images, runs the sweep engine
(`mixrobust.evaluation.run_sweep`, over ``distributed.devices`` processes) and writes the results
files (see `mixrobust.evaluation.report`) plus ``run.json``, written last: its fingerprint of the
configuration, checkpoint contents and code, and the checksums of the results files, let a re-run
skip a finished job (``resume``). Base-model outputs and STD / ROB images come from the shared
cache (``cache.*``).

Data: ``data=<name>`` picks conf/data/<name>.yaml (and, through ``data_threat``, that data set's
threat budget). Without it, the data set recorded in the checkpoints is composed by Hydra; if g
and h were trained on different data sets the run stops, asking for ``data=``. The split defaults
to the official test split, the one train.py tested on, so numbers line up with its metrics.json.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mixrobust.attacks import PGD, AdaptiveMixAttack, AutoAttack
from mixrobust.attacks.apgd import APGDLoss
from mixrobust.attacks.autoattack import IMPLEMENTATIONS
from mixrobust.errors import ConfigError
from mixrobust.evaluation import AttackName, MixOption, format_table, mix_options, read_results_csv, run_sweep, write_results
from mixrobust.evaluation.matched import format_matched
from mixrobust.evaluation.report import FILES
from mixrobust.evaluation.sweep import merge_results
from mixrobust.mixing import MixSpace, ROption, alphas_from_gammas, load_fit, parse_h_map
from mixrobust.mixing.maps import names_fit
from mixrobust.evaluation.options import option_key, option_text
from mixrobust.pipelines import inputs
from mixrobust.pipelines.fields import bounded, build, parse, plain
from mixrobust.runtime.cache import DiskCache
from mixrobust.runtime.loggers import is_wandb_logger, job_logger
from mixrobust.runtime.placement import placed_device
from mixrobust.runtime.resume import clear_marker, finished, fingerprint, with_examples, write_marker
from mixrobust.runtime.sharding import check_processes, map_shards
from mixrobust.threat import Threat

log = logging.getLogger(__name__)

MARKER = "run.json"


@dataclass(frozen=True)
class MapParams:
    """``mix.h_map_params``: the nonlinear map's parameters where ``mix.h_map`` names ``nonlinear``
    (`mixrobust.mixing.nonlinear_map`; a fitted map brings its own)."""

    scale: float = bounded(1.0, gt=0)
    power: float = bounded(1.0, gt=0)
    bias: float = 0.0
    top_k: int | None = bounded(None, ge=2)


@dataclass(frozen=True)
class MixKeys:
    """``mix.*``: the mixing weights (or eq. (3) smoothing strengths) and the R_i options swept."""

    alphas: tuple[float, ...] | None = bounded(None, ge=0, le=1, min_len=1)
    gammas: tuple[float, ...] | None = bounded(None, ge=0, allow_inf=True, min_len=1)
    r_options: tuple[ROption, ...] = bounded((ROption.ONE,), min_len=1)
    mix_spaces: tuple[MixSpace, ...] = bounded((MixSpace.PROB,), min_len=1)
    h_map: tuple[str, ...] = bounded(("identity",), min_len=1)
    h_map_params: MapParams = MapParams()
    detach_r: bool = False

    def __post_init__(self):
        if (self.alphas is None) == (self.gammas is None):
            raise ConfigError("set exactly one of mix.alphas (mixing weights in [0,1]) and mix.gammas (eq. (3) "
                              "smoothing strengths >= 0; alpha = gamma / (1 + gamma)); set the other to null")


@dataclass(frozen=True)
class SweepKeys:
    """The sweep's top-level switches: which attacks run on the mixture, and the evaluation hygiene."""

    attacks: tuple[AttackName, ...] = bounded((AttackName.STD, AttackName.ROB, AttackName.MIX, AttackName.APGD),
                                              min_len=1)
    skip_misclassified: bool = True
    preflight: bool = True
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class AdaptiveKeys:
    """``adaptive.*``: the adaptive attack on the mixture (``attacks: [..., apgd]``, `AdaptiveMixAttack`)."""

    steps: int = bounded(100, ge=1)
    losses: tuple[APGDLoss, ...] = bounded(("ce", "dlr", "dlr_targeted"), min_len=1)
    targets: int = bounded(5, ge=1)
    restarts: int = bounded(1, ge=1)
    random_start: bool = False
    surrogate: bool = False


@dataclass(frozen=True)
class AutoAttackKeys:
    """``autoattack.implementation``: which installed AutoAttack runs (see `mixrobust.attacks.autoattack`)."""

    implementation: IMPLEMENTATIONS = "auto"


@dataclass(frozen=True)
class FitsKeys:
    """``fits_dir``: where ``task=fit_map`` saves fitted maps by name and ``mix.h_map=<name>`` finds them."""

    fits_dir: Path | None = None


@dataclass(frozen=True)
class CacheKeys:
    enabled: bool = True
    dir: Path | None = None


@dataclass(frozen=True)
class MixSettings(inputs.EvaluationJob):
    """Everything the task does, checked (see `settings`)."""

    threat: Threat
    attack: PGD
    autoattack: AutoAttack | None
    adaptive: AdaptiveMixAttack | None
    alphas: tuple[float, ...]
    options: tuple[MixOption, ...]
    mix: MixKeys
    sweep: SweepKeys
    cache_dir: Path | None

    @property
    def fingerprint(self) -> str:
        """What the results depend on: the config (but certification's and job keys), the checkpoints' contents,
        the code, the data set and threat as resolved, and the AutoAttack implementation that runs. With a random
        start or AutoAttack (its random draws), the number of processes too: each shard draws its own, so the
        numbers are another draw."""
        unused = ("certify", "fit", "fits_dir") + (() if self.autoattack else ("autoattack",)) + (() if self.adaptive else ("adaptive",))
        random_start = (self.attack.random_start or bool(self.adaptive and self.adaptive.random_start)
                        or self.autoattack is not None)
        return fingerprint(inputs.numbers_config(self.config, unused), [self.g.path, self.h.path],
                           data=self.data.name, threat=self.threat.as_dict(), models=[self.g.identity, self.h.identity],
                           h_maps=[o.h_map.as_dict() for o in self.options],
                           autoattack=self.autoattack.provenance if self.autoattack else None,
                           processes=self.processes if random_start else None)


def attack(cfg: DictConfig, threat: Threat) -> PGD:
    """The ``attack`` node, built; its norm and eps must be the threat's (they follow it by default)."""
    pgd = build(cfg.attack, "attack")
    if (pgd.norm, pgd.eps) != (threat.norm, threat.eps):
        raise ConfigError(f"attack norm/eps ({pgd.norm.value}, {pgd.eps:g}) differ from the threat "
                          f"({threat.norm.value}, {threat.eps:g}); set them through threat.*")
    if getattr(pgd, "steps", 1) < 1:
        raise ConfigError("attack.steps must be >= 1: with 0 steps every attack returns the clean images and robust "
                          "accuracy would equal clean accuracy")
    inputs.warn_unreachable(pgd.steps, pgd.step_size, pgd.eps, pgd.random_start, "attack")
    return pgd


def settings(cfg: DictConfig) -> MixSettings:
    """Read and check the whole configuration of a mix job; no model is loaded, no image is read."""
    job, sweep = parse(inputs.JobKeys, cfg, strict=False), parse(SweepKeys, cfg, strict=False)
    mix, examples = parse(MixKeys, cfg.mix, "mix"), inputs.examples(cfg)
    cfg, g, h, data, threat = inputs.mixture_inputs(cfg)
    pgd = attack(cfg, threat)
    cache = parse(CacheKeys, cfg.cache, "cache")
    autoattack = None
    if AttackName.AUTOATTACK in sweep.attacks:
        implementation = parse(AutoAttackKeys, cfg.autoattack, "autoattack").implementation
        autoattack = AutoAttack(threat.norm, threat.eps, g.num_classes, seed=examples.seed,
                                implementation=implementation, batch_size=job.batch_size)
    adaptive = None
    if AttackName.APGD in sweep.attacks:
        keys = parse(AdaptiveKeys, cfg.adaptive, "adaptive")
        adaptive = AdaptiveMixAttack(threat.norm, eps=threat.eps, steps=keys.steps, losses=keys.losses,
                                     targets=keys.targets, restarts=keys.restarts, random_start=keys.random_start,
                                     seed=examples.seed, surrogate=keys.surrogate)
        if "dlr_targeted" in keys.losses and g.num_classes < 4 or "dlr" in keys.losses and g.num_classes < 3:
            raise ConfigError(f"adaptive.losses {list(keys.losses)}: the DLR losses need at least 3 classes (4 when "
                              f"targeted), these models have {g.num_classes}; use adaptive.losses=[ce]")
        if "dlr_targeted" in keys.losses and keys.targets > g.num_classes - 1:
            raise ConfigError(f"adaptive.targets={keys.targets}: these models have {g.num_classes} classes, so at most "
                              f"{g.num_classes - 1} other classes to target; set adaptive.targets<={g.num_classes - 1}")
    alphas = mix.alphas if mix.alphas is not None else tuple(alphas_from_gammas(list(mix.gammas)))
    fits_dir = parse(FitsKeys, cfg, strict=False).fits_dir
    fits = {m: load_fit(m, fits_dir) for m in mix.h_map if names_fit(m)}  # each fit file read once
    params = dataclasses.asdict(mix.h_map_params)
    maps = tuple(dict.fromkeys(parse_h_map(fits[m]["h_map"] if names_fit(m) else m, params) for m in mix.h_map))
    for m in maps:
        m.check_classes(g.num_classes)
    check_fits(fits, g, h, alphas)
    options = mix_options(mix.r_options, mix.mix_spaces, maps)
    return MixSettings(
        g=g, h=h, data=data, examples=examples, threat=threat, attack=pgd, autoattack=autoattack, adaptive=adaptive,
        alphas=tuple(sorted(set(alphas))), options=options, mix=mix, sweep=sweep, job=job,
        cache_dir=cache.dir if cache.enabled else None, device=inputs.device(cfg),
        processes=inputs.processes(cfg), logger=inputs.logger(cfg),
        config=plain(cfg))


def check_fits(fits: dict[str, dict], g, h, alphas) -> None:
    """For each fitted map that ``mix.h_map`` names (`fits`: name -> `load_fit` record): a warning if it was fitted
    on other base models (its alpha and estimates are theirs), and a note if its fitted alpha is not evaluated."""
    for name, fit in fits.items():
        fitted_on = fit.get("models")
        if fitted_on and fitted_on != {"g": g.identity, "h": h.identity}:
            log.warning("h_map %s (%s) was fitted on other base models than %s and %s: its map is evaluated as it is, "
                        "but its alpha and estimates belong to those; fit it on these with task=fit_map", name,
                        fit["path"], g.key, h.key)
        alpha = fit.get("alpha")
        if alpha is not None and not any(math.isclose(alpha, a, abs_tol=1e-9) for a in alphas):
            log.info("h_map %s was fitted at alpha %r, which the evaluated alphas leave out: add it to mix.alphas to "
                     "evaluate the fitted point", name, alpha)


@dataclass
class MixResult:
    rows: list[dict]
    files: dict[str, str]
    output_dir: Path
    seconds: float
    skipped: bool
    margins: dict | None = None

    def text(self) -> str:
        """The results table: one line per model, alpha and option, one column per attack; with linear and
        nonlinear mixing, the two at matched clean accuracy."""
        return "\n\n".join(t for t in (format_table(self.rows), format_matched(self.rows)) if t)


def _files(s: MixSettings) -> list[str]:
    maps = {(o.r_option, o.mix_space): set() for o in s.options}
    for o in s.options:
        maps[o.r_option, o.mix_space].add(o.h_map.identity)
    matched = ["matched.csv"] if max(s.alphas) > 0 and any(len(v) == 2 for v in maps.values()) else []
    return [f for f in FILES if s.job.plots or not f.endswith(".png")] + matched


def _sweep(s: MixSettings, device, cache: DiskCache | None):
    """The sweep engine with every setting bound: ``fn(x, y, index, device=...)`` (one process's shard)."""
    g, h = (f.load(device if s.processes == 1 else "cpu") for f in (s.g, s.h))
    return functools.partial(
        run_sweep, g, h, alphas=s.alphas, attack=s.attack, options=s.options, attacks=[a.value for a in s.sweep.attacks],
        autoattack=s.autoattack, adaptive=s.adaptive, batch_size=s.job.batch_size, skip_misclassified=s.sweep.skip_misclassified,
        detach_r=s.mix.detach_r, preflight=s.sweep.preflight, cache=cache, channels_last=s.sweep.channels_last,
        compile=s.sweep.compile)


def run(cfg: DictConfig) -> MixResult:
    """Check, load, sweep, write the results files; a finished job of the same fingerprint is skipped."""
    s = settings(cfg)
    x, y, index = s.examples.select(s.data)
    out, fp, files = s.job.output_dir, with_examples(s.fingerprint, x, y, index), _files(s)
    if s.job.resume and finished(out, MARKER, fp, files):
        return inputs.logged(MixResult(read_results_csv(out / "results.csv"), {f: str(out / f) for f in files}, out,
                                       0.0, True), log)
    clear_marker(out, MARKER)
    cache = DiskCache(s.cache_dir) if s.cache_dir is not None else None
    with placed_device(s.device, s.processes) as device, job_logger(s.logger, out, "mix") as logger:
        sweep = _sweep(s, device, cache)
        check_processes(s.processes, device, len(y))
        log.info("evaluating %s (%s split, %d examples) on %s%s: %s", s.data.name, s.examples.split, len(y), device,
                 f" x {s.processes} processes" if s.processes > 1 else "", s.attack)
        start = time.perf_counter()
        result = merge_results(map_shards(sweep, [x, y, index], device, s.processes))
        seconds = time.perf_counter() - start
        result.outcomes.meta["models"] = {"g": s.g.label, "h": s.h.label}
        paths = write_results(out, result, plots=s.job.plots)
        _log(logger, result.rows(), paths, {**s.config, "implementations": result.outcomes.meta["implementations"],
                                            "models": {"g": s.g.identity, "h": s.h.identity}})
        write_marker(out, MARKER, _marker(s, result, len(y), device, seconds, cache), fp, list(paths))
        log.info("sweep done in %.1f s; results in %s", seconds, out)
    return inputs.logged(MixResult(result.rows(), {k: str(v) for k, v in paths.items()}, out, seconds, False,
                                   result.margins), log)



def _marker(s: MixSettings, result, n: int, device, seconds: float, cache: DiskCache | None) -> dict:
    return {
        "g_ckpt": str(s.g.path), "h_ckpt": str(s.h.path), "data": s.data.name, "split": s.examples.split, "n": n,
        "threat": s.threat.as_dict(), "attack": repr(s.attack), "autoattack": repr(s.autoattack),
        "adaptive": repr(s.adaptive),
        "implementations": result.outcomes.meta["implementations"],
        "device": str(device), "processes": s.processes, "seconds": seconds, "timings": result.timings,
        "warnings": result.warnings, "g_record": s.g.record, "h_record": s.h.record,
        # hits and misses are counted in this process (with several processes, in theirs: not here)
        "cache": None if cache is None else {"dir": str(cache.root), "hits": cache.hits if s.processes == 1 else None,
                                             "misses": cache.misses if s.processes == 1 else None},
    }


def _log(logger, rows: list[dict], paths: dict, config: dict) -> None:
    """Per-alpha metrics (``eval/<option>/<attack>_acc``), the base models' rows, and on W&B the table and plots."""
    if not logger:
        return
    logger.log_hyperparams(config)
    alphas = sorted({r["alpha"] for r in rows if r["model"] == "mix"})
    for step, alpha in enumerate(alphas):
        metrics = {f"eval/{option_text(option_key(r)).replace('/', '_')}/{r['attack']}_acc": r["accuracy"]
                   for r in rows if r["model"] == "mix" and r["alpha"] == alpha}
        logger.log_metrics({"eval/alpha": alpha, **metrics}, step=step)
    logger.log_metrics({f"eval/{r['model']}/{r['attack']}_acc": r["accuracy"] for r in rows if r["model"] != "mix"},
                       step=len(alphas))
    if is_wandb_logger(logger):
        import wandb

        table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        images = {f"eval/{Path(p).stem}": wandb.Image(str(p)) for k, p in paths.items() if k.endswith(".png")}
        logger.experiment.log({"eval/results": table, **images})
    logger.save()
    logger.finalize("success")
