"""A user-space UDP impairment relay on 127.0.0.1: seeded loss, delay and jitter.

The kernel here has no netem, so impairments sit between two aiortc peers:
each peer is told (by rewriting its remote description's candidates) that
the other lives at one of the relay's ports. Packets that reach port `to_a`
came from B and go on to A, and the other way round. Loss applies only to
RTP (not STUN, DTLS or RTCP), so ICE and DTLS still come up and the
receiver's stats see RTP loss; delay and jitter apply to everything but STUN.

Between two agents that signal over a real broker, `SignalingProxy` does the
candidate rewriting: A dials B's alias, the proxy forwards the offer to B as
if from A's alias (with A's candidates pointing at the relay) and B's answer
back to A the same way, so the media of a normal agent-to-agent call crosses
the relay. The loss can be changed mid-call (`Direction.loss`); `drop_all`
makes a direction a black hole for every datagram.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

_CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1 )(\d+)( typ host.*)$", re.I)


def is_rtp(data: bytes) -> bool:
    """RTP (not RTCP) after RFC 7983 demultiplexing: first byte 128-191, PT not 192-223."""
    return len(data) >= 2 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223


def is_stun(data: bytes) -> bool:
    return len(data) >= 1 and data[0] < 4


def candidate_port(sdp: str) -> int:
    """The port of the 127.0.0.1 host candidate in `sdp`."""
    for line in sdp.splitlines():
        m = _CANDIDATE.match(line)
        if m:
            return int(m.group(2))
    raise ValueError("no 127.0.0.1 host candidate in SDP")


def rewrite_candidates(sdp: str, port: int) -> str:
    """Point every 127.0.0.1 host candidate of `sdp` at `port` (the relay)."""
    out = []
    for line in sdp.splitlines():
        m = _CANDIDATE.match(line)
        out.append(f"{m.group(1)}{port}{m.group(3)}" if m else line)
    return "\r\n".join(out) + "\r\n"


@dataclass
class Direction:
    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    seed: int = 1
    drop_all: bool = False  # a black hole: nothing passes, not even STUN (ICE never succeeds)
    forwarded: int = 0
    dropped: int = 0  # datagrams swallowed by `drop_all`
    rtp_dropped: int = 0
    rtp_seen: int = 0
    rng: random.Random = field(init=False)  # loss: one draw per RTP packet, reproducible
    jitter_rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.jitter_rng = random.Random(self.seed + 1_000_003)


class _Port(asyncio.DatagramProtocol):
    def __init__(self, relay: LossyRelay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._received(self.name, data)


class LossyRelay:
    """`to_a` is where B should send to reach A; `to_b` where A should send to reach B."""

    def __init__(self, a_to_b: Direction, b_to_a: Direction) -> None:
        self.a_to_b = a_to_b
        self.b_to_a = b_to_a
        self.a_addr: tuple[str, int] | None = None
        self.b_addr: tuple[str, int] | None = None
        self._ports: dict[str, _Port] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for name in ("to_a", "to_b"):
            _, proto = await self._loop.create_datagram_endpoint(
                lambda n=name: _Port(self, n), local_addr=("127.0.0.1", 0)
            )
            self._ports[name] = proto

    def port(self, name: str) -> int:
        transport = self._ports[name].transport
        return int(transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        for p in self._ports.values():
            if p.transport is not None:
                p.transport.close()

    def _received(self, port_name: str, data: bytes) -> None:
        if port_name == "to_a":  # came from B, goes to A, sent from the port B talks to
            direction, dest, out = self.b_to_a, self.a_addr, self._ports["to_b"]
        else:
            direction, dest, out = self.a_to_b, self.b_addr, self._ports["to_a"]
        if dest is None or out.transport is None:
            return
        if direction.drop_all:
            direction.dropped += 1
            return
        if is_rtp(data):
            direction.rtp_seen += 1
            if direction.rng.random() < direction.loss:
                direction.rtp_dropped += 1
                return
        delay = 0.0
        if not is_stun(data):
            delay = direction.delay_ms + direction.jitter_rng.uniform(
                -direction.jitter_ms, direction.jitter_ms
            )
        direction.forwarded += 1
        transport = out.transport
        if delay <= 0:
            transport.sendto(data, dest)
        else:
            assert self._loop is not None
            self._loop.call_later(delay / 1000, _send, transport, data, dest)


def _send(transport: Any, data: bytes, dest: tuple[str, int]) -> None:
    if not transport.is_closing():
        transport.sendto(data, dest)


class SignalingProxy:
    """Forwards protocol section 4 signaling between endpoints `a` and `b` through the relay.

    `a` dials `alias_b` (and `b` may dial `alias_a`); every message to an alias
    is re-addressed to the real endpoint, its `from` replaced by the sender's
    alias, and the SDP of offers and answers rewritten so media goes through
    `relay`. `forwarded` counts messages by type.
    """

    def __init__(
        self,
        relay: LossyRelay,
        broker_port: int,
        *,
        a: str,
        b: str,
        prefix: str = "edge/v1",
    ) -> None:
        self.relay = relay
        self.port = broker_port
        self.a, self.b = a, b
        self.alias_a, self.alias_b = f"{a}-via", f"{b}-via"
        self.prefix = prefix
        self.forwarded: dict[str, int] = {}
        self.ready = asyncio.Event()

    def _route(self, to_alias: str, msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if to_alias == self.alias_b:  # from A to B
            dest, sender, relay_port = self.b, self.alias_a, self.relay.port("to_a")
            sdp = msg.get("sdp")
            if sdp:
                self.relay.a_addr = ("127.0.0.1", candidate_port(sdp))
        else:
            dest, sender, relay_port = self.a, self.alias_b, self.relay.port("to_b")
            sdp = msg.get("sdp")
            if sdp:
                self.relay.b_addr = ("127.0.0.1", candidate_port(sdp))
        out = dict(msg, to=dest)
        out["from"] = sender
        if sdp:
            out["sdp"] = rewrite_candidates(sdp, relay_port)
        return f"{self.prefix}/{dest}/signal", out

    async def run(self) -> None:
        """Forward until cancelled."""
        async with aiomqtt.Client("127.0.0.1", self.port) as client:
            for alias in (self.alias_a, self.alias_b):
                await client.subscribe(f"{self.prefix}/{alias}/signal", qos=1)
            self.ready.set()
            async for message in client.messages:
                alias = str(message.topic).split("/")[-2]
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    continue
                msg = json.loads(payload)
                topic, out = self._route(alias, msg)
                kind = str(msg.get("type"))
                self.forwarded[kind] = self.forwarded.get(kind, 0) + 1
                await client.publish(topic, json.dumps(out).encode(), qos=1)


@contextlib.asynccontextmanager
async def lossy_link(
    broker_port: int, *, a: str, b: str, a_to_b: Direction, b_to_a: Direction
) -> AsyncIterator[tuple[LossyRelay, SignalingProxy]]:
    """A relay and a signaling proxy between agents `a` and `b`; `a` dials `proxy.alias_b`."""
    relay = LossyRelay(a_to_b, b_to_a)
    await relay.start()
    proxy = SignalingProxy(relay, broker_port, a=a, b=b)
    task = asyncio.create_task(proxy.run())
    try:
        await asyncio.wait_for(proxy.ready.wait(), 10)
        yield relay, proxy
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task
        relay.close()
