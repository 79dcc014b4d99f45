"""Per-job placement for multirun sweeps: GPU choice, GPU leases, CPU threads, launcher configs."""

from __future__ import annotations

import logging
import multiprocessing
import queue
import shutil
from pathlib import Path

import pytest

from hydra.errors import CompactHydraException

from mixrobust.errors import ConfigError
from mixrobust.runtime import placement
from mixrobust.runtime.hydra_job import HydraJob, current_job
from mixrobust.runtime.placement import LEASE, Placement, gpu_for_job, lease_gpu, plan_placement
from tests.conftest import multirun_job_config

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")
LAUNCHERS = sorted(p.stem for p in (REPO / "conf" / "hydra" / "launcher").glob("*.yaml"))
LOGGER = "mixrobust.runtime.placement"


@pytest.mark.parametrize(
    ("job_num", "count", "expected"),
    [(0, 1, 0), (5, 1, 0), (0, 4, 0), (3, 4, 3), (4, 4, 0), (9, 4, 1), (7, 3, 1)],
)
def test_gpu_for_job(job_num, count, expected):
    assert gpu_for_job(job_num, count) == expected


@pytest.mark.parametrize(("job_num", "count"), [(0, 0), (1, -2), (0, 1.5), (0, True), (-1, 2)])
def test_gpu_for_job_rejects_bad_input(job_num, count):
    with pytest.raises(ConfigError):
        gpu_for_job(job_num, count)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # single run: the visible GPU or the CPU, no lease, threads left alone
        (dict(device="auto", multirun=False, gpu_count=0), Placement("cpu")),
        (dict(device="auto", multirun=False, gpu_count=4), Placement("cuda")),
        (dict(device="auto", multirun=False, gpu_count=0, n_jobs=4, cpu_count=8), Placement("cpu")),
        # multirun: lease only with >= 2 GPUs
        (dict(device="auto", multirun=True, gpu_count=0), Placement("cpu")),
        (dict(device="auto", multirun=True, gpu_count=1), Placement("cuda")),
        (dict(device="auto", multirun=True, gpu_count=4), Placement(LEASE)),
        (dict(device="auto", multirun=True, gpu_count=4, n_jobs=4, cpu_count=16), Placement(LEASE)),
        # an explicit device is used as given
        (dict(device="cuda:1", multirun=True, gpu_count=4), Placement("cuda:1")),
        (dict(device="cuda", multirun=False, gpu_count=0), Placement("cuda")),
        (dict(device="cuda", multirun=True, gpu_count=1), Placement("cuda")),
        # ... but cuda names no GPU: in a multirun with several, each job leases its own as with auto
        (dict(device="cuda", multirun=True, gpu_count=4), Placement(LEASE)),
        (dict(device="cpu", multirun=True, gpu_count=4), Placement("cpu")),
        # joblib on CPU: cores // n_jobs threads, never more than now, never below 1
        (dict(device="auto", multirun=True, gpu_count=0, n_jobs=2, cpu_count=8), Placement("cpu", 4)),
        (dict(device="cpu", multirun=True, gpu_count=4, n_jobs=3, cpu_count=8), Placement("cpu", 2)),
        (dict(device="auto", multirun=True, gpu_count=1, n_jobs=2, cpu_count=8), Placement("cuda")),
        (dict(device="auto", multirun=True, gpu_count=0, n_jobs=16, cpu_count=8), Placement("cpu", 1)),
        (dict(device="auto", multirun=True, gpu_count=0, n_jobs=2, cpu_count=8, current_threads=1), Placement("cpu", 1)),
        (dict(device="auto", multirun=True, gpu_count=0, n_jobs=2, cpu_count=8, current_threads=8), Placement("cpu", 4)),
        (dict(device="auto", multirun=True, gpu_count=0, n_jobs=1, cpu_count=8), Placement("cpu")),
        (dict(device="auto", multirun=True, gpu_count=0, n_jobs=None, cpu_count=8), Placement("cpu")),
        # joblib's negative n_jobs: -1 = all cores, -2 = all but one
        (dict(device="auto", multirun=True, gpu_count=0, n_jobs=-1, cpu_count=8), Placement("cpu", 1)),
        (dict(device="auto", multirun=True, gpu_count=0, n_jobs=-5, cpu_count=8), Placement("cpu", 2)),
    ],
)
def test_plan_placement(kwargs, expected):
    assert plan_placement(**kwargs) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(device="gpu", multirun=False, gpu_count=0),
        dict(device="", multirun=False, gpu_count=0),
        dict(device="auto", multirun=True, gpu_count=-1),
        dict(device="auto", multirun=True, gpu_count=0, n_jobs=0, cpu_count=4),
        dict(device="auto", multirun=True, gpu_count=0, n_jobs=2, cpu_count=0),
    ],
)
def test_plan_placement_rejects_bad_input(kwargs):
    with pytest.raises(ConfigError):
        plan_placement(**kwargs)


