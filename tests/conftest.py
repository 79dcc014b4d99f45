"""Shared fixtures: composed Hydra configs, the real-data root, small trained digits models."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads of
# concurrent processes (DDP workers, subprocess checks) slow every model pass ten-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import tempfile
from pathlib import Path

# evaluation caches of this test session go to a fresh folder, not the repository's outputs/cache
os.environ["MIXROBUST_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixrobust-test-cache-")

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import mixrobust  # noqa: F401  (registers config resolvers)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides, as the Hydra entry point would, minus the run dir.

    Hydra stays initialized on conf/ afterwards, as inside the entry point, so a task can compose the
    data config recorded in its checkpoints (`mixrobust.pipelines.inputs.with_data`)."""
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=CONF_DIR, version_base="1.3")
    cfg = compose(config_name=config_name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def multirun_job_config(tmp_path: Path, config_name: str, overrides: list[str], num: int) -> DictConfig:
    """conf/<config_name>.yaml composed with its Hydra config as job `num` of a multirun whose sweep folder is
    ``<tmp_path>/sweep`` (GlobalHydra cleared first: other tests leave it set)."""
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = num
        cfg.hydra.sweep.dir = "sweep"  # relative: resolved against hydra.runtime.cwd
        cfg.hydra.runtime.cwd = str(tmp_path)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def factory(overrides=(), config_name="train", output_dir=None):
        return compose_config(config_name, list(overrides), output_dir or tmp_path)

    return factory


def real_data_root() -> Path:
    """The folder with MNIST/raw and CIFAR10/ from MIXROBUST_DATA_ROOT; skip (or fail in CI) without it."""
    root = os.environ.get("MIXROBUST_DATA_ROOT")
    if root and (Path(root) / "MNIST" / "raw").is_dir() and (Path(root) / "CIFAR10").is_dir():
        return Path(root)
    if os.environ.get("MIXROBUST_REQUIRE_DATA"):
        pytest.fail(f"MIXROBUST_REQUIRE_DATA is set but MIXROBUST_DATA_ROOT={root!r} lacks MNIST/raw or CIFAR10/")
    pytest.skip("set MIXROBUST_DATA_ROOT to a folder with MNIST/raw and CIFAR10/ to run real-data tests")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast alone and far faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_root() -> Path:
    return real_data_root()


class NetworkAccess(AssertionError):
    """Raised by `no_network`: a test reached for the network."""


def _local(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    return isinstance(host, str) and (host in ("localhost", "::1", "") or host.startswith("127."))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: urllib, requests and sockets to other hosts fail it (local sockets, which W&B's
    offline service uses, and Unix sockets stay allowed)."""
    import socket
    import urllib.request

    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(*args, **kwargs):
        raise NetworkAccess(f"network access attempted in an offline test: {args[:2]!r}")

    def guarded(real):
        def call(sock, address):
            if sock.family == socket.AF_UNIX or _local(address):
                return real(sock, address)
            refuse(address)
        return call

    monkeypatch.setattr(socket.socket, "connect", guarded(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(connect_ex))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    try:
        import requests
    except ImportError:
        return
    monkeypatch.setattr(requests.Session, "request", refuse)
