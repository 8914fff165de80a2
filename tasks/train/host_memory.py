"""Keep freed host memory in a training process instead of handing it back to the kernel after every step.

On a CPU every training step allocates and frees the same activation and gradient buffers. glibc's malloc serves
a block above its mmap threshold (at most 32 MB: a CIFAR batch of 256 at 32x32 with 32 channels in fp32 is 33.5 MB)
with a fresh mmap and unmaps it on free, and trims the top of its heap once enough is free; the next step then
faults every page in again, and the kernel zeroes each one. In a process that had decoded a data set first (the
pipeline's fetch and prepare run in the same process as train) this was 27-32 % of the training process's CPU time
as system time, and CIFAR-10 epochs took 48-55 s instead of 30-34 s (docs/benchmarks.md, CIFAR-10).

`keep_freed_memory` tells glibc to serve every block from its heaps (M_MMAP_MAX 0) and to keep up to 1 GiB free at
the top of the heap (M_TRIM_THRESHOLD): the process's footprint stays at its high-water mark, which a training
process reaches in its first steps anyway. Elsewhere (another C library, or a platform without mallopt) it does
nothing. The inference server does not call it: it runs no allocation-heavy steps and should give memory back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD_BYTES = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; true when glibc took them."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
    return _applied
