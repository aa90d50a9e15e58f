"""Call flows of protocol section 4 end to end: answer policies, glare, timeouts, stalls.

Real mosquitto, real agents (and a user-space relay where the path must fail);
each flow is asserted as its events, health, summaries (one per call_id on each
side), LED sequences read back from the MockFactory pins, and what the agent does next.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from agent_support import collector
from alsa_support import tone
from call_support import (
    SHELL_SDP,
    alsa_env,
    call_events,
    endpoint_config,
    health_states,
    one_summary_per_call,
    running,
    summaries,
    until,
)
from gpiozero.pins.mock import MockFactory
from led_support import assert_led_states, traced
from lossy_relay import Direction, lossy_link
from schema_support import assert_valid
from tcp_relay import TcpRelay

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _cats(evs: list[dict[str, Any]]) -> list[str]:
    return [e["category"] for e in evs]


def _closed(evs: list[dict[str, Any]]) -> dict[str, Any]:
    (closed,) = [e for e in evs if e["category"] == "call.closed"]
    return closed


def _hearing(agent: Any, frames: int) -> bool:
    call = agent.calls_mgr.active
    sink = call.session.sink if call is not None and call.session is not None else None
    return sink is not None and sink.frames_received >= frames


async def test_reject_policy_refuses_unavailable_and_the_agent_stays_up(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 10))
    cfg_b = endpoint_config(
        tmp_path, broker.port, "dev-b", alsa, mic=tone(900, 10), answer="reject"
    )
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a, running(cfg_b) as b:
        refused = await a.calls_mgr.dial("dev-b")
        await c.wait_for(lambda ms: summaries(ms, "dev-a") and summaries(ms, "dev-b"))
        assert a.calls_mgr.active is None and b.calls_mgr.active is None
        # Still up: the rejecting device places a call of its own, which completes.
        back = await b.calls_mgr.dial("dev-a")
        await until(lambda: _hearing(b, 25))
        await b.calls_mgr.hangup()
        await c.wait_for(lambda ms: len(summaries(ms, "dev-b")) == 2)
        await c.wait_for(lambda ms: len(summaries(ms, "dev-a")) == 2)
    sa, sb = one_summary_per_call(c.messages, "dev-a"), one_summary_per_call(c.messages, "dev-b")
    caller, callee = sa[refused.call_id], sb[refused.call_id]
    assert (caller["result"], caller["end_reason"]) == ("rejected", "rejected_unavailable")
    assert (callee["result"], callee["end_reason"]) == ("rejected", "policy_reject")
    assert caller["setup_ms"] is None and callee["setup_ms"] is None
    assert callee["codec"] is None  # refused before any media was set up
    # The wire: one reject, reason `unavailable`, and no hangup for a call never answered.
    to_a = [m.json() for m in c.messages if m.topic == "edge/v1/dev-a/signal"]
    replies = [(s["type"], s.get("reason")) for s in to_a if s["call_id"] == refused.call_id]
    assert replies == [("reject", "unavailable")]
    ev_a = call_events(c.messages, "dev-a", refused.call_id)
    ev_b = call_events(c.messages, "dev-b", refused.call_id)
    assert _cats(ev_a) == ["call.outgoing", "call.rejected", "call.closed"]
    assert "unavailable" in ev_a[1]["message"]
    assert _cats(ev_b) == ["call.incoming", "call.closed"]
    assert _closed(ev_b)["data"]["end_reason"] == "policy_reject"
    assert sb[back.call_id]["result"] == sa[back.call_id]["result"] == "completed"
    # A refusal by policy is not a failure.
    assert b.calls.failed == 0 and b.failures.counts() == (1, 0)
    assert health_states(c.messages, "dev-b")[-1] == "idle"
    for m in c.messages:
        assert_valid(m.topic, m.payload)


async def test_glare_keeps_the_lower_call_id_on_both_ends_and_is_not_a_failure(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 20))
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, mic=tone(1000, 20))
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_a) as a, running(cfg_b) as b:
        # Both dial at once: each offer is on its way before the other arrives.
        call_a, call_b = await asyncio.gather(a.calls_mgr.dial("dev-b"), b.calls_mgr.dial("dev-a"))
        winner = min(call_a.call_id, call_b.call_id)
        loser, yielder = (call_b.call_id, b) if winner == call_a.call_id else (call_a.call_id, a)
        await until(lambda: _hearing(a, 50) and _hearing(b, 50))
        assert a.calls_mgr.active is not None and b.calls_mgr.active is not None
        assert a.calls_mgr.active.call_id == b.calls_mgr.active.call_id == winner
        await a.calls_mgr.hangup()
        await c.wait_for(lambda ms: winner in one_summary_per_call(ms, "dev-b"))
        await c.wait_for(lambda ms: winner in one_summary_per_call(ms, "dev-a"))
    yielder_id = "dev-a" if yielder is a else "dev-b"
    keeper_id = "dev-b" if yielder is a else "dev-a"
    by_device = {d: one_summary_per_call(c.messages, d) for d in ("dev-a", "dev-b")}
    for d in ("dev-a", "dev-b"):
        assert by_device[d][winner]["result"] == "completed", by_device[d][winner]
    # The yielded call: not a failure on the side that yielded, nor where it arrived.
    mine = by_device[yielder_id][loser]
    assert (mine["result"], mine["end_reason"]) == ("rejected", "glare")
    assert mine["direction"] == "outgoing"
    loser_offered = any(
        m.topic == f"edge/v1/{keeper_id}/signal"
        and m.json()["call_id"] == loser
        and m.json()["type"] == "offer"
        for m in c.messages
    )
    if loser_offered:  # it may have yielded before its offer went out
        theirs = by_device[keeper_id][loser]
        assert (theirs["result"], theirs["end_reason"]) == ("rejected", "glare")
        assert theirs["direction"] == "incoming"
        kept = [
            e["data"]
            for e in call_events(c.messages, keeper_id, loser)
            if e["category"] == "call.signaling"
        ]
        assert kept == [{"kept": winner, "yielded": loser, "ours_kept": True}]
        # Its reject follows the winning offer, so the yielder never reads it as `busy`.
        to_yielder = [
            (s["type"], s["call_id"])
            for m in c.messages
            if m.topic == f"edge/v1/{yielder_id}/signal" and (s := m.json())
        ]
        assert to_yielder.index(("offer", winner)) < to_yielder.index(("reject", loser))
    else:
        assert loser not in by_device[keeper_id]
    assert set(by_device[yielder_id]) == {winner, loser}
    assert set(by_device[keeper_id]) <= {winner, loser}
    # The winning call was answered by the side that yielded, after its yield.
    yielder_cats = _cats(call_events(c.messages, yielder_id, winner))
    assert yielder_cats[:3] == ["call.incoming", "call.answered", "call.established"]
    given = [
        e["data"]
        for e in call_events(c.messages, yielder_id, loser)
        if e["category"] == "call.signaling"
    ]
    assert given == [{"kept": winner, "yielded": loser, "ours_kept": False}]
    # Neither side counts the glare against the failure-rate alert.
    for agent in (a, b):
        assert agent.calls.failed == 0
        assert agent.failures.counts() == (1, 0)
    for m in c.messages:
        assert_valid(m.topic, m.payload)


async def test_candidates_that_lead_nowhere_end_in_connect_timeout(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(
        tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 10), call="connect_timeout_s = 2.0"
    )
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, mic=tone(900, 10))
    black_hole = {"a_to_b": Direction(drop_all=True), "b_to_a": Direction(drop_all=True)}
    seams, leds = traced()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        running(cfg_a, **seams) as a,
        running(cfg_b) as b,
        lossy_link(broker.port, a="dev-a", b="dev-b", **black_hole) as (relay, proxy),
    ):
        call = await a.calls_mgr.dial(proxy.alias_b)
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"), timeout=10)
        sb = await c.wait_for(lambda ms: summaries(ms, "dev-b"))
        await until(lambda: a.health.current().state == "idle")
        assert a.calls_mgr.active is None and b.calls_mgr.active is None
        assert await leds.decoded() == "idle"
        leds.stop()
    assert proxy.forwarded.get("answer") == 1  # B answered; only the path was dead
    assert relay.a_to_b.dropped > 0 and relay.b_to_a.dropped > 0  # ICE checks went in
    (mine,) = sa
    assert (mine["result"], mine["end_reason"]) == ("failed", "connect_timeout")
    assert mine["call_id"] == call.call_id and mine["setup_ms"] is None
    assert mine["duration_s"] == 0.0
    # B learnt it from A's hangup (its own timeout is the default 15 s).
    assert (sb[0]["result"], sb[0]["end_reason"]) == ("failed", "remote_hangup")
    ev = call_events(c.messages, "dev-a", call.call_id)
    assert _cats(ev) == ["call.outgoing", "call.closed"]
    closed = _closed(ev)
    assert closed["level"] == "warning"
    assert closed["data"]["end_reason"] == "connect_timeout"
    # What ICE had, for the operator: candidates on both sides, and checks that never
    # succeeded (the relay swallowed them), not just "not connected".
    detail = closed["data"]["detail"]
    assert detail.startswith("not connected after 2 s (local host x"), detail
    assert "remote host x" in detail and "pairs: " in detail and "succeeded" not in detail
    # The timeout counts from the answer: 2 s, well before aioice gives up (~30 s).
    assert 2.0 <= closed["ts"] - ev[0]["ts"] < 6.0
    # Slow green blink for the whole dead attempt (it never got to solid), then the heartbeat.
    assert_led_states(leds, ["offline", "idle", "connecting", "idle"])
    assert health_states(c.messages, "dev-a")[-2:] == ["connecting", "idle"]
    assert a.calls.failed == 1
    for m in c.messages:
        assert_valid(m.topic, m.payload)


async def test_inbound_media_dropped_mid_call_stalls_degrades_then_times_out(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """At the default 3 s stall warning and 10 s media timeout: RTP is swallowed while
    STUN consent, RTCP and DTLS still pass, so no transport close can end it first."""
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 40))
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, mic=tone(900, 40))
    clean = {"a_to_b": Direction(), "b_to_a": Direction()}
    seams, leds = traced()
    async with (
        collector(broker.port, "edge/v1/#") as c,
        running(cfg_a, **seams) as a,
        running(cfg_b) as b,
        lossy_link(broker.port, a="dev-a", b="dev-b", **clean) as (relay, proxy),
    ):
        call = await a.calls_mgr.dial(proxy.alias_b)
        await until(lambda: _hearing(a, 50))
        assert await leds.decoded() == "good"  # solid green, past connecting's 1 s blink
        relay.b_to_a.loss = 1.0  # everything B sends A from now on, RTP only
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"), timeout=20)
        sb = await c.wait_for(lambda ms: summaries(ms, "dev-b"))
        await until(lambda: a.health.current().state == "idle")
        assert a.calls_mgr.active is None and b.calls_mgr.active is None
        assert await leds.decoded() == "idle"
        leds.stop()
    assert relay.b_to_a.rtp_dropped > 400  # > 8 s of 20 ms packets
    (mine,) = sa
    assert (mine["result"], mine["end_reason"]) == ("failed", "media_timeout")
    assert mine["call_id"] == call.call_id
    # The outage is in the call's record: each 1 s stats window with no packet counted
    # 100 % lost (MOS ~1), not left out of the averages as if the call had been clean.
    quality = [m.json() for m in c.on(f"calls/{call.call_id}/quality")]
    empty = [q for q in quality if q["loss_pct"] == 100.0]
    assert len(empty) >= 6, [q["loss_pct"] for q in quality]
    assert all(q["mos"] is not None and q["mos"] < 1.5 for q in empty)
    assert mine["no_media_s"] >= 6.0
    assert mine["loss_pct"] >= 50.0 and mine["mos_min"] < 1.5
    # B still heard A until A hung up, and was told why.
    assert sb[0]["end_reason"] == "remote_hangup"
    ev = call_events(c.messages, "dev-a", call.call_id)
    order = ["call.established", "call.media_started", "call.media_stalled", "call.closed"]
    assert [e for e in _cats(ev) if e in order] == order
    (stalled,) = [e for e in ev if e["category"] == "call.media_stalled"]
    assert stalled["level"] == "warning" and 3.0 <= stalled["data"]["silent_s"] < 4.0
    closed = _closed(ev)
    assert closed["data"]["end_reason"] == "media_timeout"
    # The relay dropped RTP only: the detail tells the operator RTCP still came through.
    assert "RTCP reports from the far end still arrived" in closed["data"]["detail"]
    # Warned at 3 s of silence, hung up at 10 s: 7 s apart (the watch ticks every 0.5 s).
    assert 6.0 <= closed["ts"] - stalled["ts"] <= 8.5
    # Degraded from the stall until the call ended: the stats windows in between
    # (every second here) must not report the silent call as good again.
    assert health_states(c.messages, "dev-a")[-4:] == ["connecting", "good", "degraded", "idle"]
    # Solid amber from the stall to the hangup.
    assert_led_states(leds, ["offline", "idle", "connecting", "good", "degraded", "idle"])
    # ... and for the stall: every health update from it to the hangup says so. The
    # hangup's own update (idle) is stamped just before `call.closed`, in the same
    # millisecond or the one before, so the window ends at the first idle, not at a ts.
    health = [m.json() for m in c.messages if m.topic == "edge/v1/dev-a/health"]
    since_stall = [h for h in health if h["ts"] >= stalled["ts"]]
    ended = next(i for i, h in enumerate(since_stall) if h["state"] == "idle")
    during = since_stall[:ended]
    assert during, since_stall
    assert 0.0 <= closed["ts"] - since_stall[ended]["ts"] < 0.5, since_stall
    for h in during:
        assert h["state"] == "degraded" and "no inbound media" in h["reasons"], during
    for m in c.messages:
        assert_valid(m.topic, m.payload)


def _offer(call_id: str, sender: str, to: str) -> bytes:
    """An offer as a far end sends it; never answered here, so its SDP is only a shell."""
    msg = {"v": 1, "type": "offer", "call_id": call_id, "from": sender, "to": to, "ts": 1.0}
    return json.dumps(dict(msg, sdp=SHELL_SDP)).encode()


async def test_a_redelivered_offer_is_not_a_second_call(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """QoS 1 may deliver an offer twice (a sender's resend after a reconnect): the
    duplicate of a refused or ended call gets its reject again, and no second record."""
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_b = endpoint_config(
        tmp_path, broker.port, "dev-b", alsa, answer="reject", call='allow = ["dev-a"]'
    )
    async with collector(broker.port, "edge/v1/#") as c, running(cfg_b) as b:
        topic = "edge/v1/dev-b/signal"
        for call_id, sender in (("forbidden-1", "intruder"), ("policy-1", "dev-a")):
            await c.client.publish(topic, _offer(call_id, sender, "dev-b"), qos=1)
            await c.wait_for(lambda ms, i=call_id: i in one_summary_per_call(ms, "dev-b"))
            await c.client.publish(topic, _offer(call_id, sender, "dev-b"), qos=1)
        # Handled in order: once this one's summary is out, so would theirs be.
        await c.client.publish(topic, _offer("forbidden-2", "intruder", "dev-b"), qos=1)
        await c.wait_for(lambda ms: "forbidden-2" in one_summary_per_call(ms, "dev-b"))
        assert b.calls_mgr.active is None
    by_call = one_summary_per_call(c.messages, "dev-b")
    assert set(by_call) == {"forbidden-1", "policy-1", "forbidden-2"}
    assert by_call["forbidden-1"]["end_reason"] == "forbidden"
    assert by_call["policy-1"]["end_reason"] == "policy_reject"
    rejects = [
        (s["call_id"], s["reason"])
        for m in c.messages
        if m.topic in ("edge/v1/intruder/signal", "edge/v1/dev-a/signal")
        and (s := m.json())["type"] == "reject"
    ]
    assert sorted(rejects) == [  # a duplicate gets the same reject again, nothing more
        ("forbidden-1", "forbidden"),
        ("forbidden-1", "forbidden"),
        ("forbidden-2", "forbidden"),
        ("policy-1", "unavailable"),
        ("policy-1", "unavailable"),
    ]
    assert b.calls.total == 3


async def test_ringing_call_answered_by_the_button_then_one_cancelled_by_the_caller(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(tmp_path, broker.port, "dev-a", alsa, mic=tone(440, 20))
    cfg_b = endpoint_config(
        tmp_path,
        broker.port,
        "dev-b",
        alsa,
        mic=tone(900, 20),
        answer="ring",
        call="ring_timeout_s = 30.0",
        extra="[button]\nenabled = true\npin = 23",
    )
    factory = MockFactory()  # B's button and LEDs
    seams_b, leds = traced(factory)
    async with (
        collector(broker.port, "edge/v1/#") as c,
        running(cfg_a) as a,
        running(cfg_b, **seams_b) as b,
    ):
        answered = await a.calls_mgr.dial("dev-b")
        await c.wait_for(
            lambda ms: "call.ringing" in _cats(call_events(ms, "dev-b", answered.call_id))
        )
        assert b.health.current().state == "ringing"
        assert await leds.decoded() == "ringing"  # fast green blink
        # The button's short press answers a ringing call.
        await until(lambda: b.button is not None)
        factory.pin(23).drive_low()
        factory.pin(23).drive_high()
        await until(lambda: _hearing(a, 25) and _hearing(b, 25))
        await a.calls_mgr.hangup()
        await c.wait_for(lambda ms: answered.call_id in one_summary_per_call(ms, "dev-b"))
        # The caller gives up while the second call rings.
        cancelled = await a.calls_mgr.dial("dev-b")
        await c.wait_for(
            lambda ms: "call.ringing" in _cats(call_events(ms, "dev-b", cancelled.call_id))
        )
        await a.calls_mgr.hangup()
        await c.wait_for(lambda ms: cancelled.call_id in one_summary_per_call(ms, "dev-b"))
        await c.wait_for(lambda ms: cancelled.call_id in one_summary_per_call(ms, "dev-a"))
        await until(lambda: b.health.current().state == "idle")
        assert await leds.decoded() == "idle"
        leds.stop()
    sa, sb = one_summary_per_call(c.messages, "dev-a"), one_summary_per_call(c.messages, "dev-b")
    first = _cats(call_events(c.messages, "dev-b", answered.call_id))
    assert first == [
        "call.incoming",
        "call.ringing",
        "call.answered",
        "call.established",
        "call.media_started",
        "call.closed",
    ]
    assert sb[answered.call_id]["result"] == sa[answered.call_id]["result"] == "completed"
    second = call_events(c.messages, "dev-b", cancelled.call_id)
    assert _cats(second) == ["call.incoming", "call.ringing", "call.closed"]
    callee = sb[cancelled.call_id]
    assert (callee["result"], callee["end_reason"]) == ("missed", "remote_cancel")
    # The caller's side: not answered, and no failure (the failure-rate alert skips it).
    caller = sa[cancelled.call_id]
    assert (caller["result"], caller["end_reason"]) == ("missed", "local_hangup")
    assert a.calls.failed == 0 and a.failures.counts() == (1, 0)
    to_b = [m.json() for m in c.messages if m.topic == "edge/v1/dev-b/signal"]
    sent = [(s["type"], s.get("reason")) for s in to_b if s["call_id"] == cancelled.call_id]
    assert sent == [("offer", None), ("hangup", "local_hangup")]
    # B's pins: rang, answered (slow blink until media, then solid), the heartbeat between
    # the calls, and the second call rang until the caller gave up.
    answered_call = ["ringing", "connecting", "good", "idle"]
    assert_led_states(leds, ["offline", "idle", *answered_call, "ringing", "idle"])


async def test_a_stall_that_ends_in_time_clears_and_the_call_goes_on(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """Shortened (1 s warning, 8 s timeout): the stall stays a health reason through
    a stats window and clears only once audio flows again; the call goes on."""
    alsa = alsa_env(tmp_path, monkeypatch)
    cfg_a = endpoint_config(
        tmp_path,
        broker.port,
        "dev-a",
        alsa,
        mic=tone(440, 40),
        call="media_stall_warn_s = 1.0\nmedia_stall_hangup_s = 8.0",
    )
    cfg_b = endpoint_config(tmp_path, broker.port, "dev-b", alsa, mic=tone(900, 40))
    clean = {"a_to_b": Direction(), "b_to_a": Direction()}
    async with (
        collector(broker.port, "edge/v1/#") as c,
        running(cfg_a) as a,
        running(cfg_b),
        lossy_link(broker.port, a="dev-a", b="dev-b", **clean) as (relay, proxy),
    ):
        call = await a.calls_mgr.dial(proxy.alias_b)
        await until(lambda: _hearing(a, 50))
        relay.b_to_a.loss = 1.0

        def health_after_stall(ms: list[Any]) -> list[dict[str, Any]]:
            return [
                h
                for m in ms
                if m.topic == "edge/v1/dev-a/health" and (h := m.json())["ts"] >= stalled[0]["ts"]
            ]

        stalled = await c.wait_for(
            lambda ms: [
                e
                for e in call_events(ms, "dev-a", call.call_id)
                if e["category"] == "call.media_stalled"
            ]
        )
        # Still stalled a stats window later (health is published on change only).
        await c.wait_for(
            lambda ms: any(
                m.json()["ts"] > stalled[0]["ts"]
                for m in ms
                if m.topic == f"edge/v1/dev-a/calls/{call.call_id}/quality"
            )
        )
        resumed_at = time.time()
        relay.b_to_a.loss = 0.0
        heard = a.calls_mgr.active.session.sink.frames_received

        # Recovered: a health update without the stall, and audio flowing again.
        await c.wait_for(
            lambda ms: any("no inbound media" not in h["reasons"] for h in health_after_stall(ms))
        )
        await until(lambda: _hearing(a, heard + 50))
        assert a.calls_mgr.active is not None and a.calls_mgr.active.call_id == call.call_id
        await a.calls_mgr.hangup()
        sa = await c.wait_for(lambda ms: summaries(ms, "dev-a"))
    after = health_after_stall(c.messages)
    while_silent = [h for h in after if h["ts"] < resumed_at]
    assert while_silent, after
    for h in while_silent:
        assert h["state"] == "degraded" and "no inbound media" in h["reasons"], after
    recovered = next(h for h in after if "no inbound media" not in h["reasons"])
    assert recovered["ts"] >= resumed_at
    # Any in-call state: the window that sees the gap's packets as lost may call it bad.
    assert recovered["state"] in ("good", "degraded", "bad")
    (mine,) = sa
    assert (mine["result"], mine["end_reason"]) == ("completed", "local_hangup")
    # The stall's windows count as lost, and stop counting once the stream is back
    # (that the gap is then not counted twice: test_quality_stats.py).
    quality = [m.json() for m in c.on(f"calls/{call.call_id}/quality")]
    assert [q["loss_pct"] for q in quality if q["ts"] > resumed_at + 1.5].count(100.0) == 0
    assert any(q["loss_pct"] == 100.0 for q in quality)
    assert mine["no_media_s"] >= 1.0
    ev = _cats(call_events(c.messages, "dev-a", call.call_id))
    assert ev.count("call.media_stalled") == 1 and ev[-1] == "call.closed"


async def test_an_offer_that_cannot_reach_the_broker_ends_the_call_signaling_unavailable(
    tmp_path: Path,
    broker,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """Dialled while the broker is unreachable: the call must not wait out answer_timeout
    and then blame the far end ("no answer from X")."""
    relay = TcpRelay(broker.port)
    await relay.start()
    try:
        alsa = alsa_env(tmp_path, monkeypatch)
        cfg_a = endpoint_config(tmp_path, relay.port, "dev-a", alsa, mic=tone(440, 10))
        async with running(cfg_a) as a:
            relay.set_open(False)
            await asyncio.wait_for(a.link.disconnected.wait(), 10)
            call = await a.calls_mgr.dial("dev-b")
            await until(lambda: call.state == "ended", timeout=5)
            assert (call.result, call.end_reason) == ("failed", "signaling_unavailable")
            await until(lambda: a.calls_mgr.active is None, timeout=5)  # teardown done
    finally:
        await relay.stop()