def test_lease_gpu_nested_leases_fallback_and_release(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with lease_gpu(2, tmp_path, job_num=1) as first:
        assert first == 1  # starts at job_num % count
        with lease_gpu(2, tmp_path, job_num=3) as second:
            assert second == 0  # GPU 1 is held: wraps around to the free one
            caplog.clear()
            with lease_gpu(2, tmp_path, job_num=5) as third:
                assert third == 1  # all held: plain modulo, with a warning
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "job 5 shares GPU 1" in warnings[0].getMessage()
        # GPU 0 was released when the second lease ended
        caplog.clear()
        with lease_gpu(2, tmp_path, job_num=1) as again:
            assert again == 0
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu0.lock", "gpu1.lock"]
    assert "job=1" in (tmp_path / "gpu1.lock").read_text()


def test_lease_gpu_releases_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with lease_gpu(2, tmp_path, job_num=0):
            raise RuntimeError("job failed")
    with lease_gpu(2, tmp_path, job_num=0) as gpu:
        assert gpu == 0


def _wait(release) -> None:
    release.wait(60)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_lease_gpu_released_while_forked_children_live(tmp_path):
    # DataLoader workers forked during a job inherit the lock's file description: closing the
    # job's copy alone would leave the GPU locked until they exit; the explicit unlock frees it
    ctx = multiprocessing.get_context("fork")
    release = ctx.Event()
    with lease_gpu(2, tmp_path, job_num=0) as gpu:
        assert gpu == 0
        child = ctx.Process(target=_wait, args=(release,))
        child.start()
    try:
        assert child.is_alive()
        with lease_gpu(2, tmp_path, job_num=2) as again:
            assert again == 0
    finally:
        release.set()
        child.join(60)


def test_lease_gpu_rejects_zero_gpus(tmp_path):
    with pytest.raises(ConfigError):
        with lease_gpu(0, tmp_path, job_num=0):
            pass


def _hold_lease(lock_dir: str, job_num: int, leased, release) -> None:
    with lease_gpu(3, lock_dir, job_num) as gpu:
        leased.put((job_num, gpu))
        release.wait(60)


def test_lease_gpu_across_processes_gives_distinct_gpus(tmp_path):
    # fork, where there is one: spawned children would each re-import torch (seconds apiece); forked
    # ones open their own lock files after the fork, so they contend exactly as separate jobs do
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    leased, release = ctx.Queue(), ctx.Event()
    # 0, 3 and 6 all start at GPU 0: plain modulo would put the three jobs on one GPU
    procs = [ctx.Process(target=_hold_lease, args=(str(tmp_path), n, leased, release)) for n in (0, 3, 6)]
    for p in procs:
        p.start()
    try:
        got = [leased.get(timeout=120) for _ in procs]
    except queue.Empty:
        pytest.fail("a process did not report its lease")
    finally:
        release.set()
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(gpu for _, gpu in got) == [0, 1, 2]


def test_gpu_lock_dir_is_per_host_and_visible_devices(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plain = placement.gpu_lock_dir(tmp_path)
    assert plain.parent == tmp_path / ".gpu_locks"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    other = placement.gpu_lock_dir(tmp_path)
    assert other.parent == plain.parent and other.name == plain.name + "-2_3"


def _compose_evaluate(overrides: list[str]):
    """conf/evaluate.yaml composed with its Hydra config (GlobalHydra cleared first: other tests leave it set)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides, return_hydra_config=True)


def _multirun_hydra_config(tmp_path, launcher: str, job_num: int, overrides: tuple[str, ...] = ()):
    return multirun_job_config(tmp_path, "evaluate", [f"hydra/launcher={launcher}", *overrides], job_num)


@pytest.fixture
def hydra_runtime():
    """Install a Hydra config as the running job's (HydraConfig.get()), and remove it afterwards."""
    from hydra.core.hydra_config import HydraConfig

    yield lambda cfg: HydraConfig.instance().set_config(cfg)
    HydraConfig.instance().cfg = None


def test_current_job_outside_hydra_is_a_plain_single_run():
    from hydra.core.hydra_config import HydraConfig

    assert not HydraConfig.initialized()
    assert current_job() == HydraJob(multirun=False, num=0, n_jobs=None, sweep_dir=None, overrides=[],
                                     override_dirname="", experiment=None, config_name=None)


def test_current_job_reads_the_multirun_job(tmp_path, monkeypatch, hydra_runtime):
    monkeypatch.setattr(placement, "available_cpus", lambda: 2)
    elsewhere = tmp_path / "elsewhere"  # the job's cwd; the relative sweep dir is not resolved against it
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = _multirun_hydra_config(tmp_path, "local_cpus", job_num=3, overrides=("seed=5",))
    hydra_runtime(cfg)
    job = current_job()
    assert (job.multirun, job.num, job.n_jobs, job.sweep_dir) == (True, 3, 2, tmp_path / "sweep")
    assert job.config_name == "evaluate" and job.experiment is None
    assert "seed=5" in job.overrides and "hydra/launcher=local_cpus" not in job.overrides
    hydra_runtime(_multirun_hydra_config(tmp_path, "basic", job_num=1))
    assert current_job().n_jobs is None  # the basic launcher runs one job at a time
    from hydra.types import RunMode
    from omegaconf import open_dict

    cfg = _multirun_hydra_config(tmp_path, "local_cpus", job_num=3, overrides=("seed=5",))
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.RUN
    hydra_runtime(cfg)
    single = current_job()
    assert (single.multirun, single.num, single.n_jobs, single.sweep_dir) == (False, 0, None, None)
    assert "seed=5" in single.overrides and single.config_name == "evaluate"  # the overrides are kept


def test_job_placement_outside_hydra_and_explicit_device(monkeypatch):
    monkeypatch.setattr(placement, "visible_gpus", lambda: 0)
    with placement.job_placement() as device:
        assert device == "cpu"
    with placement.job_placement("cuda:3") as device:
        assert device == "cuda:3"
    monkeypatch.setattr(placement, "visible_gpus", lambda: 4)
    with placement.job_placement() as device:
        assert device == "cuda"  # not a multirun: no lease


def _fake_cuda(monkeypatch) -> list[int]:
    """torch.cuda.set_device / empty_cache as no-ops that record the devices set (no GPU needed)."""
    import torch

    selected: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return selected


def test_job_placement_multirun_leases_a_gpu(tmp_path, monkeypatch, hydra_runtime):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setattr(placement, "visible_gpus", lambda: 4)
    selected = _fake_cuda(monkeypatch)
    elsewhere = tmp_path / "elsewhere"  # the job's cwd (hydra.job.chdir); the sweep dir is not under it
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hydra_runtime(_multirun_hydra_config(tmp_path, "local_gpus", job_num=5))
    lock_dir = placement.gpu_lock_dir(tmp_path / "sweep")
    with lease_gpu(4, lock_dir, job_num=1):  # another running job holds GPU 1
        with placement.job_placement() as device:
            assert device == "cuda:2" and selected == [2]
            assert "job=5" in (lock_dir / "gpu2.lock").read_text()
        with placement.job_placement("cpu") as device:
            assert device == "cpu"  # explicit device: no lease


def test_job_placement_multirun_limits_cpu_threads(tmp_path, monkeypatch, hydra_runtime, caplog):
    import torch

    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(placement, "visible_gpus", lambda: 0)
    monkeypatch.setattr(placement, "available_cpus", lambda: 8)
    hydra_runtime(_multirun_hydra_config(tmp_path, "local_cpus", job_num=0))  # n_jobs: 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(6)
        with placement.job_placement() as device:
            assert device == "cpu"
            assert torch.get_num_threads() == 4  # 8 cores // 2 jobs
        assert torch.get_num_threads() == 6  # restored
        assert any("4 torch threads" in r.getMessage() for r in caplog.records)
        torch.set_num_threads(2)
        with placement.job_placement():
            assert torch.get_num_threads() == 2  # never raised above what was set (OMP_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_composes_and_target_resolves(name):
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    cfg = _compose_evaluate([f"hydra/launcher={name}"])
    node = cfg.hydra.launcher
    assert cfg.hydra.runtime.choices["hydra/launcher"] == name
    if name == "slurm":
        assert node.submitit_folder.endswith("/.submitit/%j")
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

        # every key is one the plugin knows (a typo would be silently passed to sbatch or fail late)
        assert set(node) <= set(OmegaConf.structured(SlurmQueueConf))
    else:
        n_jobs = OmegaConf.to_container(node, resolve=True)["n_jobs"]
        assert isinstance(n_jobs, int) and n_jobs >= 1
        if name == "local_gpus":
            import torch

            assert n_jobs == max(1, torch.cuda.device_count())
    cls = get_class(node._target_)
    assert cls.__name__ == {"slurm": "SlurmLauncher"}.get(name, "JoblibLauncher")


def test_expected_launchers_exist():
    assert {"local_cpus", "local_gpus", "slurm"} <= set(LAUNCHERS)


def test_gpu_count_resolver():
    import torch
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"n": "${mr.gpu_count:}"})
    assert cfg.n == max(1, torch.cuda.device_count())


