"""HeapTrimmer: calls the trim function given, counts releases; real glibc gives RSS back."""

from __future__ import annotations

import pytest

from edgeagent.health.heap import HeapTrimmer, glibc_malloc_trim


def test_trimmer_calls_trim_with_zero_and_counts_releases() -> None:
    calls: list[int] = []
    results = iter([1, 0])

    def trim(pad: int) -> int:
        calls.append(pad)
        return next(results)

    t = HeapTrimmer(trim)
    assert t.release() is True
    assert t.release() is False
    assert calls == [0, 0]
    assert (t.trims, t.released) == (2, 1)


def test_trimmer_without_trim_is_a_noop() -> None:
    t = HeapTrimmer(None)
    assert t.release() is False
    assert t.trims == 0


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_glibc_trim_returns_fragmented_heap_pages() -> None:
    trim = glibc_malloc_trim()
    if trim is None:
        pytest.skip("not glibc")
    # 20 MiB in 32 KiB buffers (each one malloc, below the mmap threshold), touched, then
    # every other one freed: the free chunks sit in the middle of the heap between live
    # ones, where glibc's free() never returns them and only malloc_trim does.
    chunks = [bytearray(b"\x01" * (32 * 1024)) for _ in range(640)]
    del chunks[::2]
    before = _rss_kib()
    assert HeapTrimmer(trim).release() is True
    after = _rss_kib()
    assert len(chunks) == 320
    assert before - after > 5 * 1024, (before, after)
