"""The publisher's spool drain: a sliding window in seq order, grouped acks, restart on loss."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from agent_support import collector

from edgeagent.config import MqttConfig
from edgeagent.events import EventBus
from edgeagent.mqtt import BrokerLink, BrokerUnavailable, SessionCounter
from edgeagent.telemetry.breadcrumbs import Breadcrumbs
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.topics import Topics

TOPICS = Topics("edge/v1", "dev-1")


class LinkTwin:
    """Stands in for BrokerLink: records each QoS 1 publish and lets the test answer it."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        self.calls: list[int] = []  # seqs, in the order the publisher handed them over
        self._answers: dict[int, asyncio.Future[None]] = {}
        self._changed = asyncio.Condition()

    def up(self) -> None:
        self.disconnected.clear()
        self.connected.set()

    def down(self) -> None:
        self.connected.clear()
        self.disconnected.set()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        seq = int(payload)
        self.calls.append(seq)
        answer = asyncio.get_running_loop().create_future()
        self._answers[seq] = answer
        async with self._changed:
            self._changed.notify_all()
        await answer

    async def wait_calls(self, n: int) -> None:
        async with asyncio.timeout(5):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.calls) >= n)

    def puback(self, *seqs: int) -> None:
        for seq in seqs:
            self._answers.pop(seq).set_result(None)

    def fail(self, seq: int) -> None:
        self._answers.pop(seq).set_exception(BrokerUnavailable("connection lost"))


class CountingSpool(Spool):
    """A real spool that also counts its ack transactions."""

    ack_transactions = 0

    def ack_many(self, seqs: Iterable[int]) -> None:
        self.ack_transactions += 1
        super().ack_many(seqs)


async def settle() -> None:
    """Let every ready callback run (a bounded number of loop turns, no wall-clock wait)."""
    for _ in range(50):
        await asyncio.sleep(0)


def make_publisher(link: object, spool: Spool, window: int) -> Publisher:
    return Publisher(
        link,  # type: ignore[arg-type]
        spool,
        TOPICS,
        Breadcrumbs(),
        wall=lambda: 1_700_000_000.0,
        monotonic=lambda: 0.0,
        window=window,
    )


def put_seqs(publisher: Publisher, n: int) -> list[int]:
    return [publisher.spool_bytes(TOPICS.events, lambda seq: str(seq).encode()) for _ in range(n)]


