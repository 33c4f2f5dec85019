"""Garbage-collector settings for a long-running proxy process.

CPython's cycle collector runs its youngest generation every 700 net container allocations. A proxy
allocates a handful of short-lived objects per packet (frames, events, buffers) that reference counting
frees at once, so at the default threshold the collector wakes every few requests to find nothing: in a
ztunnel at 1000 requests/s it was ~4 % of the process's CPU (perf: gc_collect_main, visit_decref).
Objects created while starting (modules, classes, config) live for the whole run; freezing them keeps the
older generations' scans from walking them again and again.

Cycles are still collected, only in larger batches: the memory they can hold meanwhile is bounded by the
threshold (tens of thousands of small objects, a few MiB at most).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # net allocations between young collections (CPython's default: 700)
OLDER_THRESHOLDS = (20, 20)  # young collections per middle one, middle ones per full one (default 10, 10)


def tune_gc() -> tuple[int, int, int]:
    """Move everything alive now (the startup objects) out of the collector's sight, and collect less
    often. Returns the thresholds in force."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    return gc.get_threshold()
