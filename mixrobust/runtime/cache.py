"""An on-disk cache of intermediate tensors shared by the jobs of an alpha sweep.

What is cached: tensors that many Hydra jobs of one sweep recompute identically and that are
expensive to get, e.g. the base models' logits on the clean images (kind ``"logits"``) or the PGD
images against g or h (kind ``"adversarial"``). The callers decide what goes in an entry; this
module only stores and checks named CPU tensors.

Key: a `CacheKey` is a short `kind` word plus a JSON-serialisable `parts` dict that must name
everything the tensors depend on: the checkpoint's content hash (`file_digest`), the data subset
(`tensor_digest` of the images and labels, or the indices), the attack settings and seed, the
code's behaviour version. Its `digest` is the sha256 of the canonical JSON (sorted keys, fixed
separators) of ``{"kind": ..., "parts": ...}``, so equal keys get equal digests in every process
whatever the dict order, and any change of a value gives another digest.

File format: ``<root>/<kind>-<digest[:32]>.safetensors``, a plain safetensors file (never a
pickle) whose string metadata holds ``format`` (`FORMAT_VERSION`), ``key`` (the key's canonical
JSON) and ``payload`` (sha256 over the tensor names and `tensor_digest` of each tensor, in sorted
name order).

Concurrency: several processes may compute and save the same key at once. Each writes a complete
file under a unique temporary name in the cache folder, fsyncs it, then renames it onto the final
name with `os.replace`, which is atomic within one file system; a reader reads the file through one
open descriptor, which keeps the inode it opened even if the name is replaced meanwhile. So a
reader sees a complete old file, a complete new file or none; the last writer wins, and since
equal keys mean equal inputs, every writer's file is equally good.

Corrupt entries (truncated, garbage, not parseable by safetensors, payload digest mismatch) and
foreign ones (the stored key JSON or format version differs from the requested one: a file copied
in from another cache, a digest-prefix collision, an older format) are treated as misses: `load`
logs one warning naming the file and the reason and returns None, and `get_or_compute` recomputes
the tensors and overwrites the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from mixrobust.runtime.files import atomic_write, file_version, sha256_file
from mixrobust.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = "mixrobust-cache/1"
"""Stored in every file; bump it when the file layout or the payload digest changes."""

SUFFIX = ".safetensors"
_KIND_RE = re.compile(r"[a-z0-9_]{1,32}")

_file_digests: dict[tuple[str, int, int], str] = {}
_file_digests_lock = threading.Lock()


#: Sources that produce no number: a study's orchestration (its stages' configs are fingerprinted themselves) and
#: its report, which only reads results files. Editing them keeps a finished study's stages finished.
NOT_IN_CODE_DIGEST = ("study/", "pipelines/study.py", "pipelines/study_plan.py")


#: The libraries whose code computes a model's outputs (torch's kernels; the zoo's networks): their versions join
#: `code_digest`.
MODEL_LIBRARIES = ("torch", "torchvision", "timm", "robustbench")


def library_versions() -> dict[str, str | None]:
    """The installed version of each of `MODEL_LIBRARIES` (None: not installed)."""
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in MODEL_LIBRARIES}


def code_digest() -> str:
    """sha256 of the mixrobust package's Python sources (paths and contents) and of `library_versions`, computed
    once per process.

    Part of every cache key and run fingerprint: any change to the code that produced a result
    (an attack, a model, the mixing, an upgraded torch or timm) makes cached tensors and finished runs of the old
    code misses. `NOT_IN_CODE_DIGEST` lists the sources left out.
    """
    global _code_digest
    if _code_digest is None:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256(json.dumps(library_versions(), sort_keys=True).encode())
        for path in sorted(root.rglob("*.py")):
            if path.relative_to(root).as_posix().startswith(NOT_IN_CODE_DIGEST):
                continue
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _code_digest = h.hexdigest()
    return _code_digest


_code_digest: str | None = None


def file_digest(path: str | os.PathLike) -> str:
    """Return the sha256 hex digest of a file's content.

    Memoized in-process by the resolved path and `file_version`, so a large checkpoint is hashed once
    per process; rewriting the file changes its version and hence the memo key.
    """
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), *file_version(st))
    with _file_digests_lock:
        if memo in _file_digests:
            return _file_digests[memo]
    digest = sha256_file(path)
    if file_version(path.stat()) == file_version(st):  # not changed while hashing
        with _file_digests_lock:
            _file_digests[memo] = digest
    return digest


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` (contiguous CPU copy, native byte order), as a buffer for hashlib."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Return the sha256 hex digest over each tensor's dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_digest takes tensors, got {type(t).__name__}")
        data = _tensor_bytes(t)
        h.update(f"{t.dtype}|{tuple(t.shape)}|{data.nbytes}\n".encode())
        h.update(data)
    return h.hexdigest()


def _payload_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted tensor names and each tensor's `tensor_digest`."""
    entries = [[name, tensor_digest(tensors[name])] for name in sorted(tensors)]
    return hashlib.sha256(_canonical_json(entries).encode()).hexdigest()


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True)
class CacheKey:
    """What a cache entry depends on.

    Attributes:
        kind: A short ``[a-z0-9_]+`` word naming what is stored (``"logits"``, ``"adversarial"``);
            it prefixes the file name.
        parts: A JSON-serialisable dict naming every input of the tensors (checkpoint digest, data
            digest, attack settings, ...). Stored as its JSON round trip, so tuples become lists
            and later changes to the caller's dict do not change the key.
    """

    kind: str
    parts: dict

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not _KIND_RE.fullmatch(self.kind):
            raise ValueError(f"cache key kind must be 1-32 characters of [a-z0-9_], got {self.kind!r}")
        if not isinstance(self.parts, Mapping):
            raise TypeError(f"cache key parts must be a dict, got {type(self.parts).__name__}")
        try:
            text = _canonical_json(dict(self.parts))
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"cache key parts must be JSON-serialisable with string keys and finite numbers "
                f"(pass digests and str() of paths/devices): {e}"
            ) from e
        object.__setattr__(self, "parts", json.loads(text))

    def __hash__(self) -> int:
        return hash(self.digest)

    @property
    def canonical_json(self) -> str:
        """The canonical JSON of ``{"kind": ..., "parts": ...}``, as stored in the file."""
        return _canonical_json({"kind": self.kind, "parts": self.parts})

    @property
    def digest(self) -> str:
        """sha256 hex digest of `canonical_json`."""
        return hashlib.sha256(self.canonical_json.encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.kind}-{self.digest[:32]}{SUFFIX}"


