"""The entry points' CPU thread policy: OMP_WAIT_POLICY / OMP_NUM_THREADS set before torch starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixrobust.runtime import threads

ROOT = Path(__file__).resolve().parents[1]


def test_policy_fills_only_what_the_user_left_unset(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    env: dict[str, str] = {}
    assert threads.apply_thread_policy(env) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    assert threads.apply_thread_policy(mine) == {}
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    partly = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": ""}  # empty counts as unset
    assert threads.apply_thread_policy(partly) == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("v2, v1, expected", [
    ("max 100000", None, None),
    ("150000 100000", None, 2),  # 1.5 CPUs of quota: two threads can use it
    ("50000 100000", None, 1),
    (None, ("-1", "100000"), None),
    (None, ("400000", "100000"), 4),
    (None, None, None),  # no cgroup files at all
    ("garbage", None, None),
])
def test_cgroup_quota(tmp_path, v2, v1, expected):
    v2_path = tmp_path / "cpu.max"
    v1_paths = (tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us")
    if v2 is not None:
        v2_path.write_text(v2 + "\n")
    if v1 is not None:
        for path, text in zip(v1_paths, v1):
            path.write_text(text + "\n")
    assert threads._cgroup_cpus(v2_path, v1_paths) == expected


def test_usable_cores_is_capped_by_the_affinity_mask_and_the_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: None)
    assert threads.usable_cores() == 4
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: 2)
    assert threads.usable_cores() == 2


@pytest.mark.parametrize("entry", ["train", "evaluate"])
@pytest.mark.parametrize("preset", [{}, {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}])
def test_entry_points_apply_it_before_torch_is_imported(entry, preset):
    """Importing an entry point sets the policy (or keeps the user's) before torch is imported, and
    torch then starts with that many threads; a child process inherits the same environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(preset)
    code = (
        "import json, os, subprocess, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"import {entry}\n"
        "before = 'torch' in sys.modules\n"
        "import torch\n"
        "from mixrobust.runtime.threads import usable_cores\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"OMP_WAIT_POLICY\"])'],\n"
        "                       capture_output=True, text=True).stdout.strip()\n"
        "print(json.dumps(dict(before=before, policy=os.environ['OMP_WAIT_POLICY'], threads=torch.get_num_threads(),\n"
        "                      cores=usable_cores(), child=child)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] is False
    want_policy = preset.get("OMP_WAIT_POLICY", "PASSIVE")
    assert seen["policy"] == want_policy and seen["child"] == want_policy
    assert seen["threads"] == int(preset.get("OMP_NUM_THREADS", seen["cores"]))
