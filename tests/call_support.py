"""Harness for call tests: agents and echo peers in-process with ALSA file PCMs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import agent_config
from alsa_support import BenchAlsa, bench_alsa, write_raw

from edgeagent.agent import Agent, AgentSeams
from edgeagent.call.echo_peer import EchoPeer
from edgeagent.config import load_config


def endpoint_config(
    tmp_path: Path,
    port: int,
    device_id: str,
    alsa: BenchAlsa,
    *,
    mic: np.ndarray | None = None,
    call: str = "",
    answer: str = "auto",
    extra: str = "",
) -> Path:
    """An agent config with its own file PCMs (mic_<id>, spk_<id>) on loopback-only ICE."""
    pad = np.zeros(48000 * 60, dtype=np.int16)  # past the infile the PCM returns garbage
    signal = mic if mic is not None else np.zeros(0, dtype=np.int16)
    alsa.add_mic(
        f"mic_{device_id}",
        write_raw(tmp_path / f"mic_{device_id}.raw", np.concatenate([signal, pad])),
    )
    alsa.add_speaker(f"spk_{device_id}", tmp_path / f"spk_{device_id}.raw")
    extra_text = f"""
[ice]
host_addresses = ["127.0.0.1"]
gather_timeout_s = 0.5
[audio]
capture_device = "mic_{device_id}"
playback_device = "spk_{device_id}"
paced = true
reopen_min_s = 0.2
reopen_max_s = 1.0
[call]
answer = "{answer}"
stats_interval_s = 1.0
{call}
{extra}
"""
    return agent_config(tmp_path, port, device_id, extra=extra_text)


def alsa_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BenchAlsa:
    return bench_alsa(tmp_path, monkeypatch)


@contextlib.asynccontextmanager
async def running(
    cfg_path: Path, *, built: Callable[[Agent], None] | None = None, **seams: Any
) -> AsyncIterator[Agent]:
    """The agent running in-process; `built` sees it before it starts (to subscribe)."""
    agent = Agent(
        load_config(cfg_path, environ={}),
        AgentSeams(install_signal_handlers=False, freeze_gc_after_start=False, **seams),
    )
    if built is not None:
        built(agent)
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.link.connected.wait(), 10)
        yield agent
    finally:
        agent.request_stop("test over")
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def echo_peer(cfg_path: Path, *, clean_stop: bool = True) -> AsyncIterator[EchoPeer]:
    """A running echo peer; at the end a clean stop (hangups, `offline`), or with
    `clean_stop=False` it vanishes: its task cancelled, calls left to time out."""
    peer = EchoPeer(load_config(cfg_path, environ={}))
    task = asyncio.create_task(peer.run())
    try:
        await asyncio.wait_for(peer.link.connected.wait(), 10)
        yield peer
    finally:
        try:
            if clean_stop:
                peer.request_stop("test over")  # calls hung up, `offline` published
                await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(cond: Callable[[], Any], timeout: float = 15.0, step: float = 0.05) -> Any:
    """Bounded polling for state that has no event to await (audio frames flowing)."""
    async with asyncio.timeout(timeout):
        while not (value := cond()):
            await asyncio.sleep(step)
        return value


# --- reading what a device published (messages from agent_support.collector) ----------


def summaries(messages: list[Any], device: str) -> list[dict[str, Any]]:
    """Call summaries published by `device`, in arrival order."""
    return [
        m.json()
        for m in messages
        if m.topic.startswith(f"edge/v1/{device}/calls/") and m.topic.endswith("/summary")
    ]


def one_summary_per_call(messages: list[Any], device: str) -> dict[str, dict[str, Any]]:
    """`device`'s summaries by call_id, after checking that no call_id has two."""
    by_call: dict[str, dict[str, Any]] = {}
    for s in summaries(messages, device):
        assert s["call_id"] not in by_call, f"{device}: second summary for {s['call_id']}: {s}"
        by_call[s["call_id"]] = s
    return by_call


def events(messages: list[Any], device: str) -> list[dict[str, Any]]:
    """Events published by `device`, in arrival order."""
    return [m.json() for m in messages if m.topic == f"edge/v1/{device}/events"]


def call_events(messages: list[Any], device: str, call_id: str) -> list[dict[str, Any]]:
    """Events published by `device` about call `call_id`, in arrival order."""
    return [e for e in events(messages, device) if e.get("call_id") == call_id]


def health_states(messages: list[Any], device: str) -> list[str]:
    """The health states `device` published, in order, without repeats."""
    out: list[str] = []
    for m in messages:
        if m.topic == f"edge/v1/{device}/health":
            state = m.json()["state"]
            if not out or out[-1] != state:
                out.append(state)
    return out


def categories(messages: list[Any], device: str) -> list[str]:
    """The category of each event published by `device`."""
    return [e["category"] for e in events(messages, device)]


def alerts(messages: list[Any], device: str, name: str) -> list[dict[str, Any]]:
    """Every retained state published for alert `name` by `device`."""
    return [m.json() for m in messages if m.topic == f"edge/v1/{device}/alerts/{name}"]


# An offer's SDP for tests that never answer it (refused, or declined by policy): only a
# shell, but one that passes the agent's SDP check (signaling.sdp_problem).
SHELL_SDP = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    "a=rtpmap:111 opus/48000/2\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    f"a=fingerprint:sha-256 {':'.join(['AB'] * 32)}\r\na=setup:actpass\r\n"
)
