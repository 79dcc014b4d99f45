"""Hand the host memory that attacks free back to the operating system.

An attack allocates and frees tensors of the same few sizes at every step. glibc's allocator raises
its mmap threshold to the largest block freed so far (up to 32 MB), so after the first steps those
tensors come from the heap instead of their own mappings, and the freed heap pages stay in the
process: a long evaluation's resident memory then grows with the number of batches it has attacked,
although the live data does not. `release_freed_memory` asks glibc to return every free page
(``malloc_trim(0)``: whole free pages inside the heap too, not only its top), which bounds an
evaluation's peak memory by one batch's working set plus the per-example results. Elsewhere (macOS,
Windows, musl) it does nothing: those allocators return memory on their own terms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the host memory the process has freed to the operating system; True if anything was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
