"""The broker link against a broker that misbehaves: silent, refusing, flapping, stalling,
slow, sending malformed or huge packets, restarting mid-drain.

A real `BrokerLink` with a real `Publisher` and spool reaches a real mosquitto through
`Front`, a TCP front the test steers per accepted connection: it forwards, stalls,
trickles bytes, or plays a fake MQTT 5 broker for packets mosquitto would never send.
Every case ends with the front behaving again: the link must come back by itself, the
spool must be delivered (at least once, in seq order per connection), nothing may reach
the loop's exception handler, and descriptors must not pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agent_support import collector
from conftest import Broker, free_port, write_mosquitto_conf
from test_link_stall import loop_errors
from test_mqtt_transport import link_cfg

from edgeagent.config import MqttConfig
from edgeagent.events import EventBus
from edgeagent.mqtt import BrokerLink, Inbound, SessionCounter
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, CrumbLogHandler
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.topics import Topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]

EVENTS = "edge/v1/dev-1/events"
PEERS = "edge/v1/peer-1/status"
KEEPALIVE_S = 5  # the config's minimum: stall cases take about 8 s (5 + 3 s of grace)

# --- MQTT 5 bytes ------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connack(reason: int = 0) -> bytes:
    return packet(0x20, bytes([0, reason, 0]))


def publish(topic: str, payload: bytes, *, retain: bool = False, claimed: int = 0) -> bytes:
    """A QoS 0 PUBLISH; `claimed` > 0 announces that many more bytes than are sent."""
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + b"\x00" + payload
    return bytes([0x30 | int(retain)]) + varint(len(body) + claimed) + body


async def read_packet(r: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await r.readexactly(1))[0]
    n, shift = 0, 0
    while True:
        b = (await r.readexactly(1))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await r.readexactly(n)


def split_varint(data: bytes) -> tuple[int, bytes]:
    n, shift, i = 0, 0, 0
    while True:
        b = data[i]
        n |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            return n, data[i:]


# --- the front -----------------------------------------------------------------------------

Behaviour = Callable[["Front", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Front:
    """Listens on loopback; each accepted connection gets the next planned behaviour
    (then `forward`). Records accept times, and the seqs a fake broker took."""

    target_port: int
    plan: list[Behaviour] = field(default_factory=list)
    port: int = 0
    accepts: list[float] = field(default_factory=list)
    received: list[int] = field(default_factory=list)  # seqs PUBACKed by a fake broker
    gate_open: bool = True
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _stalled: dict[asyncio.StreamWriter, str] = field(default_factory=dict)  # -> direction
    _unstall: asyncio.Event = field(default_factory=asyncio.Event)
    trickle_s: float = 0.0  # > 0: forward byte by byte with this delay

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop_all()
        self._unstall.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop_all(self) -> None:
        for w in list(self._writers):
            w.close()

    def stall(self, direction: str = "both") -> None:
        """Stop forwarding on every open connection (without closing): `up` is towards
        the broker, `down` towards the link."""
        self._unstall.clear()
        for w in self._writers:
            self._stalled[w] = direction

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepts.append(time.monotonic())
        self._writers.add(w)
        try:
            if not self.gate_open:
                return
            behaviour = self.plan.pop(0) if self.plan else forward
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await behaviour(self, r, w)
        finally:
            self._writers.discard(w)
            self._stalled.pop(w, None)
            w.close()

    async def _pipe(
        self,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        direction: str,
        first: Callable[[bytes], bool] | None = None,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                if self._stalled.get(client) in (direction, "both"):
                    await self._unstall.wait()
                    return
                if self.trickle_s:
                    for i in range(len(data)):
                        w.write(data[i : i + 1])
                        await asyncio.sleep(self.trickle_s)
                else:
                    w.write(data)
                await w.drain()
                if first is not None and first(data):
                    break
        w.close()


async def forward(front: Front, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    up_r, up_w = await asyncio.open_connection("127.0.0.1", front.target_port)
    front._writers.add(up_w)
    try:
        await asyncio.gather(
            front._pipe(r, up_w, w, "up"), front._pipe(up_r, w, w, "down"), return_exceptions=True
        )
    finally:
        front._writers.discard(up_w)
        up_w.close()


def hang_up_after(packets: int) -> Behaviour:
    """Forward to the broker, and hang up on both sides once it has sent `packets`
    (1: its CONNACK; 2: CONNACK and SUBACK, the link up and starting its drain)."""

    async def flapping(front: Front, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", front.target_port)

        async def up() -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    up_w.write(data)

        pump = asyncio.ensure_future(up())
        try:
            for _ in range(packets):
                first, body = await read_packet(up_r)
                w.write(packet(first, body))
            await w.drain()
        finally:
            pump.cancel()
            up_w.close()

    return flapping


async def silent(front: Front, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Accept, read the CONNECT, never answer."""
    while await r.read(4096):
        pass


