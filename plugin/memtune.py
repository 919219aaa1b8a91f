"""Allocator settings for the plugin and its archive workers.

Layer bodies pass through these processes as bytes objects of 32 KiB to 1 MiB
(aiohttp's parsed HTTP chunks, the gathered pieces, pipe reads).  glibc's
malloc serves requests above its mmap threshold with a fresh ``mmap`` and hands
freed heap tops back to the kernel past its trim threshold, so such buffers
come back as new pages that fault in one by one (and are zeroed by the kernel)
on every allocation: a profile of a tree ApplyDiff showed page faults as a
visible share of both the event loop's and the worker's time.  Fixed thresholds keep
that memory in the heap for reuse.  Costs: up to the trim threshold of freed
memory stays mapped (counted in RSS).
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Larger blocks still get their own mapping (returned at free).
MMAP_THRESHOLD = 4 << 20
#: Free heap above this much is given back to the kernel.
TRIM_THRESHOLD = 16 << 20


def tune_allocator() -> bool:
    """Set glibc's thresholds; False (and nothing changed) on another libc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: libc's
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
