"""Multirun job folder names (``hydra.sweep.subdir``: ``${mr.job_dir:...}``): the job number, then its
values on the launch's grid axes, filesystem-safe and capped; and the job folders' bookkeeping
(`job_number`, order, `in_launch`, `launch_jobs`) with these names and the plain numbers of earlier sweeps."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from mixrobust.runtime import resolvers, resume
from mixrobust.runtime.hydra_job import HydraJob
from mixrobust.runtime.jobs import (find_job_folders, in_launch, job_number, latest_grid, latest_launch,
                                    launch_job_names, launch_jobs)
from mixrobust.runtime.job_names import MAX_OVERRIDES_CHARS, job_dir_name
from mixrobust.runtime.resume import write_marker
from tests.conftest import CONF_DIR, multirun_job_config

CHECKED_SWEEPER = "hydra_plugins.mixrobust_sweeper.checked_sweeper.CheckedSweeper"
SAFE = re.compile(r"[0-9]+(_[A-Za-z0-9._+=,~-]+)?")
DIGITS = ["mix.alphas=[0.0]", "mix.r_options=[one]", "experiment=digits_sweep", "n=60",
          "g_ckpt=outputs/digits/g/checkpoints/best.ckpt", "h_ckpt=/tmp/names/h/checkpoints/best.ckpt"]


# --- the name --------------------------------------------------------------------------------------

def test_names_the_grid_axes_only():
    assert job_dir_name(0, DIGITS, {"mix.alphas", "mix.r_options"}) == "0_alphas=0.0,r_options=one"
    assert job_dir_name(7, ["seed=1", "objective=pgd_at"], {"objective", "seed"}) == "7_objective=pgd_at,seed=1"
    assert job_dir_name(3, DIGITS, set()) == "3"  # nothing swept: the number alone, as in earlier sweeps
    assert resolvers.job_dir(None, ["seed=1"]) == "None_seed=1"  # outside a multirun (--cfg hydra --resolve)


def test_without_a_known_grid_every_override_but_experiment():
    name = job_dir_name(2, DIGITS)
    assert name == "2_alphas=0.0,g_ckpt=g-best,h_ckpt=h-best,n=60,r_options=one"
    assert job_dir_name(2, DIGITS, exclude=["n", "g_ckpt", "h_ckpt"]) == "2_alphas=0.0,r_options=one"
    assert job_dir_name(2, ["experiment=digits_sweep"]) == "2"


@pytest.mark.parametrize(("value", "text"), [
    ("outputs/a/h/checkpoints/best.ckpt", "h-best"),  # the run folder, then the checkpoint
    ("/abs/run7/checkpoints/last.ckpt", "run7-last"),
    ("multirun/train_cifar10_rs/sigma0.25/checkpoints/best.ckpt", "sigma0.25-best"),
    ("../up/data/file.pt", "data-file.pt"),
    ("C:\\runs\\h\\checkpoints\\best.ckpt", "h-best"),
    ("[0.5]", "0.5"),
    ("[one,grad_g_i]", "one+grad_g_i"),
    ("[[1,2],[3]]", "1+2+3"),
    ("{a:1,b:x}", "a_1+b_x"),
    ("'a b'", "a_b"),
    ('"quoted"', "quoted"),
    ("${oc.env:HOME}", "_+oc.env_HOME"),
    ("x*?<>|", "x_"),
    ("[]", ""),
])
def test_values_are_filesystem_safe(value, text):
    name = job_dir_name(4, [f"key={value}"], {"key"})
    assert name == f"4_key={text}"
    assert SAFE.fullmatch(name) and "/" not in name and "\\" not in name


def test_prefixes_deletions_and_packages():
    overrides = ["+extra.tag=x", "++model.width=2", "~logger", "+data@aux=digits"]
    named = {"extra.tag", "model.width", "logger", "data@aux"}
    assert job_dir_name(1, overrides, named) == "1_data=digits,~logger,tag=x,width=2"


def test_keys_are_cut_to_their_last_component_unless_ambiguous():
    overrides = ["mix.alphas=[0.5]", "a.eps=1", "threat.eps=0.1", "model/backbone=resnet"]
    assert job_dir_name(5, overrides, None) == "5_a.eps=1,alphas=0.5,backbone=resnet,threat.eps=0.1"


def test_long_names_are_cut_and_end_in_a_hash():
    many = "[" + ",".join(f"0.{i:03d}" for i in range(60)) + "]"
    name = job_dir_name(12, [f"mix.alphas={many}"], {"mix.alphas"})
    body = name.partition("_")[2]
    assert len(body) <= MAX_OVERRIDES_CHARS and body.startswith("alphas=0.000+0.001+")
    assert re.fullmatch(r".*-[0-9a-f]{8}", body) and SAFE.fullmatch(name)
    # different overrides that agree on the first 80 characters keep different names; the name is stable
    other = job_dir_name(12, [f"mix.alphas={many[:-1]},0.999]"], {"mix.alphas"})
    assert other != name and len(other) == len(name)
    assert job_dir_name(12, [f"mix.alphas={many}"], {"mix.alphas"}) == name
    short = job_dir_name(0, ["a=" + "x" * (MAX_OVERRIDES_CHARS - 2)], {"a"})
    assert short == "0_a=" + "x" * (MAX_OVERRIDES_CHARS - 2)  # exactly the cap: kept whole


def _write_multirun_yaml(sweep: Path, params: dict | None, task: list[str], target: str = CHECKED_SWEEPER) -> None:
    sweep.mkdir(parents=True, exist_ok=True)
    sweeper = {"_target_": target, **({"params": params} if params is not None else {})}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}}))


def test_every_job_of_a_paper_grid_gets_its_own_short_safe_name(tmp_path):
    params = OmegaConf.load(Path(CONF_DIR) / "experiment" / "paper_fig1.yaml").hydra.sweeper.params
    _write_multirun_yaml(tmp_path, OmegaConf.to_container(params),
                         ["experiment=paper_fig1", "g_ckpt=outputs/cifar10/g/checkpoints/best.ckpt",
                          "h_ckpt=outputs/cifar10/h/checkpoints/best.ckpt"])
    axes, jobs = latest_grid(tmp_path)
    assert axes == {"mix.gammas", "mix.r_options", "mix.mix_spaces"} and len(jobs) == 96
    names = [job_dir_name(i, sorted(job), axes) for i, job in enumerate(jobs)]
    assert len(set(names)) == 96 and all(SAFE.fullmatch(n) for n in names)
    assert names[0] == "0_gammas=0.0,mix_spaces=prob,r_options=one"
    assert max(len(n) for n in names) < 60 and names[-1] == "95_gammas=100.0,mix_spaces=logit,r_options=grad_ratio"


def test_grid_axes_include_command_line_sweeps_and_single_valued_params(tmp_path):
    _write_multirun_yaml(tmp_path, {"mix.alphas": "[0.0],[0.5]", "mix.r_options": "[one],[grad_g_i]"},
                         ["experiment=digits_sweep", "mix.r_options=[one]", "threat.eps=0.1,0.2", "+seed=1,2", "n=60"])
    axes, jobs = latest_grid(tmp_path)
    assert axes == {"mix.alphas", "mix.r_options", "threat.eps", "seed"}
    assert jobs == latest_launch(tmp_path) and len(jobs) == 8
    assert latest_grid(tmp_path / "nowhere") is None


# --- the resolver, as Hydra resolves hydra.sweep.subdir in a job --------------------------------------

def _job_config(tmp_path, config: str, overrides: list[str], num: int):
    return multirun_job_config(tmp_path, config, overrides, num)


@pytest.fixture
def as_job():
    """Resolve ``hydra.sweep.subdir`` of a job config as Hydra's launcher does (HydraConfig set)."""
    def subdir(cfg):
        HydraConfig.instance().set_config(cfg)
        return str(OmegaConf.select(cfg, "hydra.sweep.subdir"))

    yield subdir
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("config", ["evaluate", "train"])
def test_the_configs_name_job_folders_with_the_resolver(config):
    cfg = OmegaConf.load(Path(CONF_DIR) / f"{config}.yaml")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${mr.job_dir:${hydra:job.num},${hydra:overrides.task}}"
    assert OmegaConf.has_resolver("mr.job_dir")