def refuse(reason: int) -> Behaviour:
    async def refusing(front: Front, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_packet(r)
        w.write(connack(reason))
        await w.drain()

    return refusing


def fake(inject: bytes, *, after: str = "connack", then: str = "serve") -> Behaviour:
    """A minimal MQTT 5 broker that sends `inject` after CONNACK or the first SUBACK, then
    serves (PUBACK, SUBACK, PINGRESP), goes silent, or hangs up."""

    async def broker(front: Front, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        injected = False

        async def hostile() -> None:
            nonlocal injected
            injected = True
            w.write(inject)
            if then == "serve":  # the link has read past `inject` once it has this
                w.write(publish(PEERS, b"marker"))
            await w.drain()
            if then == "close":
                w.close()
            elif then == "silent":
                while await r.read(4096):
                    pass

        while True:
            first, body = await read_packet(r)
            kind = first >> 4
            if kind == 1:
                w.write(connack())
                if after == "connack":
                    await hostile()
                    if then != "serve":
                        return
            elif kind == 8:  # SUBSCRIBE: grant QoS 1
                w.write(packet(0x90, body[:2] + b"\x00\x01"))
                if after == "suback" and not injected:
                    await hostile()
                    if then != "serve":
                        return
            elif kind == 3:
                (tlen,) = struct.unpack("!H", body[:2])
                rest = body[2 + tlen :]
                if (first >> 1) & 3:
                    pid, rest = rest[:2], rest[2:]
                    w.write(packet(0x40, pid))
                plen, rest = split_varint(rest)  # properties, then the payload
                payload = rest[plen:]
                with contextlib.suppress(ValueError, KeyError):
                    front.received.append(json.loads(payload)["seq"])
            elif kind == 12:
                w.write(b"\xd0\x00")
            elif kind == 14:
                return
            await w.drain()

    return broker


# --- the rig ---------------------------------------------------------------------------


@dataclass
class Rig:
    link: BrokerLink
    publisher: Publisher
    spool: Spool
    inbound: list[Inbound]
    put: list[int]


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, cfg: MqttConfig, *, spooled: int = 0, payload_bytes: int = 40
) -> AsyncIterator[Rig]:
    """Link, publisher and spool as the agent wires them (warnings become events)."""
    spool = Spool(tmp_path / "spool.db")
    put = [
        spool.put(EVENTS, lambda s: json.dumps({"seq": s, "pad": "x" * payload_bytes}).encode())
        for _ in range(spooled)
    ]
    topics = Topics("edge/v1", "dev-1")
    crumbs = Breadcrumbs()
    holder: list[Publisher] = []

    async def on_connected(session: int) -> None:
        await holder[0].on_connected()

    link = BrokerLink(
        cfg,
        "dev-1",
        sessions=SessionCounter(tmp_path / "session"),
        will=lambda s: ("edge/v1/dev-1/status", json.dumps({"state": "lost"}).encode()),
        on_connected=on_connected,
        bus=EventBus(),
        rng=random.Random(7),
    )
    publisher = Publisher(
        link,
        spool,
        topics,
        crumbs,
        wall=time.time,
        monotonic=time.monotonic,
        window=cfg.max_inflight,
        retry_s=1.0,
    )
    holder.append(publisher)
    inbound: list[Inbound] = []
    link.subscribe(PEERS, inbound.append)
    handler = CrumbLogHandler(crumbs, publisher.stream_crumb)
    handler.bind_loop(asyncio.get_running_loop())
    root = logging.getLogger("edgeagent")
    root.addHandler(handler)
    tasks = [asyncio.create_task(link.run()), asyncio.create_task(publisher.run())]
    try:
        yield Rig(link, publisher, spool, inbound, put)
    finally:
        root.removeHandler(handler)
        await link.close()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        spool.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def until(cond: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Bounded polling, for state with no event to await (counters, the spool)."""
    async with asyncio.timeout(timeout):
        while not (value := cond()):
            await asyncio.sleep(0.02)
        return value


def seqs(messages: list[Any]) -> list[int]:
    return [m.json()["seq"] for m in messages if m.topic == EVENTS and "pad" in m.json()]


def mqtt_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("edgeagent.mqtt") and r.levelno >= logging.WARNING
    ]


def event_messages(messages: list[Any]) -> list[str]:
    """`log.mqtt` events the rig spooled and delivered (to mosquitto)."""
    return [
        m.json()["message"]
        for m in messages
        if m.topic == EVENTS and m.json().get("category") == "log.mqtt"
    ]


@contextlib.asynccontextmanager
async def hostile(broker: Any) -> AsyncIterator[Front]:
    front = Front(broker.port)
    await front.start()
    try:
        yield front
    finally:
        await front.stop()


async def assert_delivered(rig: Rig, delivered: list[int]) -> None:
    """Every spooled seq arrived at least once, and the spool saw every PUBACK."""
    missing = set(rig.put) - set(delivered)
    assert not missing, f"lost: {sorted(missing)[:20]}"
    await until(lambda: rig.spool.stats().pending == 0)


# --- connecting --------------------------------------------------------------------------


async def test_a_broker_that_never_sends_connack_is_retried_and_reported(
    tmp_path: Path, broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent")
    fds = open_fds()
    async with hostile(broker) as front:
        front.plan = [silent] * 4
        cfg = link_cfg(front.port, connect_timeout_s=0.5, keepalive_s=KEEPALIVE_S)
        with loop_errors() as errors:
            async with (
                collector(broker.port, EVENTS) as c,
                running(tmp_path, cfg, spooled=20) as rig,
            ):
                await asyncio.wait_for(rig.link.connected.wait(), 30)
                got = await c.wait_for(lambda ms: set(rig.put) <= set(seqs(ms)) and ms)
                await assert_delivered(rig, seqs(got))
                assert rig.link.session == 5  # four silent attempts, then the broker
                said = await c.wait_for(lambda ms: event_messages(ms))
    assert errors == []
    warnings = mqtt_warnings(caplog)
    assert warnings and "127.0.0.1" in warnings[0], warnings
    assert any("tim" in w.lower() for w in warnings), warnings  # it says: timed out
    assert len(warnings) <= 3, warnings  # once per reason, not once per attempt
    assert any("cannot connect" in s for s in said), said
    assert open_fds() <= fds + 2


@pytest.mark.parametrize(
    ("reason", "words"),
    [(0x86, "user name or password"), (0x88, "unavailable"), (0x87, "not authori")],
)
async def test_a_connack_refusal_is_retried_with_growing_backoff_and_said(
    tmp_path: Path, broker: Any, caplog: pytest.LogCaptureFixture, reason: int, words: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent")
    fds = open_fds()
    async with hostile(broker) as front:
        front.plan = [refuse(reason)] * 8
        cfg = link_cfg(front.port, reconnect_min_s=0.02, reconnect_max_s=0.32)
        with loop_errors() as errors:
            async with (
                collector(broker.port, EVENTS) as c,
                running(tmp_path, cfg, spooled=20) as rig,
            ):
                await asyncio.wait_for(rig.link.connected.wait(), 30)
                got = await c.wait_for(lambda ms: set(rig.put) <= set(seqs(ms)) and ms)
                await assert_delivered(rig, seqs(got))
    assert errors == []
    gaps = [b - a for a, b in itertools.pairwise(front.accepts)]
    # Capped exponential: the last gaps are at least half the cap, not the floor.
    assert min(gaps[-3:]) >= 0.32 / 2 * 0.9, gaps
    warnings = mqtt_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert words in warnings[0].lower(), warnings
    assert open_fds() <= fds + 2


@pytest.mark.parametrize("packets", [1, 2], ids=["after CONNACK", "after SUBACK"])
async def test_a_broker_that_hangs_up_after_every_connack_is_not_hammered(
    tmp_path: Path, broker: Any, caplog: pytest.LogCaptureFixture, packets: int
) -> None:
    """50 connections in a row hung up at once: the backoff grows as for a failed connect."""
    caplog.set_level(logging.DEBUG, logger="edgeagent")
    fds, mem = open_fds(), rss_mib()
    cap = 0.25
    async with hostile(broker) as front:
        front.plan = [hang_up_after(packets)] * 50
        cfg = link_cfg(front.port, reconnect_min_s=0.01, reconnect_max_s=cap)
        with loop_errors() as errors:
            async with (
                collector(broker.port, EVENTS) as c,
                running(tmp_path, cfg, spooled=50) as rig,
            ):
                cpu0, wall0 = time.process_time(), time.monotonic()
                await until(lambda: len(front.accepts) > 50, timeout=60)
                cpu = time.process_time() - cpu0
                wall = time.monotonic() - wall0
                await asyncio.wait_for(rig.link.connected.wait(), 30)
                got = await c.wait_for(lambda ms: set(rig.put) <= set(seqs(ms)) and ms)
                await assert_delivered(rig, seqs(got))
    assert errors == []
    times = front.accepts[:51]
    per_s = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert per_s <= 1.0 / (cap / 2) + 2, f"{per_s} connection attempts in one second"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sorted(gaps)[len(gaps) // 2] >= cap / 2 * 0.9, gaps
    assert cpu < 0.8 * wall, (cpu, wall)
    warnings = mqtt_warnings(caplog)
    assert warnings, "a flapping broker must be reported"
    assert len(warnings) <= 6, warnings  # not one per flap (each is a spooled event)
    assert open_fds() <= fds + 2
    assert rss_mib() < mem + 50


# --- a stalled or slow link -----------------------------------------------------------------


@pytest.mark.parametrize("direction", ["both", "up", "down"])
async def test_a_stalled_link_is_detected_by_keepalive_and_reconnected(
    tmp_path: Path, broker: Any, caplog: pytest.LogCaptureFixture, direction: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent")
    fds = open_fds()
    async with hostile(broker) as front:
        cfg = link_cfg(front.port, keepalive_s=KEEPALIVE_S, max_inflight=8)
        with loop_errors() as errors:
            async with (
                collector(broker.port, EVENTS) as c,
                running(tmp_path, cfg, spooled=20) as rig,
            ):
                await c.wait_for(lambda ms: set(rig.put) <= set(seqs(ms)))
                await until(lambda: rig.spool.stats().pending == 0)
                front.stall(direction)
                t0 = time.monotonic()
                more = [rig.publisher.spool_bytes(EVENTS, lambda s: b'{"seq": %d, "pad": ""}' % s)]
                more += [
                    rig.publisher.spool_bytes(EVENTS, lambda s: b'{"seq": %d, "pad": ""}' % s)
                    for _ in range(200)
                ]
                await asyncio.wait_for(rig.link.disconnected.wait(), 4 * KEEPALIVE_S)
                took = time.monotonic() - t0
                await asyncio.wait_for(rig.link.connected.wait(), 10)
                rig.put.extend(s for s in more if s is not None)
                got = await c.wait_for(lambda ms: set(rig.put) <= set(seqs(ms)) and ms, 30)
                await assert_delivered(rig, seqs(got))
    assert errors == []
    # Before paho's own 2x keepalive: the link's silence watch ended it (8 s here).
    assert took < 2 * KEEPALIVE_S, f"stall noticed after {took:.1f} s"
    lost = [w for w in mqtt_warnings(caplog) if "connection lost" in w]
    assert lost, mqtt_warnings(caplog)
    assert any(k in lost[0].lower() for k in ("keepalive", "no answer", "stalled")), lost
    assert open_fds() <= fds + 2


async def test_a_slow_link_delivers_every_message_in_order(tmp_path: Path, broker: Any) -> None:
    async with hostile(broker) as front:
        front.trickle_s = 0.0003
        cfg = link_cfg(front.port, keepalive_s=KEEPALIVE_S, max_inflight=8)
        with loop_errors() as errors:
            async with (
                collector(broker.port, EVENTS) as c,
                running(tmp_path, cfg, spooled=80) as rig,
            ):
                got = await c.wait_for(lambda ms: set(rig.put) <= set(seqs(ms)) and ms, 60)
                delivered = seqs(got)
                await assert_delivered(rig, delivered)
                assert rig.link.session == 1  # never dropped
    assert errors == []
    assert delivered == sorted(delivered), delivered
    assert len(delivered) == len(set(delivered)), delivered  # one connection: no resends


# --- packets a broker should never send --------------------------------------------------

# case -> (bytes, sent after, then, what the link's warning says; None: no warning)
MALFORMED = {
    "garbage after CONNACK": (b"\xff\xfe\xfd\xfc" * 8, "connack", "serve", "protocol error"),
    "PUBLISH longer than sent": (
        publish(PEERS, b"{}", claimed=4096),
        "suback",
        "silent",
        "stalled",
    ),
    "unknown packet type": (b"\x00\x00", "connack", "serve", "protocol error"),
    "PUBACK for an unknown id": (packet(0x40, b"\x7f\x7f\x00"), "connack", "serve", None),
    "DISCONNECT with a reason": (packet(0xE0, b"\x8b\x00"), "suback", "close", "shutting down"),
    "10 MB retained PUBLISH": (
        publish(PEERS, b"x" * (10 * 1024 * 1024), retain=True),
        "suback",
        "serve",
        "too large",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_packets_cost_at_most_the_connection(
    tmp_path: Path, broker: Any, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent")
    inject, after, then, words = MALFORMED[case]
    fds, mem = open_fds(), rss_mib()
    async with hostile(broker) as front:
        front.plan = [fake(inject, after=after, then=then)]
        cfg = link_cfg(front.port, keepalive_s=KEEPALIVE_S)
        with loop_errors() as errors:
            async with (
                collector(broker.port, EVENTS) as c,
                running(tmp_path, cfg, spooled=30) as rig,
            ):
                await asyncio.wait_for(rig.link.connected.wait(), 10)
                # Either the link read past the packet on the same connection, or it left.
                await until(
                    lambda: (
                        rig.link.session >= 2 or any(m.payload == b"marker" for m in rig.inbound)
                    ),
                    30,
                )
                if rig.link.session == 1:
                    await until(lambda: rig.spool.stats().pending == 0)
                    assert set(rig.put) <= set(front.received)
                    front.drop_all()  # then on to mosquitto
                await until(lambda: rig.link.session >= 2 and rig.link.connected.is_set(), 30)
                more = [
                    rig.publisher.spool_bytes(EVENTS, lambda s: b'{"seq": %d, "pad": ""}' % s)
                    for _ in range(10)
                ]
                rig.put.extend(s for s in more if s is not None)
                got = await c.wait_for(
                    lambda ms: set(rig.put) <= set(seqs(ms) + front.received) and ms, 20
                )
                await assert_delivered(rig, seqs(got) + front.received)
                big = [m for m in rig.inbound if len(m.payload) > 1024 * 1024]
    assert errors == []
    assert not big, "a packet over the advertised maximum reached a handler"
    warnings = [w for w in mqtt_warnings(caplog) if "connection closed by the peer" not in w]
    if words is None:
        assert not warnings, warnings
    else:
        said = mqtt_warnings(caplog)
        assert any(any(x in w.lower() for x in words.split("|")) for w in warnings), said
    assert open_fds() <= fds + 2
    assert rss_mib() < mem + 100


async def test_a_packet_that_ends_the_connection_during_connect_is_placed_after_connack(
    tmp_path: Path, broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a loaded machine aiomqtt's connect thread can return after the loop has read
    CONNACK and the packet behind it: the drop came after CONNACK, and says so. The
    thread is held until the link has reported the attempt: order, not timing."""
    import threading

    import paho.mqtt.client as paho_mqtt

    gate = threading.Event()
    original = paho_mqtt.Client.reconnect
    held: list[int] = []

    def reconnect(self: paho_mqtt.Client) -> Any:
        rc = original(self)
        if not held:
            held.append(1)
            gate.wait(10)  # the first attempt's thread, after paho sent CONNECT
        return rc

    monkeypatch.setattr(paho_mqtt.Client, "reconnect", reconnect)
    async with hostile(broker) as front:
        front.plan = [fake(b"\x00\x00", after="connack", then="serve")]
        with loop_errors() as errors:
            async with running(tmp_path, link_cfg(front.port, keepalive_s=KEEPALIVE_S)) as rig:
                try:
                    error = await until(lambda: rig.link.last_error, 10)
                finally:
                    gate.set()
                front.drop_all()  # then on to mosquitto
                await until(lambda: rig.link.connected.is_set(), 30)
    assert errors == []
    assert held == [1]
    # As worded when aiomqtt's connect has returned (test_malformed_packets_cost_...).
    assert error == "connection closed right after CONNACK: [code:130] Protocol error", error


# --- a broker restart mid-drain ---------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_a_broker_restart_during_a_drain_loses_nothing(tmp_path: Path) -> None:
    """mosquitto with persistence and a persistent observer, as a real deployment: what it
    acknowledged before the restart it still hands out after it."""
    port, ws_port = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    stay = "user root\n" if os.geteuid() == 0 else ""  # pytest's tmp dir is 0700
    write_mosquitto_conf(
        conf,
        port,
        ws_port,
        # The observer's queue must not be what drops messages (its default is 1000).
        f"{stay}persistence true\npersistence_location {tmp_path}/\nmax_queued_messages 0\n",
    )
    conf.write_text(conf.read_text().replace("persistence false\n", ""))
    broker = Broker(port=port, ws_port=ws_port, conf=conf)
    broker.start()
    try:
        await restart_during_drain(tmp_path, broker)
    finally:
        broker.stop()


async def restart_during_drain(tmp_path: Path, broker: Broker) -> None:
    observer = "observer-1"
    async with hostile(broker) as front:
        cfg = link_cfg(front.port, keepalive_s=KEEPALIVE_S)
        with loop_errors() as errors:
            async with (
                collector(broker.port, EVENTS, persistent_id=observer) as before,
                running(tmp_path, cfg, spooled=3000) as rig,
            ):
                await before.wait_for(lambda ms: len(seqs(ms)) >= 300, 30)
                front.gate_open = False  # the link waits until the observer is back
                broker.stop()
                await asyncio.wait_for(rig.link.disconnected.wait(), 10)
                pending = rig.spool.stats().pending
                assert pending > 0, "the drain finished before the restart"
                broker.start()
                async with collector(broker.port, EVENTS, persistent_id=observer) as after:
                    front.gate_open = True
                    await asyncio.wait_for(rig.link.connected.wait(), 30)

                    def missing(ms: list[Any]) -> set[int]:
                        return set(rig.put) - set(seqs(before.messages) + seqs(ms))

                    try:
                        await after.wait_for(lambda ms: not missing(ms), 60)
                    except TimeoutError:
                        lost = sorted(missing(after.messages))
                        pytest.fail(f"{len(lost)} lost: {lost[:40]}")
                    await assert_delivered(rig, seqs(before.messages) + seqs(after.messages))
                    assert rig.link.session >= 2
    assert errors == []
