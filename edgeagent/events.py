"""Internal events (frozen dataclasses named as past facts) and the bus that fans them out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every internal event."""


@dataclass(frozen=True, slots=True)
class Noted(Event):
    """Something worth a breadcrumb and an `events` message (protocol section 2)."""

    level: str
    category: str
    message: str
    data: dict[str, Any] | None = None
    call_id: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class HealthChanged(Event):
    """The call-health state (what the LEDs show) changed."""

    state: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BrokerConnected(Event):
    session: int


@dataclass(frozen=True, slots=True)
class BrokerDisconnected(Event):
    reason: str


@dataclass(frozen=True, slots=True)
class AlertChanged(Event):
    name: str
    state: str  # firing | resolved
    severity: str
    value: float | None
    threshold: float | None
    message: str
    runbook: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


E = TypeVar("E", bound=Event)


class EventBus:
    """Synchronous fan-out: handlers run inline and must not block.

    A handler that raises is logged and skipped so one faulty subscriber cannot
    silence the others; the bus never swallows the publisher's own errors.
    """

    def __init__(self) -> None:
        self._handlers: list[tuple[type[Event], Callable[[Any], None]]] = []

    def subscribe(self, kind: type[E], handler: Callable[[E], None]) -> Callable[[], None]:
        entry: tuple[type[Event], Callable[[Any], None]] = (kind, handler)
        self._handlers.append(entry)

        def unsubscribe() -> None:
            if entry in self._handlers:
                self._handlers.remove(entry)

        return unsubscribe

    def publish(self, event: Event) -> None:
        for kind, handler in list(self._handlers):
            if isinstance(event, kind):
                try:
                    handler(event)
                except Exception:  # a subscriber bug must not break the publisher
                    logger.exception("event bus: handler %r failed on %r", handler, event)

    def queue(self, kind: type[E], maxsize: int = 1000) -> asyncio.Queue[E]:
        """A queue receiving every event of `kind`; the oldest is dropped when full."""
        q: asyncio.Queue[E] = asyncio.Queue(maxsize)

        def put(event: E) -> None:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

        self.subscribe(kind, put)
        return q
