"""Keep freed memory in the process for reuse instead of handing it back to the kernel (glibc malloc).

glibc serves a large block (above its mmap threshold) from a fresh mapping and unmaps it when freed, and it
returns free memory at the top of its heap to the kernel once that exceeds its trim threshold. Either way
the next tensor of that size lands on new pages, and every page costs a fault and a zeroing in the kernel.
Inference over many prompts allocates and frees tensors of many MiB per call (32 region prompts give
(32, 1024, 128) float32 image tokens, 16 MiB, several times a call).
Raising both thresholds keeps that memory mapped; the price is a resident size that stays near its peak.

Every malloc arena keeps its own freed memory, and glibc gives threads up to 8 arenas per core, so each thread that
once held a large block (a worker thread decoding a large image) would keep its own peak. The arenas are capped
(2: the main thread's and one the worker threads share), so the process keeps one peak, not one per thread.

So the resident size says little about what the process uses; `malloc_stats` tells memory in use from memory kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33+): every field a size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


_mallinfo2 = _libc_function("mallinfo2")
if _mallinfo2 is not None:
    _mallinfo2.argtypes, _mallinfo2.restype = [], _MallInfo2


def malloc_stats() -> tuple[int, int] | None:
    """(bytes in use, bytes kept free) of malloc over all its arenas: in use counts blocks handed out and not freed
    (mapped ones too), free what it holds for reuse; None where the C library has no `mallinfo2` (glibc < 2.33,
    musl, macOS)."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return info.uordblks + info.hblkhd, info.fordblks


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30, arenas: int = 2) -> bool:
    """Serve blocks up to `mmap_threshold` bytes from the heap (32 MiB: the most glibc before 2.35 takes), keep up
    to `trim_threshold` bytes of free heap, and let threads share at most `arenas` malloc arenas, for the whole
    process; call it before starting threads. Returns False where the C library has no `mallopt` (not glibc) or
    refuses a value."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        logger.info("this C library has no mallopt: freed memory goes back to the kernel as it decides")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {M_MMAP_THRESHOLD: mmap_threshold, M_TRIM_THRESHOLD: trim_threshold, M_ARENA_MAX: arenas}
    if not all(mallopt(param, value) == 1 for param, value in settings.items()):
        logger.warning("mallopt refused one of %s (mmap threshold, trim threshold, arenas)", list(settings.values()))
        return False
    logger.info(
        "malloc keeps freed memory: blocks up to %d MiB from the heap, up to %d MiB of free heap kept, %d arenas",
        mmap_threshold >> 20,
        trim_threshold >> 20,
        arenas,
    )
    return True
