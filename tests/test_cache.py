"""The on-disk tensor cache: keys, digests, round trips, corrupt/foreign entries, concurrency."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixrobust.errors import ConfigError
from mixrobust.runtime import cache as cache_mod
from mixrobust.runtime.cache import FORMAT_VERSION, CacheKey, DiskCache, file_digest, tensor_digest
from mixrobust.runtime.files import atomic_write, current_umask, sha256_file, write_json, write_text

LOGGER = "mixrobust.runtime.cache"


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(7, 10, generator=g),
        "labels": torch.randint(0, 10, (7,), generator=g, dtype=torch.int64),
        "correct": torch.rand(7, generator=g) > 0.5,
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def warnings_about(caplog, word: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING and word in r.getMessage()]


# ---------------------------------------------------------------------------------------- digests


def test_round_trip_dtypes(tmp_path):
    cache = DiskCache(tmp_path / "cache")
    key = cache.key("logits", ckpt="abc", n=7)
    tensors = sample_tensors()
    tensors["half"] = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    tensors["bf16"] = torch.linspace(-1, 1, 5, dtype=torch.bfloat16)
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    tensors["empty"] = torch.zeros(0, 3)
    tensors["strided"] = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous input
    tensors["grad"] = torch.ones(3, requires_grad=True)
    path = cache.save(key, tensors)
    assert path == cache.path(key) and path.name == key.filename and path.is_file()
    loaded = DiskCache(tmp_path / "cache").load(key)
    assert loaded is not None
    assert all(t.device.type == "cpu" for t in loaded.values())
    assert_same(loaded, {k: v.detach() for k, v in tensors.items()})
    assert loaded["strided"].shape == (4, 3)


def test_save_tensors_sharing_memory(tmp_path):
    cache = DiskCache(tmp_path)
    t = torch.arange(10.0)
    key = cache.key("logits", x=1)
    cache.save(key, {"a": t, "b": t, "head": t[:3]})
    assert_same(cache.load(key), {"a": t, "b": t, "head": t[:3]})


def test_key_digest_insensitive_to_order_and_copies_parts():
    parts = {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10, "norm": "Linf"}, "indices": [1, 2, 3]}
    k1 = CacheKey("adversarial", parts)
    reordered = {"indices": (1, 2, 3), "attack": {"norm": "Linf", "steps": 10, "eps": 8 / 255}, "ckpt": "d1"}
    k2 = CacheKey("adversarial", reordered)
    assert k1.digest == k2.digest and k1 == k2 and hash(k1) == hash(k2)
    assert len(k1.digest) == 64 and k1.filename == f"adversarial-{k1.digest[:32]}.safetensors"
    assert DiskCache(None, enabled=False).key("adversarial", **parts).digest == k1.digest
    parts["ckpt"] = "changed"  # the key keeps its own copy
    assert k1.digest == k2.digest
    assert json.loads(k1.canonical_json) == {"kind": "adversarial", "parts": k2.parts}


@pytest.mark.parametrize(
    "kind, parts",
    [
        ("logits", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10}, "seed": 0}),  # kind
        ("adversarial", {"ckpt": "d2", "attack": {"eps": 8 / 255, "steps": 10}, "seed": 0}),
        ("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 256, "steps": 10}, "seed": 0}),
        ("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 11}, "seed": 0}),
        ("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10}, "seed": 1}),
        ("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10}, "seed": True}),
        ("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10}, "seed": None}),
        ("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10}}),
        ("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10}, "seed": 0, "x": 0}),
    ],
)
def test_key_digest_sensitive_to_any_change(kind, parts):
    base = CacheKey("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10}, "seed": 0})
    other = CacheKey(kind, parts)
    assert other.digest != base.digest and other.filename != base.filename and other != base


KEY_SCRIPT = """
from mixrobust.runtime.cache import CacheKey
print(CacheKey("adversarial", {"seed": 0, "attack": {"steps": 10, "eps": 8 / 255}, "ckpt": "d1"}).digest)
"""


def test_key_digest_stable_across_processes():
    key = CacheKey("adversarial", {"ckpt": "d1", "attack": {"eps": 8 / 255, "steps": 10}, "seed": 0})
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", KEY_SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == key.digest


@pytest.mark.parametrize("kind", ["", "Logits", "log-its", "a/b", "x" * 33, 3])
def test_key_rejects_bad_kind(kind):
    with pytest.raises(ValueError, match="kind"):
        CacheKey(kind, {})


@pytest.mark.parametrize("parts", [{"x": object()}, {"x": float("nan")}, {"x": {1: 2, "a": 3}}, ["x"]])
def test_key_rejects_parts_that_are_not_plain_json(parts):
    with pytest.raises(TypeError):
        CacheKey("logits", parts)


def test_file_digest(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"weights" * 1000)
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_digest(str(path)) == file_digest(tmp_path / "." / "model.ckpt")

    path.write_bytes(b"other weights")  # other size
    assert file_digest(path) == hashlib.sha256(b"other weights").hexdigest()

    st = path.stat()
    path.write_bytes(b"OTHER weights")  # same size: the new mtime makes it rehash
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_digest(path) == hashlib.sha256(b"OTHER weights").hexdigest()

    calls = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        assert file_digest(path) == hashlib.sha256(b"OTHER weights").hexdigest()
    assert calls == []  # memoized: hashed above already
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    file_digest(path)
    assert len(calls) == 1
    # a same-size file put in its place with the same mtime (a coarse file system clock): another inode, rehashed
    st = path.stat()
    new = tmp_path / "new.ckpt"
    new.write_bytes(b"0THER weights")
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)
    assert file_digest(path) == hashlib.sha256(b"0THER weights").hexdigest()


def test_tensor_digest():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x.t()) == tensor_digest(x.t().contiguous())
    assert tensor_digest(x, x[0]) != tensor_digest(x[0], x)
    distinct = {
        tensor_digest(x),
        tensor_digest(x.reshape(4, 3)),
        tensor_digest(x.view(torch.int32)),  # same bytes, other dtype
        tensor_digest(x + (torch.arange(12).reshape(3, 4) == 5)),  # one value
        tensor_digest(x, x),
        tensor_digest(),
    }
    assert len(distinct) == 6
    assert tensor_digest(torch.zeros(0, 3)) != tensor_digest(torch.zeros(3, 0))


# ---------------------------------------------------------------------------- misses and repairs


def test_get_or_compute_computes_once(tmp_path):
    cache = DiskCache(tmp_path / "c")
    key = cache.key("logits", ckpt="abc")
    calls = []

    def compute():
        calls.append(1)
        return sample_tensors()

    first = cache.get_or_compute(key, compute)
    second = cache.get_or_compute(key, compute)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert_same(first, second)
    other = DiskCache(tmp_path / "c")  # another process: still a hit
    assert_same(other.get_or_compute(key, compute), first)
    assert len(calls) == 1 and other.hits == 1
    other.get_or_compute(other.key("logits", ckpt="abd"), compute)
    assert len(calls) == 2


def test_get_or_compute_returns_computed_tensors(tmp_path):
    cache = DiskCache(tmp_path)
    out = sample_tensors()
    assert cache.get_or_compute(cache.key("logits", a=1), lambda: out) is out


def test_truncated_entry_is_recomputed_and_repaired(tmp_path, caplog):
    cache = DiskCache(tmp_path)
    key = cache.key("adversarial", ckpt="abc", eps=0.3)
    tensors = {"x": torch.rand(50, 1, 28, 28)}
    path = cache.save(key, tensors)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    calls = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = cache.get_or_compute(key, lambda: calls.append(1) or tensors)
    assert calls == [1] and out is tensors
    assert len(warnings_about(caplog, path.name)) == 1
    assert len(path.read_bytes()) == len(data)  # repaired (header key order may differ)
    repaired = DiskCache(tmp_path)
    assert_same(repaired.load(key), tensors)
    assert repaired.hits == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x01\x02\x03",
        random.Random(0).randbytes(4096),  # seeded: the same bytes every run
        (10**9).to_bytes(8, "little") + b"{}",
        (2).to_bytes(8, "little") + b"{}",  # valid empty safetensors file, without our metadata
        (5).to_bytes(8, "little") + b"[1,2]",
    ],
)
def test_garbage_entry_is_a_miss_logged_once(tmp_path, caplog, garbage):
    cache = DiskCache(tmp_path)
    key = cache.key("logits", ckpt="abc")
    cache.path(key).write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(key) is None
        assert cache.load(key) is None
    assert len(warnings_about(caplog, cache.path(key).name)) == 1
    assert (cache.hits, cache.misses) == (0, 2)
    assert_same(cache.get_or_compute(key, sample_tensors), sample_tensors())
    assert_same(cache.load(key), sample_tensors())


def test_valid_header_with_garbage_tensors_is_a_miss(tmp_path, caplog):
    cache = DiskCache(tmp_path)
    key = cache.key("logits", ckpt="abc")
    meta = {"format": FORMAT_VERSION, "key": key.canonical_json, "payload": "0" * 64}
    header = json.dumps({"__metadata__": meta, "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}})
    cache.path(key).write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 16)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(key) is None
    assert warnings_about(caplog, "corrupt")


def saved_entry(tmp_path):
    """A cache with one saved entry: (cache, key, path, metadata, tensors read back)."""
    cache = DiskCache(tmp_path)
    key = cache.key("logits", ckpt="abc")
    path = cache.save(key, sample_tensors())
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    return cache, key, path, meta, tensors


def test_tampered_payload_is_a_miss(tmp_path, caplog):
    cache, key, path, meta, tensors = saved_entry(tmp_path)
    tensors["logits"][3, 4] += 1.0
    save_file(tensors, path, metadata=meta)  # valid file, old payload digest
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(key) is None
    assert warnings_about(caplog, "payload")


def test_foreign_entry_is_a_miss_and_overwritten(tmp_path, caplog):
    cache = DiskCache(tmp_path)
    mine, theirs = cache.key("logits", ckpt="mine"), cache.key("logits", ckpt="theirs")
    os.replace(cache.save(theirs, {"x": torch.zeros(3)}), cache.path(mine))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(mine) is None
    assert warnings_about(caplog, "foreign")
    out = cache.get_or_compute(mine, lambda: {"x": torch.ones(3)})
    assert_same(cache.load(mine), out)


def test_older_format_is_foreign(tmp_path, caplog):
    cache, key, path, meta, tensors = saved_entry(tmp_path)
    save_file(tensors, path, metadata={**meta, "format": "mixrobust-cache/0"})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(key) is None
    assert warnings_about(caplog, "format")


def test_disabled_cache_writes_nothing(tmp_path):
    root = tmp_path / "cache"
    cache = DiskCache(root, enabled=False)
    key = cache.key("logits", ckpt="abc")
    calls = []
    assert cache.save(key, sample_tensors()) is None
    for _ in range(2):
        cache.get_or_compute(key, lambda: calls.append(1) or sample_tensors())
    assert len(calls) == 2 and (cache.hits, cache.misses) == (0, 2)
    assert not root.exists() and list(tmp_path.iterdir()) == []
    DiskCache(root).save(key, sample_tensors())  # an entry written by an enabled cache is ignored
    assert cache.load(key) is None


def test_folder_created_on_demand(tmp_path):
    root = tmp_path / "a" / "b"
    cache = DiskCache(root)
    assert not root.exists()
    assert cache.load(cache.key("logits", x=1)) is None
    cache.save(cache.key("logits", x=1), sample_tensors())
    assert [p.name for p in root.iterdir()] == [cache.key("logits", x=1).filename]


def test_root_that_is_a_file_is_a_config_error(tmp_path):
    root = tmp_path / "cache"
    root.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"cache\.dir=.*cache\.enabled=false"):
        DiskCache(root)
    with pytest.raises(ConfigError, match=r"cache\.dir"):
        DiskCache(None)
    assert DiskCache(root, enabled=False).load(CacheKey("logits", {})) is None


def test_failed_save_does_not_fail_get_or_compute(tmp_path, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "atomic_write", fail)
    cache = DiskCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = cache.get_or_compute(cache.key("logits", x=1), sample_tensors)
    assert_same(out, sample_tensors())
    assert warnings_about(caplog, "No space left")


# ----------------------------------------------------------------------- atomic files, permissions


@pytest.fixture
def umask():
    """Set the process umask for the test (``umask(0o002)``), restoring the original afterwards."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask):
    for mask in (0o002, 0o077, 0o022):
        umask(mask)
        assert current_umask() == mask
        assert current_umask() == mask  # reading it left it unchanged
    assert os.umask(0o022) == 0o022