class _BadEntry(Exception):
    """A cache file that is corrupt or foreign; the message says why."""


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length + JSON)."""
    if len(data) < 8:
        raise _BadEntry(f"corrupt: {len(data)} bytes, shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise _BadEntry(f"corrupt: header of {n} bytes in a file of {len(data)} bytes (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadEntry(f"corrupt: unreadable safetensors header ({e})") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise _BadEntry("foreign: no mixrobust cache metadata in the file")
    return meta


class DiskCache:
    """Named CPU tensors on disk under keys that name everything they depend on.

    Args:
        root: The cache folder, created on the first save. May be None when disabled.
        enabled: If False, nothing is read or written and `get_or_compute` always computes.

    Attributes:
        hits: Lookups answered from disk.
        misses: Lookups that found nothing usable (absent, corrupt, foreign, or disabled cache).

    Raises:
        ConfigError: If the cache is enabled and `root` is None or an existing non-folder.
    """

    def __init__(self, root: str | os.PathLike | None, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self.root = Path(root).expanduser() if root is not None else None
        self.hits = 0
        self.misses = 0
        self._warned: set[tuple[str, int, int, str]] = set()
        if self.enabled:
            if self.root is None:
                raise ConfigError("cache.dir is not set; set cache.dir=<folder> or cache.enabled=false")
            self._check_root()

    def __repr__(self) -> str:
        return f"DiskCache({str(self.root)!r}, enabled={self.enabled}, hits={self.hits}, misses={self.misses})"

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(
                f"cache folder {self.root} exists but is not a folder; "
                "set cache.dir= to a folder (or a path to create) or cache.enabled=false"
            )

    def key(self, kind: str, **parts: Any) -> CacheKey:
        """Return ``CacheKey(kind, parts)``."""
        return CacheKey(kind, parts)

    def path(self, key: CacheKey) -> Path:
        """The file that holds (or would hold) the entry for `key`."""
        if self.root is None:
            raise ConfigError("cache.dir is not set; set cache.dir=<folder> or cache.enabled=false")
        return self.root / key.filename

    def load(self, key: CacheKey) -> dict[str, torch.Tensor] | None:
        """Return the tensors stored under `key` (on CPU), or None on a miss.

        A miss is an absent file, a disabled cache, or a corrupt or foreign file; the latter two
        are logged once as a warning naming the file and the reason.
        """
        if not self.enabled:
            self.misses += 1
            return None
        path = self.path(key)
        try:
            with open(path, "rb") as f:  # one descriptor: a concurrent os.replace cannot mix files
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as e:  # unreadable (permissions on a shared folder, I/O error): compute instead
            log.warning("cache entry %s cannot be read (%s); computing it", path, e)
            self.misses += 1
            return None
        try:
            tensors = self._decode(data, key)
        except _BadEntry as e:
            self._warn(path, st, str(e))
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    @staticmethod
    def _decode(data: bytes, key: CacheKey) -> dict[str, torch.Tensor]:
        meta = _read_metadata(data)
        if meta.get("format") != FORMAT_VERSION:
            raise _BadEntry(f"foreign: format {meta.get('format')!r}, expected {FORMAT_VERSION!r}")
        if meta.get("key") != key.canonical_json:
            raise _BadEntry(f"foreign: stored for key {meta.get('key')!r}, not {key.canonical_json!r}")
        try:
            tensors = _st_load(data)
        except Exception as e:  # safetensors raises its own SafetensorError, or others on garbage
            raise _BadEntry(f"corrupt: safetensors cannot read it ({type(e).__name__}: {e})") from e
        if _payload_digest(tensors) != meta.get("payload"):
            raise _BadEntry("corrupt: tensor payload does not match its stored sha256")
        return tensors

    def _warn(self, path: Path, st: os.stat_result, reason: str) -> None:
        tag = (str(path), st.st_size, st.st_mtime_ns, reason)
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning("cache entry %s is unusable and will be recomputed: %s", path, reason)

    def save(self, key: CacheKey, tensors: Mapping[str, torch.Tensor]) -> Path | None:
        """Store `tensors` under `key` atomically (last writer wins); return the file, or None if disabled.

        Tensors are stored as contiguous CPU copies; the folder is created on demand.
        """
        if not self.enabled:
            return None
        prepared = _prepare(tensors)
        metadata = {"format": FORMAT_VERSION, "key": key.canonical_json, "payload": _payload_digest(prepared)}
        data = _st_save(prepared, metadata=metadata)
        del prepared
        self._check_root()
        return atomic_write(self.path(key), lambda f: f.write(data), mode="wb")

    def get_or_compute(
        self, key: CacheKey, compute: Callable[[], Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Return the tensors under `key`, calling ``compute()`` and saving its result on a miss.

        On a miss the tensors returned are those `compute` returned (not a re-read). A failed save
        (disk full, read-only folder) is logged as a warning and does not fail the caller.
        """
        cached = self.load(key)
        if cached is not None:
            return cached
        tensors = compute()
        if not isinstance(tensors, Mapping):
            raise TypeError(f"cache compute() must return a dict of tensors, got {type(tensors).__name__}")
        if self.enabled:
            try:
                self.save(key, tensors)
            except OSError as e:
                log.warning("could not write cache entry %s: %s", self.path(key), e)
        return tensors


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, detached CPU tensors, none sharing memory with another (safetensors refuses that)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"cache entries are dicts of tensors, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"cache entries map str to tensor, got {name!r}: {type(t).__name__}")
        t = t.detach().to("cpu")
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out
