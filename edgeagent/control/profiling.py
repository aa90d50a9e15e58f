"""The `memory` and `profile` commands: in-process diagnostics that run inside the live loop.

memory: tracemalloc snapshots `interval_s` apart (taken and compared on a worker thread, so
the loop only pauses for the C-level copy of the trace table), the top growth by line, gc
statistics and RSS. Tracing is started only for the measurement and stopped afterwards,
unless something else (PYTHONTRACEMALLOC, a debugger) had it on already.

profile: pyinstrument, a statistical profiler (a C-level setstatprofile hook that records a
stack only every `interval` seconds), chosen over yappi because yappi is deterministic (a hook
on every call and return, several times slower on a Pi's CPU, too much to leave running for
60 s beside the audio path) and over cProfile for the same reason. It runs with
`async_mode="disabled"`: the profile is of the whole event-loop thread (every task, callback
and the loop itself), not only of the coroutine that started it, which would mostly show our
own `sleep`. Coroutine frames appear in the stacks, so time is attributed to the task code
that used it. Worker threads are not sampled.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import resource
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

__all__ = [
    "ProfilerBusy",
    "cpu_profile",
    "memory_profile",
    "parse_status_rss_mb",
    "read_rss_mb",
]

_MIB: Final = 1024 * 1024


class ProfilerBusy(Exception):
    """A profile is already running in this thread (pyinstrument allows one)."""


def parse_status_rss_mb(status_text: str) -> float | None:
    """VmRSS from the text of /proc/<pid>/status, in MiB."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return round(int(parts[1]) / 1024, 2)
    return None


def read_rss_mb(proc_root: Path = Path("/proc")) -> float | None:
    """This process's resident set size in MiB (peak RSS where /proc is missing)."""
    try:
        return parse_status_rss_mb((proc_root / "self" / "status").read_text())
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (_MIB if sys.platform == "darwin" else 1024), 2)


_STDLIB_RE: Final = re.compile(r".*/lib/python3\.\d+/")


def _short(path: str) -> str:
    """A filename without the long site-packages / stdlib / repo prefix."""
    idx = path.rfind("site-packages" + os.sep)
    if idx >= 0:
        return path[idx + len("site-packages") + 1 :]
    idx = path.rfind("edgeagent" + os.sep)
    if idx >= 0:
        return path[idx:]
    return _STDLIB_RE.sub("", path)


def _gc_stats() -> dict[str, Any]:
    return {
        "enabled": gc.isenabled(),
        "counts": list(gc.get_count()),
        "thresholds": list(gc.get_threshold()),
        "generations": gc.get_stats(),
        "garbage": len(gc.garbage),
        "frozen": gc.get_freeze_count(),
    }


_FILTERS: Final = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def _compare(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int) -> list[Any]:
    stats = after.filter_traces(_FILTERS).compare_to(before.filter_traces(_FILTERS), "lineno")
    growth = [s for s in stats if s.size_diff > 0][:top]
    out = []
    for s in growth:
        frame = s.traceback[0]
        out.append(
            {
                "where": f"{_short(frame.filename)}:{frame.lineno}",
                "size_diff_kib": round(s.size_diff / 1024, 2),
                "count_diff": s.count_diff,
                "size_kib": round(s.size / 1024, 2),
                "count": s.count,
            }
        )
    return out


async def memory_profile(
    interval_s: float,
    top: int,
    sleep: Callable[[float], Awaitable[None]],
    *,
    rss: Callable[[], float | None] = read_rss_mb,
) -> dict[str, Any]:
    """Two tracemalloc snapshots `interval_s` apart: what grew, gc state and RSS."""
    was_tracing = tracemalloc.is_tracing()
    rss_before = rss()
    if not was_tracing:
        tracemalloc.start(1)  # one frame per trace: the line, at the least overhead
    try:
        tracemalloc.reset_peak()
        before = await asyncio.to_thread(tracemalloc.take_snapshot)
        await sleep(interval_s)
        after = await asyncio.to_thread(tracemalloc.take_snapshot)
        current, peak = tracemalloc.get_traced_memory()
        overhead = tracemalloc.get_tracemalloc_memory()
        growth = await asyncio.to_thread(_compare, before, after, top)
        del before, after
    finally:
        if not was_tracing:
            tracemalloc.stop()  # frees the traces; the snapshots were dropped above
    rss_after = rss()
    return {
        "interval_s": interval_s,
        "rss_mb_before": rss_before,
        "rss_mb_after": rss_after,
        "rss_delta_mb": (
            None if rss_before is None or rss_after is None else round(rss_after - rss_before, 2)
        ),
        "traced_mb": round(current / _MIB, 3),
        "traced_peak_mb": round(peak / _MIB, 3),
        "tracemalloc_overhead_mb": round(overhead / _MIB, 3),
        "tracing_was_on": was_tracing,
        "top_growth": growth,
        "gc": _gc_stats(),
        "note": "growth counts only allocations made while tracing (during the interval)",
    }


def _top_functions(root: Any, top: int, total: float) -> list[dict[str, Any]]:
    """Self and total time per function across the whole tree (pyinstrument Frames)."""
    self_time: dict[str, float] = {}
    incl_time: dict[str, float] = {}
    stack: list[tuple[Any, frozenset[str]]] = [(root, frozenset())]
    while stack:
        frame, on_path = stack.pop()
        if frame.is_synthetic:  # pyinstrument's "[self]"/"[await]" bookkeeping leaves
            for child in frame.children:
                stack.append((child, on_path))
            continue
        key = f"{frame.function} ({_short(frame.file_path or '?')}:{frame.line_no})"
        self_time[key] = self_time.get(key, 0.0) + frame.total_self_time
        if key not in on_path:  # recursion: count the outermost activation only
            incl_time[key] = incl_time.get(key, 0.0) + frame.time
        for child in frame.children:
            stack.append((child, on_path | {key}))
    ranked = sorted(self_time.items(), key=lambda kv: kv[1], reverse=True)[:top]
    denom = total if total > 0 else 1.0
    return [
        {
            "function": name,
            "self_s": round(s, 4),
            "self_pct": round(100 * s / denom, 1),
            "total_s": round(incl_time.get(name, 0.0), 4),
        }
        for name, s in ranked
        if s > 0
    ]


async def cpu_profile(
    duration_s: float,
    top: int,
    sleep: Callable[[float], Awaitable[None]],
    *,
    interval_s: float = 0.001,
) -> dict[str, Any]:
    """Sample the event-loop thread for `duration_s`; the top functions by self time."""
    from pyinstrument import Profiler  # imported on use: only this command needs it

    profiler = Profiler(interval=interval_s, async_mode="disabled")
    try:
        profiler.start()
    except RuntimeError as exc:  # another profiler active in this thread
        raise ProfilerBusy(str(exc)) from exc
    try:
        await sleep(duration_s)
    finally:
        session = profiler.stop()
    root = session.root_frame()
    cpu_s = session.cpu_time
    result: dict[str, Any] = {
        "duration_s": round(session.duration, 3),
        "cpu_s": round(cpu_s, 3) if cpu_s is not None else None,
        "samples": session.sample_count,
        "interval_ms": interval_s * 1000,
        "top": [],
        "profiler": "pyinstrument (event-loop thread, statistical)",
    }
    if root is not None:
        # Idle time in the selector (epoll) is time the loop was waiting, not working.
        result["top"] = await asyncio.to_thread(_top_functions, root, top, session.duration)
        idle = sum(f["self_s"] for f in result["top"] if f["function"].startswith("epoll.poll"))
        result["loop_idle_pct"] = round(100 * idle / max(session.duration, 1e-9), 1)
    return result
