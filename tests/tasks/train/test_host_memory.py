"""A training process keeps the buffers it frees: the next step does not fault every page in again."""

import subprocess
import sys

import pytest

# Allocate, touch and free a 40 MB block 20 times (what a training step does with an activation buffer), counting
# the process's minor page faults; with keep_freed_memory first (argv[1] == "keep") or without.
PROBE = """
import ctypes, resource, sys
from tuneline.tasks.train.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.fast
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_training_buffers_stay_in_the_process():
    pages = (40 << 20) // 4096
    applied, kept = faults("keep")
    _, returned = faults("plain")
    assert applied == "True"
    assert returned > 10 * pages  # glibc maps a fresh block each time: every page faults in again
    assert kept < 2 * pages  # the first pass faults the block in; the other 19 reuse it
