"""Echo cancellation in calls: on by default, configured from [audio.aec], ERLE reported.

The canceller itself is tested in test_aec.py; here it is the session's wiring
(config to canceller) and a call whose far end talks while what the near end
plays loops back into its microphone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import agent_config, collector
from alsa_support import EchoPath, heard_speech, level_dbfs, read_raw
from call_support import alsa_env, endpoint_config, running
from schema_support import assert_valid

from edgeagent.agent import Agent
from edgeagent.audio.aec import EchoCanceller
from edgeagent.audio.synth import speech_like
from edgeagent.call.session import CallSession
from edgeagent.clock import FakeClock
from edgeagent.config import load_config

SEAMS: dict[str, Any] = {"install_crash_hooks": False}


def session_for(cfg_path: Path) -> CallSession:
    return CallSession(
        load_config(cfg_path, environ={}),
        "call-1",
        clock=FakeClock(),
        on_quality=lambda _s: None,
        on_issue=lambda _c: None,
        on_health=lambda _s, _w: None,
        on_media_stalled=lambda _s: None,
    )


@pytest.mark.parametrize(
    ("aec_toml", "delay_ms"),
    [
        ("", 40),
        ("[audio.aec]\nstream_delay_ms = 120\n", 120),
        ("[audio.aec]\nenabled = false\n", None),
    ],
)
async def test_a_call_cancels_echo_by_default_with_the_configured_stream_delay(
    tmp_path: Path, aec_toml: str, delay_ms: int | None
) -> None:
    session = session_for(agent_config(tmp_path, 1883, extra=aec_toml))
    try:
        if delay_ms is None:
            assert session.aec is None
        else:
            assert isinstance(session.aec, EchoCanceller)
            # what the libwebrtc processor was given, read back from it
            assert session.aec.stream_delay_ms == delay_ms
    finally:
        await session.pc.close()


def quality(messages: list[Any], device: str) -> list[dict[str, Any]]:
    prefix = f"edge/v1/{device}/calls/"
    return [m.json() for m in messages if m.topic.startswith(prefix) and "/quality" in m.topic]


def far_end_voice() -> np.ndarray:
    """3 s of silence, then speech: the far end starts talking once the call is up."""
    speech = np.rint(speech_like(20.0, 11, level_dbfs=-20.0)).astype(np.int16)
    return np.concatenate([np.zeros(3 * 48000, dtype=np.int16), speech])


@contextlib.asynccontextmanager
async def echo_loop(
    agent: Agent, speaker: Path, mic: Path, erl_db: float
) -> AsyncIterator[EchoPath]:
    """`EchoPath` from `agent`'s speaker file to its mic file during its active call."""

    def capture_pos() -> int | None:
        call = agent.calls_mgr.active
        if call is None or call.session is None or call.session.capture.frames_read == 0:
            return None
        return int(call.session.capture.frames_read) * 960

    path = EchoPath(speaker, mic, capture_pos, erl_db=erl_db)
    task = asyncio.create_task(path.run())
    try:
        yield path
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("aec", [True, False])
async def test_a_talking_far_end_whose_voice_loops_back_is_cancelled_and_erle_reported(
    tmp_path: Path, broker: Any, monkeypatch: pytest.MonkeyPatch, aec: bool
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    # dev-a: silent itself, hears dev-b through a speaker 10 dB from its microphone
    extra = "" if aec else "[audio.aec]\nenabled = false\n"
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, extra=extra)
    voice = far_end_voice()
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, mic=voice)
    async with (
        collector(broker.port, "edge/v1/#") as c,
        running(cfg_b, **SEAMS),
        running(cfg_a, **SEAMS) as a,
        echo_loop(a, tmp_path / "spk_dev-a.raw", tmp_path / "mic_dev-a.raw", 10.0) as loop,
    ):
        call = await a.calls_mgr.dial("dev-b")
        session = call.session
        assert session is not None
        if aec:  # on by default, with the default stream delay
            assert isinstance(session.aec, EchoCanceller) and session.aec.stream_delay_ms == 40
        else:
            assert session.aec is None
        # Three stats windows (1 s each) in which dev-a played dev-b's voice.
        talking = await c.wait_for(
            lambda ms: (
                t
                if len(t := [q for q in quality(ms, "dev-a") if q["audio"]["rx_level_dbfs"] > -40])
                >= 3
                else None
            ),
            timeout=20,
        )
        assert loop.copied > 2 * 48000  # over two seconds of playout reached the microphone
        reports = quality(c.messages, "dev-a")
        await a.calls_mgr.hangup()
    for m in c.messages:
        if "/quality" in m.topic:
            assert_valid(m.topic, m.payload)
    # The last two seconds dev-b played: its own voice, if any, back from dev-a's microphone.
    returned = read_raw(tmp_path / "spk_dev-b.raw")[-2 * 48000 :]
    if aec:
        # no ERLE while the far end is silent (its first 3 s), then the echo is removed
        assert "erle_db" not in reports[0]["audio"]
        # (the first window may hold under 0.5 s of the far end's voice: none yet)
        assert all(q["audio"]["erle_db"] >= 10.0 for q in talking[1:])
        assert level_dbfs(returned) < -60.0
    else:
        assert all("erle_db" not in q["audio"] for q in reports)
        assert level_dbfs(returned) > -40.0  # -20 dBFS speech, 10 dB of ERL, two Opus hops
        # ... and it is dev-b's own voice: 0.6-0.7 after two Opus hops and two playout
        # buffers (SPEECH_MATCH is for one hop); another speech of this synth 0.13-0.31.
        _, rho, _ = heard_speech(voice, returned)
        assert rho >= 0.5
