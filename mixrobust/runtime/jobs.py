"""The job folders of a Hydra multirun: which finished, which did not, and which the latest launch asked for.

A job folder is finished when it holds an intact marker (`mixrobust.runtime.resume.read_marker`:
written last, with a checksum of every results file) recorded under the job's current overrides.
Folders with ``.hydra/`` but no such marker are incomplete (still running, failed, damaged, or
holding an earlier launch's results next to new overrides). Jobs are found at any depth below the
sweep folder, except in the report folder and dot-folders, and ordered by their relative path with
integer parts, and the job number of a ``<num>_<overrides>`` folder, compared as numbers (``2`` and
``2_alphas=0.5`` before ``10``).

Job folders are named ``<num>_<overrides>`` (``hydra.sweep.subdir``, `mixrobust.runtime.resolvers.job_dir`),
``<num>`` alone in sweeps of earlier versions: `job_number` reads the number back. A sweep folder of an
earlier version re-run by the same launch holds both (``1`` and ``1_seed=1``, the same job): `launch_jobs`
counts one of them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf

from mixrobust.errors import ConfigError
from mixrobust.runtime.job_names import job_dir_name, split_override
from mixrobust.runtime.resume import read_marker

log = logging.getLogger(__name__)

#: Sweepers whose job expansion `latest_launch` reproduces (Hydra's basic one and its checked subclass).
BASIC_SWEEPERS = ("BasicSweeper", "CheckedSweeper")


@dataclass
class JobFolder:
    """A finished job: its folder, name (path relative to the sweep folder), Hydra overrides, the
    marker file it finished with and that marker's content."""

    path: Path
    name: str
    overrides: list[str] = field(default_factory=list)
    marker: str = ""
    content: dict = field(default_factory=dict)


_NUMBERED = re.compile(r"([0-9]+)(?:_[^/]*)?")


def job_number(name: str) -> int | None:
    """The job number of a folder named ``<num>`` or ``<num>_<anything>`` (one path component), else None."""
    match = _NUMBERED.fullmatch(name)
    return int(match.group(1)) if match else None


def _sort_key(relative: Path) -> tuple:
    return tuple((1, 0, p) if job_number(p) is None else (0, job_number(p), p.partition("_")[2])
                 for p in relative.parts)


