"""Fast call set-up: our ICE check pacing, early end of the check loop, and the STUN policy."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioice.ice
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from alsa_support import tone
from call_support import alsa_env, echo_peer, endpoint_config, running, until

from edgeagent.call.ice import (
    CHECK_INTERVAL_S,
    ice_configuration,
    restrict_host_addresses,
    selected_candidates,
    stun_seen_down,
    without_stun,
)
from edgeagent.call.session import CallSession
from edgeagent.clock import FakeClock
from edgeagent.config import Config, DeviceConfig, IceConfig

LOOPBACK = ["127.0.0.1"]


def _conn(pc: RTCPeerConnection) -> Any:
    return pc.getTransceivers()[0].sender.transport.transport.iceGatherer._connection


async def _call(interval_s: float) -> tuple[RTCPeerConnection, RTCPeerConnection]:
    """Offer/answer between two loopback peers with our ICE policy; returns (caller, callee)."""
    caller, callee = RTCPeerConnection(ice_configuration()), RTCPeerConnection(ice_configuration())
    caller.addTrack(AudioStreamTrack())
    offer = await caller.createOffer()
    restrict_host_addresses(caller, LOOPBACK, gather_timeout_s=0.5, check_interval_s=interval_s)
    await caller.setLocalDescription(offer)
    await callee.setRemoteDescription(caller.localDescription)
    callee.addTrack(AudioStreamTrack())
    answer = await callee.createAnswer()
    restrict_host_addresses(callee, LOOPBACK, gather_timeout_s=0.5, check_interval_s=interval_s)
    await callee.setLocalDescription(answer)
    await caller.setRemoteDescription(callee.localDescription)
    return caller, callee


@pytest.fixture
async def closing() -> AsyncIterator[list[RTCPeerConnection]]:
    pcs: list[RTCPeerConnection] = []
    yield pcs
    for pc in pcs:
        await pc.close()


async def _completed(pc: RTCPeerConnection) -> None:
    done = asyncio.Event()

    def check() -> None:
        if pc.iceConnectionState == "completed":
            done.set()

    pc.on("iceconnectionstatechange", check)
    check()
    await done.wait()


async def test_ice_ends_when_the_checks_succeed_not_a_whole_ta_later(
    closing: list[RTCPeerConnection],
) -> None:
    # Ta of 2 s on both ends: aioice's loop would only notice success after sleeping it
    # out; ours ends as soon as the nominated pair succeeded (one loopback round trip).
    t0 = time.monotonic()
    caller, callee = await _call(interval_s=2.0)
    closing += [caller, callee]
    async with asyncio.timeout(1.5):
        await asyncio.gather(_completed(caller), _completed(callee))
    assert time.monotonic() - t0 < 1.5
    async with asyncio.timeout(10):
        while caller.connectionState != "connected" or callee.connectionState != "connected":
            await asyncio.sleep(0.01)  # DTLS has no event besides this state; bounded
    pair = selected_candidates(caller)
    assert pair is not None and pair[0].host == pair[1].host == "127.0.0.1"


async def test_the_override_is_per_connection_not_process_wide(
    closing: list[RTCPeerConnection],
) -> None:
    caller, callee = await _call(interval_s=CHECK_INTERVAL_S)
    closing += [caller, callee]
    for pc in (caller, callee):
        conn = _conn(pc)
        assert "connect" in vars(conn) and "gather_candidates" in vars(conn)
    plain = aioice.ice.Connection(ice_controlling=True)
    assert "connect" not in vars(plain)
    assert aioice.ice.Connection.connect.__module__ == "aioice.ice"


@dataclass
class _Started:
    at: list[float]


async def test_checks_start_one_per_ta() -> None:
    # Three remote candidates on ports nobody answers: the checks must start Ta apart.
    socks = []
    for _ in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    pc = RTCPeerConnection(ice_configuration())
    try:
        pc.addTrack(AudioStreamTrack())
        offer = await pc.createOffer()
        restrict_host_addresses(pc, LOOPBACK, check_interval_s=0.05)
        await pc.setLocalDescription(offer)
        conn = _conn(pc)
        conn.remote_username, conn.remote_password = "user", "password-password-pass"
        for i, s in enumerate(socks):
            port = s.getsockname()[1]
            conn._remote_candidates.append(
                aioice.Candidate(str(i), 1, "udp", 100 - i, "127.0.0.1", port, "host")
            )
        conn._remote_candidates_end = True
        started = _Started([])
        real = conn.check_start_task

        def record(pair: Any) -> None:  # aioice's hook, wrapped on this instance only
            if pair.task is None:
                started.at.append(time.monotonic())
            real(pair)

        conn.check_start_task = record
        task = asyncio.ensure_future(conn.connect())
        async with asyncio.timeout(10):
            while len(started.at) < 3:
                await asyncio.sleep(0.01)  # bounded: no event for "a check started"
        task.cancel()
        gaps = [b - a for a, b in zip(started.at, started.at[1:], strict=False)]
        assert all(g >= 0.045 for g in gaps), gaps
    finally:
        await pc.close()
        for s in socks:
            s.close()


def test_ta_below_the_rfc_floor_is_refused() -> None:
    pc = RTCPeerConnection(ice_configuration())
    with pytest.raises(ValueError, match="RFC 8445"):
        restrict_host_addresses(pc, LOOPBACK, check_interval_s=0.001)


def test_without_stun_keeps_turn_and_the_relay_policy() -> None:
    config = ice_configuration(
        ["stun:10.0.0.1:3478"], ["turn:10.0.0.2:3478"], "u", "p", relay_only=True
    )
    out = without_stun(config)
    assert [s.urls for s in out.iceServers or []] == ["turn:10.0.0.2:3478"]
    assert out.iceTransportPolicy == config.iceTransportPolicy
    assert without_stun(ice_configuration(["stun:10.0.0.1:3478"])).iceServers == []


@dataclass(frozen=True)
class _Probe:
    url: str
    status: str


def test_stun_seen_down_reads_the_latest_probe_of_that_server() -> None:
    url = "stun:10.0.0.1:3478"
    assert stun_seen_down([_Probe(url, "unreachable")], url)
    assert not stun_seen_down([_Probe(url, "ok")], url)
    assert not stun_seen_down([_Probe("stun:10.0.0.9:3478", "unreachable")], url)
    assert not stun_seen_down([], url)  # never probed: not known down


def test_default_gather_timeout_leaves_room_under_one_second() -> None:
    assert IceConfig().gather_timeout_s <= 0.75


async def test_a_session_gathers_without_a_stun_server_seen_down() -> None:
    dead = "stun:127.0.0.1:9"
    cfg = Config(device=DeviceConfig(id="dev-1"), ice=IceConfig(stun_urls=[dead]))
    made = []
    for down in (False, True):
        session = CallSession(
            cfg,
            f"c{int(down)}",
            clock=FakeClock(),
            on_quality=lambda _s: None,
            on_issue=lambda _c: None,
            on_health=lambda _s, _w: None,
            on_media_stalled=lambda _s: None,
            stun_down=lambda down=down: down,  # type: ignore[misc]
        )
        made.append(session)
    try:
        servers = []
        for m in made:
            m.pc.addTransceiver("audio")
            servers.append(_conn(m.pc).stun_server)
        assert servers == [("127.0.0.1", 9), None]
    finally:
        for m in made:
            await m.pc.close()


async def test_a_dead_stun_server_costs_at_most_the_default_gather_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never read: a STUN server that never answers
        pc = RTCPeerConnection(ice_configuration([f"stun:127.0.0.1:{dead.getsockname()[1]}"]))
        try:
            pc.addTrack(AudioStreamTrack())
            offer = await pc.createOffer()
            timeout = IceConfig().gather_timeout_s
            restrict_host_addresses(pc, LOOPBACK, gather_timeout_s=timeout)
            t0 = time.monotonic()
            await pc.setLocalDescription(offer)
            took = time.monotonic() - t0
            assert timeout * 0.9 <= took < timeout + 0.5, took  # waited for STUN, not longer
            assert " 127.0.0.1 " in pc.localDescription.sdp
        finally:
            await pc.close()


async def test_offer_answer_still_carries_our_candidates(closing: list[RTCPeerConnection]) -> None:
    caller, callee = await _call(interval_s=CHECK_INTERVAL_S)
    closing += [caller, callee]
    for desc in (caller.localDescription, callee.localDescription):
        assert isinstance(desc, RTCSessionDescription)
        assert "a=candidate:" in desc.sdp and " 127.0.0.1 " in desc.sdp


@pytest.mark.broker
@pytest.mark.slow
async def test_the_agent_skips_the_stun_server_its_probe_found_dead(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never read: a STUN server that never answers
        stun = f"stun:127.0.0.1:{dead.getsockname()[1]}"
        alsa = alsa_env(tmp_path, monkeypatch)
        cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 10))
        cfg_a.write_text(
            cfg_a.read_text().replace(
                "gather_timeout_s = 0.5", f'gather_timeout_s = 0.5\nstun_urls = ["{stun}"]'
            )
        )
        cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
        async with echo_peer(cfg_e), running(cfg_a) as a:
            # The agent's first network probe round finds the server dead...
            await until(lambda: a.netwatch.latest is not None and a.netwatch.latest.stun)
            assert a._stun_seen_down()
            await a.calls_mgr.dial("echo")
            await until(lambda: a.calls_mgr.active and a.calls_mgr.active.session)
            session = a.calls_mgr.active.session
            # ...so the call's ICE agent is built without it, and the call connects.
            assert _conn(session.pc).stun_server is None
            await until(lambda: a.calls_mgr.active and a.calls_mgr.active.state == "active")
            await a.calls_mgr.hangup()