def test_cache_entries_and_results_files_are_group_shared_under_umask_002(tmp_path, umask):
    umask(0o002)
    cache = DiskCache(tmp_path / "cache")
    entry = cache.save(cache.key("logits", ckpt="abc"), sample_tensors())
    via_compute = cache.path(cache.key("logits", ckpt="abd"))
    cache.get_or_compute(cache.key("logits", ckpt="abd"), sample_tensors)
    results = write_json(tmp_path / "out" / "results.json", {"acc": 0.5})
    text = write_text(tmp_path / "out" / "notes.txt", "hello\n")
    binary = atomic_write(tmp_path / "out" / "blob.bin", lambda f: f.write(b"\0\1"), mode="wb")
    for path in (entry, via_compute, results, text, binary):
        assert mode_of(path) == 0o664, path  # group-readable and group-writable, not mkstemp's 0o600
    assert json.loads(results.read_text()) == {"acc": 0.5} and binary.read_bytes() == b"\0\1"
    assert sorted(os.listdir(tmp_path / "out")) == ["blob.bin", "notes.txt", "results.json"]  # no .tmp left


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o000, 0o666), (0o027, 0o640)])
def test_atomic_files_get_0o666_minus_the_umask(tmp_path, umask, mask, expected):
    path = tmp_path / "results.json"
    path.write_text("old")
    os.chmod(path, 0o600)  # an older file's mode does not carry over: the new file replaces it
    umask(mask)
    write_json(path, [1, 2])
    assert mode_of(path) == expected and json.loads(path.read_text()) == [1, 2]
    cache = DiskCache(tmp_path / "cache")
    assert mode_of(cache.save(cache.key("logits", x=mask), sample_tensors())) == expected


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = write_text(tmp_path / "results.csv", "old\n")

    def fail(f):
        f.write("half of the new")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, fail)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["results.csv"]  # the temporary file is removed


