"""Calls of this device: signaling on MQTT, the answer policy, one active call, records.

Every inbound signaling message is decoded and checked; anything unusable is
answered (reject with a reason) and reported, never dropped silently. Exactly
one call may be active; other offers get `busy`, except the glare case where
both ends offered to each other at once (the lower call_id wins on both ends).
Each call ends with one spooled summary.

Every call is traced (docs/tracing.md): a root span per call with its phases as
children. An outgoing offer carries the root's `traceparent`; an incoming one's
is continued, so both ends of a call share one trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from edgeagent.audio.checks import AudioIssueChanged
from edgeagent.call import signaling as sig
from edgeagent.call.ledger import OpenCallLedger
from edgeagent.call.offer_token import token_mismatch
from edgeagent.call.peers import PeerPresence, PeerStatus
from edgeagent.call.session import CallEnded, CallSession, QualitySample
from edgeagent.clock import Clock
from edgeagent.config import Config
from edgeagent.health.alerts import AlertRules, flag
from edgeagent.mqtt import BrokerLink, BrokerUnavailable, Inbound
from edgeagent.telemetry import payloads as p
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.topics import Topics
from edgeagent.telemetry.tracing import CallTracer

logger = logging.getLogger(__name__)

OfferCheck = Callable[[p.Signal], None]
"""Raises sig.SignalError (reason `forbidden`) for an offer whose token is not acceptable."""
OfferToken = Callable[[str, str], str]
"""The token for our offer of a call (callee id, call_id): see `offer_token.OfferSigner`."""


@dataclass
class Call:
    """Bookkeeping of one call, from first signal to summary."""

    call_id: str
    direction: str  # incoming | outgoing
    peer: str
    traceparent: str | None
    started_mono: float
    started_wall: float
    state: str = "new"  # new, ringing, offering, connecting, active, ended
    session: CallSession | None = None
    task: asyncio.Task[None] | None = None
    answered: asyncio.Future[p.Signal] | None = None  # outgoing: the answer or reject
    offer_sent: asyncio.Event = field(default_factory=asyncio.Event)  # outgoing; set at the end too
    accept: asyncio.Future[bool] | None = None  # incoming while ringing
    end_reason: str | None = None
    result: str | None = None
    setup_ms: float | None = None
    connected_mono: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    spans: CallTracer = field(default_factory=lambda: CallTracer(trace.NoOpTracer()))

    @property
    def trace_id(self) -> str | None:
        """The call's trace: its root span's, else the offer's traceparent's (untraced)."""
        return self.spans.trace_id or sig.trace_id_of(self.traceparent)


# Ends of a connected call that someone chose: `completed`, not `failed` (which would
# count against the failure-rate alert). Anything else that ends a live call failed.
# A caller that ends its own call so before any answer records it `missed`.
DELIBERATE_ENDS = frozenset(
    {
        "local_hangup",
        "remote_hangup",
        "agent_stopping",
        "max_duration",
        "button",
        "remote_command",
        "call_test",
    }
)


LOST = "agent_lost"
"""end_reason of a call the agent did not live to end (recovered at the next start)."""

AGENT_SIDE_FAILURES = frozenset({"audio_device", "error", "signaling_unavailable", LOST})
"""Failures of this end, where the far end's presence explains nothing."""

OFFERS_REMEMBERED = 256
"""Offers whose duplicates are ignored; a redelivery comes within seconds of the first."""


