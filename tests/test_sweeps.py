"""Sweeps at scale: every config composes and instantiates, the shared cache changes no number,
sharded (DDP) evaluation equals one process, and Hydra multiruns are checked job by job before any
runs, resume, report, run in parallel and log one offline W&B run per job, grouped by sweep.

The multirun tests run ``evaluate.py -m`` as a user would, in subprocesses, on two small digits
checkpoints trained here; their numbers are compared with an uninterrupted sequential sweep.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from mixrobust import load_classifier
from mixrobust.attacks import PGD
from mixrobust.data import DigitsDataModule
from mixrobust.errors import DataNotFoundError
from mixrobust.evaluation import run_sweep
from mixrobust.pipelines import certify, mix, train
from mixrobust.pipelines.fields import build  # re-raises our own errors unwrapped
from mixrobust.runtime.cache import DiskCache
from mixrobust.runtime.sharding import shard_bounds
from tests.conftest import CONF_DIR, compose_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["trainer.enable_progress_bar=false", "logger=none", "trainer.max_epochs=3", "val_attack_steps=2",
              "test_attack_steps=2"]
THREAT = ["threat.eps=0.1", "threat.step_size=0.05"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Digits g (standard) and h (PGD-AT l_inf 0.1, 2 steps), a few epochs each."""
    out = {}
    for name, extra in (("g", ["objective=standard", "optimizer=adamw", "optimizer.lr=3e-3"]),
                        ("h", ["objective=pgd_at", "objective.steps=2", *THREAT])):
        cfg = compose_config("train", [*TRAIN_FAST, *extra], tmp_path_factory.mktemp(name))
        out[name] = train.run(cfg).metrics["best_checkpoint"]
    return out


# --- every config composes and every _target_ instantiates ---------------------------------------

def _targets(node, path=""):
    """(path, node) of every mapping with a _target_ in a config tree."""
    if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing()):
        return
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from _targets(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _targets(item, f"{path}[{i}]")


def _instantiate_all(cfg: DictConfig, where: str, save_dir: Path) -> int:
    """Instantiate every _target_ as the pipelines and Hydra do; returns how many there were."""
    count = 0
    for path, node in _targets(cfg):
        count += 1
        try:
            if path.startswith("hydra."):
                _plugin(node)
            elif path == "logger":
                build(node, path, save_dir=str(save_dir))
            elif path == "trainer":
                _trainer(node)
            else:
                build(node, path, _convert_="all")
        except DataNotFoundError:  # the data module was built and checked its (absent) folder
            assert path == "data", f"{where}: {path} needs data files"
    return count


def _trainer(node):
    """The Lightning Trainer of a train config (its extras removed, as train.run does); a GPU trainer
    on a machine without one: its arguments are checked against Trainer's signature instead."""
    import inspect

    import lightning.pytorch as L

    from mixrobust.pipelines.train import TRAINER_EXTRAS

    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in TRAINER_EXTRAS}
    assert get_class(kwargs.pop("_target_")) is L.Trainer
    if kwargs.get("accelerator") == "gpu" and not torch.cuda.is_available():
        inspect.signature(L.Trainer).bind(**kwargs)
    else:
        L.Trainer(**kwargs, logger=False, enable_checkpointing=False)


def _plugin(node):
    """Build a Hydra launcher, sweeper or callback as Hydra does: its class, called with the node's keys."""
    if "submitit" in node._target_:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    kwargs = OmegaConf.to_container(node, resolve=True)
    return get_class(kwargs.pop("_target_"))(**kwargs)


@pytest.fixture(autouse=True)
def _no_hydra_job_left_behind():
    """`_compose` installs its config as the running Hydra job's; later tests must not see it."""
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


def _compose(primary: str, overrides: list[str]) -> DictConfig:
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()  # compose_config (conftest) leaves Hydra initialized on conf/
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=primary, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a job
    return cfg


REQUIRED = ["g_ckpt=g.ckpt", "h_ckpt=h.ckpt"]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")
                                               if not p.stem.startswith("study_")))  # tests/test_study.py: each stage