@pytest.mark.parametrize("size", [0, 5, (1 << 20) - 1, 1 << 20, (3 << 20) + 17])
def test_sha256_file(tmp_path, size):
    path = tmp_path / "data.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    assert sha256_file(path) == sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
    assert file_digest(path) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ concurrency

N_WRITERS, ROUNDS, NUMEL = 4, 10, 1 << 20  # 4 MiB per entry


def _writer(root: str, wid: int, start) -> None:
    torch.set_num_threads(1)
    cache = DiskCache(root)
    key = cache.key("adversarial", test="concurrency")
    start.wait(timeout=120)
    for i in range(ROUNDS):
        v = wid * 1000 + i
        cache.save(key, {"x": torch.full((NUMEL,), float(v)), "tag": torch.tensor([v, wid, i])})


def test_concurrent_writers_and_reader(tmp_path, caplog):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(N_WRITERS + 1)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, start)) for w in range(N_WRITERS)]
    for p in procs:
        p.start()
    cache = DiskCache(tmp_path)
    key = cache.key("adversarial", test="concurrency")
    path = cache.path(key)
    reads, misses_after_first = 0, 0
    try:
        start.wait(timeout=120)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            deadline = time.monotonic() + 300
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                out = cache.load(key)
                if out is None:
                    misses_after_first += reads > 0
                    continue
                reads += 1
                v, wid, i = out["tag"].tolist()
                assert v == wid * 1000 + i and 0 <= wid < N_WRITERS and 0 <= i < ROUNDS
                assert out["x"].shape == (NUMEL,) and bool((out["x"] == v).all())
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * N_WRITERS
    assert not warnings_about(caplog, ""), "a reader saw a corrupt entry"
    assert misses_after_first == 0  # once written, the name never disappears
    final = cache.load(key)
    assert final is not None and final["tag"][2].item() == ROUNDS - 1  # the last writer's last write
    assert os.listdir(tmp_path) == [path.name]  # no .tmp files left behind
    print(f"{reads} complete reads during {N_WRITERS * ROUNDS} writes")


def test_code_digest_follows_the_model_libraries_versions(monkeypatch):
    """An upgraded torch or timm may compute other outputs from the same weights: cached tensors and finished runs of
    the old version are misses."""
    monkeypatch.setattr(cache_mod, "_code_digest", None)
    here = cache_mod.code_digest()
    installed = cache_mod.library_versions()
    assert installed["torch"] and torch.__version__.startswith(installed["torch"])
    monkeypatch.setattr(cache_mod, "_code_digest", None)
    monkeypatch.setattr(cache_mod, "library_versions", lambda: {**installed, "timm": "0.0.1"})
    assert cache_mod.code_digest() != here
