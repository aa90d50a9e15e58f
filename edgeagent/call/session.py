"""One call: an RTCPeerConnection, its audio devices and the per-frame checks, stats and liveness.

The session owns everything that lives exactly as long as a call. It reports
through callbacks (quality samples, notable events, health) and ends with a
reason: the manager decides what that means for signaling and the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidAccessError, InvalidStateError, OperationError

from edgeagent import __version__
from edgeagent.audio.aec import EchoCanceller, EchoCancellerConfig
from edgeagent.audio.checks import AudioIssueChanged, FrameAnalyzer, audio_object
from edgeagent.audio.echo import EchoDetector
from edgeagent.audio.frames import Samples
from edgeagent.audio.playout import PlayoutBuffer, PlayoutSettings
from edgeagent.call import libopus
from edgeagent.call import signaling as sig
from edgeagent.call.ice import (
    ice_configuration,
    ice_failure,
    ice_progress,
    restrict_host_addresses,
    without_stun,
)
from edgeagent.call.opus import (
    LibopusMonoEncoder,
    LossHint,
    OpusSettings,
    far_end_decodes_fec,
    far_end_is_aiortc,
    far_end_sends_fec,
    far_end_uses_fec,
    install_opus_encoder,
    mark_sdp,
    munge_sdp,
    opus_encoders,
    prefer_opus,
    send_audio_level,
)
from edgeagent.call.tracks import (
    MicrophoneTrack,
    RemoteAudioSink,
    connect_sink,
    install_receive_path,
    receive_decoders,
)
from edgeagent.clock import Clock
from edgeagent.config import Config
from edgeagent.hw.alsa import AlsaCapture, AlsaPlayback, AudioDeviceError
from edgeagent.quality import emodel
from edgeagent.quality.stats import NetworkStats, OutageLoss, WindowStats, normalise, window
from edgeagent.telemetry.tracing import CallTracer

logger = logging.getLogger(__name__)

# What aiortc raises for a remote description it cannot use (bare internal errors).
_AIORTC_REFUSALS = (
    ValueError,
    KeyError,
    AttributeError,
    AssertionError,
    InvalidAccessError,
    InvalidStateError,
    OperationError,
)

REMOTE_CLOSE_GRACE_S = 2.0
MOS_GOOD = 3.6
MOS_DEGRADED = 3.1


class CallEnded(Exception):
    """The session ended by itself; `reason` is the summary's end_reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class QualitySample:
    """One stats window, in the units of the protocol's quality message."""

    mos: float | None
    r_factor: float | None
    window: WindowStats
    playout_delay_ms: float
    audio: dict[str, Any]
    remote_mos: float | None = None
    no_media: bool = False  # no inbound packet in the window: counted 100 % lost (OutageLoss)


@dataclass
class SessionRecord:
    """What the summary needs, accumulated over the call."""

    samples: list[QualitySample] = field(default_factory=list)
    audio_issues: dict[str, int] = field(default_factory=dict)
    connected_at: float | None = None
    first_media_at: float | None = None
    fec_sent: bool = False  # FEC went into our packets at some point (loss hint > 0)
    max_loss_hint: int = 0


def opus_settings(cfg: Config) -> OpusSettings:
    """Our Opus settings from the [call] opus keys."""
    call = cfg.call
    hint = call.opus_loss_hint_percent
    return OpusSettings(
        bitrate_bps=call.opus_bitrate_kbps * 1000,
        fec=call.opus_fec,
        complexity=call.opus_complexity,
        expected_loss_percent=None if hint == "auto" else hint,
    )


def health_for(mos: float | None, stalled: bool, issues: list[str]) -> tuple[str, tuple[str, ...]]:
    """good / degraded / bad from the latest MOS and what the checks say."""
    reasons: list[str] = []
    if stalled:
        reasons.append("no inbound media")
    reasons += issues
    if mos is not None and mos < MOS_DEGRADED:
        return "bad", (f"MOS {mos:.2f}", *reasons)
    if (mos is not None and mos < MOS_GOOD) or reasons:
        return "degraded", (*((f"MOS {mos:.2f}",) if mos and mos < MOS_GOOD else ()), *reasons)
    return "good", ()


