"""Process-wide allocator settings for a process that moves bulk data through HBONE.

Tunnel traffic allocates and frees buffers of 256 KiB to 1 MiB all the time (socket reads, HTTP/2 frames,
TLS records). glibc serves blocks above its mmap threshold (128 KiB, raised on the fly) with fresh mmap'd
pages, which the kernel must zero on first touch, and gives heap memory back above its trim threshold: in
the benchmark that made throughput flip between two speeds, with a few hundred thousand page faults per
GiB in the slow runs. Keeping such blocks on the heap, and the heap from shrinking at every free, removes
that cost; memory held is bounded by the trim threshold above what is in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("hbone.allocator")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_allocator() -> bool:
    """Apply the settings when the C library is glibc; returns whether they were applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the allocator settings")
    return ok
