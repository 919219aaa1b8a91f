"""tune_allocator: blocks of a layer body's size stay in glibc's heap."""

from __future__ import annotations

import subprocess
import sys

_PROBE = r"""
import ctypes, sys
from plugin.memtune import MMAP_THRESHOLD, tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_blocks(size):
    before = libc.mallinfo2().hblks
    block = bytearray(size)
    after = libc.mallinfo2().hblks
    del block
    return after - before

assert tune_allocator()
print(mapped_blocks(1 << 20), mapped_blocks(MMAP_THRESHOLD - (64 << 10)),
      mapped_blocks(2 * MMAP_THRESHOLD))
"""


def test_megabyte_blocks_come_from_the_heap_after_tuning() -> None:
    # A process of its own: the thresholds are process-wide and stay set.
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "0", "1"], "a 1 MiB block was mmapped, or an 8 MiB one was not"
