"""Freed memory kept by the C allocator for the next step, rather than handed back to the kernel and faulted in again.

glibc's malloc serves an allocation over its mmap threshold (adaptive, at most 32 MiB) with a fresh mapping that it
unmaps when freed, and trims the top of its heap when more than a threshold is free there. A denoising step
allocates and frees the same large activations every step (a 512 px GEGLU projection: 42 MB at one sample), so each
step faults their pages in again, 4 KiB at a time, and the kernel zeroes every one. Served from a heap that keeps
what was freed, they are reused warm (measured: docs/benchmarks.md, "Allocator"). When no request is in flight
the backend hands the heap's free pages back (`release_free_memory`), so an idle worker holds what it uses, as
before; the next request's first step faults its activations in once.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_FREED_BYTES = 2**31 - 1  # the largest trim threshold mallopt's int takes: up to 2 GiB free at the top is kept
_libc: ctypes.CDLL | None = None  # set once retaining: process-wide and never undone (a later pipeline of this
# process asking for `system` still has it)


def retaining() -> bool:
    return _libc is not None


def retain_freed_memory() -> bool:
    """Makes this process's malloc serve every allocation from its heap (no per-allocation mappings) and keep up to
    KEEP_FREED_BYTES free at its top. False where the C library has no mallopt and malloc_trim (not glibc) or
    refuses."""
    global _libc
    if _libc is not None:
        return True
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        log.warning("the C library has no mallopt and malloc_trim: freed memory goes back to the kernel "
                    "(allocator: system)")
        return False
    if libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES):
        _libc = libc
    return _libc is not None


def release_free_memory() -> None:
    """Hands the free pages of a retaining heap back to the kernel (malloc_trim: the top of the heap, and whole
    free pages inside it); nothing where it does not retain."""
    if _libc is not None:
        _libc.malloc_trim(0)
