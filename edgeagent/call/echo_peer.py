"""The echo peer: an endpoint that answers every call and sends back what it hears.

Used by operators (`edgeagent echo-peer`), tests, benches and the `call_test`
command. It speaks the same signaling as a device and uses the same receive
path and Opus settings, so what comes back went through a real call both ways:
lost packets are concealed with libopus PLC and recovered from the caller's FEC,
its SDP says it decodes FEC (`a=tool:edgeagent/... opus-fec`, with libopus0), and
it sends FEC back under the loss the caller reports, as an agent does. With
`security.signaling = "signed"` it answers only offers whose token a key in its
`keys_file` signed (docs/signaling.md), and with `call.allow` only those callers, as a
device does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

from edgeagent import __version__
from edgeagent.call import libopus
from edgeagent.call import signaling as sig
from edgeagent.call.ice import ice_configuration, ignored_servers, restrict_host_addresses
from edgeagent.call.offer_token import offer_check
from edgeagent.call.opus import (
    LossHint,
    far_end_decodes_fec,
    far_end_uses_fec,
    install_opus_encoder,
    mark_sdp,
    munge_sdp,
    opus_encoders,
)
from edgeagent.call.session import opus_settings
from edgeagent.call.tracks import install_receive_path
from edgeagent.config import Config
from edgeagent.control.keys import TrustedKey, load_keys_file
from edgeagent.control.replay import ReplayCache
from edgeagent.control.tokens import Verifier
from edgeagent.events import EventBus
from edgeagent.mqtt import BrokerLink, BrokerUnavailable, Inbound, SessionCounter
from edgeagent.quality.stats import NetworkStats, normalise, window
from edgeagent.telemetry import payloads as p
from edgeagent.telemetry.topics import Topics

logger = logging.getLogger(__name__)

MAX_CALLS = 8
LOSS_HINT_INTERVAL_S = 1.0  # how often the loss the caller reports steers our FEC


class EchoPeer:
    """Answers offers on its own signal topic and loops the caller's audio back."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.prefix, cfg.device.id)
        cfg.storage.state_dir.mkdir(parents=True, exist_ok=True)
        self.link = BrokerLink(
            cfg.mqtt,
            cfg.device.id,
            sessions=SessionCounter(cfg.storage.state_dir / "echo-session"),
            will=lambda s: (self.topics.status, self._status("lost", s)),
            on_connected=self._on_connected,
            bus=EventBus(),
            rng=random.Random(),  # noqa: S311 - backoff jitter
        )
        self.link.subscribe(self.topics.signal, self._on_signal)
        self.calls: dict[str, RTCPeerConnection] = {}
        self._callers: dict[str, str] = {}  # call_id -> caller, to hang up on a clean stop
        self.answered = 0
        self.refused = 0
        self._replay: ReplayCache | None = None
        self._check_offer = self._offer_check()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._stop_reason = "stopped"

    def _offer_check(self) -> Callable[[p.Signal], None] | None:
        """With signed signaling, offers need a token from a key in keys_file, as on a device."""
        sec = self.cfg.security
        if sec.signaling != "signed":
            return None
        keys: dict[str, TrustedKey] = {}
        if sec.keys_file is not None:
            keys = load_keys_file(sec.keys_file)
        else:
            logger.warning("echo peer: signed signaling, but no keys_file; refusing every offer")
        self._replay = ReplayCache(self.cfg.storage.state_dir / "echo-replay.sqlite3", time.time)
        verifier = Verifier(
            self.cfg.device.id,
            keys,
            max_lifetime_s=sec.max_token_lifetime_s,
            replay=self._replay,
            clock=time.time,
        )
        return offer_check(verifier, self.cfg.device.id)

    def _status(self, state: str, session: int, reason: str | None = None) -> bytes:
        return p.encode(
            p.Status(
                v=1,
                device=self.cfg.device.id,
                ts=round(time.time(), 3),
                state=state,  # type: ignore[arg-type]
                session=session,
                boot_id="echo-peer",
                version="echo-peer",
                reason=reason,
            )
        )

    async def _on_connected(self, session: int) -> None:
        await self.link.publish(
            self.topics.status, self._status("online", session), qos=1, retain=True
        )

    def request_stop(self, reason: str = "stopped") -> None:
        """Stop cleanly: calls closed, then a retained `offline` with `reason` (protocol 1)."""
        self._stop_reason = reason
        self._stop.set()

    async def run(self) -> None:
        """Until `request_stop` (clean: `offline` published) or cancelled (the Will stays)."""
        for line in ignored_servers(self.cfg.ice.stun_urls, self.cfg.ice.turn_urls):
            logger.warning("echo peer: ice: %s", line)
        link = asyncio.ensure_future(self.link.run())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([link, stop], return_when=asyncio.FIRST_COMPLETED)
            if link.done():
                link.result()  # the link gave up: its error, as before
                return
            # Hang up first, so callers hear why (not a dead transport), then close.
            for call_id, pc in list(self.calls.items()):
                caller = self._callers.get(call_id)
                if caller is not None:
                    out = self._signal("hangup", caller, call_id, reason="echo_peer_stopping")
                    with contextlib.suppress(BrokerUnavailable, TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self.link.publish(out.topic, out.payload, qos=1)
                await pc.close()
            offline = self._status("offline", self.link.session, self._stop_reason)
            final = (self.topics.status, offline)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):
                    await self.link.close(final)
        finally:
            stop.cancel()
            link.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link
            for pc in list(self.calls.values()):
                await pc.close()
            if self._replay is not None:
                self._replay.close()

    def _on_signal(self, inbound: Inbound) -> None:
        try:
            msg = sig.decode_signal(inbound.payload, me=self.cfg.device.id)
        except sig.SignalError as exc:
            logger.warning("echo peer: %s", exc)
            if exc.sender and exc.call_id:
                self._send("reject", exc.sender, exc.call_id, reason="error")
            return
        if msg.type == "offer":
            if msg.call_id in self.calls:
                return
            if not sig.caller_allowed(msg.from_, self.cfg.call.allow):
                self.refused += 1
                logger.warning(
                    "echo peer: call %s from %s rejected (forbidden): not in call.allow",
                    msg.call_id,
                    msg.from_,
                )
                self._send("reject", msg.from_, msg.call_id, reason="forbidden")
                return
            if self._check_offer is not None:
                try:
                    self._check_offer(msg)
                except sig.SignalError as exc:
                    self.refused += 1
                    logger.warning(
                        "echo peer: call %s from %s rejected (forbidden): offer token refused: %s",
                        msg.call_id,
                        msg.from_,
                        exc,
                    )
                    self._send("reject", msg.from_, msg.call_id, reason="forbidden")
                    return
            if len(self.calls) >= MAX_CALLS:
                self._send("reject", msg.from_, msg.call_id, reason="busy")
                return
            self._spawn(self._answer(msg))
        elif msg.type == "hangup":
            pc = self.calls.pop(msg.call_id, None)
            self._callers.pop(msg.call_id, None)
            if pc is not None:
                self._spawn(pc.close())

    async def _answer(self, offer: p.Signal) -> None:
        ice = self.cfg.ice
        pc = RTCPeerConnection(
            ice_configuration(
                stun_urls=ice.stun_urls,
                turn_urls=ice.turn_urls,
                username=ice.turn_username,
                credential=ice.turn_password.get_secret_value() if ice.turn_password else None,
                relay_only=ice.relay_only,
            )
        )
        self.calls[offer.call_id] = pc
        self._callers[offer.call_id] = offer.from_
        opus = opus_settings(self.cfg)
        tracks: list[MediaStreamTrack] = []
        pc.on("track", tracks.append)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and self.calls.get(offer.call_id) is pc:
                del self.calls[offer.call_id]
                self._callers.pop(offer.call_id, None)
                await pc.close()

        try:
            assert offer.sdp is not None
            await pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
            for track in tracks:
                if track.kind == "audio":
                    pc.addTrack(track)  # the echo: the caller's own audio goes back
            # Mono Opus with PLC (and FEC from a caller that sends it), as frames for
            # the encoder that sends them back.
            install_receive_path(
                pc, mono_opus=True, opus_fec=far_end_uses_fec(offer.sdp), as_frames=True
            )
            install_opus_encoder(pc, opus)
            fec_to_caller = opus.fec and far_end_decodes_fec(offer.sdp)
            for encoder in opus_encoders(pc):
                encoder.set_fec(fec_to_caller)
            answer = await pc.createAnswer()
            restrict_host_addresses(
                pc, ice.host_addresses or None, gather_timeout_s=ice.gather_timeout_s
            )
            await pc.setLocalDescription(
                RTCSessionDescription(munge_sdp(answer.sdp, opus), "answer")
            )
        except Exception as exc:  # noqa: BLE001 - the per-call boundary: a bad offer ends this call only
            logger.warning("echo peer: call %s failed: %s", offer.call_id, exc)
            self.calls.pop(offer.call_id, None)
            self._callers.pop(offer.call_id, None)
            await pc.close()
            self._send("reject", offer.from_, offer.call_id, reason="error")
            return
        self.answered += 1
        sdp = mark_sdp(pc.localDescription.sdp, __version__, decodes_fec=libopus.load() is not None)
        self._send("answer", offer.from_, offer.call_id, sdp=sdp)
        if fec_to_caller:
            self._spawn(self._follow_loss(offer.call_id, pc, LossHint()))

    async def _follow_loss(self, call_id: str, pc: RTCPeerConnection, hint: LossHint) -> None:
        """Set the encoder's loss hint from the loss the caller reports, while the call lasts."""
        prev: NetworkStats | None = None
        loop = asyncio.get_running_loop()
        while self.calls.get(call_id) is pc:
            await asyncio.sleep(LOSS_HINT_INTERVAL_S)
            if self.calls.get(call_id) is not pc:
                return
            try:
                cur = normalise(await pc.getStats(), at_s=loop.time())
            except Exception as exc:  # noqa: BLE001 - stats of a closing pc: stop following
                logger.debug("echo peer: call %s: no stats: %s", call_id, exc)
                return
            if prev is not None:
                percent = hint.update(window(prev, cur).remote_loss_pct)
                for encoder in opus_encoders(pc):
                    if encoder.set_loss_hint(percent):
                        logger.info("echo peer: call %s: opus loss hint %d %%", call_id, percent)
            prev = cur

    def _signal(self, kind: str, to: str, call_id: str, **fields: Any) -> sig.Outbound:
        return sig.build(
            kind,
            prefix=self.topics.prefix,
            me=self.cfg.device.id,
            to=to,
            call_id=call_id,
            ts=round(time.time(), 3),
            **fields,
        )

    def _send(self, kind: str, to: str, call_id: str, **fields: Any) -> None:
        self._spawn(self._publish(self._signal(kind, to, call_id, **fields)))

    async def _publish(self, out: sig.Outbound) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self.link.publish(out.topic, out.payload, qos=1)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
