"""Sweep the mixture of two checkpoints over alpha: ``run(cfg)`` is what ``python evaluate.py`` calls.

Order of work: every config value is validated (alphas, mixing options, attack names, the
AutoAttack implementation), then both checkpoints are loaded and checked against each other
(class count, input shape, data set) and against the evaluation data, and only then does the
first attack run. Results go to ``cfg.output_dir`` (see `mixrobust.evaluation.report`), plus
``run.json`` (what was evaluated, warnings, timings, cache use), written last: its fingerprint of
the configuration and checkpoint contents lets a re-run skip a finished job (``resume``).
Base-model outputs and STD / ROB images come from the shared cache (``cache.*``,
`mixrobust.evaluation.cache`), and ``distributed.devices: k`` splits the examples over k
processes (`mixrobust.pipelines.distributed`).

Data: ``data=<name>`` picks conf/data/<name>.yaml (and, through ``data_threat``, that data
set's threat budget). Without it, the data set recorded in the checkpoints is used, with its
conf/data/<name>.yaml and conf/data_threat/<name>_<norm>.yaml; if g and h were trained on
different data sets the choice is ambiguous and the run stops, asking for ``data=``. An explicit
``data=`` that differs from a checkpoint's data set is allowed (e.g. a model trained on a
superset), with a warning. The split defaults to the official test split, the one train.py
tested on, so numbers line up with its metrics.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mixrobust.atomic import write_json
from mixrobust.checkpoint import load_classifier
from mixrobust.data import subset_indices
from mixrobust.errors import ConfigError
from mixrobust.attacks import AutoAttack
from mixrobust.evaluation import (
    AttackName,

    format_table,
    mix_options,
    parse_attacks,
    read_results_csv,
    run_sweep,
    write_results,
)
from mixrobust.evaluation.report import FILES
from mixrobust.evaluation.sweep import merge_results
from mixrobust.mixing import alphas_from_gammas, check_compatible
from mixrobust.mixing.options import check_alphas
from mixrobust.pipelines.common import (
    build_cache,
    build_logger,
    finish_wandb,
    finished_run,
    job_overrides,
    log,
    require_keys,
    run_fingerprint,
)
from mixrobust.pipelines.distributed import check_devices, run_sharded
from mixrobust.threat import Norm, Threat

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda if available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...): {err}") from None


def sweep_settings(cfg: DictConfig) -> dict:
    """Validated alphas, mixing options and attack names from ``cfg.mix`` and ``cfg.attacks``."""
    mix = cfg.mix
    alphas, gammas = mix.get("alphas"), mix.get("gammas")
    if (alphas is None) == (gammas is None):
        raise ConfigError("set exactly one of mix.alphas (mixing weights in [0,1]) and mix.gammas "
                          "(eq. (3) smoothing strengths >= 0; alpha = gamma / (1 + gamma))")
    if gammas is not None:
        alphas = alphas_from_gammas(list(gammas))
    alphas, _ = check_alphas(list(alphas))
    attacks = parse_attacks(list(cfg.attacks))
    if not attacks:
        raise ConfigError(f"attacks is empty; valid values: {', '.join(a.value for a in AttackName)}")
    return {"alphas": sorted(set(alphas)), "options": mix_options(list(mix.r_options), list(mix.mix_spaces)),
            "attacks": attacks, "detach_r": bool(mix.get("detach_r", False))}


def _fill_threat(cfg: DictConfig, name: str) -> None:
    """Fill threat.eps / step_size left null from conf/data_threat/<name>_<norm>.yaml."""
    norm = Norm.parse(cfg.threat.norm).value
    path = CONF_DIR / "data_threat" / f"{name}_{norm}.yaml"
    defaults = OmegaConf.load(path).get("threat", {}) if path.is_file() else {}
    with open_dict(cfg):
        for key in ("eps", "step_size"):
            if cfg.threat.get(key) is None and defaults.get(key) is not None:
                cfg.threat[key] = defaults[key]


def resolve_data(cfg: DictConfig, records: dict[str, dict]):
    """The data module to evaluate on (see the module docstring); fills ``cfg.data`` / ``cfg.threat``."""
    trained_on = {k: r.get("data") for k, r in records.items()}
    if cfg.get("data") is None:
        if None in trained_on.values() or trained_on["g"] != trained_on["h"]:
            raise ConfigError(
                f"g was trained on {trained_on['g']!r} and h on {trained_on['h']!r}: choose the evaluation data "
                "explicitly with data=<name> (e.g. data=digits)"
            )
        name = trained_on["g"]
        path = CONF_DIR / "data" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"the checkpoints were trained on {name!r} but there is no {path}; pass data=<name>")
        with open_dict(cfg):
            cfg.data = OmegaConf.load(path)
        _fill_threat(cfg, name)
    datamodule = instantiate(cfg.data)
    for model, name in trained_on.items():
        if name is not None and name != datamodule.name:
            log.warning("%s was trained on %r but is evaluated on %r (data=%s)", model, name, datamodule.name,
                        datamodule.name)
    return datamodule


def build_threat(cfg: DictConfig, h_record: dict) -> Threat:
    """The threat (norm, eps, step size); warns if h was trained against a different one."""
    missing = [k for k in ("eps", "step_size") if cfg.threat.get(k) is None]
    if missing:
        raise ConfigError(f"threat.{missing[0]} is not set and this data set has no default for "
                          f"norm {cfg.threat.norm}; pass threat.{missing[0]}=...")
    threat = Threat(**OmegaConf.to_container(cfg.threat, resolve=True))
    trained = h_record.get("threat")
    if trained and (trained.get("norm") != threat.norm.value or abs(float(trained.get("eps", -1)) - threat.eps) > 1e-9):
        log.warning("h was trained against %s eps=%g but is evaluated at %s eps=%g",
                    trained.get("norm"), float(trained.get("eps", float("nan"))), threat.norm.value, threat.eps)
    return threat


def select_examples(cfg: DictConfig, datamodule, g) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels and split indices of the evaluated subset (first n, or n per class)."""
    x, y = datamodule.eval_tensors(cfg.split)
    index = subset_indices(y, n=cfg.get("n"), n_per_class=cfg.get("n_per_class"), seed=cfg.seed)
    x, y = x[index], y[index]
    if tuple(x.shape[1:]) != tuple(g.input_shape):
        raise ConfigError(f"the {datamodule.name} {cfg.split} images have shape {tuple(x.shape[1:])} but the "
                          f"models take {tuple(g.input_shape)}; pass the data set they were trained on (data=...)")
    return x, y, index


