"""Gets telemetry to the broker: spooled topics through the durable spool, the rest live.

Spooled messages (events, alerts, summaries, crashes, traces) are committed to
the spool with their `seq` before any attempt to send, and acknowledged out of
it only after the broker's PUBACK. The drain keeps a sliding window of QoS 1
publishes in flight in seq order, refilling as each PUBACK arrives and acking
in small groups; after a reconnect it starts again from the oldest
unacknowledged message (QoS 1: at least once).

Volatile messages (metrics, quality) are dropped while offline; the retained
`health` state is remembered and republished on every connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

import msgspec

from edgeagent.mqtt import BrokerLink, BrokerUnavailable
from edgeagent.telemetry import payloads as p
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, Crumb
from edgeagent.telemetry.spool import Spool, SpoolFull
from edgeagent.telemetry.topics import Topics

logger = logging.getLogger(__name__)


class TokenBucket:
    """A token bucket on an injected monotonic clock."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Publisher:
    """The one writer of device telemetry; owns the spool drain."""

    def __init__(
        self,
        link: BrokerLink,
        spool: Spool,
        topics: Topics,
        crumbs: Breadcrumbs,
        *,
        wall: Callable[[], float],
        monotonic: Callable[[], float],
        events_rate_per_s: float = 20.0,
        events_burst: int = 100,
        window: int = 32,
        retry_s: float = 5.0,
    ) -> None:
        self._link = link
        self._spool = spool
        self._topics = topics
        self._crumbs = crumbs
        self._wall = wall
        self._window = window
        self._retry_s = retry_s
        self._bucket = TokenBucket(events_rate_per_s, events_burst, monotonic)
        self._suppressed: dict[str, int] = {}
        self.unstored = 0  # messages the spool could not store (filesystem full)
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()  # set whenever acks are committed (flush waits on it)
        self._health: bytes | None = None
        self.sent = 0

    # --- building -------------------------------------------------------------------------

    def base(self) -> dict[str, Any]:
        return {"v": p.PROTOCOL_VERSION, "device": self._topics.device_id, "ts": self.ts()}

    def ts(self) -> float:
        return round(self._wall(), 3)

    # --- spooled --------------------------------------------------------------------------

    def spool(
        self, topic: str, build: Callable[[int], msgspec.Struct], *, retain: bool = False
    ) -> int | None:
        """Commit a message with the next seq; the drain sends it when the link is up.

        None if it could not be stored (filesystem full): counted in `unstored`, which
        the metrics carry (they are not spooled)."""
        return self._put(topic, lambda seq: p.encode(build(seq)), retain)

    def spool_bytes(self, topic: str, build: Callable[[int], bytes]) -> int | None:
        """Commit an already-encoded payload (OTLP/JSON traces) with the next seq."""
        return self._put(topic, build, False)

    def _put(self, topic: str, build: Callable[[int], bytes], retain: bool) -> int | None:
        try:
            seq = self._spool.put(topic, build, retain=retain)
        except (SpoolFull, sqlite3.Error, OSError) as exc:  # the store is unusable now
            self.unstored += 1
            logger.error("telemetry: %s not stored: %s", topic, exc)
            return None
        self._wake.set()
        return seq

    def event(
        self,
        level: p.Level,
        category: str,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        call_id: str | None = None,
        trace_id: str | None = None,
        crumb: bool = True,
        limited: bool = True,
    ) -> int | None:
        """Record a breadcrumb and stream it on `events` (rate limited, never silently).

        `limited=False` streams it whatever the bucket holds: for reports that must not be
        reduced to a count, such as the seq ranges the spool dropped.
        """
        ts = self.ts()
        if crumb:
            self._crumbs.add(Crumb(ts, level, category, message, data, call_id, trace_id))
        if limited and not self._bucket.take():
            self._suppressed[category] = self._suppressed.get(category, 0) + 1
            return None
        if self._suppressed and (not limited or self._bucket.take()):
            self._flush_suppressed()  # it takes a token too: a storm stays at the rate
        return self.spool(
            self._topics.events,
            lambda seq: p.Event(
                v=1,
                device=self._topics.device_id,
                ts=ts,
                seq=seq,
                level=level,
                category=category,
                message=message,
                data=data,
                call_id=call_id,
                trace_id=trace_id,
            ),
        )

    def stream_crumb(self, crumb: Crumb) -> None:
        """Sink for log records at WARNING and above (already in the crumb ring)."""
        self.event(
            crumb.level,  # type: ignore[arg-type]
            crumb.category,
            crumb.message,
            data=crumb.data,
            call_id=crumb.call_id,
            crumb=False,
        )

    def _flush_suppressed(self) -> None:
        counts, self._suppressed = self._suppressed, {}
        total = sum(counts.values())
        self.spool(
            self._topics.events,
            lambda seq: p.Event(
                v=1,
                device=self._topics.device_id,
                ts=self.ts(),
                seq=seq,
                level="warning",
                category="telemetry.rate_limit",
                message=f"{total} events over the rate limit were not streamed",
                data={"suppressed": counts},
            ),
        )

    def report_spool_drops(self) -> None:
        """Turn the spool's dropped ranges into `spool` events (protocol section 2).

        Not rate limited: the spool fills when events flood, and a suppressed report would
        leave only a count where the protocol promises the range (the rows are marked
        reported once taken)."""
        for drop in self._spool.take_drop_reports():
            self.event(
                "error",
                "spool",
                f"spool full ({drop.reason}): dropped seq {drop.first_seq}..{drop.last_seq}",
                data={
                    "first_seq": drop.first_seq,
                    "last_seq": drop.last_seq,
                    "count": drop.count,
                    "reason": drop.reason,
                },
                limited=False,
            )

    # --- volatile -------------------------------------------------------------------------

    def volatile(self, topic: str, payload: msgspec.Struct) -> bool:
        """QoS 0, not spooled: sent if the link is up, else dropped. True if handed over."""
        if not self._link.connected.is_set():
            return False
        task = asyncio.get_running_loop().create_task(self._send_volatile(topic, p.encode(payload)))
        task.add_done_callback(_consume)
        return True

    async def _send_volatile(self, topic: str, data: bytes) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self._link.publish(topic, data, qos=0)

    def health(self, payload: p.Health) -> None:
        """Retained QoS 1 health; the latest is republished on every connect."""
        self._health = p.encode(payload)
        if self._link.connected.is_set():
            task = asyncio.get_running_loop().create_task(self._send_health())
            task.add_done_callback(_consume)

    async def _send_health(self) -> None:
        if self._health is None:
            return
        with contextlib.suppress(BrokerUnavailable):  # sent again on the next connect
            await self._link.publish(self._topics.health, self._health, qos=1, retain=True)

    async def on_connected(self) -> None:
        """Called by the link after every connect, before it reports itself up."""
        self._wake.set()

    # --- drain ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Drain the spool whenever the link is up, oldest first.

        A failed publish pauses the drain until the link drops, or `retry_s` if it does
        not (a PUBACK that timed out on a live connection): then it starts again from
        the oldest unacked seq (QoS 1: the broker may see a message twice; seq tells)."""
        while True:
            await self._link.connected.wait()
            await self._send_health()
            try:
                await self._drain()
            except BrokerUnavailable as exc:
                logger.debug("publisher: drain paused: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._retry_s):
                        await self._link.disconnected.wait()

    async def _drain(self) -> None:
        """Keep up to `window` QoS 1 publishes in flight in seq order; ack as PUBACKs land.

        A sliding window, not batches: waiting for a whole batch's PUBACKs stalls on
        the broker's Nagle plus our delayed ACK (~40 ms per batch on Linux), while a
        refill on every PUBACK keeps the stream self-clocked. Acks are written to the
        spool in groups, not one transaction per PUBACK. On the first failure nothing
        more is sent; what is in flight settles, successes are acked, and the failure
        is raised so the next connection starts again from the oldest unacked seq.
        """
        inflight: dict[int, asyncio.Task[bool]] = {}
        acked: list[int] = []
        failures: list[BaseException] = []
        progress = asyncio.Event()
        last_sent: int | None = None
        ack_group = max(1, self._window // 4)

        def landed(seq: int, task: asyncio.Task[bool]) -> None:
            inflight.pop(seq, None)
            progress.set()
            if task.cancelled():
                return
            exc = task.exception()
            if exc is None:
                acked.append(seq)
            else:
                failures.append(exc)

        try:
            while self._link.connected.is_set() and not failures:
                self.report_spool_drops()
                room = self._window - len(inflight)
                if room > 0:
                    self._wake.clear()
                    for e in self._spool.pending(limit=room, after=last_sent):
                        # Tasks start in creation order (call_soon is FIFO), so the
                        # client's PUBLISH packets go out in seq order.
                        task = asyncio.ensure_future(
                            self._link.publish(e.topic, e.payload, qos=1, retain=e.retain)
                        )
                        task.add_done_callback(functools.partial(landed, e.seq))
                        inflight[e.seq] = task
                        last_sent = e.seq
                if len(acked) >= ack_group or (acked and not inflight):
                    self._ack(acked)
                if inflight:
                    progress.clear()
                    await progress.wait()
                elif not self._wake.is_set():
                    await self._wait_wake_or_disconnect()
            if inflight:  # failed or disconnected: let the window settle, keep its acks
                await asyncio.wait(list(inflight.values()))
        finally:
            for task in inflight.values():
                task.cancel()
            self._ack(acked)
        if failures:
            raise failures[0]

    def _ack(self, acked: list[int]) -> None:
        if acked:
            self._spool.ack_many(acked)
            self.sent += len(acked)
            acked.clear()
            self._acked.set()

    async def flush(self) -> bool:
        """Until the spool is empty (True), or the link is down (False); no timeout of its own.

        For a clean stop: the last call's summary and spans reach the broker before
        `offline`. Bound it with a timeout; whatever is left stays spooled for the
        next start. Messages spooled meanwhile are waited for too.
        """
        while self._spool.stats().pending:
            if not self._link.connected.is_set():
                return False
            self._acked.clear()
            await self._until_set_or_down(self._acked)
        return True

    async def _wait_wake_or_disconnect(self) -> None:
        await self._until_set_or_down(self._wake)

    async def _until_set_or_down(self, event: asyncio.Event) -> None:
        """Until `event` is set or the link goes down, whichever comes first."""
        setting = asyncio.ensure_future(event.wait())
        down = asyncio.ensure_future(self._link.disconnected.wait())
        try:
            await asyncio.wait({setting, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            setting.cancel()
            down.cancel()


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("publisher: send failed", exc_info=task.exception())