class CallManager:
    """Owns signaling and the active call."""

    def __init__(
        self,
        cfg: Config,
        link: BrokerLink,
        topics: Topics,
        publisher: Publisher,
        *,
        clock: Clock,
        on_health: Callable[[str | None, tuple[str, ...]], None],
        on_finished: Callable[[Call], None],
        on_fault: Callable[[str | None], None],
        check_offer: OfferCheck | None = None,
        offer_token: OfferToken | None = None,
        alerts: AlertRules | None = None,
        tracer: trace.Tracer | None = None,
        stun_down: Callable[[], bool] | None = None,
        aiortc_jitter_buffer: bool = False,
        ledger: OpenCallLedger | None = None,
    ) -> None:
        """`ledger`: where the open call's would-be summary is kept (`edgeagent.call.ledger`).
        `stun_down`: whether the agent's probes see the (first) STUN server down now
        (see `edgeagent.call.ice.stun_seen_down`); such calls gather without it.
        `aiortc_jitter_buffer`: see `CallSession` (benchmarks only)."""
        self.cfg = cfg
        self.link = link
        self.topics = topics
        self.publisher = publisher
        self.clock = clock
        self._on_health = on_health
        self._on_finished = on_finished
        self._on_fault = on_fault
        self._check_offer = check_offer
        self._offer_token = offer_token
        self.alerts = alerts
        self.tracer: trace.Tracer = tracer or trace.NoOpTracer()
        self._stun_down = stun_down
        self._aiortc_jitter_buffer = aiortc_jitter_buffer
        self._ledger = ledger
        self.peers = PeerPresence(
            link, topics.prefix, time_fn=clock.time, on_change=self._on_peer_status
        )
        self.active: Call | None = None
        self.history: list[Call] = []
        # Offers already handled, oldest first: a QoS 1 redelivery is not a new call.
        self._offers_seen: dict[tuple[str, str], str | None] = {}  # -> the reject it got
        self._tasks: set[asyncio.Task[None]] = set()
        link.subscribe(topics.signal, self._on_signal)

    # --- public API (button, commands) ----------------------------------------------------

    async def dial(
        self, peer: str | None = None, *, call_id: str | None = None, token: str | None = None
    ) -> Call:
        """Start an outgoing call; returns once the offer is sent (the call continues).

        `call_id` and `token` (an operator-minted offer token, which needs the call_id it was
        minted for) replace the fresh id and the token of our own call key.
        """
        peer = peer or self.cfg.call.default_peer
        if not peer or not sig.ENDPOINT_ID.match(peer):
            raise ValueError(f"no valid peer to dial: {peer!r}")
        if call_id is not None and not sig.CALL_ID.match(call_id):
            raise ValueError(f"bad call_id {call_id!r}: 1-64 of A-Z a-z 0-9 . _ -")
        if token is not None:
            if call_id is None:
                raise ValueError("a token needs the call_id it was minted for")
            mismatch = token_mismatch(token, peer, call_id)
            if mismatch is not None:
                raise ValueError(mismatch)
        if self.active is not None:
            raise RuntimeError(f"busy: call {self.active.call_id} is active")
        call_id = call_id or sig.new_call_id()
        if token is None and self._offer_token is not None:
            token = self._offer_token(peer, call_id)
        call = self._new_call(call_id, "outgoing", peer, None)
        call.spans.start_call(call.call_id, "outgoing", peer)
        # The offer carries the root span's context, so the far end continues this trace.
        call.traceparent = call.spans.traceparent() or sig.new_traceparent()
        call.answered = asyncio.get_running_loop().create_future()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        call.task = self._spawn(self._outgoing(call, ready, token))
        _forget_task_when_done(call)
        await asyncio.shield(ready)
        return call

    async def hangup(self, reason: str = "local_hangup") -> Call | None:
        """End the active call (or stop it ringing); returns it, or None if idle."""
        call = self.active
        if call is None:
            return None
        if call.accept is not None and not call.accept.done():
            call.accept.set_result(False)
            return call
        await self._finish(call, reason, send_hangup=True)
        return call

    def fail_active(self, detail: str) -> bool:
        """End the active call with reason `error` and `detail`; False if there is none."""
        call = self.active
        if call is None:
            return False
        if call.session is not None:
            call.session.fail("error", detail)
        else:
            self._spawn(self._finish(call, "error", detail=detail, send_hangup=True))
        return True

    def answer_ringing(self) -> bool:
        """Accept the ringing incoming call (the button); False if nothing rings."""
        call = self.active
        if call is not None and call.accept is not None and not call.accept.done():
            call.accept.set_result(True)
            return True
        return False

    def trace_id_for(self, call_id: str | None) -> str | None:
        """The trace id of the active or a recent call, for alerts and snapshots."""
        if call_id is None:
            return None
        if self.active is not None and self.active.call_id == call_id:
            return self.active.trace_id
        done = next((c for c in reversed(self.history) if c.call_id == call_id), None)
        return done.trace_id if done else None

    def note_alert(
        self, name: str, state: str, severity: str, value: float | None, call_id: str | None
    ) -> None:
        """A span event on the active call for an alert scoped to it (keeps its trace), or
        for a device alert during it (throttling, memory, disk): the call's summary lists
        the device alerts that fired while it ran."""
        call = self.active
        if call is None or call_id not in (None, call.call_id):
            return
        if call_id is None and state == "firing":
            call.extra.setdefault("device_alerts", set()).add(name)
        attrs: dict[str, AttributeValue] = {"alert.name": name, "alert.severity": severity}
        if value is not None:
            attrs["alert.value"] = value
        call.spans.event(f"alert.{state}", attrs)

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            if self.active is not None:
                await self._finish(self.active, "agent_stopping", send_hangup=True)
            for task in list(self._tasks):
                task.cancel()

    # --- inbound --------------------------------------------------------------------------

    def _on_signal(self, inbound: Inbound) -> None:
        try:
            msg = sig.decode_signal(inbound.payload, me=self.cfg.device.id)
        except sig.SignalError as exc:
            self.publisher.event(
                "warning",
                "call.signaling",
                f"rejected signaling message: {exc}",
                data={"sender": exc.sender},
                call_id=exc.call_id,
            )
            if exc.sender and exc.call_id:
                self._send("reject", exc.sender, exc.call_id, reason="error")
            return
        if msg.type == "offer" and msg.traceparent is None:
            carried = sig.traceparent_from_properties(inbound.user_properties)
            if carried is not None:  # MQTT 5 user property of a sender without the field
                msg = msgspec.structs.replace(msg, traceparent=carried)
        handler = {
            "offer": self._on_offer,
            "answer": self._on_answer,
            "reject": self._on_answer,
            "hangup": self._on_hangup,
        }[msg.type]
        handler(msg)

    def _on_offer(self, msg: p.Signal) -> None:
        key = (msg.from_, msg.call_id)
        if key in self._offers_seen:
            # A duplicate (QoS 1 redelivery): answered or refused already, and recorded
            # once; a refusal is repeated (the same reject), in case the first was lost.
            logger.debug("signaling: offer %s from %s again: ignored", msg.call_id, msg.from_)
            sent = self._offers_seen[key]
            if sent is not None:
                self._send("reject", msg.from_, msg.call_id, reason=sent)
            return
        self._offers_seen[key] = None
        if len(self._offers_seen) > OFFERS_REMEMBERED:
            del self._offers_seen[next(iter(self._offers_seen))]
        active = self.active
        if not sig.caller_allowed(msg.from_, self.cfg.call.allow):
            self._refuse(msg, "forbidden", f"caller {msg.from_} is not allowed")
            return
        if self._check_offer is not None:
            try:
                self._check_offer(msg)
            except sig.SignalError as exc:
                self._refuse(msg, "forbidden", f"offer token refused: {exc}")
                return
        problem = sig.sdp_problem(msg.sdp)
        if problem is not None:  # refused before answering: the caller is told why
            self._refuse(msg, "error", f"unusable offer: {problem}")
            return
        if active is not None:
            if (
                active.direction == "outgoing"
                and active.state == "offering"
                and active.peer == msg.from_
            ):
                self._glare(active, msg)
                return
            self._refuse(msg, "busy", f"busy with call {active.call_id}")
            return
        self._start_incoming(msg)

    def _start_incoming(self, msg: p.Signal) -> None:
        call = self._new_call(msg.call_id, "incoming", msg.from_, msg.traceparent)
        call.spans.start_call(call.call_id, "incoming", call.peer, msg.traceparent)
        call.task = self._spawn(self._incoming(call, msg))
        _forget_task_when_done(call)

    def _glare(self, ours: Call, theirs: p.Signal) -> None:
        """We and the peer offered to each other at once: the lower call_id goes on.

        Neither end failed: the call that gives way ends `rejected` with reason
        `glare` on both ends, so it does not count against the failure-rate alert.
        """
        keep = sig.glare_winner(ours.call_id, theirs.call_id) == ours.call_id
        kept, given_up = (ours.call_id, theirs.call_id) if keep else (theirs.call_id, ours.call_id)
        self.publisher.event(
            "info",
            "call.signaling",
            f"glare with {theirs.from_}: {kept} goes on, {given_up} gives way",
            data={"kept": kept, "yielded": given_up, "ours_kept": keep},
            call_id=given_up,
        )
        if keep:
            self._spawn(self._refuse_glare(ours, theirs))
        else:
            self._spawn(self._yield_to(ours, theirs))

    async def _refuse_glare(self, ours: Call, theirs: p.Signal) -> None:
        # The reject goes out after our offer (one publisher, one topic: in order), so
        # the peer yields to our offer first and then ignores the reject of a call it
        # already ended, instead of reading it as `busy`.
        await ours.offer_sent.wait()
        self._refuse(theirs, "busy", f"glare: our call {ours.call_id} goes on", end_reason="glare")

    async def _yield_to(self, ours: Call, theirs: p.Signal) -> None:
        # No hangup: the peer applies the same rule and refuses our offer by itself.
        await self._finish(ours, "glare", result="rejected")
        if self.active is None:
            self._start_incoming(theirs)

    def _on_answer(self, msg: p.Signal) -> None:
        call = self.active
        if call is None or call.call_id != msg.call_id or call.answered is None:
            logger.debug("signaling: %s for unknown call %s", msg.type, msg.call_id)
            return
        if call.peer != msg.from_:
            self.publisher.event(
                "warning",
                "call.signaling",
                f"{msg.type} for call {msg.call_id} from {msg.from_}, expected {call.peer}",
                call_id=msg.call_id,
            )
            return
        if not call.answered.done():
            call.answered.set_result(msg)

    def _on_hangup(self, msg: p.Signal) -> None:
        call = self.active
        if call is None or call.call_id != msg.call_id or call.peer != msg.from_:
            # Both ends hang up at once often enough: said, at DEBUG, not reported.
            logger.debug("signaling: hangup of %s from %s: not our call", msg.call_id, msg.from_)
            return
        if call.accept is not None and not call.accept.done():
            call.extra["remote_cancel"] = True
            call.accept.set_result(False)
            return
        self._spawn(self._finish(call, "remote_hangup", detail=msg.reason))

    def _rejected(self, caller: str, call_id: str, reason: str) -> None:
        """Remember the reject an offer got, for its redeliveries."""
        if (caller, call_id) in self._offers_seen:
            self._offers_seen[(caller, call_id)] = reason

    def _refuse(
        self, msg: p.Signal, reason: str, why: str, *, end_reason: str | None = None
    ) -> None:
        """Reject an offer with `reason` and record it (summary end_reason: `end_reason`
        if given, else the reason)."""
        self._send("reject", msg.from_, msg.call_id, reason=reason)
        # A refused call still gets its record (and its trace), so failure rates see it.
        call = Call(
            msg.call_id,
            "incoming",
            msg.from_,
            msg.traceparent,
            self.clock.monotonic(),
            self.clock.time(),
            spans=CallTracer(self.tracer),
        )
        call.spans.start_call(call.call_id, "incoming", call.peer, msg.traceparent)
        self._rejected(msg.from_, msg.call_id, reason)
        self.publisher.event(
            "warning" if reason == "forbidden" else "info",
            "call.incoming",
            f"call {msg.call_id} from {msg.from_} rejected ({reason}): {why}",
            data={"peer": msg.from_, "reason": reason},
            call_id=msg.call_id,
            trace_id=call.trace_id,
        )
        call.result, call.end_reason = "rejected", end_reason or reason
        self._summary(call, opened=False)
        call.spans.end_call("rejected", end_reason=call.end_reason)

    def close(self) -> None:
        """The agent stops: what the open-call record still has pending is written."""
        if self._ledger is not None:
            self._ledger.close()
        self.peers.close()

    def recover_open_call(self, crash: tuple[str, str] | None = None) -> p.Summary | None:
        """Spool the summary of a call the previous run did not live to end.

        `crash`: (crash_id, kind) of the report this start wrote about the previous run,
        if any; the summary and its `call.closed` event name it. Returns the summary.
        """
        if self._ledger is None or (doc := self._ledger.take()) is None:
            return None
        try:
            kept = msgspec.json.decode(doc, type=p.Summary)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("calls: the previous run's open call record is unusable: %s", exc)
            self.publisher.event(
                "warning",
                "call.closed",
                f"the previous run left an unusable open call record: {exc}",
                data={"result": "failed", "end_reason": LOST, "recovered": True},
            )
            return None
        crash_id, kind = crash if crash is not None else (None, None)
        summary = msgspec.structs.replace(
            kept,
            ts=self.publisher.ts(),
            device=self.cfg.device.id,
            result="failed",
            end_reason=LOST,
            crash_id=crash_id,
        )
        last_alive = kept.ts
        detail = (
            f"the agent stopped before the call ended ({kind}, crash report {crash_id})"
            if crash_id
            else "the agent stopped before the call ended (no crash report about it)"
        ) + (
            "; it had not connected"
            if summary.setup_ms is None
            else f"; last recorded {summary.duration_s:.0f} s after it connected"
        )
        self.publisher.event(
            "warning",
            "call.closed",
            f"call {summary.call_id}: call ended: failed ({LOST}: {detail})",
            data={
                "result": "failed",
                "end_reason": LOST,
                "detail": detail,
                "recovered": True,
                "crash_id": crash_id,
                "last_recorded_ts": last_alive,
            },
            call_id=summary.call_id,
            trace_id=summary.trace_id,
        )
        logger.warning("call %s: %s", summary.call_id, detail)
        call = Call(
            summary.call_id,
            summary.direction,
            summary.peer,
            None,
            self.clock.monotonic(),
            summary.started_ts or last_alive,
            result="failed",
            end_reason=LOST,
            state="ended",
        )
        self.history.append(call)
        self._on_finished(call)
        self.publisher.spool(
            self.topics.summary(summary.call_id),
            lambda seq: msgspec.structs.replace(summary, seq=seq),
        )
        return summary

    # --- call flows -----------------------------------------------------------------------

    async def _incoming(self, call: Call, offer: p.Signal) -> None:
        self._event(call, "info", "call.incoming", f"incoming call from {call.peer}")
        policy = self.cfg.call.answer
        if policy == "reject":
            self._send("reject", call.peer, call.call_id, reason="unavailable")
            self._rejected(call.peer, call.call_id, "unavailable")
            await self._finish(call, "policy_reject", result="rejected")
            return
        if policy == "ring":
            call.spans.begin_phase("ringing")
            call.state = "ringing"
            call.accept = asyncio.get_running_loop().create_future()
            self._on_health("ringing", (f"call from {call.peer}",))
            self._event(call, "info", "call.ringing", "ringing")
            try:
                async with asyncio.timeout(self.cfg.call.ring_timeout_s):
                    accepted = await call.accept
            except TimeoutError:
                accepted = False
                call.extra["ring_timeout"] = True
            call.spans.end_phase("ringing")
            if not accepted:
                if call.extra.get("remote_cancel"):
                    await self._finish(call, "remote_cancel", result="missed")
                    return
                self._send("reject", call.peer, call.call_id, reason="unavailable")
                self._rejected(call.peer, call.call_id, "unavailable")
                reason = "ring_timeout" if call.extra.get("ring_timeout") else "declined"
                await self._finish(
                    call, reason, result="missed" if reason == "ring_timeout" else "rejected"
                )
                return
        if call.state == "ended":  # stopped (or hung up) while it rang
            return
        self._event(call, "info", "call.answered", "answering")
        call.state = "connecting"
        self._on_health("connecting", ())
        try:
            call.spans.begin_phase("signaling.answer")
            session = await self._open_session(call)
            assert offer.sdp is not None
            answer_sdp = await session.answer(offer.sdp)
            self._send("answer", call.peer, call.call_id, sdp=answer_sdp)
            call.spans.end_phase("signaling.answer")
            await self._connect_and_run(call, session)
        except CallEnded as ended:
            await self._finish(call, ended.reason, detail=ended.detail, send_hangup=True)
        except Exception as exc:  # the per-call boundary: a bug ends this call, not the agent
            logger.exception("call %s: failed", call.call_id)
            await self._finish(
                call, "error", detail=f"{type(exc).__name__}: {exc}", send_hangup=True
            )

    async def _outgoing(self, call: Call, ready: asyncio.Future[None], token: str | None) -> None:
        call.state = "offering"
        self._on_health("connecting", (f"calling {call.peer}",))
        self._event(call, "info", "call.outgoing", f"calling {call.peer}")
        try:
            try:
                call.spans.begin_phase("signaling.offer")
                session = await self._open_session(call)
                offer_sdp = await session.create_offer()
                await self._send_offer(call, offer_sdp, token)
                call.offer_sent.set()
                call.spans.end_phase("signaling.offer")
            finally:
                if not ready.done():
                    ready.set_result(None)
            assert call.answered is not None
            call.spans.begin_phase("signaling.answer_wait")
            try:
                async with asyncio.timeout(self.cfg.call.answer_timeout_s):
                    reply = await call.answered
            except TimeoutError:
                call.spans.end_phase("signaling.answer_wait", error="answer_timeout")
                raise CallEnded("answer_timeout", f"no answer from {call.peer}") from None
            wait = call.spans.phase_span("signaling.answer_wait")
            if wait is not None:
                wait.set_attribute("signal.reply", reply.type)
            call.spans.end_phase("signaling.answer_wait")
            if reply.type == "reject":
                self._event(call, "info", "call.rejected", f"{call.peer} rejected: {reply.reason}")
                await self._finish(call, f"rejected_{reply.reason or 'unknown'}", result="rejected")
                return
            assert reply.sdp is not None
            if call.state == "ended":  # hung up while the answer came in
                return
            call.state = "connecting"
            await session.accept_answer(reply.sdp)
            await self._connect_and_run(call, session)
        except CallEnded as ended:
            await self._finish(call, ended.reason, detail=ended.detail, send_hangup=True)
        except Exception as exc:  # the per-call boundary
            logger.exception("call %s: failed", call.call_id)
            await self._finish(
                call, "error", detail=f"{type(exc).__name__}: {exc}", send_hangup=True
            )

    async def _open_session(self, call: Call) -> CallSession:
        session = CallSession(
            self.cfg,
            call.call_id,
            clock=self.clock,
            on_quality=lambda s: self._quality(call, s),
            on_issue=lambda c: self._issue(call, c),
            on_health=lambda st, why: self._on_health(st, why) if call.state == "active" else None,
            on_media_stalled=lambda s: self._event(
                call,
                "warning",
                "call.media_stalled",
                f"media stalled: no inbound audio for {s:.1f} s",
                data={"silent_s": round(s, 1)},
            ),
            spans=call.spans,
            stun_down=self._stun_down,
            aiortc_jitter_buffer=self._aiortc_jitter_buffer,
        )
        call.session = session
        try:
            await session.open_devices()
        except CallEnded:
            self._on_fault("audio capture device unavailable")
            raise
        return session

    async def _connect_and_run(self, call: Call, session: CallSession) -> None:
        await session.wait_connected(self.cfg.call.connect_timeout_s)
        if call.state == "ended":  # ended (hangup, stop) while connecting: it stays ended
            return
        call.connected_mono = self.clock.monotonic()
        call.setup_ms = round((call.connected_mono - call.started_mono) * 1000, 1)
        call.state = "active"
        # Begun in this order so in-call events land on call.active (the newest phase).
        call.spans.begin_phase("media.first_packet")
        call.spans.begin_phase(
            "call.active", {"call.codec": call.session.codec if call.session else "opus"}
        )
        self._on_health("good", ())
        local, remote = session.ice_types()
        call.extra["ice"] = (local, remote)
        logger.info(
            "call %s: connected to %s in %.0f ms (ICE %s/%s)",
            call.call_id,
            call.peer,
            call.setup_ms,
            local,
            remote,
        )
        self._event(
            call,
            "info",
            "call.established",
            f"connected in {call.setup_ms:.0f} ms",
            data={"setup_ms": call.setup_ms, "ice_local": local, "ice_remote": remote},
        )
        self._note_open(call, durable=True)
        media = asyncio.ensure_future(self._announce_media(call, session))
        try:
            await session.run()
        finally:
            media.cancel()

    async def _announce_media(self, call: Call, session: CallSession) -> None:
        while session.sink is None or session.sink.frames_received == 0:
            await self.clock.sleep(0.02)
        call.spans.end_phase("media.first_packet")
        self._event(call, "info", "call.media_started", "first inbound audio")

    # --- ending ---------------------------------------------------------------------------

    async def _finish(
        self,
        call: Call,
        reason: str,
        *,
        detail: str | None = None,
        result: str | None = None,
        send_hangup: bool = False,
    ) -> None:
        if call.state == "ended":
            return
        prior = call.state
        call.state = "ended"
        call.offer_sent.set()  # a glare refusal waiting on it goes out now
        call.end_reason = reason
        if result is None:
            result = _result_of(call, prior, reason)
        call.result = result
        spans = call.spans
        if spans.active:
            spans.end_phase("call.active")
            spans.begin_phase("teardown", {"call.end_reason": reason})
        if send_hangup and prior not in ("new",) and result != "rejected":
            # Sent before the transport closes, so the far end learns why first.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._publish(
                        self._signal("hangup", call.peer, call.call_id, reason=reason),
                        None,
                    )
        if call.session is not None:
            try:
                await call.session.close()
            except Exception:  # the call's record and `active` must still clear
                logger.exception("call %s: closing the session failed", call.call_id)
        spans.end_phase("teardown")
        if reason == "audio_device":
            self._on_fault("audio device failed during a call")
        if self.active is call:
            self.active = None
        self._on_health(None, ())
        data: dict[str, Any] = {"result": result, "end_reason": reason, "detail": detail}
        if result == "failed" and reason not in AGENT_SIDE_FAILURES:
            # Unanswered, never connected, media gone: what the broker says of the far
            # end tells "it is down" from "the path between us is".
            try:
                presence = self.peers.describe(call.peer)
                status = self.peers.status(call.peer)
            except Exception:  # context only: it must never cost the call its record
                logger.exception("call %s: the far end's presence", call.call_id)
            else:
                detail = f"{detail}; {presence}" if detail else presence
                data["detail"] = detail
                data["peer_status"] = status.to_dict() if status else None
        level: p.Level = "info" if result == "completed" else "warning"
        self._event(
            call,
            level,
            "call.closed",
            f"call ended: {result} ({reason}{': ' + detail if detail else ''})",
            data=data,
        )
        logger.info("call %s: ended %s (%s)", call.call_id, result, reason)
        summary = self._summary(call)
        spans.end_call(result, _root_attributes(summary, detail), end_reason=reason)
        # History keeps the bookkeeping, not the media: a closed session still holds
        # the peer connection, playout, AEC and echo buffers (megabytes per call).
        call.session = None
        call.answered = call.accept = None
        task = call.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    def _summary(self, call: Call, *, opened: bool = True) -> p.Summary:
        """Spool the call's summary; `opened`: it had an open-call record to remove (a
        refused offer has none, and may reuse the active call's call_id)."""
        self.history.append(call)
        del self.history[:-50]
        self._on_finished(call)
        summary = self._build_summary(call)
        self.publisher.spool(
            self.topics.summary(call.call_id),
            lambda seq: msgspec.structs.replace(summary, seq=seq),
        )
        if self._ledger is not None and opened:
            self._ledger.clear(call.call_id)
        return summary

    def _build_summary(self, call: Call) -> p.Summary:
        """The call's summary as of now (an open call: `failed`/`agent_lost`)."""
        session = call.session
        samples = session.record.samples if session else []
        moses = [s.mos for s in samples if s.mos is not None]
        loss = [s.window.loss_pct for s in samples if s.window.loss_pct is not None]
        jit = [s.window.jitter_ms for s in samples if s.window.jitter_ms is not None]
        rtt = [s.window.rtt_ms for s in samples if s.window.rtt_ms is not None]
        local, remote = call.extra.get("ice", (None, None))
        duration = self.clock.monotonic() - call.connected_mono if call.connected_mono else 0.0
        playout = None
        if session is not None:
            st = session.playout.stats()
            plc, fec = session.decoder_concealment()
            playout = {
                "concealed_frames": st.concealed_frames + plc + fec,
                "plc_frames": plc,
                "fec_frames": fec,
                "underruns": st.underruns,
                "overruns": st.overruns,
                "max_depth_ms": round(st.max_depth_ms, 1),
                "late_frames": st.late_frames,
                "decode_errors": session.decode_errors(),
                "late_packets": session.late_packets(),
            }
        return p.Summary(
            v=1,
            device=self.cfg.device.id,
            ts=self.publisher.ts(),
            seq=0,
            call_id=call.call_id,
            trace_id=call.trace_id,
            direction=call.direction,  # type: ignore[arg-type]
            peer=call.peer,
            result=call.result or "failed",  # type: ignore[arg-type]
            end_reason=call.end_reason or LOST,
            setup_ms=call.setup_ms,
            duration_s=round(duration, 2),
            codec=session.codec if session else None,
            mos_avg=round(fmean(moses), 2) if moses else None,
            mos_min=round(min(moses), 2) if moses else None,
            loss_pct=round(fmean(loss), 2) if loss else None,
            jitter_ms_avg=round(fmean(jit), 1) if jit else None,
            rtt_ms_avg=round(fmean(rtt), 1) if rtt else None,
            audio_issues=dict(session.record.audio_issues) if session else {},
            ice=p.IcePair(local_type=local, remote_type=remote),
            started_ts=round(call.started_wall, 3),
            playout=playout,
            opus=p.OpusSummary(**session.opus_summary()) if session else None,
            device_alerts=sorted(call.extra.get("device_alerts", ())) or None,
            no_media_s=round(session.no_media_s, 1) if session else None,
        )

    def _note_open(self, call: Call, *, durable: bool) -> None:
        """Keep the open call's would-be summary on disk (see `edgeagent.call.ledger`)."""
        if self._ledger is not None and call.state != "ended":
            doc = msgspec.json.encode(self._build_summary(call))
            self._ledger.write(call.call_id, doc, durable=durable)

    # --- reporting ------------------------------------------------------------------------

    def _on_peer_status(self, peer: str, status: PeerStatus) -> None:
        """The far end of the active call changed presence (or is found down as we call)."""
        call = self.active
        if call is None or call.peer != peer or call.state == "ended":
            return
        if status.state == "online" and status.seen_ts is None:
            return  # present, as expected: nothing to say
        self._event(
            call,
            "info" if status.state == "online" else "warning",
            "call.peer",
            self.peers.describe(peer),
            data={"peer": peer, **status.to_dict()},
        )

    def _quality(self, call: Call, s: QualitySample) -> None:
        self._note_open(call, durable=False)
        w = s.window
        if self.alerts is not None:
            self.alerts.observe_many(
                {
                    "mos": s.mos,
                    "loss_pct": w.loss_pct,
                    "jitter_ms": w.jitter_ms,
                    "rtt_ms": w.rtt_ms,
                },
                call_id=call.call_id,
            )
        self.publisher.volatile(
            self.topics.quality(call.call_id),
            p.Quality(
                v=1,
                device=self.cfg.device.id,
                ts=self.publisher.ts(),
                call_id=call.call_id,
                mos=_r(s.mos, 2),
                r_factor=_r(s.r_factor, 1),
                loss_pct=_r(w.loss_pct, 2),
                jitter_ms=_r(w.jitter_ms, 1),
                rtt_ms=_r(w.rtt_ms, 1),
                codec=call.session.codec if call.session else "opus",
                bitrate_kbps=_r(w.tx_bitrate_kbps, 1),
                playout_delay_ms=round(s.playout_delay_ms, 1),
                audio=p.AudioQuality(**s.audio),
                direction=call.direction,
                remote_loss_pct=_r(w.remote_loss_pct, 2),
                remote_mos=_r(s.remote_mos, 2),
                trace_id=call.trace_id,
            ),
        )

    def _issue(self, call: Call, change: AudioIssueChanged) -> None:
        if self.alerts is not None and change.stream in ("capture", "capture_raw"):
            active: set[str] = call.extra.setdefault("issues", set())
            (active.add if change.active else active.discard)(change.name)
            self.alerts.observe(
                "no_audio", flag(bool({"no_audio", "dead_input"} & active)), call_id=call.call_id
            )
            if change.name not in ("no_audio", "dead_input"):
                self.alerts.observe(change.name, flag(change.active), call_id=call.call_id)
        state = "detected" if change.active else "cleared"
        call.spans.event(
            f"audio.{change.name}.{state}",
            {"audio.stream": change.stream, "audio.value": float(change.value or 0.0)},
        )
        self._event(
            call,
            "warning" if change.active else "info",
            f"audio.{change.name}",
            f"{change.stream}: {change.name} {state}",
            data={"stream": change.stream, "active": change.active, "value": change.value},
        )

    def _event(
        self,
        call: Call,
        level: p.Level,
        category: str,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.publisher.event(
            level,
            category,
            f"call {call.call_id}: {message}",
            data=data,
            call_id=call.call_id,
            trace_id=call.trace_id,
        )

    def _new_call(self, call_id: str, direction: str, peer: str, traceparent: str | None) -> Call:
        call = Call(
            call_id,
            direction,
            peer,
            traceparent,
            self.clock.monotonic(),
            self.clock.time(),
            spans=CallTracer(self.tracer),
        )
        if self.alerts is not None:  # device alerts already firing when the call begins
            firing = {c.name for c in self.alerts.firing() if c.call_id is None}
            if firing:
                call.extra["device_alerts"] = firing
        self.active = call
        self._note_open(call, durable=True)
        self.peers.watch(peer)
        return call

    def _signal(self, kind: str, to: str, call_id: str, **fields: Any) -> sig.Outbound:
        return sig.build(
            kind,
            prefix=self.topics.prefix,
            me=self.cfg.device.id,
            to=to,
            call_id=call_id,
            ts=self.publisher.ts(),
            **fields,
        )

    def _send(self, kind: str, to: str, call_id: str, **fields: Any) -> None:
        out = self._signal(kind, to, call_id, **fields)
        self._spawn(self._publish(out, fields.get("traceparent")))

    async def _send_offer(self, call: Call, sdp: str, token: str | None) -> None:
        """Publish the offer and wait for the broker to take it: an offer that never left
        ends the call `signaling_unavailable`, not `answer_timeout` (which would blame
        the far end)."""
        out = self._signal(
            "offer", call.peer, call.call_id, sdp=sdp, traceparent=call.traceparent, token=token
        )
        props = [("traceparent", call.traceparent)] if call.traceparent else None
        try:
            await self.link.publish(out.topic, out.payload, qos=1, user_properties=props)
        except BrokerUnavailable as exc:
            raise CallEnded("signaling_unavailable", f"offer not sent: {exc}") from None

    async def _publish(self, out: sig.Outbound, traceparent: str | None) -> None:
        props = [("traceparent", traceparent)] if traceparent else None
        try:
            await self.link.publish(out.topic, out.payload, qos=1, user_properties=props)
        except BrokerUnavailable as exc:
            logger.warning("signaling: could not send to %s: %s", out.topic, exc)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("calls: task failed", exc_info=task.exception())


def _result_of(call: Call, prior: str, reason: str) -> str:
    """The summary's result for a call that ended by `reason` in state `prior`."""
    if reason not in DELIBERATE_ENDS:
        return "failed"
    if call.connected_mono is not None:
        return "completed"
    # This caller gave up before any answer (hung up while it rang, or stopped): the
    # call was not answered, which is no failure of the call path.
    if call.direction == "outgoing" and prior == "offering" and reason != "remote_hangup":
        return "missed"
    return "failed"


def _forget_task_when_done(call: Call) -> None:
    """Drop the finished task from the call (and so from `history`).

    A cancelled task keeps its CancelledError, whose traceback holds the frames
    of the call flow and through them the whole CallSession: without this,
    every call in `history` kept its media alive (~1.5 MiB a call in the soak).
    """
    task = call.task
    if task is not None:
        task.add_done_callback(lambda _t: setattr(call, "task", None))


def _root_attributes(summary: p.Summary, detail: str | None) -> dict[str, AttributeValue]:
    """The root span's call attributes: the summary's codec, setup, duration and MOS."""
    values: dict[str, AttributeValue | None] = {
        "call.codec": summary.codec,
        "call.setup_ms": summary.setup_ms,
        "call.duration_s": summary.duration_s,
        "call.mos_avg": summary.mos_avg,
        "call.mos_min": summary.mos_min,
        "call.loss_pct": summary.loss_pct,
        "call.jitter_ms_avg": summary.jitter_ms_avg,
        "call.rtt_ms_avg": summary.rtt_ms_avg,
        "call.ice.local_type": summary.ice.local_type,
        "call.ice.remote_type": summary.ice.remote_type,
        "call.end_detail": detail,
    }
    return {k: v for k, v in values.items() if v is not None}


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
