"""The README's first command: scripts/bench-run's agent calls its echo peer, end to end.

Both run through the CLI as the script starts them (`edgeagent echo-peer --config
config/bench-echo.toml`, then `edgeagent run --config config/bench.toml --dial
bench-echo`), on the committed files. The environment overrides only what a test
must: the broker port (EDGEAGENT__MQTT__PORT), the state dirs (under tmp_path), and
ALSA_CONFIG_PATH, an asoundrc of this test's that defines the config's PCM names as
file PCMs (a tone in, the speaker to a file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import ROOT, AgentProcess, Received, collector
from alsa_support import (
    RATE,
    active,
    bench_alsa,
    hz_tolerance,
    level_dbfs,
    peak_hz,
    tone,
    write_raw,
)
from call_support import events, summaries, until
from schema_support import assert_valid

from edgeagent.config import load_config

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FREQ = 700.0


def _bench_run() -> tuple[str, str, str, list[str]]:
    """What scripts/bench-run starts: (echo peer config, agent config, --dial, PCM names)."""
    script = (ROOT / "scripts" / "bench-run").read_text()
    echo = re.search(r"edgeagent echo-peer --config (\S+)", script)
    run = re.search(r"edgeagent run --config (\S+) --dial (\S+)", script)
    assert echo is not None and run is not None, "bench-run no longer starts them this way"
    return echo[1], run[1], run[2], re.findall(r"^pcm\.(\w+) ", script, re.MULTILINE)


def _statuses(ms: list[Received], device: str, state: str) -> list[dict[str, Any]]:
    return [
        s for m in ms if m.topic == f"edge/v1/{device}/status" and (s := m.json())["state"] == state
    ]


def _played(path: Path) -> np.ndarray:
    """The speaker file so far (a whole number of samples: it is being written)."""
    data = path.read_bytes() if path.exists() else b""
    return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")


async def test_bench_agent_dials_the_bench_echo_peer_and_hears_itself_back(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
) -> None:
    echo_path, agent_path, dial, pcms = _bench_run()
    cfg = load_config(ROOT / agent_path, environ={})
    echo_cfg = load_config(ROOT / echo_path, environ={})
    device, peer = cfg.device.id, echo_cfg.device.id
    # The pair as committed: the agent dials the echo peer's id (and so would its
    # button), both on one broker, and the script defines the agent's PCMs.
    assert dial == peer == cfg.call.default_peer
    assert (cfg.mqtt.host, cfg.mqtt.port) == (echo_cfg.mqtt.host, echo_cfg.mqtt.port)
    assert cfg.audio.capture_device in pcms and cfg.audio.playback_device in pcms
    assert cfg.leds.mock

    alsa = bench_alsa(tmp_path)
    pad = np.zeros(RATE * 60, dtype=np.int16)  # past the infile the PCM returns garbage
    mic = write_raw(tmp_path / "mic.raw", np.concatenate([tone(FREQ, 30), pad]))
    alsa.add_mic(cfg.audio.capture_device, mic)
    speaker = tmp_path / "spk.raw"
    alsa.add_speaker(cfg.audio.playback_device, speaker)
    port = {"EDGEAGENT__MQTT__PORT": str(broker.port)}
    echo = AgentProcess(
        ROOT / echo_path,
        env={**port, "EDGEAGENT__STORAGE__STATE_DIR": str(tmp_path / "echo-state")},
        log=tmp_path / "echo-peer.log",
        command="echo-peer",
    )
    agent = AgentProcess(
        ROOT / agent_path,
        env={
            **port,
            "EDGEAGENT__STORAGE__STATE_DIR": str(tmp_path / "state"),
            "ALSA_CONFIG_PATH": str(alsa.conf),
        },
        log=tmp_path / "agent.log",
        args=("--dial", dial),
    )
    try:
        async with collector(broker.port, "edge/v1/#") as c:
            echo.start()
            # The echo peer listens before the agent dials (its offer is not retained).
            await c.wait_for(lambda ms: _statuses(ms, peer, "online"), 20)
            agent.start()
            established = await c.wait_for(
                lambda ms: [e for e in events(ms, device) if e["category"] == "call.established"],
                30,
            )
            call_id = established[0]["call_id"]
            # Two seconds of the tone came back from the echo peer to the speaker file.
            await until(lambda: active(_played(speaker)).size >= 2 * RATE, timeout=20, step=0.2)
            assert agent.terminate() == 0, agent.output()[-3000:]
            (summary,) = await c.wait_for(lambda ms: summaries(ms, device))
            await c.wait_for(lambda ms: _statuses(ms, device, "offline"))
            assert echo.terminate() == 0, echo.output()[-3000:]
            await c.wait_for(lambda ms: _statuses(ms, peer, "offline"))
    finally:
        agent.stop_quietly()
        echo.stop_quietly()
    assert summary["call_id"] == call_id
    assert (summary["peer"], summary["direction"]) == (peer, "outgoing")
    assert (summary["result"], summary["end_reason"]) == ("completed", "agent_stopping")
    assert summary["setup_ms"] is not None and summary["duration_s"] > 0
    cats = [e["category"] for e in events(c.messages, device) if e.get("call_id") == call_id]
    order = ["call.outgoing", "call.established", "call.media_started", "call.closed"]
    assert [e for e in cats if e in order] == order
    assert _statuses(c.messages, device, "offline")[-1]["reason"] == "SIGTERM"
    # What played is the agent's own tone (sent at -12 dBFS), through Opus both ways.
    played = active(_played(speaker))
    assert abs(peak_hz(played) - FREQ) <= hz_tolerance(FREQ), peak_hz(played)
    assert abs(level_dbfs(played) - (-12.0)) <= 6.0, level_dbfs(played)
    for m in c.messages:
        assert_valid(m.topic, m.payload)