class CallSession:
    """Media and measurements of one call."""

    def __init__(
        self,
        cfg: Config,
        call_id: str,
        *,
        clock: Clock,
        on_quality: Callable[[QualitySample], None],
        on_issue: Callable[[AudioIssueChanged], None],
        on_health: Callable[[str, tuple[str, ...]], None],
        on_media_stalled: Callable[[float], None],
        spans: CallTracer | None = None,
        stun_down: Callable[[], bool] | None = None,
        aiortc_jitter_buffer: bool = False,
    ) -> None:
        """`stun_down` says whether the agent's own probes currently see the STUN server
        down; such a call gathers without it (it could only delay the offer).
        `aiortc_jitter_buffer` keeps aiortc's jitter buffer (aiortc#543) in the receive
        path instead of bypassing it: for benchmarks that measure the workaround."""
        self.cfg = cfg
        self.aiortc_jitter_buffer = aiortc_jitter_buffer
        self.spans = spans
        self.call_id = call_id
        self.clock = clock
        self._on_quality = on_quality
        self._on_issue = on_issue
        self._on_health = on_health
        self._on_media_stalled = on_media_stalled
        ice = cfg.ice
        rtc_config = ice_configuration(
            stun_urls=ice.stun_urls,
            turn_urls=ice.turn_urls,
            username=ice.turn_username,
            credential=ice.turn_password.get_secret_value() if ice.turn_password else None,
            relay_only=ice.relay_only,
        )
        if ice.stun_urls and stun_down is not None and stun_down():
            logger.info(
                "call %s: STUN %s unreachable at the last probe: gathering without it",
                call_id,
                ice.stun_urls[0],
            )
            rtc_config = without_stun(rtc_config)
        self.pc = RTCPeerConnection(rtc_config)
        self.opus = opus_settings(cfg)
        self.loss_hint = LossHint()
        self.far_end_ours = False  # set from the remote SDP (`_after_remote`)
        self.fec_to_far_end = False
        self.fec_from_far_end = False  # the far end sends FEC under loss (it decodes FEC)
        self.encoder_name = "pyav"  # or libopus's version string (`_after_remote`)
        self.codec = "opus"  # what we send, from the negotiated codecs (`_after_remote`)
        audio = cfg.audio
        self.capture = AlsaCapture(audio.capture_device, clock=clock, paced=audio.paced)
        self.playout = PlayoutBuffer(
            PlayoutSettings(target_ms=audio.playout_target_ms, max_ms=audio.playout_max_ms)
        )
        self.aec = (
            EchoCanceller(EchoCancellerConfig(stream_delay_ms=audio.aec.stream_delay_ms))
            if audio.aec.enabled
            else None
        )
        self.raw_checks = FrameAnalyzer("capture_raw")
        self.tx_checks = FrameAnalyzer("capture")
        self.rx_checks = FrameAnalyzer("playout")
        self.echo = EchoDetector("capture")
        self._rendered: deque[Samples] = deque(maxlen=50)  # playback thread -> loop
        self.track = MicrophoneTrack(self.capture, processor=self._process_capture)
        self.sink: RemoteAudioSink | None = None
        self.playback: AlsaPlayback | None = None
        self.record = SessionRecord()
        self._outages = OutageLoss()
        self._tasks: list[asyncio.Task[None]] = []
        self._failed: asyncio.Future[CallEnded] = asyncio.get_running_loop().create_future()
        self._close_grace: asyncio.TimerHandle | None = None
        self._connected = asyncio.Event()
        self._stalled = False  # no inbound audio for media_stall_warn_s, not resumed yet
        self._rtcp_heard_at: float | None = None  # the last stats window with an RTCP RR
        self._receive_buffers: list[Any] = []
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("iceconnectionstatechange", self._on_ice_state)

    # --- audio path (runs every 20 ms on the loop) ----------------------------------------

    def _process_capture(self, frame: Samples) -> Samples:
        while self._rendered:
            far = self._rendered.popleft()
            if self.aec is not None:
                self.aec.process_render(far)
            self.echo.push_render(far)
            self._issues(self.rx_checks.analyze(far).changes)
        self._issues(self.raw_checks.analyze(frame).changes)
        if self.aec is not None:
            frame = self.aec.process_capture(frame)
        self._issues(self.tx_checks.analyze(frame).changes)
        self._issues(self.echo.push_capture(frame))
        return frame

    def fail(self, reason: str, detail: str) -> None:
        """End the call from outside its own tasks (e.g. an aiortc task of this call failed)."""
        if not self._failed.done():
            self._failed.set_result(CallEnded(reason, detail))

    def _render_tap(self, frame: Samples) -> None:
        self._rendered.append(frame)  # deque.append is atomic; analysed on the loop

    def _issues(self, changes: tuple[AudioIssueChanged, ...]) -> None:
        for change in changes:
            if change.active:
                key = f"{change.stream}.{change.name}"
                self.record.audio_issues[key] = self.record.audio_issues.get(key, 0) + 1
            self._on_issue(change)

    # --- devices and tracks ---------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.call_id}:{name}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._failed.done():
            return
        exc = task.exception()
        if isinstance(exc, AudioDeviceError):
            self._failed.set_result(CallEnded("audio_device", str(exc)))
        elif exc is not None:
            logger.error("call %s: %s failed", self.call_id, task.get_name(), exc_info=exc)
            self._failed.set_result(CallEnded("error", f"{type(exc).__name__}: {exc}"))

    async def open_devices(self) -> None:
        """Open the capture device; raises CallEnded('audio_device') if it is missing."""
        self._spawn(self.capture.run(), "capture")
        opened = asyncio.ensure_future(self.capture.wait_opened())
        await asyncio.wait([opened, self._failed], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if self._failed.done():
            opened.cancel()
            raise self._failed.result()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self.sink is not None:
            return
        self.sink = RemoteAudioSink(
            track, self.playout, clock=self.clock, render_tap=self._render_tap
        )
        audio = self.cfg.audio
        self.playback = AlsaPlayback(
            audio.playback_device, self.sink.pull, clock=self.clock, paced=audio.paced
        )
        # Decoded frames straight into the playout buffer; if the receive path is
        # not installed yet (the track event fires inside setRemoteDescription),
        # `_after_remote` connects it.
        connect_sink(self.pc, self.sink)
        self._spawn(self.sink.run(), "sink")
        self._spawn(self.playback.run(), "playback")

    # --- phases (tracing) ------------------------------------------------------------------

    def _begin(self, name: str, attrs: dict[str, Any] | None = None) -> None:
        if self.spans is not None and self.spans.active:
            self.spans.begin_phase(name, attrs)

    def _end(self, name: str, *, error: str | None = None) -> None:
        if self.spans is not None:
            self.spans.end_phase(name, error=error)

    def _on_ice_state(self) -> None:
        # aiortc: ICE "checking" -> "completed" (or "failed"); DTLS starts after "completed",
        # and the connection state turns "connected" once DTLS is up too.
        state = self.pc.iceConnectionState
        logger.debug("call %s: ICE %s", self.call_id, state)
        if state == "completed":
            if self.spans is not None and (span := self.spans.phase_span("ice.connect")):
                local, remote = self.ice_types()
                span.set_attributes(
                    {k: v for k, v in (("ice.local_type", local), ("ice.remote_type", remote)) if v}
                )
            self._end("ice.connect")
            self._begin("dtls")
        elif state == "failed":
            self._end("ice.connect", error="ICE failed")

    def _dtls_role(self) -> str | None:
        try:
            role = self.pc.getTransceivers()[0].sender.transport._role
        except (AttributeError, IndexError):
            return None
        return role if isinstance(role, str) else None

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        logger.debug("call %s: connection %s", self.call_id, state)
        if state == "connected":
            if self.spans is not None and (span := self.spans.phase_span("dtls")):
                role = self._dtls_role()
                if role:
                    span.set_attribute("dtls.role", role)
            self._end("dtls")
            self._connected.set()
        elif state == "failed" and not self._failed.done():
            self._end("dtls", error="DTLS or ICE failed")
            self._failed.set_result(CallEnded("ice_failed", ice_failure(self.pc) or ""))
        elif state == "closed" and not self._failed.done():
            # The far end closed its transport; its hangup message is usually on its
            # way over MQTT, so give it a moment to arrive before calling it a failure.
            self._close_grace = asyncio.get_running_loop().call_later(
                REMOTE_CLOSE_GRACE_S, self._remote_closed
            )

    def _remote_closed(self) -> None:
        if not self._failed.done():
            self._failed.set_result(CallEnded("transport_closed", "far end closed the connection"))

    # --- negotiation ----------------------------------------------------------------------

    async def create_offer(self) -> str:
        self.pc.addTrack(self.track)
        offer = await self.pc.createOffer()
        restrict_host_addresses(
            self.pc,
            self.cfg.ice.host_addresses or None,
            gather_timeout_s=self.cfg.ice.gather_timeout_s,
        )
        await self._set_local(RTCSessionDescription(munge_sdp(offer.sdp, self.opus), "offer"))
        return self._signalled_sdp()

    def _signalled_sdp(self) -> str:
        """Our local description as signalled: marked as ours, with whether we decode FEC."""
        return mark_sdp(
            str(self.pc.localDescription.sdp), __version__, decodes_fec=libopus.load() is not None
        )

    async def _set_local(self, description: RTCSessionDescription) -> None:
        """setLocalDescription, which gathers every candidate first (aiortc does not trickle)."""
        self._begin("ice.gathering")
        try:
            await self.pc.setLocalDescription(description)
        except BaseException as exc:
            self._end("ice.gathering", error=f"{type(exc).__name__}: {exc}")
            raise
        if self.spans is not None and (span := self.spans.phase_span("ice.gathering")):
            sdp = str(self.pc.localDescription.sdp)
            span.set_attribute("ice.candidates", sdp.count("a=candidate:"))
        self._end("ice.gathering")

    async def accept_answer(self, sdp: str) -> None:
        self._begin("ice.connect")  # ICE checks start once the answer is applied
        await self._set_remote(sdp, "answer")
        self._after_remote(sdp)

    async def answer(self, offer_sdp: str) -> str:
        await self._set_remote(offer_sdp, "offer")
        self.pc.addTrack(self.track)
        self._after_remote(offer_sdp)
        try:
            # An offer aiortc took in may still be one it cannot answer (media sections
            # it cannot mirror: two data channels, an m=text, broken video sections).
            answer = await self.pc.createAnswer()
            restrict_host_addresses(
                self.pc,
                self.cfg.ice.host_addresses or None,
                gather_timeout_s=self.cfg.ice.gather_timeout_s,
            )
            local = RTCSessionDescription(munge_sdp(answer.sdp, self.opus), "answer")
            await self._set_local(local)
        except _AIORTC_REFUSALS as exc:
            raise CallEnded(
                "error", f"unusable offer: aiortc cannot answer it ({type(exc).__name__}: {exc})"
            ) from exc
        self._begin("ice.connect")  # checks run while the answer travels to the caller
        return self._signalled_sdp()

    async def _set_remote(self, sdp: str, kind: str) -> None:
        """setRemoteDescription, or CallEnded("error") saying what is wrong with the SDP."""
        problem = sig.sdp_problem(sdp)
        if problem is not None:
            raise CallEnded("error", f"unusable {kind}: {problem}")
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp, kind))
        except _AIORTC_REFUSALS as exc:
            # What aiortc raises for an SDP it cannot use, named, so the summary says
            # more than "KeyError".
            raise CallEnded(
                "error", f"unusable {kind}: aiortc refused it ({type(exc).__name__}: {exc})"
            ) from exc

    def _after_remote(self, remote_sdp: str) -> None:
        # Who decodes what we send: a browser, SIP phone or agent with libopus (PLC,
        # and FEC when it asked for it) or a stock aiortc peer (no FEC).
        self.far_end_ours = far_end_is_aiortc(remote_sdp)
        self.codec = prefer_opus(self.pc) or "none"
        # The sink downmixes to mono anyway: decode Opus to mono (docs/profile.md),
        # with PLC; FEC from a far end that may send it (one that decodes FEC itself).
        self._receive_buffers = install_receive_path(
            self.pc,
            mono_opus=True,
            opus_fec=far_end_uses_fec(remote_sdp),
            aiortc_jitter_buffer=self.aiortc_jitter_buffer,
        )
        if self.sink is not None:
            connect_sink(self.pc, self.sink)
        install_opus_encoder(self.pc, self.opus)
        # Named now: aiortc drops a sender's encoder when the call ends.
        encoders = opus_encoders(self.pc)
        if encoders and isinstance(encoders[0], LibopusMonoEncoder):
            self.encoder_name = libopus.version() or "libopus"
        # aiortc's receiver never reads the RTP audio level: skip it for our agents.
        send_audio_level(self.pc, not self.far_end_ours)
        self.fec_to_far_end = self.opus.fec and far_end_decodes_fec(remote_sdp)
        # We ask for FEC (useinbandfec=1) when ours is on; a far end that decodes FEC
        # itself sends it under loss (browsers; agents with their opus_fec on).
        self.fec_from_far_end = self.opus.fec and far_end_sends_fec(remote_sdp)
        for encoder in opus_encoders(self.pc):
            encoder.set_fec(self.fec_to_far_end)

    async def wait_connected(self, timeout_s: float) -> None:
        """Until ICE and DTLS are up; CallEnded on failure or timeout."""
        connected = asyncio.ensure_future(self._connected.wait())
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait([connected, self._failed], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        except TimeoutError:
            why = ice_failure(self.pc)
            progress = ice_progress(self.pc)
            detail = f"not connected after {timeout_s:.0f} s" + (f": {why}" if why else "")
            raise CallEnded(
                "connect_timeout", detail + (f" ({progress})" if progress else "")
            ) from None
        finally:
            connected.cancel()
        if self._failed.done():
            raise self._failed.result()
        self.record.connected_at = self.clock.monotonic()

    # --- the active call ------------------------------------------------------------------

    async def run(self) -> None:
        """Watch the connected call until it ends by itself (raises CallEnded)."""
        stats = asyncio.ensure_future(self._stats_loop())
        try:
            await asyncio.wait([stats, self._failed], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
            if self._failed.done():
                raise self._failed.result()
            stats.result()  # a bug in the stats loop surfaces here
        finally:
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats

    async def _stats_loop(self) -> None:
        cfg = self.cfg.call
        started = self.clock.monotonic()
        # The baseline at the start, so the first quality message covers the call's first
        # `stats_interval_s` and comes at its end (protocol section 2), not one interval later.
        prev: NetworkStats | None = await self._sample(None, started)
        next_stats = started + cfg.stats_interval_s
        max_end = started + cfg.max_duration_s
        while True:
            await self.clock.sleep(0.5)
            now = self.clock.monotonic()
            last = self.sink.last_frame_at if self.sink else None
            if last is not None and self.record.first_media_at is None:
                self.record.first_media_at = last
            silent_for = now - (last if last is not None else started)
            if silent_for >= cfg.media_stall_hangup_s:
                detail = f"no inbound audio for {silent_for:.0f} s"
                heard = self._rtcp_heard_at
                if heard is not None and now - heard < silent_for:
                    detail += (
                        "; RTCP reports from the far end still arrived on the same path: it"
                        " sends no audio (muted, capture or encoder stalled) or something"
                        " between drops only RTP"
                    )
                raise CallEnded("media_timeout", detail)
            if silent_for >= cfg.media_stall_warn_s:
                if not self._stalled:
                    self._stalled = True
                    self._on_media_stalled(silent_for)
                    self._report_health()
            elif self._stalled:
                self._stalled = False
                self._report_health()
            if now >= max_end:
                raise CallEnded("max_duration", f"{cfg.max_duration_s:.0f} s reached")
            if now >= next_stats:
                next_stats = now + cfg.stats_interval_s
                prev = await self._sample(prev, now)

    async def _sample(self, prev: NetworkStats | None, now: float) -> NetworkStats:
        report = await self.pc.getStats()
        cur = normalise(report, at_s=now)
        if prev is None:
            return cur
        win, no_media = self._outages.adjust(
            window(prev, cur), media_flowed=self.record.first_media_at is not None
        )
        if win.remote_loss_pct is not None:  # a receiver report about our audio came in
            self._rtcp_heard_at = now
        depth = self.playout.depth_ms
        fec_sent = self._follow_remote_loss(win.remote_loss_pct)
        # Both directions carry Opus at our configured bitrate (our SDP asks the far
        # end for maxaveragebitrate = ours); its complexity is assumed to be ours.
        ie = emodel.opus_ie(self.opus.bitrate_bps / 1000.0, self.opus.complexity)
        delay = emodel.one_way_delay_ms(win.rtt_ms or 0.0, depth)
        mos = r = remote_mos = None
        plc, fec = self.decoder_concealment()
        if win.loss_pct is not None:
            # Our own receive path: libopus PLC, with FEC from a far end that sends it,
            # or the playout buffer's fade.
            handling = emodel.own_loss_handling(self.decodes_with_plc(), fec=self.fec_from_far_end)
            bpl = emodel.BPL[handling]
            r = emodel.r_factor(delay, win.loss_pct, ie=ie, bpl=bpl)
            mos = emodel.mos_from_r(r)
        if win.remote_loss_pct is not None:
            # The far end's playout depth is unknown: ours stands in for it.
            handling = emodel.receiver_loss_handling(fec_sent=fec_sent)
            remote_r = emodel.r_factor(delay, win.remote_loss_pct, ie=ie, bpl=emodel.BPL[handling])
            remote_mos = emodel.mos_from_r(remote_r)
        pstats = self.playout.stats()
        est = self.echo.estimate
        audio = audio_object(
            self.tx_checks.snapshot(),
            self.rx_checks.snapshot(),
            echo_likelihood=est.likelihood,
            echo_delay_ms=est.delay_ms if est.confirmed else None,
            erle_db=self.aec.erle_db if self.aec else None,
            underruns=pstats.underruns + (self.playback.underruns if self.playback else 0),
            overruns=pstats.overruns + self.capture.overruns,
        )
        # Concealed: played but not decoded from a packet that arrived for it.
        audio["concealed_frames"] = pstats.concealed_frames + plc + fec
        audio["plc_frames"] = plc
        audio["fec_frames"] = fec
        audio["decode_errors"] = self.decode_errors()
        audio["late_packets"] = self.late_packets()
        sample = QualitySample(mos, r, win, depth, audio, remote_mos, no_media)
        self.record.samples.append(sample)
        self._on_quality(sample)
        self._report_health()
        return cur

    @property
    def no_media_s(self) -> float:
        """Seconds of stats windows, once media flowed, in which no inbound packet came."""
        return self._outages.outage_s

    def decoder_concealment(self) -> tuple[int, int]:
        """Frames the Opus decoder concealed so far: (PLC, recovered from FEC)."""
        plc = fec = 0
        for inline in receive_decoders(self.pc):
            if inline.plc is not None:
                plc += inline.plc.plc_frames
                fec += inline.plc.fec_frames
        return plc, fec

    def decode_errors(self) -> int:
        """Packets that arrived but could not be decoded (garbage, empty), so far."""
        return sum(inline.errors for inline in receive_decoders(self.pc))

    def late_packets(self) -> int:
        """Packets dropped before decoding: older than one already passed on, or repeats."""
        return sum(int(getattr(b, "late", 0)) for b in self._receive_buffers)

    def decodes_with_plc(self) -> bool:
        """Whether lost packets are concealed by libopus (True) or faded by the playout buffer."""
        return any(inline.plc is not None for inline in receive_decoders(self.pc))

    def _follow_remote_loss(self, remote_loss_pct: float | None) -> bool:
        """Set the encoders' loss hint from the far end's reported loss; True if FEC is sent.

        Only a far end that decodes FEC gets a hint above 0: for a stock aiortc peer
        the FEC bits would be wasted (see edgeagent/call/opus.py).
        """
        hint = self.loss_hint.update(remote_loss_pct) if self.fec_to_far_end else 0
        fec_sent = False
        for encoder in opus_encoders(self.pc):
            if encoder.set_loss_hint(hint):
                logger.info("call %s: opus loss hint now %d %%", self.call_id, hint)
            fec_sent |= encoder.fec and encoder.loss_hint_percent > 0
            self.record.max_loss_hint = max(self.record.max_loss_hint, encoder.loss_hint_percent)
        self.record.fec_sent |= fec_sent
        return fec_sent

    def opus_summary(self) -> dict[str, Any]:
        """The summary's `opus` object: encoder, decoder and whether FEC flowed."""
        return {
            "encoder": self.encoder_name,
            "decoder": "libopus_plc" if self.decodes_with_plc() else "pyav_fade",
            "bitrate_kbps": self.opus.bitrate_bps / 1000.0,
            "complexity": self.opus.complexity,
            "fec_to_far_end": self.fec_to_far_end,
            "fec_sent": self.record.fec_sent,
            "max_loss_hint_pct": self.record.max_loss_hint,
            "fec_from_far_end": self.fec_from_far_end,
        }

    def _report_health(self) -> None:
        # A stats sample during a stall must not show the call good again (the LEDs
        # went degraded -> good while nothing arrived).
        last = self.record.samples[-1] if self.record.samples else None
        issues = sorted(
            {*self.tx_checks.active_issues(), *self.raw_checks.active_issues()}
            | ({"echo"} if self.echo.echo_active else set())
        )
        # A window with no media says nothing the stall rule does not (degraded from
        # media_stall_warn_s on, issue 3): its MOS of 1 is for the records, not the LEDs.
        mos = last.mos if last is not None and not last.no_media else None
        self._on_health(*health_for(mos, self._stalled, issues))

    def ice_types(self) -> tuple[str | None, str | None]:
        """Types (host/srflx/relay) of the nominated candidate pair, where aioice exposes it."""
        try:
            sender = self.pc.getTransceivers()[0].sender
            conn = sender.transport.transport._connection
            pairs = list(conn._nominated.values()) or [
                p for p in conn._check_list if p.nominated or p.state.name == "SUCCEEDED"
            ]
            pair = pairs[0]
            return pair.local_candidate.type, pair.remote_candidate.type
        except (AttributeError, IndexError) as exc:
            logger.debug("call %s: no ICE pair to report: %r", self.call_id, exc)
            return None, None

    async def close(self) -> None:
        self.track.stop()
        with contextlib.suppress(Exception):  # closing a half-negotiated pc may raise
            await self.pc.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, AudioDeviceError):
                await task
        # Break the pc <-> session cycles (event-emitter callbacks hold bound methods)
        # so the media buffers go by reference counting now, not at some later
        # generation-2 collection.
        if self._close_grace is not None:  # our own close also reaches `closed`
            self._close_grace.cancel()
        self.pc.remove_all_listeners()
        self.track.remove_all_listeners()
        self._tasks.clear()
