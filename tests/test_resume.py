"""Exact resume: train.py killed with SIGKILL after epoch k and resumed from last.ckpt repeats the
uninterrupted run (same seed, CPU): identical validation metrics for every later epoch and the same
final test accuracy. A train.py stopped by SIGTERM exits non-zero and names last.ckpt.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 5
KILL_AFTER = 1  # 0-based: killed once epochs 0 and 1 are saved
# PGD-AT with random starts and augmentation: every kind of randomness training has
RUN = ["objective=pgd_at", "objective.steps=2", "threat.eps=0.1", "threat.step_size=0.05", f"trainer.max_epochs={EPOCHS}",
       "val_attack_steps=2", "test_attack_steps=2", "trainer.enable_progress_bar=false", "logger=csv", "seed=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, str(ROOT / "train.py"), *RUN, *extra, f"hydra.run.dir={out}"]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def saved_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - not written yet
        return None


def val_metrics(run: Path) -> dict[int, dict[str, str]]:
    """Per-epoch validation metrics from every CSV log of the run folder (a resumed run adds a version)."""
    out: dict[int, dict[str, str]] = {}
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                vals = {k: v for k, v in row.items() if k.startswith("val/") and v}
                if vals:
                    out.setdefault(int(row["epoch"]), {}).update(vals)
    return out


def test_killed_run_resumed_from_last_ckpt_repeats_the_uninterrupted_run(tmp_path):
    # the uninterrupted run beside the one to kill (one thread each, two cores)
    log = tmp_path / "full.log"
    with open(log, "w") as out:
        full = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={tmp_path / 'full'}"],
                                stdout=out, stderr=subprocess.STDOUT, env=ENV)

    killed = tmp_path / "killed"
    proc = train(killed, wait=False)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while (saved_epoch(last) or -1) < KILL_AFTER:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = saved_epoch(last)
    assert KILL_AFTER <= k < EPOCHS - 1, k
    assert not (killed / "metrics.json").exists()

    resumed = train(killed, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert full.wait(timeout=600) == 0, log.read_text()[-2000:]
    assert resumed.stdout.strip().splitlines()[-1] == str(killed / "checkpoints" / "best.ckpt")

    expected, got = val_metrics(tmp_path / "full"), val_metrics(killed)
    assert sorted(expected) == list(range(EPOCHS))
    for epoch in range(k + 1, EPOCHS):
        assert got[epoch] == expected[epoch], f"epoch {epoch}"
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed_metrics = json.loads((killed / "metrics.json").read_text())
    assert resumed_metrics["test/acc"] == full_metrics["test/acc"]
    assert resumed_metrics["test/robust_acc"] == full_metrics["test/robust_acc"]


def test_sigterm_exits_non_zero_and_names_last_ckpt(tmp_path):
    out = tmp_path / "run"
    proc = train(out, wait=False)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while saved_epoch(last) is None:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    assert f"ckpt_path={last}" in stderr and "SIGTERM" in stderr
    assert not (out / "metrics.json").exists()