def test_gpu_count_resolver_is_at_least_one(monkeypatch):
    import torch
    from omegaconf import OmegaConf

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert OmegaConf.create({"n": "${mr.gpu_count:}"}).n == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert OmegaConf.create({"n": "${mr.gpu_count:}"}).n == 3
    monkeypatch.setattr(placement, "visible_gpus", lambda: 5)  # the resolver counts GPUs as placement does
    assert OmegaConf.create({"n": "${mr.gpu_count:}"}).n == 5


# ------------------------------------------------------------------------------------ resolve_device


@pytest.mark.parametrize(
    ("name", "gpus", "expected"),
    [
        ("auto", 0, "cpu"),
        ("auto", 1, "cuda"),
        ("auto", 4, "cuda"),
        ("cpu", 0, "cpu"),
        ("cpu", 2, "cpu"),
        ("cuda", 1, "cuda"),
        ("cuda:0", 1, "cuda:0"),
        ("cuda:3", 4, "cuda:3"),
    ],
)
def test_resolve_device(monkeypatch, name, gpus, expected):
    import torch

    monkeypatch.setattr(placement, "visible_gpus", lambda: gpus)
    device = placement.resolve_device(name)
    assert isinstance(device, torch.device) and device == torch.device(expected)


@pytest.mark.parametrize(
    ("name", "gpus", "match"),
    [
        ("gpu", 4, "not a torch device"),  # unknown to torch
        ("", 4, "not a torch device"),
        ("cuda:x", 4, "not a torch device"),
        ("cuda:-1", 4, "not a torch device"),
        ("mps", 4, "cpu or cuda"),  # a torch device mixrobust does not run on
        ("meta", 0, "cpu or cuda"),
        ("cuda", 0, "no CUDA GPU"),  # a machine without a GPU
        ("cuda:0", 0, "no CUDA GPU"),
        ("cuda:1", 1, r"only 1 GPU\(s\) are visible"),  # an index beyond the visible count
        ("cuda:4", 4, r"only 4 GPU\(s\) are visible"),
    ],
)
def test_resolve_device_rejects_with_one_config_error(monkeypatch, name, gpus, match):
    monkeypatch.setattr(placement, "visible_gpus", lambda: gpus)
    with pytest.raises(ConfigError, match=match) as info:
        placement.resolve_device(name)
    assert repr(name) in str(info.value) or f"device={name}" in str(info.value)
    # one message: no chained torch error behind it, shown by Hydra without a traceback
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert isinstance(err, CompactHydraException) and isinstance(err, ValueError)