def test_resolver_reads_the_launch_from_multirun_yaml(tmp_path, monkeypatch, as_job):
    monkeypatch.chdir(tmp_path.parent)  # the sweep folder is found relative to hydra.runtime.cwd
    task = ["experiment=digits_sweep", "g_ckpt=g.ckpt", "h_ckpt=h.ckpt", "n=60", "mix.alphas=[0.0],[0.5]"]
    _write_multirun_yaml(tmp_path / "sweep", {"mix.alphas": "[0.0],[0.2]", "mix.r_options": "[one],[grad_g_i]"}, task)
    job3 = ["mix.alphas=[0.5]", "mix.r_options=[grad_g_i]", *[t for t in task if not t.startswith("mix.")]]
    assert as_job(_job_config(tmp_path, "evaluate", job3, 3)) == "3_alphas=0.5,r_options=grad_g_i"
    # a job the recorded launch does not hold under this number: named after all its overrides
    assert as_job(_job_config(tmp_path, "evaluate", job3, 1)) == (
        "1_alphas=0.5,g_ckpt=g.ckpt,h_ckpt=h.ckpt,n=60,r_options=grad_g_i")
    # no multirun.yaml (another sweeper, or a job composed elsewhere), with override_dirname's exclude_keys
    (tmp_path / "sweep" / "multirun.yaml").unlink()
    cfg = _job_config(tmp_path, "evaluate", [*job3, "hydra.job.config.override_dirname.exclude_keys=[n,g_ckpt]"], 3)
    assert as_job(cfg) == "3_alphas=0.5,h_ckpt=h.ckpt,r_options=grad_g_i"


