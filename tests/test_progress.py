"""Progress of long stages: log lines at a steady rate where output is not a terminal."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mixrobust.runtime import progress

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def log_mode():
    progress.configure("log", 0.05)
    yield
    progress.configure("auto", progress.DEFAULT_INTERVAL)


def test_duration():
    assert [progress.duration(s) for s in (0, 44.6, 60, 185, 3600 + 125)] == ["0s", "45s", "1m00s", "3m05s", "1h02m"]


def test_line_has_count_rate_eta_and_detail():
    clock = Clock()
    stage = progress.Stage("MIX attacks", 400, "images", clock=clock)
    clock.now += 10.0
    stage.done, stage.detail = 100, "alpha 0.5, one/prob"
    # 100 images in 10 s: 10 images/s; 300 left: 30 s
    assert stage.line() == "MIX attacks: 100/400 images (25%), 10 images/s, 10s elapsed, ETA 30s (alpha 0.5, one/prob)"
    stage.done = 400
    assert "ETA" not in stage.line() and "(100%)" in stage.line()
    unknown = progress.Stage("training", 0, "batches", clock=clock)
    unknown.done = 7
    assert unknown.line().startswith("training: 7 batches, ")


def test_a_resumed_stage_counts_its_rate_from_where_it_started():
    clock = Clock()
    stage = progress.Stage("training", 100, "batches", clock=clock, done=60)  # 60 done before the resume
    clock.now += 20.0
    stage.done = 70  # 10 in 20 s: 0.5 batches/s, 30 left: 60 s
    assert stage.line() == "training: 70/100 batches (70%), 0.5 batches/s, 20s elapsed, ETA 1m00s"


def test_auto_is_a_bar_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TERM", raising=False)
    assert progress.resolve_mode("auto", Tty(), Tty()) == "bar"
    assert progress.resolve_mode("auto", io.StringIO(), Tty()) == "log"  # stdout to a file, tee, nohup
    assert progress.resolve_mode("auto", Tty(), io.StringIO()) == "log"
    monkeypatch.setenv("TERM", "dumb")
    assert progress.resolve_mode("auto", Tty(), Tty()) == "log"
    assert progress.resolve_mode("none", Tty(), Tty()) == "none"


def test_log_mode_reports_while_a_step_is_running(log_mode, caplog):
    """The timer writes a line every interval even when no batch finishes in between."""
    caplog.set_level(logging.INFO, logger="mixrobust.progress")
    with progress.stage("slow stage", 3, "batches") as stage:
        stage.advance(1)
        time.sleep(0.5)  # one long step: ten intervals
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "slow stage: started, 3 batches"
    assert lines[-1].startswith("slow stage: done, 1 batches in")
    running = [line for line in lines if line.startswith("slow stage: 1/3 batches (33%)")]
    assert len(running) >= 3, lines
    assert all("ETA" in line for line in running)


def test_bar_mode_routes_console_logs_above_the_bar(monkeypatch):
    """While the bar is live, a console log handler writes through rich's redirected stdout (so a log line
    prints above the bar instead of breaking it); afterwards it writes to its own stream again."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(sys, "stdout", stream)
    root = logging.getLogger()
    root.addHandler(handler)
    progress.configure("bar", 1.0)
    try:
        with progress.stage("bar stage", 4) as stage:
            assert handler.stream is not stream and handler.stream is sys.stdout  # rich's proxy
            stage.advance(4)
        assert handler.stream is stream and sys.stdout is stream
    finally:
        root.removeHandler(handler)
        progress.configure("auto", progress.DEFAULT_INTERVAL)


def test_none_mode_logs_start_and_end_only(caplog):
    progress.configure("none", 0.01)
    try:
        caplog.set_level(logging.INFO, logger="mixrobust.progress")
        with progress.stage("quiet", 2) as stage:
            stage.advance(1)
            time.sleep(0.1)
            stage.advance(1)
        assert [r.getMessage().split(",")[0] for r in caplog.records] == ["quiet: started", "quiet: done"]
    finally:
        progress.configure("auto", progress.DEFAULT_INTERVAL)


def test_a_failed_stage_logs_no_done_line(log_mode, caplog):
    caplog.set_level(logging.INFO, logger="mixrobust.progress")
    with pytest.raises(RuntimeError), progress.stage("failing", 2):
        raise RuntimeError("boom")
    assert not any("done" in r.getMessage() for r in caplog.records)


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval must be > 0"):
        progress.configure("log", 0)


def test_bad_progress_settings_name_the_key(make_cfg):
    from mixrobust import pipelines
    from mixrobust.errors import ConfigError

    with pytest.raises(ConfigError, match="progress.mode"):
        pipelines.progress_settings(make_cfg(["progress.mode=sometimes"]))
    with pytest.raises(ConfigError, match="progress.interval"):
        pipelines.progress_settings(make_cfg(["progress.interval=0"], config_name="evaluate"))


def test_default_interval_is_at_most_a_minute():
    for name in ("train", "evaluate"):
        node = OmegaConf.load(ROOT / "conf" / f"{name}.yaml").progress
        assert node.mode == "auto" and 0 < node.interval <= 60


STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[mixrobust\.progress\]\[INFO\] - (.*)$")


def test_training_to_a_log_file_shows_progress_at_a_steady_rate(tmp_path):
    """``python train.py objective=pgd_at > log 2>&1``: the log has the training and testing stages with
    rate and ETA, and no gap between progress lines longer than the interval (plus scheduling slack);
    no rich bar frames."""
    log_path = tmp_path / "log"
    interval = 2
    env = {k: v for k, v in os.environ.items() if k != "TERM"}
    with open(log_path, "w") as out:
        done = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "objective=pgd_at", "trainer.max_epochs=4", "logger=none",
             f"progress.interval={interval}", "val_attack_steps=5", "test_attack_steps=20",
             f"hydra.run.dir={tmp_path / 'run'}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, timeout=600)
    text = log_path.read_text()
    assert done.returncode == 0, text[-3000:]
    stamps = [(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2))
              for m in map(STAMP.match, text.splitlines()) if m]
    messages = [m for _, m in stamps]
    assert "training: started, 84 batches" in messages  # 4 epochs of 21 batches (1,293 images, batch 64)
    assert any(re.match(r"training: \d+/84 batches \(\d+%\), [\d.]+ batches/s, \d+s elapsed, ETA \d+s \(epoch \d/4", m)
               for m in messages), messages
    assert any(m.startswith("training: done, 84 batches") for m in messages)
    assert any(m.startswith("testing: done") for m in messages)
    training = [t for t, m in stamps if m.startswith("training")]
    gaps = [(b - a).total_seconds() for a, b in zip(training, training[1:])]
    assert gaps and max(gaps) <= interval + 1.5, gaps
    assert "━" not in text  # no rich progress bar frames in a log file
    # the entry point's noise filters hold for the warnings Lightning really raises, and its lines show once
    for noise in ("LeafSpec", "does not have many workers", "Tip:", "Seed set to", "FLOPs"):
        assert noise not in text, noise
    assert text.count("GPU available: False") == 1


def test_a_failing_detail_does_not_stop_the_lines(log_mode, caplog):
    """A detail read by the timer thread while the work changes it may fail: that line goes without it."""
    caplog.set_level(logging.INFO, logger="mixrobust.progress")

    def broken():
        raise KeyError("val/acc")

    with progress.stage("flaky", 2) as stage:
        stage.detail = broken
        time.sleep(0.3)
    running = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flaky: 0/2")]
    assert len(running) >= 2 and not any("(" in line.split("images")[-1] for line in running)