def test_resolve_device_on_this_machine():
    import torch

    count = torch.cuda.device_count()
    assert placement.resolve_device("auto").type == ("cuda" if count else "cpu")
    assert placement.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU" if count == 0 else "GPU\\(s\\) are visible"):
        placement.resolve_device(f"cuda:{count}")
    if count:
        assert placement.resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")


# ----------------------------------------------------------------------- placed_device, placed_trainer


def test_placed_device_outside_hydra(monkeypatch):
    import torch

    monkeypatch.setattr(placement, "visible_gpus", lambda: 0)
    with placement.placed_device("auto") as device:
        assert device == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        with placement.placed_device("cuda"):
            pass
    monkeypatch.setattr(placement, "visible_gpus", lambda: 2)
    with placement.placed_device("auto") as device:
        assert device == torch.device("cuda")  # not a multirun: no lease
    with placement.placed_device("cuda:1", processes=2) as device:
        assert device == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="only 2 GPU"):
        with placement.placed_device("cuda:2"):
            pass


def test_placed_device_pins_the_job_and_refuses_processes_per_job_in_a_parallel_sweep(tmp_path, monkeypatch,
                                                                                     hydra_runtime):
    import torch

    monkeypatch.setattr(placement, "visible_gpus", lambda: 0)
    monkeypatch.setattr(placement, "available_cpus", lambda: 2)
    hydra_runtime(_multirun_hydra_config(tmp_path, "local_cpus", job_num=1))  # joblib, n_jobs: 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with placement.placed_device("auto") as device:
            assert device == torch.device("cpu")
            assert torch.get_num_threads() == 1  # 2 cores // 2 jobs
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="distributed.devices=1"):
        with placement.placed_device("auto", processes=2):
            pass
    hydra_runtime(_multirun_hydra_config(tmp_path, "basic", job_num=1))  # one job at a time: allowed
    with placement.placed_device("auto", processes=2) as device:
        assert device == torch.device("cpu")  # resolved; Fabric places its processes on it