@contextlib.asynccontextmanager
async def running(publisher: Publisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_window_slides_one_puback_at_a_time_in_seq_order(tmp_path: Path) -> None:
    link = LinkTwin()
    with Spool(tmp_path / "spool.db") as spool:
        publisher = make_publisher(link, spool, window=4)
        seqs = put_seqs(publisher, 10)
        link.up()
        async with running(publisher):
            await link.wait_calls(4)
            await settle()
            assert link.calls == seqs[:4]  # never more than the window in flight
            link.puback(seqs[1])  # out of order: still one slot free, one refill
            await link.wait_calls(5)
            await settle()
            assert link.calls == seqs[:5]
            link.puback(seqs[0])
            await link.wait_calls(6)
            link.puback(*seqs[2:6])
            await link.wait_calls(10)
            assert link.calls == seqs  # seq order on the wire, each once
            link.puback(*seqs[6:])
            await settle()
            assert spool.stats().pending == 0
            assert publisher.sent == 10


async def test_messages_spooled_mid_drain_join_the_window(tmp_path: Path) -> None:
    link = LinkTwin()
    with Spool(tmp_path / "spool.db") as spool:
        publisher = make_publisher(link, spool, window=4)
        first = put_seqs(publisher, 2)
        link.up()
        async with running(publisher):
            await link.wait_calls(2)
            later = put_seqs(publisher, 3)
            link.puback(first[0])
            await link.wait_calls(5)
            assert link.calls == first + later
            link.puback(first[1], *later)
            await settle()
            assert spool.stats().pending == 0


async def test_failure_stops_the_window_and_reconnect_restarts_from_oldest_unacked(
    tmp_path: Path,
) -> None:
    link = LinkTwin()
    with Spool(tmp_path / "spool.db") as spool:
        publisher = make_publisher(link, spool, window=4)
        seqs = put_seqs(publisher, 6)
        link.up()
        async with running(publisher):
            await link.wait_calls(4)
            link.puback(seqs[0])
            link.fail(seqs[1])
            await settle()
            assert link.calls == seqs[:4]  # nothing new goes out after a failure
            link.puback(seqs[2], seqs[3])  # what was in flight still counts
            link.down()
            await settle()
            assert [e.seq for e in spool.pending()] == [seqs[1], seqs[4], seqs[5]]
            assert publisher.sent == 3
            link.up()
            await link.wait_calls(7)
            assert link.calls[4:] == [seqs[1], seqs[4], seqs[5]]
            link.puback(seqs[1], seqs[4], seqs[5])
            await settle()
            assert spool.stats().pending == 0


async def test_cancel_mid_window_keeps_unacked_messages(tmp_path: Path) -> None:
    link = LinkTwin()
    with Spool(tmp_path / "spool.db") as spool:
        publisher = make_publisher(link, spool, window=4)
        seqs = put_seqs(publisher, 6)
        link.up()
        async with running(publisher):
            await link.wait_calls(4)
            link.puback(seqs[0], seqs[1])
            await link.wait_calls(6)
        # Acked before the stop are gone; in flight when stopped stay for the next start.
        assert [e.seq for e in spool.pending()] == seqs[2:]


async def test_flush_returns_once_everything_spooled_is_acknowledged(tmp_path: Path) -> None:
    link = LinkTwin()
    with Spool(tmp_path / "spool.db") as spool:
        publisher = make_publisher(link, spool, window=4)
        seqs = put_seqs(publisher, 3)
        link.up()
        async with running(publisher):
            flush = asyncio.create_task(publisher.flush())
            await link.wait_calls(3)
            link.puback(seqs[0], seqs[1])
            await settle()
            assert not flush.done()  # one still unacknowledged
            link.puback(seqs[2])
            assert await asyncio.wait_for(flush, 5) is True
        assert spool.stats().pending == 0


async def test_flush_gives_up_when_the_link_drops_and_keeps_the_messages(tmp_path: Path) -> None:
    link = LinkTwin()
    with Spool(tmp_path / "spool.db") as spool:
        publisher = make_publisher(link, spool, window=4)
        seqs = put_seqs(publisher, 2)
        assert await publisher.flush() is False  # offline: nothing to wait for
        link.up()
        async with running(publisher):
            flush = asyncio.create_task(publisher.flush())
            await link.wait_calls(2)
            link.down()
            link.fail(seqs[0])
            link.fail(seqs[1])
            assert await asyncio.wait_for(flush, 5) is False
        assert [e.seq for e in spool.pending()] == seqs


@pytest.mark.broker
async def test_drain_to_mosquitto_in_order_with_grouped_acks(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    n = 600
    bus = EventBus()
    with CountingSpool(tmp_path / "spool.db") as spool:
        cfg = MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=0.05)
        publisher: Publisher

        async def on_connected(session: int) -> None:
            await publisher.on_connected()

        link = BrokerLink(
            cfg,
            "dev-1",
            sessions=SessionCounter(tmp_path / "session"),
            will=lambda s: (TOPICS.status, b"lost"),
            on_connected=on_connected,
            bus=bus,
            rng=random.Random(1),
        )
        publisher = make_publisher(link, spool, window=32)
        seqs = put_seqs(publisher, n)  # spooled while offline
        async with collector(broker.port, TOPICS.events) as c:
            link_task = asyncio.create_task(link.run())
            async with running(publisher):
                await link.connected.wait()
                more = put_seqs(publisher, 50)  # and while draining
                got = await c.wait_for(lambda ms: len(ms) >= n + 50 and ms, timeout=30)
                assert [int(m.payload) for m in got] == seqs + more
                await asyncio.wait_for(_until_empty(spool), 5)
            link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link_task
        assert publisher.sent == n + 50
        # Grouped: not one sqlite transaction per PUBACK (window 32 -> groups of 8).
        assert spool.ack_transactions <= (n + 50) // 4


async def _until_empty(spool: Spool) -> None:
    while spool.stats().pending:
        await asyncio.sleep(0.01)


def test_a_spool_drop_range_is_reported_even_when_events_are_rate_limited(
    tmp_path: Path,
) -> None:
    """The spool fills when events flood: its drop report must still name the range."""
    with Spool(tmp_path / "spool.db", max_messages=4) as spool:
        publisher = Publisher(
            LinkTwin(),  # type: ignore[arg-type]
            spool,
            TOPICS,
            Breadcrumbs(),
            wall=lambda: 1_700_000_000.0,
            monotonic=lambda: 0.0,  # the bucket never refills
            events_rate_per_s=1.0,
            events_burst=2,
        )
        for i in range(3):  # the bucket is empty after two
            publisher.event("info", "test.flood", f"event {i}")
        put_seqs(publisher, 5)  # seqs 3-7: the count cap drops 1-3
        publisher.report_spool_drops()
        entries = spool.pending(limit=10)
        drops = [json.loads(e.payload) for e in entries if e.topic == TOPICS.events]
        drops = [d for d in drops if isinstance(d, dict) and d.get("category") == "spool"]
        assert len(drops) == 1
        assert drops[0]["level"] == "error"
        assert (drops[0]["data"]["first_seq"], drops[0]["data"]["last_seq"]) == (1, 3)
        # Taken once, reported once (spooling the report under the cap drops more: new range).
        assert all(r.first_seq > 3 for r in spool.take_drop_reports())


def test_a_message_the_full_spool_cannot_store_is_counted_not_raised(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        publisher = make_publisher(LinkTwin(), spool, window=4)
        pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
        spool._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # SQLITE_FULL, as a full disk
        assert publisher.spool_bytes(TOPICS.events, lambda seq: b"x" * 200_000) is None
        assert publisher.unstored == 1
        assert publisher.spool_bytes(TOPICS.events, lambda seq: str(seq).encode()) == 1


def test_a_state_directory_removed_under_the_agent_costs_messages_not_exceptions(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with Spool(state / "spool.db") as spool:
        publisher = make_publisher(LinkTwin(), spool, window=4)
        assert publisher.spool_bytes(TOPICS.events, lambda seq: str(seq).encode()) == 1
        shutil.rmtree(state)
        for i in range(3):  # whatever sqlite manages without its directory: never a raise
            publisher.event("warning", "test", f"after the directory went {i}")
        assert publisher.unstored + spool.stats().next_seq - 2 == 3


def test_the_session_counter_goes_on_in_memory_without_its_directory(tmp_path: Path) -> None:
    from edgeagent.mqtt import SessionCounter

    state = tmp_path / "state"
    state.mkdir()
    counter = SessionCounter(state / "session")
    assert counter.next() == 1
    shutil.rmtree(state)
    assert counter.next() == 2  # the link can still CONNECT with a Will of this session


async def test_a_publish_that_fails_on_a_live_link_is_retried_without_a_reconnect(
    tmp_path: Path,
) -> None:
    """A PUBACK that timed out while keepalives keep the link up used to stop the drain
    until the next reconnect, however long that took, with the spool filling."""
    link = LinkTwin()
    with Spool(tmp_path / "spool.db") as spool:
        publisher = Publisher(
            link,  # type: ignore[arg-type]
            spool,
            TOPICS,
            Breadcrumbs(),
            wall=lambda: 1_700_000_000.0,
            monotonic=lambda: 0.0,
            window=4,
            retry_s=0.05,
        )
        seqs = put_seqs(publisher, 3)
        link.up()
        async with running(publisher):
            await link.wait_calls(3)
            link.puback(seqs[0])
            link.fail(seqs[1])  # e.g. aiomqtt's publish timeout
            link.puback(seqs[2])
            await link.wait_calls(4)  # the link never went down
            assert link.calls[3] == seqs[1]
            link.puback(seqs[1])
            await settle()
            assert spool.stats().pending == 0


def test_an_event_storm_streams_at_the_configured_rate_summaries_included(
    tmp_path: Path,
) -> None:
    """1000 warnings a second for 10 s at 20/s with a burst of 100: what is spooled
    (events and the 'over the rate limit' summaries) stays within burst + rate x time,
    and every suppressed event is counted in a summary."""
    now = [0.0]
    with Spool(tmp_path / "spool.db", max_messages=100_000) as spool:
        publisher = Publisher(
            LinkTwin(),  # type: ignore[arg-type]
            spool,
            TOPICS,
            Breadcrumbs(),
            wall=lambda: 1_700_000_000.0,
            monotonic=lambda: now[0],
            events_rate_per_s=20.0,
            events_burst=100,
        )
        for i in range(10_000):
            now[0] = i / 1000
            publisher.event("warning", "test.storm", f"w{i}")
        docs = [json.loads(e.payload) for e in spool.pending(limit=100_000)]
    assert len(docs) <= 100 + 20 * 10 + 1
    streamed = sum(1 for d in docs if d["category"] == "test.storm")
    counted = sum(
        d["data"]["suppressed"].get("test.storm", 0)
        for d in docs
        if d["category"] == "telemetry.rate_limit"
    )
    assert streamed + counted + sum(publisher._suppressed.values()) == 10_000