def _log_to_logger(logger, rows: list[dict], paths: dict, cfg: DictConfig) -> None:
    if not logger:
        return
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    alphas = sorted({r["alpha"] for r in rows if r["model"] == "mix"})
    for step, alpha in enumerate(alphas):
        metrics = {f"eval/{r['r_option']}_{r['mix_space']}/{r['attack']}_acc": r["accuracy"]
                   for r in rows if r["model"] == "mix" and r["alpha"] == alpha}
        logger.log_metrics({"eval/alpha": alpha, **metrics}, step=step)
    logger.log_metrics({f"eval/{r['model']}/{r['attack']}_acc": r["accuracy"] for r in rows if r["model"] != "mix"},
                       step=len(alphas))
    if type(logger).__name__ == "WandbLogger":
        import wandb

        table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        images = {f"eval/{Path(p).stem}": wandb.Image(str(p)) for k, p in paths.items() if k.endswith(".png")}
        logger.experiment.log({"eval/results": table, **images})
    logger.save()
    logger.finalize("success")


def _sweep_shard(payload: dict, start: int, stop: int, device: torch.device):
    """`run_sweep` on examples [start, stop) (one process's shard), models moved to `device`."""
    g, h = payload["g"].to(device), payload["h"].to(device)
    part = slice(start, stop)
    return run_sweep(g, h, payload["x"][part], payload["y"][part], index=payload["index"][part], **payload["kwargs"])