@pytest.mark.parametrize(
    ("launcher", "overrides", "cpus", "refused"),
    [
        ("local_cpus", ["hydra.launcher.n_jobs=3"], 8, True),
        ("local_cpus", ["hydra.launcher.n_jobs=-1"], 8, True),  # joblib: all 8 cores
        ("local_cpus", ["hydra.launcher.n_jobs=-1"], 1, False),  # all of 1 core: one job at a time
        ("local_cpus", ["hydra.launcher.n_jobs=-2"], 2, False),  # all but one of 2 cores
        ("local_cpus", ["hydra.launcher.n_jobs=1"], 8, False),
        ("slurm", [], 8, False),  # one job per allocation
    ],
)
def test_placed_device_several_processes_follow_the_launchers_parallelism(tmp_path, monkeypatch, hydra_runtime,
                                                                          launcher, overrides, cpus, refused):
    monkeypatch.setattr(placement, "visible_gpus", lambda: 0)
    monkeypatch.setattr(placement, "available_cpus", lambda: cpus)
    hydra_runtime(_multirun_hydra_config(tmp_path, launcher, job_num=0, overrides=tuple(overrides)))
    if refused:
        with pytest.raises(ConfigError, match="distributed.devices=1"):
            with placement.placed_device("cpu", processes=2):
                pass
    else:
        with placement.placed_device("cpu", processes=2) as device:
            assert device.type == "cpu"
    with placement.placed_device("cpu", processes=1) as device:  # one process per job: always allowed
        assert device.type == "cpu"


