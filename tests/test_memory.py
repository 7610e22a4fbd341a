"""`keep_freed_memory`: the large tensors of a many-prompt call reuse freed pages instead of faulting in new ones."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys

import pytest
from server_fixtures import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# `load` binds `predictor`; then 32 region captions of one image (per-prompt image tokens (32, 1024, 128): 16 MiB
# each), twice to warm up, then the page faults of each of four more calls. The median is taken: the heap may still
# grow once to a new peak in one call, which faults its new pages in that call only.
CALLS = """
import resource, numpy as np, torch
torch.set_num_threads(1)
{load}
predictor.set_image(np.zeros((480, 640, 3), np.uint8))
boxes = [(c * 80, r * 120, (c + 1) * 80, (r + 1) * 120) for r in range(4) for c in range(8)]
faults = []
with torch.no_grad():
    for i in range(6):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        predictor.caption_batch(boxes, max_new_tokens=4)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(*faults[2:])
"""
LIBRARY = f"""
from pixelllm import PixelLLM, Predictor
from pixelllm.memory import keep_freed_memory
predictor = Predictor(PixelLLM.from_pretrained({str(DEFAULT_MODEL_DIR)!r}))
"""
MANY_FAULTS = 2000  # a call that hands its large tensors back faults 4000-27000 pages in again (CI runs)
FEW_FAULTS = 1500  # kept: 0 in most calls; a clean-clone CI run saw 1024 (one 4 MiB growth) in two of four calls


def faults_per_call(load: str) -> float:
    """The median page faults of a 32-box call after warm-up, in a fresh process set up by `load`."""
    out = subprocess.run([sys.executable, "-c", CALLS.format(load=load)], capture_output=True, text=True, check=True)
    return statistics.median(float(f) for f in out.stdout.splitlines()[-1].split())


def test_freed_tensors_are_reused_without_page_faults():
    plain, kept = faults_per_call(LIBRARY), faults_per_call(LIBRARY + "assert keep_freed_memory()")
    assert plain > MANY_FAULTS, f"expected glibc to hand the tensors back and fault them in again: {plain} faults"
    assert kept < FEW_FAULTS, f"{kept} page faults per call with freed memory kept (without: {plain})"


@pytest.mark.parametrize("keep", [True, False])
def test_the_service_keeps_freed_memory_unless_told_not_to(keep):
    load = (
        "from server import Settings\nfrom server.inference import load_predictor\n"
        f"predictor, _ = load_predictor(Settings(model={str(DEFAULT_MODEL_DIR)!r}, device='cpu', "
        f"keep_freed_memory={keep}))"
    )
    faults = faults_per_call(load)
    assert faults < FEW_FAULTS if keep else faults > MANY_FAULTS, faults


# Eight threads each hold an 80 KiB array at once (below any mmap threshold: from the thread's arena), then the
# number of malloc arenas is read from glibc's `malloc_info` report (one <heap> element per arena).
ARENAS = """
import ctypes, ctypes.util, sys, tempfile, threading
import numpy as np
{setup}
together = threading.Barrier(8)
def hold():
    block = np.ones(10_000)
    together.wait()
    del block
threads = [threading.Thread(target=hold) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
with tempfile.NamedTemporaryFile("r") as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(report.read().count("<heap nr="))
"""


def arenas_after_eight_threads(setup: str) -> int:
    out = subprocess.run([sys.executable, "-c", ARENAS.format(setup=setup)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_threads_share_two_arenas_when_freed_memory_is_kept():
    plain = arenas_after_eight_threads("")
    kept = arenas_after_eight_threads("from pixelllm.memory import keep_freed_memory\nassert keep_freed_memory()")
    assert plain >= 5, f"expected glibc to give concurrent threads arenas of their own: {plain} arenas"
    assert kept <= 2, f"{kept} arenas with freed memory kept (without: {plain})"


STATS = """
import numpy as np
from pixelllm.memory import keep_freed_memory, malloc_stats
assert keep_freed_memory()
before = malloc_stats()
block = np.ones(16 << 20, np.uint8)  # below the 32 MiB mmap threshold: from the heap
held = malloc_stats()
del block
print(*before, *held, *malloc_stats())
"""


def test_malloc_stats_tell_memory_in_use_from_memory_kept():
    out = subprocess.run([sys.executable, "-c", STATS], capture_output=True, text=True, check=True)
    used_before, free_before, used_held, _, used_after, free_after = map(int, out.stdout.split())
    mib = 1 << 20
    assert used_held - used_before >= 16 * mib  # handed out
    assert abs(used_after - used_before) < mib  # and back
    assert free_before < 4 * mib <= 16 * mib <= free_after  # kept for reuse (with the free space it was cut from)
