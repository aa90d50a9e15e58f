"""Returning freed C heap to the kernel after a call (glibc `malloc_trim`), measured in RSS.

A call frees megabytes of small numpy and codec buffers, below glibc's mmap threshold,
so they stay in the heap as free chunks and RSS does not come back down. `malloc_trim(0)`
releases whole free pages at the top and in the middle of every arena. It costs about a
millisecond and is a no-op where the C library is not glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

Trim = Callable[[int], int]


def glibc_malloc_trim() -> Trim | None:
    """glibc's `malloc_trim`, or None when the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Trim = fn
    return trim


class HeapTrimmer:
    """Calls `trim(0)` when asked (after a call ends); does nothing without one."""

    def __init__(self, trim: Trim | None) -> None:
        self._trim = trim
        self.trims = 0
        self.released = 0

    def release(self, *, collect: bool = False) -> bool:
        """Give free heap pages back to the kernel; True if the C library released any.

        With `collect`, first run a full garbage collection: a closed call leaves
        reference cycles (aiortc's peer connection graph, event-emitter callbacks)
        that would otherwise wait for the next generation-2 pass, so RSS would
        saw-tooth over several calls instead of returning after each one.
        """
        if collect:
            gc.collect()
        if self._trim is None:
            return False
        self.trims += 1
        freed = bool(self._trim(0))
        self.released += freed
        logger.debug("heap: malloc_trim released memory: %s", freed)
        return freed
