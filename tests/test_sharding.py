"""map_shards: contiguous shards, results back in shard order, a user error in any process raised in the caller."""

from __future__ import annotations

import functools

import pytest
import torch

from mixrobust.errors import NonFiniteError
from mixrobust.runtime.sharding import map_shards, shard_bounds


def _describe(offset: int, fail_at: int | None, x: torch.Tensor, index: torch.Tensor, device: torch.device) -> dict:
    if fail_at is not None and bool((index == fail_at).any()):  # this process meets a model with NaN outputs
        raise NonFiniteError("h returned NaN or inf outputs on 1 of 3 examples")
    return {"index": index.tolist(), "sum": float(x.sum()) + offset, "device": str(device), "x_device": str(x.device)}


def test_one_process_runs_here_without_moving_the_tensors():
    x, index = torch.arange(8.0).view(8, 1), torch.arange(8)
    [part] = map_shards(functools.partial(_describe, 0, None), [x, index], torch.device("cpu"), 1)
    assert part == {"index": list(range(8)), "sum": 28.0, "device": "cpu", "x_device": "cpu"}


@pytest.mark.slow
def test_processes_get_contiguous_shards_in_order_and_errors_come_back(monkeypatch):
    x, index = torch.arange(10.0).view(10, 1), torch.arange(10)
    with monkeypatch.context() as inside:  # under srun (one task): the processes are still the job's own, not SLURM's
        for key, value in (("SLURM_NTASKS", "1"), ("SLURM_JOB_NAME", "evaluate"), ("SLURM_PROCID", "0"),
                           ("SLURM_LOCALID", "0"), ("SLURM_NODEID", "0"), ("SLURM_NTASKS_PER_NODE", "1"),
                           ("SLURM_JOB_ID", "1"), ("SLURM_NODELIST", "localhost")):
            inside.setenv(key, value)
        parts = map_shards(functools.partial(_describe, 100, None), [x[:5], index[:5]], torch.device("cpu"), 2)
    assert [p["index"] for p in parts] == [[0, 1, 2], [3, 4]] == [list(range(a, b)) for a, b in shard_bounds(5, 2)]
    assert [p["sum"] for p in parts] == [103.0, 107.0]
    with pytest.raises(NonFiniteError, match="h returned NaN or inf outputs on 1 of 3 examples"):
        map_shards(functools.partial(_describe, 0, 7), [x, index], torch.device("cpu"), 2)

