"""A user-space UDP impairment relay on 127.0.0.1: seeded loss, delay and jitter.

The kernel here has no netem, so impairments sit between two aiortc peers:
each peer is told (by rewriting its remote description's candidates) that
the other lives at one of the relay's ports. Packets that reach port `to_a`
came from B and go on to A, and the other way round. Loss applies only to
RTP (not STUN, DTLS or RTCP), so ICE and DTLS still come up and the
receiver's stats see RTP loss; delay and jitter apply to everything but STUN.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field
from typing import Any

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
    forwarded: int = 0
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
