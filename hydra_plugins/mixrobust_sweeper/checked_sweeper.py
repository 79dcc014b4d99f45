"""``hydra/sweeper: checked``: Hydra's basic sweeper that checks every job of the grid before launching any.

Hydra's basic sweeper composes each job's config before launching a batch, to catch composition
errors early. This sweeper also calls ``check(job_config)`` (the dotted path in
``hydra.sweeper.check``, e.g. ``mixrobust.pipelines.check``) on each job's config, with the job's
Hydra runtime (number, output folder) in place, so a bad value at any grid point (job 7's alpha,
a missing checkpoint in one ``h_ckpt`` of a list) stops the whole sweep before job 0 starts, with
one message naming the job. With ``max_batch_size: null`` (the default) the whole grid is one
batch, so every job is checked before the first one runs.
"""


import copy
from typing import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import open_dict, read_write


@dataclass
class CheckedSweeperConf:
    _target_: str = "hydra_plugins.mixrobust_sweeper.checked_sweeper.CheckedSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    check: Optional[str] = None


ConfigStore.instance().store(group="hydra/sweeper", name="checked", node=CheckedSweeperConf, provider="mixrobust")


class CheckedSweeper(BasicSweeper):
    """`BasicSweeper` whose batches are checked job by job (``check``) before they are launched."""

    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 check: Optional[str] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.check = check

    def sweep(self, arguments: List[str]) -> Any:
        """The sweep, holding its folder: a second launch into it stops before Hydra records it there (its
        ``multirun.yaml``, the jobs' ``.hydra/``), which would make the first launch's report misread its jobs."""
        from mixrobust.runtime.files import hold_folder

        with hold_folder(Path(str(self.config.hydra.sweep.dir)), "hydra.sweep.dir=<folder>"):
            return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        super().validate_batch_is_legal(batch)
        if not self.check:
            return
        check = get_method(self.check)
        loader = self.hydra_context.config_loader
        start = self.batch_index - 1 if self.max_batch_size is None else (self.batch_index - 1) * self.max_batch_size
        saved = HydraConfig.instance().cfg  # None in the sweep's own process
        try:
            for offset, overrides in enumerate(batch):
                num = start + offset
                job = loader.load_sweep_config(master_config=self.config, sweep_overrides=list(overrides))
                with open_dict(job):
                    job.hydra.job.id = job.hydra.job.num = num
                HydraConfig.instance().set_config(job)  # resolves ${hydra:job.num} in sweep.subdir
                output_dir = str(Path(job.hydra.sweep.dir) / str(job.hydra.sweep.subdir))
                with read_write(job.hydra), open_dict(job.hydra):  # as the launcher sets it for the job
                    job.hydra.runtime.output_dir = output_dir
                HydraConfig.instance().set_config(job)
                try:
                    check(job)
                except Exception as exc:  # noqa: BLE001 - re-raised with the job named, same type when it can be
                    named = _named(exc, num, sum(len(b) for b in self.overrides), overrides)
                    if job.get("debug") is True:  # the app's debug switch: Hydra prints the traceback
                        raise RuntimeError(str(named)) from exc
                    raise named from None
        finally:
            HydraConfig.instance().cfg = saved


def _named(exc: Exception, num: int, total: int, overrides: Sequence[str]) -> Exception:
    """`exc` with the job's number and overrides in front of its message (same type, else unchanged)."""
    message = f"job {num} of {total} ({' '.join(overrides) or 'no overrides'}), checked before any job ran: {exc}"
    try:
        named = copy.copy(exc)
        named.args = (message,)
        return named
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied keeps its own message
        return exc
