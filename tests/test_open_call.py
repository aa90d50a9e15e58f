"""A call the agent did not live to end still gets its one summary, at the next start.

The record itself (`OpenCallLedger`: ordered writes off the loop, another call's record
kept, bad files refused), and end to end: a real agent process in a call with a real
echo peer over mosquitto, SIGKILLed mid-call and started again on the same state dir;
and the same call stopped cleanly, which must not be summarised twice.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
from agent_support import AgentProcess, collector
from alsa_support import bench_alsa, tone
from call_support import (
    alsa_env,
    call_events,
    echo_peer,
    endpoint_config,
    events,
    running,
    summaries,
)
from schema_support import assert_valid

from edgeagent.call.ledger import MAX_BYTES, OPEN_CALL, OpenCallLedger
from edgeagent.telemetry import payloads as p

# --- the record ----------------------------------------------------------------------------


def test_writes_land_in_order_and_only_the_calls_own_summary_removes_its_record(
    tmp_path: Path,
) -> None:
    ledger = OpenCallLedger(tmp_path / OPEN_CALL)
    for n in range(50):  # queued on the ledger's thread; the last one is what stays
        ledger.write("c-1", f'{{"n":{n}}}'.encode(), durable=n % 10 == 0)
    ledger.flush()
    assert json.loads(ledger.path.read_bytes()) == {"n": 49}
    ledger.clear("c-0")  # a refused (busy) offer's summary during call c-1
    ledger.flush()
    assert ledger.path.exists()
    ledger.clear("c-1")
    ledger.write("c-2", b'{"n":"next"}', durable=True)  # glare: the next call already began
    ledger.clear("c-1")
    ledger.flush()
    assert json.loads(ledger.path.read_bytes()) == {"n": "next"}
    ledger.clear("c-2")
    ledger.close()  # what is pending is done before close returns
    assert not ledger.path.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_record_goes_as_the_summary_is_spooled_and_a_queued_write_does_not_return_it(
    tmp_path: Path,
) -> None:
    """clear() removes the file at once (no kill can fall between the summary's commit
    and the removal); a write still queued on the ledger's thread for that call, or one
    for a call before it, is dropped."""
    ledger = OpenCallLedger(tmp_path / OPEN_CALL)
    ledger.write("c-1", b'{"n":1}', durable=False)
    ledger.flush()
    gate = threading.Event()
    ledger._io.submit(gate.wait)  # the ledger's thread is busy (an fsync, say)
    ledger.write("c-1", b'{"n":2}', durable=True)  # a quality sample's refresh, queued
    ledger.clear("c-1")  # the call ended: removed now, on this thread
    assert not ledger.path.exists()
    ledger.write("c-2", b'{"n":3}', durable=False)  # the next call begins
    ledger._io.submit(lambda: None)
    gate.set()
    ledger.flush()
    assert json.loads(ledger.path.read_bytes()) == {"n": 3}  # c-1's late write dropped
    ledger.close()


def test_take_returns_the_previous_runs_record_once(tmp_path: Path) -> None:
    path = tmp_path / OPEN_CALL
    assert OpenCallLedger(path).take() is None
    path.write_bytes(b'{"call_id":"c-9"}')
    ledger = OpenCallLedger(path)
    assert ledger.take() == b'{"call_id":"c-9"}'
    assert not path.exists() and ledger.take() is None
    path.write_bytes(b"x" * (MAX_BYTES + 1))
    assert OpenCallLedger(path).take() is None  # not a call record: refused and removed
    assert not path.exists()


def test_a_state_dir_that_cannot_be_written_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    ledger = OpenCallLedger(blocked / OPEN_CALL)
    with caplog.at_level(logging.WARNING, logger="edgeagent.call.ledger"):
        for _ in range(3):
            ledger.write("c-1", b"{}", durable=True)
        ledger.clear("c-1")
        ledger.close()
    warnings = [r for r in caplog.records if "cannot record the open call" in r.message]
    assert len(warnings) == 1
    ledger.write("c-2", b"{}", durable=False)  # after close: done in place, still no raise
    ledger.clear("c-2")


# --- end to end ----------------------------------------------------------------------------


def _started(ms: list[Any]) -> list[dict[str, Any]]:
    return [
        e for e in events(ms, "dev-1") if e["category"] == "agent" and "started" in e["message"]
    ]


def _closed(ms: list[Any], call_id: str) -> list[dict[str, Any]]:
    return [e for e in call_events(ms, "dev-1", call_id) if e["category"] == "call.closed"]


def _pair(tmp_path: Path, port: int) -> tuple[Path, Path, dict[str, str]]:
    """dev-1 (a tone on its microphone, echo-1 its default peer), echo-1, and their env."""
    alsa = bench_alsa(tmp_path)
    dev = endpoint_config(
        tmp_path, port, "dev-1", alsa, mic=tone(700.0, 40), call='default_peer = "echo-1"'
    )
    echo = endpoint_config(tmp_path, port, "echo-1", alsa)
    return dev, echo, {"ALSA_CONFIG_PATH": str(alsa.conf)}


async def _in_a_call(c: Any, agent: AgentProcess) -> str:
    """Start the agent (it dials the echo peer) and wait for two quality samples."""
    agent.start()
    established = await c.wait_for(
        lambda ms: [e for e in events(ms, "dev-1") if e["category"] == "call.established"], 30
    )
    call_id: str = established[0]["call_id"]
    await c.wait_for(lambda ms: len(c.on(f"calls/{call_id}/quality")) >= 2, 20)
    return call_id


@pytest.mark.slow
@pytest.mark.broker
async def test_a_call_cut_by_sigkill_is_summarised_at_the_next_start_with_its_crash(
    tmp_path: Path, broker: Any
) -> None:
    dev, echo, env = _pair(tmp_path, broker.port)
    agent = AgentProcess(dev, env=env, args=("--dial", "echo-1"))
    state = tmp_path / "state-dev-1"
    async with echo_peer(echo):
        try:
            async with collector(broker.port, "edge/v1/dev-1/#") as c:
                call_id = await _in_a_call(c, agent)
                # The record is on disk while the call runs: the summary as of now.
                record = msgspec.json.decode((state / OPEN_CALL).read_bytes(), type=p.Summary)
                assert (record.call_id, record.result, record.end_reason) == (
                    call_id,
                    "failed",
                    "agent_lost",
                )
                agent.kill()
                assert not summaries(c.messages, "dev-1")

                again = AgentProcess(dev, env=env, log=tmp_path / "again.log")
                again.start()
                try:
                    (crash,) = await c.wait_for(lambda ms: [m.json() for m in c.on("/crash")], 30)
                    (summary,) = await c.wait_for(lambda ms: summaries(ms, "dev-1"), 30)
                    (closed,) = await c.wait_for(lambda ms: _closed(ms, call_id))
                    assert again.terminate() == 0, again.output()[-3000:]
                finally:
                    again.stop_quietly()
        finally:
            agent.stop_quietly()
    assert_valid(f"edge/v1/dev-1/calls/{call_id}/summary", summary)
    assert crash["kind"] == "unclean_shutdown" and crash["snapshot"]["cause"] == "killed"
    assert summary["call_id"] == call_id and summary["peer"] == "echo-1"
    assert summary["direction"] == "outgoing"
    assert (summary["result"], summary["end_reason"]) == ("failed", "agent_lost")
    assert summary["crash_id"] == crash["crash_id"]
    # What the call had before the kill: its set-up, ICE pair, codec and quality samples.
    assert summary["setup_ms"] is not None and summary["codec"] == "opus"
    assert summary["ice"]["local_type"] == "host"
    assert summary["duration_s"] >= 1.0 and summary["mos_avg"] is not None
    assert closed["level"] == "warning" and closed["data"]["recovered"] is True
    assert closed["data"]["crash_id"] == crash["crash_id"]
    assert crash["crash_id"] in closed["data"]["detail"]
    assert not (state / OPEN_CALL).exists()


@pytest.mark.slow
@pytest.mark.broker
async def test_a_call_ended_by_a_clean_stop_is_not_summarised_again_at_the_next_start(
    tmp_path: Path, broker: Any
) -> None:
    dev, echo, env = _pair(tmp_path, broker.port)
    agent = AgentProcess(dev, env=env, args=("--dial", "echo-1"))
    async with echo_peer(echo):
        try:
            async with collector(broker.port, "edge/v1/dev-1/#") as c:
                call_id = await _in_a_call(c, agent)
                assert agent.terminate() == 0, agent.output()[-3000:]
                (first,) = await c.wait_for(lambda ms: summaries(ms, "dev-1"))
                assert first["end_reason"] == "agent_stopping"
                assert not (tmp_path / "state-dev-1" / OPEN_CALL).exists()
                again = AgentProcess(dev, env=env, log=tmp_path / "again.log")
                again.start()
                try:
                    # The next start's "started" event is spooled after any recovered
                    # summary would be, and the spool sends in order.
                    await c.wait_for(lambda ms: len(_started(ms)) == 2, 30)
                    assert again.terminate() == 0, again.output()[-3000:]
                finally:
                    again.stop_quietly()
        finally:
            agent.stop_quietly()
    assert [s["call_id"] for s in summaries(c.messages, "dev-1")] == [call_id]
    assert len(_closed(c.messages, call_id)) == 1
    assert not c.on("/crash")


@pytest.mark.broker
async def test_a_refused_offer_reusing_the_active_calls_id_leaves_its_record(
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused offer writes no open-call record, so its summary must not remove one:
    here another endpoint's offer carries the call_id of the call in progress."""
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg = endpoint_config(tmp_path, broker.port, "dev-b", alsa, call='allow = ["dev-x"]')
    async with collector(broker.port, "edge/v1/#") as c, running(cfg) as b:
        call = await b.calls_mgr.dial("nobody-home")  # offering: the record is written
        ledger = b.calls_mgr._ledger
        assert ledger is not None
        ledger.flush()
        assert ledger.path.exists()
        intruder = {"v": 1, "type": "offer", "call_id": call.call_id, "from": "dev-y",
                    "to": "dev-b", "ts": 1.0, "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
                    "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}  # fmt: skip
        await c.client.publish("edge/v1/dev-b/signal", json.dumps(intruder).encode(), qos=1)
        await c.wait_for(lambda ms: summaries(ms, "dev-b"))  # dev-y refused: forbidden
        ledger.flush()
        record = msgspec.json.decode(ledger.path.read_bytes(), type=p.Summary)
        assert (record.call_id, record.peer) == (call.call_id, "nobody-home")
        assert b.calls_mgr.active is call