def read_overrides(job_dir: str | os.PathLike) -> list[str]:
    """The job's override strings from ``.hydra/overrides.yaml`` ([] if the file is absent or empty)."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    data = yaml.safe_load(path.read_text()) or []
    if not isinstance(data, list):
        raise ConfigError(f"{path} should hold a YAML list of override strings, not {type(data).__name__}")
    return [str(x) for x in data]


def _finished(folder: Path, markers: tuple[str, ...]) -> tuple[str, dict] | None:
    for marker in markers:
        if (folder / marker).is_file():
            content = read_marker(folder, marker)
            if content is None:
                return None
            recorded = content.get("overrides")
            if recorded is not None and sorted(recorded) != sorted(read_overrides(folder)):
                return None  # an earlier launch's results next to this launch's overrides
            return marker, content
    return None


def find_job_folders(sweep_dir: str | os.PathLike, markers: tuple[str, ...],
                     skip: str = "report") -> tuple[list[JobFolder], list[Path]]:
    """Finished jobs and incomplete job folders below `sweep_dir`, both sorted (module docstring)."""
    root = Path(sweep_dir)
    done, incomplete = [], []
    for folder, dirnames, filenames in os.walk(root):
        here = Path(folder)
        if any(m in filenames for m in markers) or ".hydra" in dirnames:
            found = _finished(here, markers)
            if found is None:
                incomplete.append(here)
            else:
                done.append(JobFolder(here, here.relative_to(root).as_posix(), read_overrides(here), *found))
            dirnames[:] = []
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and not (here == root and d == skip)]
    done.sort(key=lambda j: _sort_key(j.path.relative_to(root)))
    incomplete.sort(key=lambda p: _sort_key(p.relative_to(root)))
    return done, incomplete


def _launch(sweep_dir: str | os.PathLike) -> tuple[list, list, list[frozenset[str]]] | None:
    """The latest launch's parsed sweeper params, its parsed command-line task overrides and its jobs'
    override sets in Hydra's job order; None if unknown (`latest_launch`)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.load(path)
    sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None)
    if sweeper is None or str(sweeper.get("_target_", "")).rpartition(".")[2] not in BASIC_SWEEPERS:
        return None
    params = OmegaConf.to_container(sweeper.params, resolve=False) if sweeper.get("params") else {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
    overrides = OverridesParser.create().parse_overrides(arguments)
    jobs = [frozenset(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    return overrides[:len(params)], overrides[len(params):], jobs


def latest_launch(sweep_dir: str | os.PathLike) -> list[frozenset[str]] | None:
    """The override sets of the jobs the latest launch into `sweep_dir` asked for, or None if unknown.

    Hydra writes ``multirun.yaml`` into the sweep folder at every launch; its sweeper params and
    command-line task overrides are expanded into jobs exactly as Hydra's basic sweeper does
    (other sweepers' folders, or folders without the file, give None: every job counts).
    """
    launch = _launch(sweep_dir)
    return None if launch is None else launch[2]


def latest_grid(sweep_dir: str | os.PathLike) -> tuple[set[str], list[frozenset[str]]] | None:
    """The axes of the latest launch's grid and its jobs' override sets (`latest_launch`), or None if unknown.

    The axes are the keys of the sweeper's params (a preset's grid, also when the command line gives
    one of them a single value) and the command-line overrides that sweep (``threat.eps=0.1,0.2``):
    every key whose value can differ between the launch's jobs.
    """
    launch = _launch(sweep_dir)
    if launch is None:
        return None
    params, arguments, jobs = launch
    keys = [split_override(o)[0] for o in params] + [split_override(o)[0] for o in arguments if o.is_sweep_override()]
    return set(keys), jobs


def launch_job_names(sweep_dir: str | os.PathLike) -> list[str] | None:
    """The folder name each job of the latest launch into `sweep_dir` gets now, in job order (as
    ``hydra.sweep.subdir`` = ``${mr.job_dir:...}`` names it, `mixrobust.runtime.resolvers.job_dir`: its number,
    its values on the grid axes (`latest_grid`), without ``hydra.job.config.override_dirname.exclude_keys``);
    None if the launch is unknown or its recorded ``hydra.sweep.subdir`` names job folders otherwise."""
    grid = latest_grid(sweep_dir)
    if grid is None:
        return None
    axes, jobs = grid
    cfg = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
    sweep = OmegaConf.select(cfg, "hydra.sweep", default=None)
    subdir = OmegaConf.to_container(sweep, resolve=False).get("subdir") if isinstance(sweep, DictConfig) else None
    if subdir is not None and "mr.job_dir:" not in str(subdir):
        return None
    exclude = OmegaConf.select(cfg, "hydra.job.config.override_dirname.exclude_keys", default=None,
                               throw_on_resolution_failure=False)
    exclude = [str(k) for k in exclude or ()]
    return [job_dir_name(num, sorted(job), axes, exclude) for num, job in enumerate(jobs)]


def in_launch(job: JobFolder, wanted: list[frozenset[str]]) -> bool:
    """Whether `job` is one the latest launch asked for. Hydra numbers a launch's jobs in the
    sweeper's order, so a numbered job folder (``<num>_<overrides>``, or ``<num>`` from earlier
    versions) must hold that number's overrides (an old folder ``11_alphas=0.8`` is not the new job 1
    with alpha 0.8); other folder names match by overrides."""
    overrides = frozenset(job.overrides)
    num = job_number(job.name)
    if num is not None:
        return num < len(wanted) and wanted[num] == overrides
    return overrides in wanted


J = TypeVar("J")


def _finished_at(path: Path, markers: Sequence[str]) -> int:
    """When the folder's job finished: its newest marker file's mtime (ns), 0 without one."""
    times = []
    for marker in markers:
        try:
            times.append((path / marker).stat().st_mtime_ns)
        except OSError:
            pass
    return max(times, default=0)


def launch_jobs(jobs: Sequence[J], wanted: list[frozenset[str]], sweep_dir: str | os.PathLike,
                markers: Sequence[str]) -> tuple[list[J], list[J]]:
    """Finished `jobs` (`JobFolder`s, or anything with their ``path``, ``name`` and ``overrides``) split into
    those that count for the latest launch into `sweep_dir` (`wanted`: `latest_launch`) and the stale ones,
    both in the given order.

    Stale are the jobs not `in_launch`, and the extra folders of one job: a sweep folder of an earlier
    version keeps its finished ``1`` when the same launch, re-run, writes ``1_seed=1``; both hold job 1's
    overrides, one counts: the folder named as the launch names that job now (`launch_job_names`) if it is
    among them, else the one whose marker (the newest of `markers` in it) was written last.
    """
    launched = {id(j) for j in jobs if in_launch(j, wanted)}
    by_number: dict[int, list[J]] = {}
    for job in jobs:
        num = job_number(job.name)
        if num is not None and id(job) in launched:
            by_number.setdefault(num, []).append(job)
    names = None
    for num, group in by_number.items():
        if len(group) < 2:
            continue
        if names is None:
            names = launch_job_names(sweep_dir) or []
        named = [j for j in group if num < len(names) and j.name == names[num]]
        if named:
            keep = named[0]
        else:  # the last finished; of folders that finished at once, the last in the order
            keep = max(enumerate(group), key=lambda item: (_finished_at(Path(item[1].path), markers), item[0]))[1]
        others = [j for j in group if j is not keep]
        launched -= {id(j) for j in others}
        log.warning("%d finished folders hold job %d of the latest launch: %s counts (%s); left out as stale: %s",
                    len(group), num, keep.name, "named as the launch names it now" if named else "finished last",
                    ", ".join(j.name for j in others))
    return [j for j in jobs if id(j) in launched], [j for j in jobs if id(j) not in launched]
