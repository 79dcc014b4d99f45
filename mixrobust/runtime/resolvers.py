"""OmegaConf resolvers used by the configs (``mr.*``; `register_resolvers`, called on import of `mixrobust`)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

#: The longest rendering of a job's overrides in its folder name; a longer one is cut and ends in a hash.
MAX_OVERRIDES_CHARS = 80
#: Keys left out of a job folder's name when the launch's grid is unknown (the sweep folder names the preset).
UNNAMED_KEYS = ("experiment",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def gpu_count() -> int:
    """Number of visible CUDA devices (`mixrobust.runtime.placement.visible_gpus`), at least 1 (``${mr.gpu_count:}``,
    e.g. joblib's n_jobs)."""
    from mixrobust.runtime.placement import visible_gpus

    return max(1, visible_gpus())


def pgd_step(eps, steps) -> float:
    """PGD step size 2.5 * eps / steps (Madry et al.): the attack can cross the ball and back."""
    return 2.5 * float(eps) / int(steps)


def _path_text(path: str) -> str:
    """A path as its last two components joined by ``-``, without ``checkpoints`` folders and a
    ``.ckpt`` suffix: ``outputs/a/h/checkpoints/best.ckpt`` -> ``h-best``."""
    parts = [p for p in re.split(r"[/\\]+", path) if p not in ("", ".", "..", "checkpoints")]
    if parts and parts[-1].endswith(".ckpt") and len(parts[-1]) > 5:
        parts[-1] = parts[-1][:-5]
    return "-".join(parts[-2:])


def _value_text(value: str) -> str:
    """An override's value without brackets, braces, quotes or spaces: list items joined by ``+``,
    paths shortened (`_path_text`), any other character outside ``[A-Za-z0-9._+-]`` as ``_``."""
    items = [v.strip().strip("'\"").strip() for v in re.split(r"[\[\]{}(),]", value)]
    items = [_path_text(v) if re.search(r"[/\\]", v) else v for v in items if v]
    return _UNSAFE.sub("_", "+".join(items))


def _split(override: str) -> tuple[str, str | None]:
    """An override string's key (without ``+`` / ``++`` / ``~``, as `mixrobust.runtime.jobs.override_key`)
    and value (None for a deletion ``~key``)."""
    key, eq, value = override.partition("=")
    return key.strip().lstrip("+~"), (value if eq else None)


def _short_keys(keys: Iterable[str]) -> dict[str, str]:
    """Each key's last dotted (or ``/``) component, its whole path with ``.`` where that is ambiguous."""
    keys = sorted(set(keys))
    last = {k: re.split(r"[./]", k.partition("@")[0])[-1] for k in keys}
    return {k: _UNSAFE.sub("_", last[k] if list(last.values()).count(last[k]) == 1 else k.replace("/", "."))
            for k in keys}


def job_dir_name(num: int | None, overrides: Sequence[str], named: Iterable[str] | None = None,
                 exclude: Iterable[str] = ()) -> str:
    """The folder name of job `num` of a multirun: ``<num>_<key>=<value>,...``, e.g. ``3_alphas=0.6,r_options=one``.

    `overrides` are the job's task overrides (``hydra.overrides.task``); the name holds those whose key
    is in `named` (the launch's grid axes), or, with `named` None, every one but `UNNAMED_KEYS`, and never
    those in `exclude`. Keys are cut to their last component where that is unambiguous, values are
    made filesystem-safe (`_value_text`: no ``/``, brackets, quotes or spaces), items are sorted by
    (shortened) key and joined by ``,``. A rendering longer than `MAX_OVERRIDES_CHARS` is cut and ends
    in ``-`` and 8 hex digits of a hash of the named overrides, so different overrides keep different
    names. With no override to name, the name is the job number alone (as in sweeps of earlier versions).
    """
    num = "None" if num is None else int(num)  # None: resolved outside a multirun (``--cfg hydra --resolve``)
    skip = set(exclude) | (set() if named is not None else set(UNNAMED_KEYS))
    wanted = None if named is None else set(named)
    picked = sorted((key, value, o) for o in overrides for key, value in [_split(str(o))]
                    if key not in skip and (wanted is None or key in wanted))
    if not picked:
        return str(num)
    short = _short_keys(key for key, _, _ in picked)
    picked.sort(key=lambda item: (short[item[0]], item))
    body = ",".join(f"~{short[key]}" if value is None else f"{short[key]}={_value_text(value)}"
                    for key, value, _ in picked)
    if len(body) > MAX_OVERRIDES_CHARS:
        digest = hashlib.sha256("\n".join(o for _, _, o in picked).encode()).hexdigest()[:8]
        body = body[:MAX_OVERRIDES_CHARS - 9].rstrip(",=+-_.") + "-" + digest
    return f"{num}_{body}"


def _launch_context(num: int, overrides: Sequence[str]) -> tuple[set[str] | None, tuple[str, ...]]:
    """The grid axes of the launch job `num` belongs to (None if unknown: not a basic or checked
    sweeper's launch, or its ``multirun.yaml`` lists other jobs) and the keys of
    ``hydra.job.config.override_dirname.exclude_keys``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, ()
    hc = HydraConfig.get()
    exclude = tuple(str(k) for k in OmegaConf.select(hc, "job.config.override_dirname.exclude_keys", default=None)
                    or ())
    try:
        from mixrobust.runtime.jobs import latest_grid

        sweep_dir = Path(str(hc.sweep.dir))
        if not sweep_dir.is_absolute():  # relative to where the sweep started
            sweep_dir = Path(str(OmegaConf.select(hc, "runtime.cwd", default=None) or os.getcwd())) / sweep_dir
        grid = latest_grid(sweep_dir)
    except Exception as exc:  # noqa: BLE001 - an unreadable launch only makes the name longer
        log.debug("job %d: the launch's grid is unknown (%s); its folder is named after all its overrides", num, exc)
        grid = None
    if grid is None or not (num < len(grid[1]) and grid[1][num] == frozenset(overrides)):
        return None, exclude
    return grid[0], exclude


def job_dir(num, overrides) -> str:
    """``${mr.job_dir:${hydra:job.num},${hydra:overrides.task}}``: the folder name of a multirun job
    (`job_dir_name`), naming the overrides on the axes of its launch's grid (read from the sweep
    folder's ``multirun.yaml``: the sweeper's params and the command line's sweeps), all but
    ``experiment=`` when the grid is unknown, never ``hydra.job.config.override_dirname.exclude_keys``."""
    overrides = [str(o) for o in (overrides or [])]
    named, exclude = (None, ()) if num is None else _launch_context(int(num), overrides)
    return job_dir_name(num, overrides, named, exclude)


def register_resolvers() -> None:
    """Register the ``mr.*`` resolvers (idempotent).

    ``${mr.mul_int:a,b}`` = int(a * b), e.g. LR milestones as fractions of max_epochs;
    ``${mr.gpu_count:}`` = max(1, number of visible CUDA devices), e.g. one local job per GPU;
    ``${mr.pgd_step:eps,steps}`` = 2.5 * eps / steps, PGD's step size in eps sweeps;
    ``${mr.job_dir:${hydra:job.num},${hydra:overrides.task}}`` = a multirun job's folder name, its number
    and its grid values (`job_dir`), e.g. ``3_alphas=0.6,r_options=one``.
    """
    if not OmegaConf.has_resolver("mr.mul_int"):
        OmegaConf.register_new_resolver("mr.mul_int", lambda a, b: int(float(a) * float(b)))
    if not OmegaConf.has_resolver("mr.pgd_step"):
        OmegaConf.register_new_resolver("mr.pgd_step", pgd_step)
    if not OmegaConf.has_resolver("mr.gpu_count"):
        OmegaConf.register_new_resolver("mr.gpu_count", gpu_count)
    if not OmegaConf.has_resolver("mr.job_dir"):
        OmegaConf.register_new_resolver("mr.job_dir", job_dir)
