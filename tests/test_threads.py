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
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # a container's quota: 3 of the machine's 8 cores
    env: dict[str, str] = {}
    assert threads.apply_thread_policy(env) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    assert threads.apply_thread_policy(mine) == {}
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    partly = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": ""}  # empty counts as unset
    assert threads.apply_thread_policy(partly) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_thread_count_left_to_torch_when_the_whole_machine_is_usable(monkeypatch):
    """torch's default (a thread per physical core) and joblib's per-worker split stay untouched."""
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    env: dict[str, str] = {}
    assert threads.apply_thread_policy(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and "OMP_NUM_THREADS" not in env


def _cgroup(tmp_path, proc_lines, files):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("".join(line + "\n" for line in proc_lines))
    return threads._cgroup_cpus(root, proc)


@pytest.mark.parametrize("proc, files, expected", [
    (["0::/"], {"cpu.max": "max 100000"}, None),
    (["0::/"], {"cpu.max": "150000 100000"}, 2),  # 1.5 CPUs of quota: two threads can use it
    (["0::/"], {"cpu.max": "50000 100000"}, 1),
    # a nested v2 group (systemd CPUQuota, a container sharing the host's namespace): the tightest on the path
    (["0::/user.slice/job.scope"], {"cpu.max": "max 100000", "user.slice/cpu.max": "400000 100000",
                                    "user.slice/job.scope/cpu.max": "max 100000"}, 4),
    (["0::/a/b"], {"a/cpu.max": "800000 100000", "a/b/cpu.max": "200000 100000"}, 2),
    # v1: the cpu controller's hierarchy
    (["4:cpu,cpuacct:/docker/abc"], {"cpu/docker/abc/cpu.cfs_quota_us": "300000",
                                     "cpu/docker/abc/cpu.cfs_period_us": "100000"}, 3),
    (["4:cpu,cpuacct:/"], {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    (["0::/"], {}, None),  # no limit files at all
    (["0::/"], {"cpu.max": "garbage"}, None),
    ([], {"cpu.max": "200000 100000"}, 2),  # /proc says nothing: the mount point
])
def test_cgroup_quota(tmp_path, proc, files, expected):
    assert _cgroup(tmp_path, proc, files) == expected


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
        "                      cores=usable_cores(), machine=os.cpu_count(), child=child,\n"
        "                      omp=os.environ.get('OMP_NUM_THREADS'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] is False
    want_policy = preset.get("OMP_WAIT_POLICY", "PASSIVE")
    assert seen["policy"] == want_policy and seen["child"] == want_policy
    if "OMP_NUM_THREADS" in preset:
        assert seen["omp"] == preset["OMP_NUM_THREADS"] and seen["threads"] == int(preset["OMP_NUM_THREADS"])
    elif seen["cores"] < seen["machine"]:
        assert seen["omp"] == str(seen["cores"]) and seen["threads"] == seen["cores"]
    else:
        assert seen["omp"] is None  # torch's own default