def run(cfg: DictConfig) -> dict:
    """Validate, load, sweep, write the results files; returns rows, margins and file paths.

    Skips the work when ``cfg.output_dir`` already holds a finished run of the same configuration
    (``resume: true``, the default; see `mixrobust.pipelines.common.finished_run`).
    """
    require_keys(cfg, "g_ckpt", "h_ckpt", "threat", "attack", "mix", "output_dir")
    output_dir = Path(cfg.output_dir)
    settings = sweep_settings(cfg)
    device = resolve_device(str(cfg.get("device", "auto")))
    g, h = (load_classifier(cfg[k], map_location=device) for k in ("g_ckpt", "h_ckpt"))
    check_compatible(g, h)
    # fills data and the threat's defaults (conf/data_threat) first: the fingerprint must cover them
    datamodule = resolve_data(cfg, {"g": g.record, "h": h.record})
    fingerprint = run_fingerprint(cfg, cfg.g_ckpt, cfg.h_ckpt)
    files = [f for f in FILES if f.endswith(".png") <= bool(cfg.get("plots", True))]
    if cfg.get("resume", True) and finished_run(output_dir, fingerprint, files):
        rows = read_results_csv(output_dir / "results.csv")
        return {"rows": rows, "margins": None, "files": {f: str(output_dir / f) for f in files}, "seconds": 0.0,
                "output_dir": str(output_dir), "skipped": True}
    (output_dir / "run.json").unlink(missing_ok=True)  # an old run's marker must not vouch for new files
    threat = build_threat(cfg, h.record)
    attack = instantiate(cfg.attack)
    if (attack.norm, attack.eps) != (threat.norm, threat.eps):
        raise ConfigError(f"attack norm/eps ({attack.norm.value}, {attack.eps}) differ from the threat "
                          f"({threat.norm.value}, {threat.eps}); set them through threat.*")
    autoattack = None
    if AttackName.AUTOATTACK in settings["attacks"]:
        autoattack = AutoAttack(threat.norm, threat.eps, g.num_classes, seed=cfg.seed,
                                implementation=cfg.autoattack.implementation, batch_size=cfg.batch_size)
    x, y, index = select_examples(cfg, datamodule, g)
    devices = check_devices(OmegaConf.select(cfg, "distributed.devices", default=1), device,
                            len(y))
    cache = build_cache(cfg)
    log.info("evaluating %s (%s split, %d examples) on %s%s: %s", datamodule.name, cfg.split, len(y), device,
             f" x {devices} processes" if devices > 1 else "", attack)
    if devices > 1:  # each process moves its copy to its own device; none should land on g's GPU first
        g, h = g.cpu(), h.cpu()
    payload = {"g": g, "h": h, "x": x, "y": y, "index": index.numpy(), "kwargs": dict(
        alphas=settings["alphas"], attack=attack, options=settings["options"],
        attacks=[a.value for a in settings["attacks"]], autoattack=autoattack, batch_size=int(cfg.batch_size),
        skip_misclassified=bool(cfg.skip_misclassified), detach_r=settings["detach_r"],
        preflight=bool(cfg.preflight), cache=cache)}

    with finish_wandb():
        logger = build_logger(cfg, str(output_dir))
        start = time.perf_counter()
        parts = run_sharded(_sweep_shard, payload, len(y), devices, device)
        result = parts[0] if len(parts) == 1 else merge_results(parts)
        seconds = time.perf_counter() - start
        paths = write_results(output_dir, result, plots=bool(cfg.get("plots", True)))
        rows = result.rows()
        _log_to_logger(logger, rows, paths, cfg)
        write_json(output_dir / "run.json", {  # last: its fingerprint marks the run finished (see resume)
            "g_ckpt": str(cfg.g_ckpt), "h_ckpt": str(cfg.h_ckpt), "data": datamodule.name, "split": cfg.split,
            "n": len(y), "threat": threat.as_dict(), "attack": repr(attack), "autoattack": repr(autoattack),
            "device": str(device), "processes": devices, "seconds": seconds, "timings": result.timings,
            "warnings": result.warnings, "g_record": g.record, "h_record": h.record, "fingerprint": fingerprint,
            # hits and misses are counted in this process (with several processes, in theirs: not here)
            "cache": None if cache is None else {"dir": str(cache.root), "hits": cache.hits if devices == 1 else None,
                                                 "misses": cache.misses if devices == 1 else None},
            "overrides": job_overrides(),
        })
        log.info("sweep done in %.1f s; results in %s\n%s", seconds, output_dir, format_table(rows))
    return {"rows": rows, "margins": result.margins, "files": {k: str(v) for k, v in paths.items()},
            "seconds": seconds, "output_dir": str(output_dir), "skipped": False}
