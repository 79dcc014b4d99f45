"""Atomic results files: write to a temporary file in the same folder, then rename over the target.

A killed run leaves either the old file or the new one, never half of one. Files get the
permissions of any file the user creates (``0o666`` minus the umask), not the ``0o600`` of a
temporary file, so a group-shared results folder or cache stays readable by the group. `hold_folder` keeps a
second run out of a folder a run is writing into.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status; elsewhere set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no reader API elsewhere: set and restore at once
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], mode: str = "w") -> Path:
    """Call ``write(fileobj)`` on a temporary file next to `path`, fsync it, and rename it to `path`.

    The file ends with mode ``0o666 & ~umask``, as if the user had created it directly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_version(st: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another without reading it: size, mtime and ctime in ns, inode and
    device. An atomic rewrite is a new inode, and a rewrite in place changes ctime, even where a coarse file system
    clock gives two versions within a second the same mtime."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def try_lock(path: str | os.PathLike) -> int | None:
    """An fd holding an exclusive, non-blocking ``flock`` on `path` (created if absent); None if another process
    holds it. Close the fd to release it (the lock also ends with the process)."""
    import errno
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


#: Environment variables that number a process of a launch (DDP, several nodes, SLURM tasks): the ones numbered
#: above 0 share their first process's folder.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
FOLDER_LOCK = ".mixrobust.lock"


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, fix: str) -> Iterator[None]:
    """Hold ``<folder>/.mixrobust.lock`` for the ``with`` block: a second run into the same folder raises one
    ConfigError naming the holder and `fix` (how to give it another folder), before it writes anything there. Two
    runs' files would mix in one folder: one run's marker vouching for the other's results, one's checkpoint tested
    as the other's. On a file system without locks the run goes on with a warning."""
    from mixrobust.errors import ConfigError

    path = Path(folder) / FOLDER_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = try_lock(path)
    except OSError as err:
        logging.getLogger(__name__).warning("cannot lock %s (%s): nothing stops another run from writing into %s",
                                            path, err, path.parent)
        yield
        return
    if fd is None:
        holder = path.read_text().strip() or "another process"
        raise ConfigError(f"another run ({holder}) is writing into {path.parent}: two runs in one folder would mix "
                          f"their files. Give this one its own folder: {fix}, or wait for that run to end")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=float))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON content of `path`, or None when it is absent or unreadable (callers treat both as not written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def csv_text(columns: Sequence[str], rows: Iterable[dict]) -> str:
    """CSV text of `rows` under a header of `columns`: None and NaN become empty cells, floats keep full
    precision (their repr, so inf stays inf and a re-read gives the same float)."""
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return repr(value) if isinstance(value, float) else value

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([cell(row[c]) for c in columns] for row in rows)
    return buffer.getvalue()


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def package_version() -> str:
    """mixrobust's installed version ("0+unknown" when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixrobust")
    except PackageNotFoundError:
        return "0+unknown"
