"""Keep freed memory in the process for reuse instead of handing it back to the kernel (glibc malloc).

glibc serves a large block (above its mmap threshold) from a fresh mapping and unmaps it when freed, and it
returns free memory at the top of its heap to the kernel once that exceeds its trim threshold. Either way
the next tensor of that size lands on new pages, and every page costs a fault and a zeroing in the kernel.
Inference over many prompts allocates and frees tensors of many MiB per call (32 region prompts give
(32, 1024, 128) float32 image tokens, 16 MiB, several times a call).
Raising both thresholds keeps that memory mapped; the price is a resident size that stays near its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks up to `mmap_threshold` bytes from the heap (32 MiB: the most glibc before 2.35 takes) and
    keep up to `trim_threshold` bytes of free heap, for the whole process. Returns False where the C library
    has no `mallopt` (not glibc) or refuses a value."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        logger.info("this C library has no mallopt: freed memory goes back to the kernel as it decides")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1 or mallopt(M_TRIM_THRESHOLD, trim_threshold) != 1:
        logger.warning("mallopt refused mmap threshold %d / trim threshold %d bytes", mmap_threshold, trim_threshold)
        return False
    logger.info(
        "malloc keeps freed memory: blocks up to %d MiB from the heap, up to %d MiB of free heap kept",
        mmap_threshold >> 20,
        trim_threshold >> 20,
    )
    return True
