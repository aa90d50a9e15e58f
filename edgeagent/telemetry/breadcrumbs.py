"""The breadcrumb ring and the in-memory log ring that crash reports and commands read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


def level_name(levelno: int) -> str:
    """Protocol level for a logging level number."""
    for number in sorted(LEVELS, reverse=True):
        if levelno >= number:
            return LEVELS[number]
    return "debug"


@dataclass(frozen=True, slots=True)
class Crumb:
    ts: float
    level: str
    category: str
    message: str
    data: dict[str, Any] | None = None
    call_id: str | None = None
    trace_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Breadcrumbs:
    """The last N crumbs, oldest first."""

    def __init__(self, size: int = 100) -> None:
        self._ring: deque[Crumb] = deque(maxlen=size)

    def add(self, crumb: Crumb) -> None:
        self._ring.append(crumb)

    def snapshot(self, limit: int | None = None) -> list[dict[str, Any]]:
        items = list(self._ring)
        if limit is not None:
            items = items[-limit:]
        return [c.to_dict() for c in items]


class CrumbLogHandler(logging.Handler):
    """Turns log records at INFO and above into crumbs, and passes them on to `sink`.

    `sink` (the event streamer) receives our own records at `stream_level` and
    above, and third-party records only from ERROR up (libraries log chatty
    warnings while the broker is away). A record emitted while the sink runs is
    not fed back into it. With a loop bound (`bind_loop`), records logged on other
    threads (the device sampler, exporters) reach the sink on that loop: the sink
    writes the spool, which belongs to the loop's thread. The sink failing is
    reported like any handler error, never raised into the code that logged.
    """

    def __init__(
        self,
        crumbs: Breadcrumbs,
        sink: Callable[[Crumb], None] | None = None,
        *,
        stream_level: int = logging.WARNING,
    ) -> None:
        super().__init__(logging.INFO)
        self._crumbs = crumbs
        self._sink = sink
        self._stream_level = stream_level
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stream through `loop` from now on; call on the loop's own thread."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            crumb = Crumb(
                ts=record.created,
                level=level_name(record.levelno),
                category=f"log.{record.name.removeprefix('edgeagent.')}",
                message=record.getMessage(),
                call_id=getattr(record, "CALL_ID", None),
            )
        except Exception:  # noqa: BLE001 - a bad format string must not break logging
            self.handleError(record)
            return
        self._crumbs.add(crumb)
        if (
            self._sink is None
            or record.levelno < self._stream_level
            or not (record.name.startswith("edgeagent") or record.levelno >= logging.ERROR)
        ):
            return
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):  # the loop has closed: a crumb only
                loop.call_soon_threadsafe(self._stream, crumb, record)
            return
        self._stream(crumb, record)

    def _stream(self, crumb: Crumb, record: logging.LogRecord) -> None:
        if self._sink is None or self._busy:
            return
        self._busy = True
        try:
            self._sink(crumb)
        except Exception:  # noqa: BLE001 - logging must never raise into its caller
            self.handleError(record)
        finally:
            self._busy = False


class LogRing(logging.Handler):
    """The last N formatted log lines with their level, for crash reports and `logs`."""

    def __init__(self, size: int = 100, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self._ring: deque[tuple[float, int, str]] = deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._ring.append((record.created, record.levelno, self.format(record)))
        except Exception:  # noqa: BLE001 - logging.Handler contract: report, never raise
            self.handleError(record)

    def lines(
        self, limit: int | None = None, *, min_level: int = 0, since: float | None = None
    ) -> list[str]:
        out = [
            line
            for ts, lvl, line in self._ring
            if lvl >= min_level and (since is None or ts >= since)
        ]
        return out[-limit:] if limit else out

    def resize(self, size: int) -> None:
        self._ring = deque(self._ring, maxlen=size)


def now() -> float:
    """Wall time rounded to milliseconds, as the protocol's `ts`."""
    return round(time.time(), 3)