def test_resolver_in_a_train_sweep(tmp_path, as_job):
    _write_multirun_yaml(tmp_path / "sweep", None, ["trainer.max_epochs=1", "seed=0,1"])
    assert as_job(_job_config(tmp_path, "train", ["trainer.max_epochs=1", "seed=1"], 1)) == "1_seed=1"


def test_an_unreadable_launch_only_lengthens_the_name(tmp_path, as_job):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra: [unclosed")
    assert as_job(_job_config(tmp_path, "train", ["seed=1"], 0)) == "0_seed=1"
    assert resolvers.job_dir(0, ["seed=1", "experiment=x"]) == "0_seed=1"  # outside Hydra: no launch known


# --- job folders with these names ----------------------------------------------------------------------

def _job(sweep: Path, name: str, overrides: list[str]) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "results.csv").write_text("x\n1\n")
    with pytest.MonkeyPatch.context() as patch:  # the marker records the overrides of the job that wrote it
        patch.setattr(resume, "current_job", lambda: HydraJob(overrides=list(overrides)))
        write_marker(job, "done.json", {}, "f" * 64, ["results.csv"])
    return job


def test_job_number():
    assert [job_number(n) for n in ("0", "12", "3_alphas=0.5,r_options=one", "3_", "a", "3a", "_3", "3_x/y", "")] == [
        0, 12, 3, 3, None, None, None, None, None]


def test_folders_sort_by_job_number_and_match_the_launch_by_it(tmp_path):
    names = {"10_seed=0": ["seed=0"], "2_seed=1": ["seed=1"], "1": ["seed=1"], "0_seed=0": ["seed=0"],
             "1_seed=0": ["seed=0"], "custom": ["seed=1"], "old/3": ["seed=2"]}
    for name, overrides in names.items():
        _job(tmp_path, name, overrides)
    folders, incomplete = find_job_folders(tmp_path, ("done.json",))
    assert incomplete == []
    assert [f.name for f in folders] == ["0_seed=0", "1", "1_seed=0", "2_seed=1", "10_seed=0", "custom", "old/3"]
    wanted = [frozenset({"seed=0"}), frozenset({"seed=1"})]
    assert {f.name: in_launch(f, wanted) for f in folders} == {
        "0_seed=0": True,  # job 0 holds seed=0
        "1": True,  # a plain numbered folder of an earlier version: job 1, seed=1
        "1_seed=0": False,  # an earlier launch's job 1: the latest launch's job 1 is seed=1
        "2_seed=1": False, "10_seed=0": False,  # beyond the latest launch's 2 jobs
        "custom": True, "old/3": False,  # other names match by overrides
    }


def _finished_at(job: Path, seconds: int) -> None:
    """Set when the job finished: its marker's mtime."""
    os.utime(job / "done.json", ns=(seconds * 10**9, seconds * 10**9))


