"""Resuming a job: a fingerprint of what it computes, and a marker that says its files are final.

A job writes its results files first and its marker (``run.json``, ``certify_summary.json``) last,
atomically. The marker records the job's fingerprint (`fingerprint`: the configuration, the input
files' contents and the code) and the sha256 of every results file. `finished` accepts a job
folder only if the marker's fingerprint is this run's and every file still has its recorded
checksum; a damaged or edited results file makes the job recompute, with a warning. The marker
also records the Hydra overrides the job was written or adopted under, which the sweep report
uses to tell a job's own results from an earlier launch's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mixrobust.runtime.cache import code_digest, file_digest, tensor_digest
from mixrobust.runtime.files import sha256_file, write_json
from mixrobust.runtime.hydra_job import current_job

log = logging.getLogger(__name__)


def fingerprint(config: Mapping, inputs: Sequence[str | os.PathLike] = (), **extra: Any) -> str:
    """sha256 of a plain `config` (what the job was asked to do), the contents of its `inputs`
    files (e.g. checkpoints), the package's code (`code_digest`) and any `extra` JSON values."""
    blob = json.dumps({"config": config, "inputs": [file_digest(p) for p in inputs], "code": code_digest(),
                       **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def with_examples(fp: str, *tensors) -> str:
    """`fp` extended by the digest of the examples the job evaluates (images, labels, their positions): a folder
    whose data files changed since (another layout of the same data set, images added or removed) is recomputed,
    whatever its config."""
    return hashlib.sha256(f"{fp}|{tensor_digest(*tensors)}".encode()).hexdigest()


def read_marker(folder: str | os.PathLike, marker: str) -> dict | None:
    """The marker's content if it holds checksums that every listed file still matches, else None
    (absent, unreadable, or a damaged file: the latter two with a warning naming it)."""
    folder = Path(folder)
    path = folder / marker
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
        checksums = dict(content["checksums"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s is unreadable or lacks file checksums (damaged, or written by an older version); "
                    "the job is not counted as finished", path)
        return None
    for name, digest in checksums.items():
        file = folder / name
        if not file.is_file() or sha256_file(file) != digest:
            state = "is missing" if not file.is_file() else "does not match the checksum recorded in " + marker
            log.warning("%s %s (damaged or edited?); the job is not counted as finished", file, state)
            return None
    return content


def finished(folder: str | os.PathLike, marker: str, fp: str, files: Sequence[str]) -> dict | None:
    """The marker of a finished run of fingerprint `fp` with every one of `files` intact, else None.

    A finished run of another fingerprint, or with a damaged file, is reported with a warning (the
    caller recomputes it). A finished run found here is adopted by this launch: the marker records
    this job's overrides.
    """
    content = read_marker(folder, marker)
    if content is None:
        return None
    if content.get("fingerprint") != fp:
        log.warning("%s holds a run of a different configuration (or inputs, or code); recomputing it", folder)
        return None
    missing = [f for f in files if f not in content["checksums"]]
    if missing:
        log.warning("%s lacks %s; recomputing it", folder, ", ".join(missing))
        return None
    log.info("%s already holds this run's results: skipped (resume=false recomputes)", folder)
    overrides = current_job().overrides
    if sorted(content.get("overrides") or []) != sorted(overrides):
        write_json(Path(folder) / marker, {**content, "overrides": overrides})
    return content


def clear_marker(folder: str | os.PathLike, marker: str) -> None:
    """Remove an old marker before recomputing, so it can never vouch for new, half-written files."""
    (Path(folder) / marker).unlink(missing_ok=True)


def write_marker(folder: str | os.PathLike, marker: str, content: Mapping, fp: str,
                 files: Sequence[str | os.PathLike]) -> Path:
    """Write the marker last: `content`, the fingerprint, each file's sha256 and the job's overrides."""
    folder = Path(folder)
    names = sorted({Path(f).name for f in files} - {marker})
    checksums = {name: sha256_file(folder / name) for name in names}
    return write_json(folder / marker, {**content, "fingerprint": fp, "checksums": checksums,
                                        "overrides": current_job().overrides})