def test_every_experiment_and_sweep_composes_and_instantiates(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXROBUST_DATA_ROOT", os.environ.get("MIXROBUST_DATA_ROOT", str(tmp_path)))
    primary = "train" if experiment.startswith("train_") else "evaluate"
    base = [f"experiment={experiment}", f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}"]
    if primary == "evaluate":  # the values a user must give: checkpoints (and a certification baseline)
        base += REQUIRED
        if _compose(primary, base).task == "certify":
            base.append("certify.baseline_ckpt=b.ckpt")
    cfg = _compose(primary, base)
    assert _instantiate_all(cfg, experiment, tmp_path) >= 3  # data (or model...), launcher, sweeper at least
    assert not OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    # every job of the recorded sweep composes too: each swept value at least once
    params = cfg.hydra.sweeper.params or {}
    if primary == "evaluate" and experiment.endswith(("_certify", "fig3")):
        assert cfg.task == "certify"
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        assert len(values) >= 2, f"{experiment}: {override.key_or_group} sweeps one value"
        for value in values:
            job = _compose(primary, [*base, f"{override.key_or_group}={value}"])
            _instantiate_all(job, f"{experiment} {override.key_or_group}={value}", tmp_path)


@pytest.mark.parametrize("launcher", ["basic", "joblib", "local_cpus", "local_gpus", "slurm"])
def test_every_launcher_composes_and_instantiates(launcher, tmp_path):
    cfg = _compose("evaluate", [f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}", *REQUIRED])
    _plugin(cfg.hydra.launcher)
    if launcher == "local_gpus":
        assert cfg.hydra.launcher.n_jobs == max(1, torch.cuda.device_count())


# --- the shared cache ----------------------------------------------------------------------------

def _digits(n: int):
    x, y = DigitsDataModule().eval_tensors("test")
    return x[:n], y[:n]


def test_cache_changes_no_number_and_serves_later_sweeps(ckpts, tmp_path, caplog):
    g, h = load_classifier(ckpts["g"]), load_classifier(ckpts["h"])
    x, y = _digits(90)
    attack = PGD(norm="linf", eps=0.1, step_size=0.05, steps=4)
    kw = dict(attack=attack, batch_size=32, preflight=False)
    plain = {a: run_sweep(g, h, x, y, alphas=[a], **kw) for a in (0.3, 0.6)}
    cache = DiskCache(tmp_path / "cache")
    first = run_sweep(g, h, x, y, alphas=[0.3], cache=cache, **kw)
    assert (cache.hits, cache.misses) == (0, 4)  # clean logits of g and of h, STD, ROB
    second = run_sweep(g, h, x, y, alphas=[0.6], cache=cache, **kw)
    assert (cache.hits, cache.misses) == (4, 4)  # nothing but the MIX attack was recomputed
    # entries are per model: with another h, g's clean logits and STD images are read back
    other_h = copy.deepcopy(h)
    with torch.no_grad():
        next(other_h.parameters()).mul_(1.01)
    with_other_h = run_sweep(g, other_h, x, y, alphas=[0.6], cache=cache, **kw)
    assert (cache.hits, cache.misses) == (6, 6)
    assert with_other_h.rows() == run_sweep(g, other_h, x, y, alphas=[0.6], **kw).rows()
    for cached, ref in ((first, plain[0.3]), (second, plain[0.6])):
        assert cached.rows() == ref.rows()
        for key, value in ref.outcomes.mix.items():
            assert np.array_equal(cached.outcomes.mix[key], value)
        assert cached.margins == ref.margins
    # a corrupt entry is detected and recomputed, with the same numbers
    for path in (tmp_path / "cache").glob("adversarial-*.safetensors"):
        path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again = run_sweep(g, h, x, y, alphas=[0.6], cache=cache, **kw)
    assert "adversarial-" in caplog.text and again.rows() == plain[0.6].rows()
    # the cache key covers the attack: other settings are computed, not served
    other = run_sweep(g, h, x, y, alphas=[0.6], cache=cache, attack=PGD(norm="linf", eps=0.05, step_size=0.05, steps=4),
                      batch_size=32, preflight=False)
    assert other.rows() != plain[0.6].rows()


def test_cache_extends_entries_when_a_job_attacks_more_examples(ckpts, tmp_path):
    """skip_misclassified makes the attacked set depend on alpha; the entry grows to the union."""
    g, h = load_classifier(ckpts["g"]), load_classifier(ckpts["h"])
    x, y = _digits(120)
    attack = PGD(norm="linf", eps=0.1, step_size=0.05, steps=3)
    cache = DiskCache(tmp_path / "cache")
    kw = dict(attack=attack, batch_size=50, preflight=False)
    sub = run_sweep(g, h, x[:60], y[:60], alphas=[0.5], **kw)  # an unrelated entry (other data)
    for alphas in ([0.5], [0.0, 0.9]):
        got = run_sweep(g, h, x, y, alphas=alphas, cache=cache, **kw)
        assert got.rows() == run_sweep(g, h, x, y, alphas=alphas, **kw).rows()
    assert sub.outcomes.n == 60


# --- sharded evaluation ----------------------------------------------------------------------------

def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def test_shard_bounds_cover_every_example_once():
    for n in (1, 7, 61, 100):
        for world in range(1, min(n, 5) + 1):
            bounds = shard_bounds(n, world)
            sizes = [b - a for a, b in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == n and max(sizes) - min(sizes) <= 1
            assert all(a2 == b1 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))


@pytest.mark.slow
def test_two_process_evaluation_and_certification_equal_one_process(ckpts, tmp_path):
    """DDP on two gloo processes, 61 examples (not divisible by 2): the same per-example results."""
    common = [f"g_ckpt={ckpts['g']}", f"h_ckpt={ckpts['h']}", "logger=none", "n=61", "attack.steps=4", "adaptive.steps=4",
              "device=cpu", "mix.alphas=[0.0,0.5,0.8]", "mix.r_options=[one,grad_g_i]", "cache.enabled=false", *THREAT]
    out = {}
    for devices in (1, 2):
        cfg = compose_config("evaluate", [*common, f"distributed.devices={devices}"], tmp_path / f"mix{devices}")
        out[devices] = mix.run(cfg)
    one, two = (np.load(tmp_path / f"mix{d}" / "outcomes.npz") for d in (1, 2))
    assert one.files == two.files
    for key in one.files:
        assert np.array_equal(one[key], two[key]), key
    assert out[1].rows == out[2].rows
    # margins are means of float32 probability gaps: equal up to the rounding of other batch shapes
    flat = [_flatten(out[d].margins) for d in (1, 2)]
    assert flat[0].keys() == flat[1].keys()
    for key, value in flat[0].items():
        if isinstance(value, float):
            assert flat[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
        else:
            assert flat[1][key] == value, key
    assert json.loads((tmp_path / "mix2" / "run.json").read_text())["processes"] == 2

    cert = [f"g_ckpt={ckpts['g']}", f"h_ckpt={ckpts['h']}", "logger=none", "experiment=digits_certify", "n=21",
            "certify.n0=20", "certify.n=200", "certify.sigma=0.25", "device=cpu", "plots=false"]
    for devices in (1, 2):
        certify.run(compose_config("evaluate", [*cert, f"distributed.devices={devices}"], tmp_path / f"cert{devices}"))
    assert (tmp_path / "cert1" / "certify.csv").read_text() == (tmp_path / "cert2" / "certify.csv").read_text()


# --- multiruns as a user runs them ---------------------------------------------------------------

def _sweep_cmd(ckpts, sweep_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "evaluate.py"), "-m", "experiment=digits_sweep", f"g_ckpt={ckpts['g']}",
            f"h_ckpt={ckpts['h']}", "n=80", "attack.steps=4", "adaptive.steps=4", *THREAT, "mix.alphas=[0.4],[0.7],[1.0]",
            "mix.r_options=[one]", "logger=none", f"hydra.sweep.dir={sweep_dir}", *extra]


#: The job folders of `_sweep_cmd`'s grid: the job number and its values on the grid's axes (hydra.sweep.subdir).
JOBS = ("0_alphas=0.4,r_options=one", "1_alphas=0.7,r_options=one", "2_alphas=1.0,r_options=one")


def _env(cache_dir: Path) -> dict:
    return {**os.environ, "MIXROBUST_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(cmd, env):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _numbers(report_csv: Path) -> str:
    return report_csv.read_text()


@pytest.mark.slow
def test_sweep_report_resume_after_kill_and_joblib_give_identical_numbers(ckpts, tmp_path):
    """A sweep killed as soon as its first job finished, then re-run with the same command, completes only the
    missing jobs and reports the numbers of an uninterrupted sweep (two joblib workers, another cache, run meanwhile:
    one torch thread per process)."""
    parallel, log = tmp_path / "parallel", tmp_path / "parallel.log"
    with open(log, "w") as out:
        uninterrupted = subprocess.Popen(_sweep_cmd(ckpts, parallel, "hydra/launcher=local_cpus",
                                                    "hydra.launcher.n_jobs=2"), env=_env(tmp_path / "cache2"),
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    env = _env(tmp_path / "cache")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_sweep_cmd(ckpts, killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / JOBS[0] / "run.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / JOBS[0] / "run.json").exists() and not (killed / "report" / "combined.csv").exists()
    finished_before = json.loads((killed / JOBS[0] / "run.json").read_text())["fingerprint"]
    stamp = (killed / JOBS[0] / "results.csv").stat().st_mtime_ns
    out = _run(_sweep_cmd(ckpts, killed), env)
    assert "already holds this run's results: skipped" in out.stderr + out.stdout
    assert (killed / JOBS[0] / "results.csv").stat().st_mtime_ns == stamp  # job 0 was not redone
    assert json.loads((killed / JOBS[0] / "run.json").read_text())["fingerprint"] == finished_before
    combined = killed / "report" / "combined.csv"
    lines = combined.read_text().splitlines()
    assert lines[0].startswith("job,overrides,model,alpha") and len(lines) == 1 + 3 * (10 + 6)  # 3 jobs: g, h x 5; one alpha x 6
    assert (killed / "report" / "accuracy_vs_alpha.png").is_file() and (killed / "report" / "tradeoff.png").is_file()
    assert sorted(p.name for p in killed.iterdir() if p.is_dir()) == [*JOBS, "report"]
    assert json.loads((killed / JOBS[0] / "run.json").read_text())["cache"]["hits"] == 0
    assert json.loads((killed / JOBS[2] / "run.json").read_text())["cache"]["hits"] >= 3  # STD, ROB from job 0

    # uninterrupted, on the joblib launcher with two worker processes: the same numbers
    assert uninterrupted.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert _numbers(parallel / "report" / "combined.csv") == _numbers(combined)

    # a later launch with a smaller grid into the same folder: its report leaves the old jobs out
    _run(_sweep_cmd(ckpts, killed)[:-4] + ["mix.alphas=[0.4]", "mix.r_options=[one]", "logger=none",
                                            f"hydra.sweep.dir={killed}"], env)
    jobs = json.loads((killed / "report" / "jobs.json").read_text())
    assert [j["job"] for j in jobs["completed"]] == [JOBS[0]] and [j["job"] for j in jobs["stale"]] == list(JOBS[1:])


def test_checked_sweeper_stops_a_grid_with_one_bad_job_before_any_job_runs(ckpts, tmp_path):
    """hydra/sweeper=checked: a bad value at one grid point (job 1) stops the sweep before job 0 starts, with one
    message naming the job, and no traceback."""
    sweep = tmp_path / "bad"
    cmd = _sweep_cmd(ckpts, sweep)
    cmd[cmd.index("mix.alphas=[0.4],[0.7],[1.0]")] = "mix.alphas=[0.4],[1.5]"
    proc = subprocess.run(cmd, env=_env(tmp_path / "cache"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "job 1 of 2 (mix.alphas=[1.5] " in proc.stderr and "checked before any job ran" in proc.stderr
    assert "mix.alphas[0] must be a number >= 0 and <= 1, got 1.5" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not sweep.exists() or not any(p.is_dir() for p in sweep.iterdir())  # no job folder, no report

    # a second launch into a sweep folder in use stops before Hydra records it there
    from mixrobust.runtime.files import hold_folder

    busy = tmp_path / "busy"
    with hold_folder(busy, "-"):
        proc = subprocess.run(_sweep_cmd(ckpts, busy), env=_env(tmp_path / "cache"), cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    assert f"another run (pid {os.getpid()} on " in proc.stderr and f"is writing into {busy}" in proc.stderr
    assert "hydra.sweep.dir=<folder>" in proc.stderr
    assert [p.name for p in busy.iterdir()] == [".mixrobust.lock"]  # no multirun.yaml, no job folder


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb2.Record()
            record.ParseFromString(buf)
            yield record


@pytest.mark.slow
def test_wandb_offline_one_run_per_job_grouped_by_sweep(ckpts, tmp_path):
    sweep = tmp_path / "wb"
    cmd = [c for c in _sweep_cmd(ckpts, sweep) if c != "logger=none"]
    cmd[cmd.index("mix.alphas=[0.4],[0.7],[1.0]")] = "mix.alphas=[0.4],[0.7]"
    env = {**_env(tmp_path / "cache"), "WANDB_MODE": "", "WANDB_API_KEY": ""}
    _run([*cmd, "logger=wandb"], env)
    runs = {}
    for job in JOBS[:2]:
        files = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, f"job {job}: {files}"
        records = list(_wandb_records(files[0]))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        keys = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
                for i in r.history.item}
        runs[job] = run
        assert run.run_group == str(sweep) and "mix" in run.tags
        assert run.display_name == job  # the job folder's name: its number and grid values
        assert "eval/results/_type" in keys  # the results table
    assert runs[JOBS[0]].run_id != runs[JOBS[1]].run_id


def test_wandb_online_without_login_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    """No API key (as on a cluster node without network or login): the job warns and logs offline."""
    import wandb

    from mixrobust.runtime.loggers import build_logger

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    cfg = OmegaConf.create({"task": "mix", "logger": {"_target_": "lightning.pytorch.loggers.WandbLogger",
                                                      "project": "mixrobust", "offline": False, "tags": []}})
    with caplog.at_level(logging.WARNING, logger="mixrobust"):
        logger = build_logger(cfg.logger, str(tmp_path / "run"), cfg.task)
    try:
        assert "logging offline instead" in caplog.text and logger._offline
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    finally:
        wandb.finish()
        monkeypatch.delenv("WANDB_MODE", raising=False)  # WandbLogger sets it for offline runs
