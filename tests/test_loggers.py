"""mixrobust.runtime.loggers: the W&B logger's online attempt and its offline fallback, and `log_to_files`.

The fallback test simulates a machine with an API key but no network: W&B's server address points
at a closed local port, so every request is refused at once and only the init timeout decides how
long the attempt lasts.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mixrobust.errors import ConfigError
from mixrobust.runtime.loggers import build_logger, log_to_files, wandb_init_timeout

WANDB = "lightning.pytorch.loggers.WandbLogger"
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex digits: looks like a key, reaches nothing


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No real W&B login or settings; the process left as the test found it.

    After the test: its run finished, W&B's process-wide state (the settings of its singleton, which a
    later wandb.init would reuse) torn down, and the WANDB_* variables as they were before, absent ones
    absent. Lightning sets WANDB_MODE=dryrun for offline runs, which monkeypatch.delenv does not undo
    when the variable was absent at the start: a later online run in this process would run offline.
    """
    before = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield monkeypatch
    import wandb

    try:
        wandb.finish()
        wandb.teardown()
    finally:
        for key in [k for k in os.environ if k.startswith("WANDB_") and k not in before]:
            del os.environ[key]
        os.environ.update(before)


def node(**keys):
    return OmegaConf.create({"_target_": WANDB, "project": "mixrobust", "tags": [], **keys})


def runs(save_dir: Path) -> dict[str, list[str]]:
    folders = sorted(p.name for d in ("wandb", ".wandb") if (save_dir / d).is_dir() for p in (save_dir / d).iterdir()
                     if p.is_dir() and not p.is_symlink())
    return {"offline": [f for f in folders if f.startswith("offline-run-")],
            "other": [f for f in folders if not f.startswith("offline-run-")]}


def test_online_without_network_falls_back_within_the_timeout(tmp_path, wandb_env, caplog):
    """An API key but no network: the online run gives up after logger.init_timeout (plus W&B's 10 s grace),
    the job logs offline, and the job's wandb/ folder holds the offline run only (the failed online run's
    folder removed). Without the timeout, W&B waited about 90 s and left its run-* folder behind."""
    wandb_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    timeout, grace, margin = 3, 10, 20  # margin: W&B's service start and Lightning's import on a loaded machine
    save_dir = tmp_path / "run"
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="mixrobust"):
        logger = build_logger(node(offline=False, init_timeout=timeout), save_dir, "mix")
    elapsed = time.perf_counter() - start
    assert logger._offline
    assert elapsed < timeout + grace + margin, elapsed
    assert f"starting W&B online run (timeout {timeout} s)" in caplog.text
    assert "logging offline instead" in caplog.text
    found = runs(save_dir)
    assert len(found["offline"]) == 1 and found["other"] == [], found


def test_offline_run_passes_neither_init_timeout_nor_anonymous(tmp_path, wandb_env, caplog):
    """init_timeout is ours, not a wandb.init argument; Lightning's anonymous=None made W&B warn on every run."""
    with caplog.at_level(logging.INFO, logger="mixrobust"):
        logger = build_logger(node(offline=True, init_timeout=20), tmp_path / "run", "mix")
    assert logger._offline and "init_timeout" not in logger._wandb_init and "anonymous" not in logger._wandb_init
    assert "starting W&B online run" not in caplog.text
    assert len(runs(tmp_path / "run")["offline"]) == 1


def test_online_asked_but_wandb_mode_offline_says_so(tmp_path, wandb_env, caplog):
    """WANDB_MODE=offline (or Lightning's dryrun from an earlier offline run in this process) wins: no attempt."""
    wandb_env.setenv("WANDB_MODE", "offline")
    with caplog.at_level(logging.INFO, logger="mixrobust"):
        logger = build_logger(node(offline=False, init_timeout=20), tmp_path / "run", "mix")
    assert logger._offline is False  # the logger was asked for online; W&B itself runs it offline
    assert "WANDB_MODE=offline keeps W&B from going online" in caplog.text
    assert "starting W&B online run" not in caplog.text
    assert runs(tmp_path / "run")["other"] == []


@pytest.mark.parametrize("value", [0, -1, "soon", True, float("inf"), float("nan")])
def test_bad_init_timeout_is_a_config_error(value):
    with pytest.raises(ConfigError, match="logger.init_timeout must be a number of seconds > 0"):
        wandb_init_timeout({"init_timeout": value})


@pytest.mark.parametrize("config_name", ["train", "evaluate"])
def test_bad_init_timeout_is_refused_with_the_settings(make_cfg, config_name):
    """Before any work: the settings of both entry points check it, not only the W&B start."""
    from mixrobust.pipelines import inputs

    with pytest.raises(ConfigError, match="logger.init_timeout must be a number of seconds > 0"):
        inputs.logger(make_cfg(["logger=wandb", "logger.init_timeout=-1"], config_name=config_name))


def test_init_timeout_values():
    assert wandb_init_timeout({}) is None and wandb_init_timeout({"init_timeout": None}) is None
    assert wandb_init_timeout({"init_timeout": 20}) == 20.0
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "logger" / "wandb.yaml")
    assert wandb_init_timeout(conf) == conf.init_timeout > 0


def test_log_to_files_reaches_file_handlers_only(tmp_path):
    """What the entry point prints itself goes to the job's log file, not to the console a second time."""
    console, path = io.StringIO(), tmp_path / "job.log"
    parent, child = logging.getLogger("test_loggers_parent"), logging.getLogger("test_loggers_parent.child")
    handlers = [logging.StreamHandler(console), logging.FileHandler(path)]
    for handler in handlers:
        parent.addHandler(handler)
    parent.setLevel(logging.INFO)
    try:
        log_to_files(child, logging.INFO, "results:\n%s", "a table")
        log_to_files(child, logging.DEBUG, "below the level: %s", "dropped")
        child.info("a plain line")
    finally:
        for handler in handlers:
            parent.removeHandler(handler)
            handler.close()
        parent.setLevel(logging.NOTSET)
    assert path.read_text() == "results:\na table\na plain line\n"
    assert console.getvalue() == "a plain line\n"


def test_log_to_files_without_a_file_handler_does_nothing(caplog):
    with caplog.at_level(logging.INFO):
        log_to_files(logging.getLogger("test_loggers_nofile"), logging.INFO, "not here")
    assert caplog.records == []


def test_an_offline_job_leaves_later_jobs_of_the_process_free_to_go_online(tmp_path, wandb_env):
    """Lightning sets WANDB_MODE=dryrun for an offline run; a sweep worker's next job asking for online must not
    inherit it. A WANDB_MODE the user set stays."""
    from mixrobust.runtime.loggers import job_logger

    wandb_env.delenv("WANDB_MODE", raising=False)
    with job_logger(node(offline=True), tmp_path / "a", "mix") as logger:
        logger.log_metrics({"x": 1.0})
    assert "WANDB_MODE" not in os.environ
    wandb_env.setenv("WANDB_MODE", "offline")
    with job_logger(node(offline=True), tmp_path / "b", "mix"):
        pass
    assert os.environ["WANDB_MODE"] == "offline"
