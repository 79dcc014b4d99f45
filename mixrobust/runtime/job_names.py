"""The folder name of a multirun job: its number and the grid values it holds, e.g. ``0_alphas=0.5,r_options=one``.

`job_dir_name` renders a job's overrides filesystem-safe (paths as their run folder and file, no
brackets or quotes, keys shortened where unambiguous, at most `MAX_OVERRIDES_CHARS` then a hash);
the ``${mr.job_dir:}`` resolver (`mixrobust.runtime.resolvers`) names the job folders with it and
`mixrobust.runtime.jobs` recognizes them. Imports only the standard library.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

#: The longest rendering of a job's overrides in its folder name; a longer one is cut and ends in a hash.
MAX_OVERRIDES_CHARS = 80
#: Keys left out of a job folder's name when the launch's grid is unknown (the sweep folder names the preset).
UNNAMED_KEYS = ("experiment",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


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


def split_override(override) -> tuple[str, str | None]:
    """An override's key as the job folder names see it (``mix.alphas``, ``objective``, ``data@pkg``:
    without ``+`` / ``++`` / ``~``) and its value (None for a deletion ``~key``). `override` is an
    override string or a parsed Hydra override (read from its input line, as the launch wrote it)."""
    text = override if isinstance(override, str) else (override.input_line or override.get_key_element())
    key, eq, value = str(text).partition("=")
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
    picked = sorted((key, value, o) for o in overrides for key, value in [split_override(str(o))]
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