def test_placed_device_leases_one_gpu_per_job_but_not_for_several_processes(tmp_path, monkeypatch, hydra_runtime):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setattr(placement, "visible_gpus", lambda: 4)
    selected = _fake_cuda(monkeypatch)
    hydra_runtime(_multirun_hydra_config(tmp_path, "basic", job_num=6))
    with placement.placed_device("auto") as device:
        assert device == torch.device("cuda:2") and selected == [2]  # 6 % 4, leased
        assert "job=6" in (placement.gpu_lock_dir(tmp_path / "sweep") / "gpu2.lock").read_text()
    selected.clear()
    shutil.rmtree(tmp_path / "sweep")
    with placement.placed_device("auto", processes=2) as device:
        assert device == torch.device("cuda") and selected == []  # Fabric uses devices 0..k-1: no lease
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("trainer", "gpus", "launcher", "expected"),
    [
        # a one-GPU trainer in a local multi-GPU sweep gets its leased GPU
        ({"accelerator": "gpu", "devices": 1}, 4, "local_gpus", {"accelerator": "gpu", "devices": [3]}),
        ({"accelerator": "auto", "devices": 1, "max_epochs": 2}, 4, "basic",
         {"accelerator": "auto", "devices": [3], "max_epochs": 2}),
        ({"accelerator": "cuda", "devices": "1"}, 2, "local_gpus", {"accelerator": "cuda", "devices": [1]}),
        # DDP, CPU and single-GPU-machine trainers keep their settings
        ({"accelerator": "gpu", "devices": 2, "strategy": "ddp"}, 4, "local_gpus",
         {"accelerator": "gpu", "devices": 2, "strategy": "ddp"}),
        ({"accelerator": "cpu", "devices": 1}, 4, "local_gpus", {"accelerator": "cpu", "devices": 1}),
        ({"accelerator": "gpu", "devices": 1}, 1, "local_gpus", {"accelerator": "gpu", "devices": 1}),
        ({"accelerator": "auto", "devices": 1}, 0, "basic", {"accelerator": "auto", "devices": 1}),
    ],
)
def test_placed_trainer(tmp_path, monkeypatch, hydra_runtime, trainer, gpus, launcher, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))
    monkeypatch.setattr(placement, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(placement, "available_cpus", lambda: 2)
    _fake_cuda(monkeypatch)
    hydra_runtime(_multirun_hydra_config(tmp_path, launcher, job_num=7))
    given = dict(trainer)
    with placement.placed_trainer(trainer) as args:
        assert args == expected
    assert trainer == given  # the caller's dict is left alone


def test_placed_trainer_outside_a_sweep_keeps_the_settings(monkeypatch):
    monkeypatch.setattr(placement, "visible_gpus", lambda: 4)
    _fake_cuda(monkeypatch)
    with placement.placed_trainer({"accelerator": "gpu", "devices": 1}) as args:
        assert args == {"accelerator": "gpu", "devices": 1}


# --- one run per folder ---------------------------------------------------------------------------


def test_a_second_run_into_a_busy_folder_stops_before_any_work(tmp_path, monkeypatch):
    """Two runs started into one folder (the same second, a job array) would mix their files: the second is refused
    naming the first and the fix; the first's later ranks share its folder; the folder is free once it ends."""
    import os

    from omegaconf import OmegaConf

    from mixrobust import pipelines
    from tests.conftest import compose_config

    for key in pipelines.RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    cfg = compose_config("train", ["logger=none"], tmp_path)
    with pipelines.own_folder(cfg):
        monkeypatch.setattr(pipelines.module("train"), "settings", lambda cfg: pytest.fail("work started"))
        with pytest.raises(ConfigError, match=rf"another run \(pid {os.getpid()} on .+\) is writing into {tmp_path}: "
                                              r".*hydra\.run\.dir=<folder> \(with -m: hydra\.sweep\.dir=<folder>\)"):
            pipelines.run(cfg)
        monkeypatch.setenv("LOCAL_RANK", "1")  # DDP's second process: the same run
        with pipelines.own_folder(cfg):
            pass
        monkeypatch.delenv("LOCAL_RANK")
    with pipelines.own_folder(OmegaConf.create({"output_dir": str(tmp_path)})):
        pass


@pytest.mark.parametrize(("devices", "count"), [(1, 1), (4, 4), (-1, None), ("auto", None), ("-1", None), ("2", 2),
                                               ("0,1", 2), ("1,", 1), ([0], 1), ([0, 2], 2)])
def test_trainer_devices_counts_what_lightning_would_use(devices, count):
    assert placement.trainer_devices(devices) == count


def test_several_devices_per_job_are_refused_when_jobs_run_at_once(tmp_path, monkeypatch):
    """DDP training (trainer=ddp) and sharded evaluation put every job's processes on devices 0..k-1: a parallel joblib
    sweep is refused before any work; one job at a time is not."""
    from mixrobust.pipelines import train
    from tests.conftest import compose_config

    monkeypatch.setattr(placement, "available_cpus", lambda: 4)
    monkeypatch.setattr(placement, "current_job", lambda: HydraJob(multirun=True, n_jobs=2))
    cfg = compose_config("train", ["trainer=ddp", "logger=none"], tmp_path)
    with placement.without_host_checks(), pytest.raises(ConfigError, match=r"trainer\.devices > 1 uses the devices "
                                                                          r"0\.\.k-1 .* or trainer\.devices=1"):
        train.settings(cfg)
    with placement.without_host_checks():  # one GPU a job: as many jobs at once as GPUs
        train.settings(compose_config("train", ["trainer=gpu", "trainer.devices=[0]", "logger=none"], tmp_path))
    with pytest.raises(ConfigError, match=r"distributed\.devices > 1 .* or distributed\.devices=1"):
        placement.check_processes_launcher(2)
    placement.check_processes_launcher(1)
    monkeypatch.setattr(placement, "current_job", lambda: HydraJob(multirun=True, n_jobs=1))
    placement.check_processes_launcher(2)