def test_launch_job_names_are_the_resolvers_names(tmp_path, monkeypatch, as_job):
    monkeypatch.chdir(tmp_path)
    task = ["experiment=digits_sweep", "n=60"]
    _write_multirun_yaml(tmp_path / "sweep", {"mix.alphas": "[0.0],[0.5]", "mix.r_options": "[one],[grad_g_i]"}, task)
    names = launch_job_names(tmp_path / "sweep")
    assert names == ["0_alphas=0.0,r_options=one", "1_alphas=0.0,r_options=grad_g_i",
                     "2_alphas=0.5,r_options=one", "3_alphas=0.5,r_options=grad_g_i"]
    job3 = ["mix.alphas=[0.5]", "mix.r_options=[grad_g_i]", *task]
    assert as_job(_job_config(tmp_path, "evaluate", job3, 3)) == names[3]
    # with override_dirname's exclude_keys and hydra.sweep.subdir recorded in multirun.yaml
    multirun = yaml.safe_load((tmp_path / "sweep" / "multirun.yaml").read_text())
    multirun["hydra"]["job"] = {"config": {"override_dirname": {"exclude_keys": ["mix.r_options"]}}}
    multirun["hydra"]["sweep"] = {"dir": "sweep", "subdir": "${mr.job_dir:${hydra:job.num},${hydra:overrides.task}}"}
    (tmp_path / "sweep" / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    names = launch_job_names(tmp_path / "sweep")
    assert names[3] == "3_alphas=0.5" == as_job(_job_config(
        tmp_path, "evaluate", [*job3, "hydra.job.config.override_dirname.exclude_keys=[mix.r_options]"], 3))
    multirun["hydra"]["sweep"]["subdir"] = "${hydra.job.num}"  # folders named otherwise: no names known
    (tmp_path / "sweep" / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    assert launch_job_names(tmp_path / "sweep") is None
    assert launch_job_names(tmp_path / "nowhere") is None


def test_of_a_job_s_finished_folders_the_one_with_its_current_name_counts(tmp_path, caplog):
    _write_multirun_yaml(tmp_path, None, ["trainer.max_epochs=1", "seed=0,1"])
    wanted = latest_launch(tmp_path)
    old = _job(tmp_path, "1", ["trainer.max_epochs=1", "seed=1"])  # an earlier version's folder of job 1
    new = _job(tmp_path, "1_seed=1", ["seed=1", "trainer.max_epochs=1"])  # the same launch re-run: the same job
    other = _job(tmp_path, "0", ["trainer.max_epochs=1", "seed=0"])  # job 0 not re-run yet: its only folder
    gone = _job(tmp_path, "2_seed=2", ["trainer.max_epochs=1", "seed=2"])  # not in the launch
    _finished_at(new, 1_000)
    _finished_at(old, 2_000)  # finished later, but the folder's name is not what the launch names job 1 now
    folders, _ = find_job_folders(tmp_path, ("done.json",))
    assert [f.name for f in folders] == ["0", "1", "1_seed=1", "2_seed=2"]
    with caplog.at_level("WARNING"):
        counted, stale = launch_jobs(folders, wanted, tmp_path, ("done.json",))
    assert [f.name for f in counted] == ["0", "1_seed=1"] and [f.name for f in stale] == ["1", "2_seed=2"]
    assert [f.path for f in counted] == [other, new] and stale[1].path == gone and stale[0].path == old
    assert any("1_seed=1 counts (named as the launch names it now); left out as stale: 1" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("newest", ["1_b", "1_a"])
def test_of_a_job_s_folders_named_otherwise_the_last_finished_counts(tmp_path, newest):
    _write_multirun_yaml(tmp_path, None, ["seed=0,1"])
    for i, name in enumerate(sorted({"1_a", "1_b"} - {newest}) + [newest]):
        _finished_at(_job(tmp_path, name, ["seed=1"]), 1_000 * (i + 1))
    folders, _ = find_job_folders(tmp_path, ("done.json",))
    assert all(in_launch(f, latest_launch(tmp_path)) for f in folders)  # each alone would be job 1
    counted, stale = launch_jobs(folders, latest_launch(tmp_path), tmp_path, ("done.json",))
    assert [f.name for f in counted] == [newest] and [f.name for f in stale] == sorted({"1_a", "1_b"} - {newest})
