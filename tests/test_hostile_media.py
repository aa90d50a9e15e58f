"""A far end that sends hostile media: the agent survives it, counts it, and hears again.

A real agent (in-process) dials a real aiortc far end, the echo peer, over a real
mosquitto; the echo peer loops the agent's 440 Hz tone back. Once the tone is heard,
the far end's RTP is rewritten after aiortc builds each packet and before SRTP
protects it (a wrapper around its DTLS transport's `_send_rtp`), so the agent
receives the hostile packets as genuine authenticated ones: Opus payloads that are
garbage, empty, truncated, huge, stereo or of odd frame sizes; RTP timestamps and
sequence numbers that jump, go back, wrap or repeat; an SSRC change; a burst after a
silence; a payload type not negotiated; header oddities. Then the far end sends
good media again. For each case the call goes on (or ends with a documented
reason), the tone is heard again, the playout depth stays within its bound in every
quality message and the summary, the counters that should move do, and no exception
escaped anywhere.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import Received, collector
from aiortc.rtp import is_rtcp
from alsa_support import RATE, active, hz_tolerance, peak_hz, tone
from call_support import alsa_env, echo_peer, endpoint_config, running, summaries, until
from schema_support import assert_valid

from edgeagent.audio.playout import PlayoutBuffer, PlayoutSettings
from edgeagent.call import libopus
from edgeagent.call.tracks import receive_decoders
from edgeagent.quality.stats import NetworkStats, OutageLoss, window

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CRASH_MARKERS = ("Traceback", "Task exception was never retrieved", "Exception in callback")
TONE_HZ = 440
PLAYOUT_MAX_MS = 200.0  # the config default (audio.playout_max_ms)
HOSTILE_PACKETS = 50  # one second of 20 ms packets
NO_AEC = "[audio.aec]\nenabled = false\n"
FRAME = 960  # RTP timestamp units (48 kHz) of a 20 ms packet


# --- Opus packets made with libopus through ctypes (edgeagent/call/libopus.py) -------------


def opus_packets(
    count: int,
    *,
    channels: int = 1,
    frame_ms: float = 20.0,
    bitrate: int = 32000,
    cbr: bool = False,
    freq: float = 1000.0,
) -> list[bytes]:
    """`count` consecutive Opus packets of a tone, each `frame_ms` long."""
    lib = libopus.load()
    if lib is None:
        pytest.skip("libopus0 is needed to make Opus packets")
    err = ctypes.c_int()
    # A c_void_p, not the int restype gives: the variadic ctl would truncate it to 32 bits.
    enc = ctypes.c_void_p(
        lib.opus_encoder_create(RATE, channels, libopus.APPLICATION_VOIP, ctypes.byref(err))
    )
    assert err.value == 0 and enc.value
    try:
        for request, value in (
            (libopus.SET_BITRATE, bitrate),
            (libopus.SET_VBR, 0 if cbr else 1),
        ):
            rc = lib.opus_encoder_ctl(enc, ctypes.c_int(request), ctypes.c_int32(value))
            assert rc == 0
        n = round(RATE * frame_ms / 1000)
        out = ctypes.create_string_buffer(1500)
        packets = []
        for i in range(count):
            t = (np.arange(n) + i * n) / RATE
            mono = 8000 * np.sin(2 * np.pi * freq * t)
            if channels == 2:  # a different tone in each channel: a real stereo stream
                right = 8000 * np.sin(2 * np.pi * freq * 1.5 * t)
                pcm = np.column_stack([mono, right]).reshape(-1)
            else:
                pcm = mono
            samples = np.ascontiguousarray(np.rint(pcm).astype(np.int16))
            size = lib.opus_encode(enc, samples.ctypes.data, n, ctypes.addressof(out), 1500)
            assert size > 0, size
            packets.append(out.raw[:size])
        return packets
    finally:
        lib.opus_encoder_destroy(enc)


# --- the far end's RTP, rewritten before SRTP ----------------------------------------------


@dataclass
class Rtp:
    """One RTP packet as raw fields (RFC 3550 section 5.1); `head` keeps CSRCs and extensions."""

    byte0: int
    marker: int
    pt: int
    seq: int
    ts: int
    ssrc: int
    extra: bytes  # CSRC list and header extension, as they were
    payload: bytes

    @classmethod
    def parse(cls, data: bytes) -> Rtp:
        b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
        pos = 12 + 4 * (b0 & 0x0F)
        if b0 & 0x10:
            (words,) = struct.unpack("!H", data[pos + 2 : pos + 4])
            pos += 4 + 4 * words
        assert not b0 & 0x20, "aiortc sends no padding"
        return cls(b0, b1 >> 7, b1 & 0x7F, seq, ts, ssrc, data[12:pos], data[pos:])

    def serialize(self) -> bytes:
        head = struct.pack(
            "!BBHII",
            self.byte0,
            (self.marker << 7) | self.pt,
            self.seq & 0xFFFF,
            self.ts & 0xFFFFFFFF,
            self.ssrc & 0xFFFFFFFF,
        )
        return head + self.extra + self.payload

    def copy(self, **changes: Any) -> Rtp:
        fields = dict(self.__dict__)
        fields.update(changes)
        return Rtp(**fields)


Rule = Callable[["Mangler", Rtp], list[Rtp]]


@dataclass
class Mangler:
    """Wraps the far end's DTLS transport `_send_rtp`: RTP passes through `rule` for
    `count` packets, then flows again with the lasting offsets (`seq_add`, `ts_add`,
    `ssrc`) a real sender that jumped would keep. RTCP passes untouched."""

    transport: Any
    seq_add: int = 0
    ts_add: int = 0
    ssrc: int | None = None
    rule: Rule | None = None
    count: int = 0
    seen: int = 0  # packets given to the current rule
    last: Rtp | None = None  # the last packet sent, as sent
    state: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    sent_hostile: int = 0

    def __post_init__(self) -> None:
        self._send = self.transport._send_rtp
        self.transport._send_rtp = self._send_rtp

    def start(self, rule: Rule, count: int = HOSTILE_PACKETS) -> None:
        self.rule, self.count, self.seen = rule, count, 0
        self.done.clear()

    async def _send_rtp(self, data: bytes) -> None:
        if is_rtcp(data):
            await self._send(data)
            return
        pkt = Rtp.parse(data)
        pkt = pkt.copy(
            seq=pkt.seq + self.seq_add,
            ts=pkt.ts + self.ts_add,
            ssrc=self.ssrc if self.ssrc is not None else pkt.ssrc,
        )
        out = [pkt]
        rule = self.rule
        if rule is not None:
            out = rule(self, pkt)
            self.seen += 1
            self.sent_hostile += len(out)
            if self.seen >= self.count:
                self.rule = None
                self.done.set()
        for p in out:
            self.last = p
            await self._send(p.serialize())


# --- the cases -----------------------------------------------------------------------------


def payloads(make: Callable[[int], bytes]) -> Rule:
    """Each packet's payload replaced by `make(i)`."""
    return lambda m, p: [p.copy(payload=make(m.seen))]


def seeded(seed: int) -> random.Random:
    return random.Random(seed)


def random_payloads() -> Rule:
    rng = seeded(1)
    return payloads(lambda i: rng.randbytes(rng.choice((1, 2, 3, 17, 100, 400, 1200))))


def truncated() -> Rule:
    return lambda m, p: [p.copy(payload=p.payload[: max(1, len(p.payload) // 3)])]


def from_packets(packets: list[bytes]) -> Rule:
    return payloads(lambda i: packets[i % len(packets)])


def shift(seq: int = 0, ts: int = 0, ssrc: int | None = None) -> Rule:
    """From this packet on, the sender's numbering jumps (and stays jumped)."""

    def rule(m: Mangler, p: Rtp) -> list[Rtp]:
        m.seq_add += seq
        m.ts_add += ts
        if ssrc is not None:
            m.ssrc = ssrc
        return [p.copy(seq=p.seq + seq, ts=p.ts + ts, ssrc=ssrc if ssrc is not None else p.ssrc)]

    return rule


def ts_wrap() -> Rule:
    """Timestamps moved so that they wrap past 2**32 five packets later."""

    def rule(m: Mangler, p: Rtp) -> list[Rtp]:
        delta = ((1 << 32) - 5 * FRAME - p.ts) & 0xFFFFFFFF
        return shift(ts=delta)(m, p)

    return rule


def ts_stuck() -> Rule:
    """Every packet with the timestamp of the first (the sender's clock stopped)."""

    def rule(m: Mangler, p: Rtp) -> list[Rtp]:
        first = m.state.setdefault("ts", p.ts)
        return [p.copy(ts=first)]

    return rule


def repeated(times: int) -> Rule:
    return lambda m, p: [p] * times


def seq_stuck() -> Rule:
    """Every packet with the sequence number of the first; timestamps go on."""

    def rule(m: Mangler, p: Rtp) -> list[Rtp]:
        first = m.state.setdefault("seq", p.seq)
        return [p.copy(seq=first)]

    return rule


def burst_after_silence(silent: int = 100, burst: int = 500) -> Rule:
    """Nothing for `silent` packets (2 s), then `burst` packets at once, numbered on from
    the last packet sent; the stream then continues after the burst."""

    def rule(m: Mangler, p: Rtp) -> list[Rtp]:
        if m.seen < silent - 1:
            m.state.setdefault("last", p.copy(seq=p.seq - 1, ts=p.ts - FRAME))
            return []
        last: Rtp = m.state["last"]
        out = [
            p.copy(seq=last.seq + k, ts=last.ts + k * FRAME, marker=int(k == 1))
            for k in range(1, burst + 1)
        ]
        m.seq_add += burst - silent
        m.ts_add += (burst - silent) * FRAME
        return out

    return rule


def payload_type(pt: int) -> Rule:
    return lambda m, p: [p.copy(pt=pt)]


def pcmu_with_empty() -> Rule:
    """Packets labelled PCMU (negotiated too), one of them empty."""
    return lambda m, p: [p.copy(pt=0, payload=b"" if m.seen == 10 else p.payload)]


def codec_switch_after_loss() -> Rule:
    """Every third packet lost for 1.2 s (concealed), then 1 s labelled PCMU, then Opus."""

    def rule(m: Mangler, p: Rtp) -> list[Rtp]:
        if m.seen < 60:
            return [] if m.seen % 3 == 2 else [p]
        return [p.copy(pt=0)]

    return rule


def marker_always() -> Rule:
    return lambda m, p: [p.copy(marker=1)]


def junk_extensions() -> Rule:
    """A one-byte-header extension block (RFC 8285) of unknown ids with random data,
    in place of aiortc's (mid, abs-send-time, audio level)."""
    rng = seeded(2)

    def rule(m: Mangler, p: Rtp) -> list[Rtp]:
        body = b"".join(bytes([(13 << 4) | 15]) + rng.randbytes(16) for _ in range(8))
        body += b"\x00" * (-len(body) % 4)
        ext = struct.pack("!HH", 0xBEDE, len(body) // 4) + body
        return [p.copy(byte0=0x90, extra=ext)]

    return rule


def csrcs_and_padding() -> Rule:
    """15 contributing sources and 200 bytes of padding, all well formed."""

    def rule(m: Mangler, p: Rtp) -> list[Rtp]:
        csrc = b"".join(struct.pack("!I", 1000 + i) for i in range(15))
        ext = p.extra[4 * (p.byte0 & 0x0F) :]
        pad = b"\x00" * 199 + bytes([200])
        return [
            p.copy(
                byte0=0x80 | 0x20 | (p.byte0 & 0x10) | 15, extra=csrc + ext, payload=p.payload + pad
            )
        ]

    return rule


@dataclass(frozen=True)
class Case:
    name: str
    rule: Callable[[], Rule]
    count: int = HOSTILE_PACKETS
    # Counters of the quality message's `audio` block (or the summary's `playout`
    # block for late_frames) that must have moved by the end of the call.
    moves: tuple[str, ...] = ()
    # No packet is lost (the sender only renumbers them): no window may report loss.
    lossless: bool = False
    # Both ends without libopus0: Opus decoded through PyAV (edgeagent/call/opus.py).
    pyav: bool = False
    # A timestamp jump libwebrtc does not count as jitter: no window may report it as such
    # (aiortc's own statistics put minutes of it in one window; SteadyStreamStatistics).
    steady_jitter: bool = False


CASES = [
    Case("random_bytes", random_payloads, moves=("decode_errors",)),
    Case("empty_payloads", lambda: payloads(lambda i: b""), moves=("underruns",)),
    Case("truncated", truncated),
    Case(
        "payloads_1200_bytes",
        lambda: from_packets(opus_packets(50, channels=2, bitrate=480000, cbr=True)),
    ),
    Case("stereo", lambda: from_packets(opus_packets(50, channels=2, bitrate=64000))),
    Case(
        "frames_2_5ms", lambda: from_packets(opus_packets(50, frame_ms=2.5)), moves=("plc_frames",)
    ),
    Case("frames_60ms", lambda: from_packets(opus_packets(50, frame_ms=60))),
    Case("frames_120ms", lambda: from_packets(opus_packets(50, frame_ms=120))),
    Case("ts_jump_hour", lambda: shift(ts=3600 * RATE), count=1, steady_jitter=True),
    Case("ts_jump_1_9s", lambda: shift(ts=round(1.9 * RATE)), count=1, moves=("overruns",)),
    Case("ts_backwards_10s", lambda: shift(ts=-10 * RATE), count=1, steady_jitter=True),
    Case("ts_wrap", ts_wrap, count=1, steady_jitter=True),
    Case("ts_stuck", ts_stuck),
    Case("seq_jump_forward", lambda: shift(seq=20000), count=1, lossless=True),
    # A jump back is only deliverable with a new SSRC (ssrc_change): the sender's own SRTP
    # context refuses to protect an index that old.
    # SRTP's replay protection drops a repeated sequence number before aiortc sees it.
    Case("seq_repeat", lambda: repeated(3)),
    Case("seq_stuck", seq_stuck),
    Case(
        "ssrc_change",
        lambda: shift(seq=-20000, ts=-123456789, ssrc=0x0BADF00D),
        count=1,
        moves=("late_packets",),  # dropped as old until the buffer resyncs
    ),
    Case("burst_500_after_2s_silence", burst_after_silence, count=100, moves=("overruns",)),
    Case(
        "empty_payloads_pyav",
        lambda: payloads(lambda i: b""),
        pyav=True,
        moves=("decode_errors",),
    ),
    Case("payload_type_pcmu_with_empty", pcmu_with_empty),
    Case("codec_switch_after_loss", codec_switch_after_loss, count=110, moves=("fec_frames",)),
    Case("payload_type_unknown", lambda: payload_type(77)),
    Case("payload_type_pcmu", lambda: payload_type(0)),
    Case("marker_always", marker_always),
    Case("junk_header_extensions", junk_extensions),
    Case("csrcs_and_padding", csrcs_and_padding),
]


# --- what the agent says ---------------------------------------------------------------------


def quality(messages: list[Received], device: str) -> list[dict[str, Any]]:
    prefix = f"edge/v1/{device}/calls/"
    return [
        m.json() for m in messages if m.topic.startswith(prefix) and m.topic.endswith("/quality")
    ]


def tail(path: Path, seconds: float) -> np.ndarray:
    """The last `seconds` the speaker played (the file PCM appends as it plays)."""
    if not path.exists():
        return np.zeros(0, dtype=np.int16)
    want = round(seconds * RATE) * 2
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell() & ~1
        f.seek(max(0, size - want))
        return np.frombuffer(f.read(want), dtype="<i2").astype(np.int16)


def played_bytes(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def tone_heard(path: Path, since: int) -> bool:
    """The last half second played after byte `since` is mostly the tone."""
    if played_bytes(path) - since < RATE:  # at least 0.5 s played since
        return False
    heard = active(tail(path, 0.5))
    return heard.size >= 0.4 * RATE and abs(peak_hz(heard) - TONE_HZ) <= hz_tolerance(TONE_HZ)


async def phase(name: str, waiting: Awaitable[Any], state: Callable[[], Any] = str) -> Any:
    """Await `waiting`; a timeout says which phase of the case it was, and `state()`."""
    try:
        return await waiting
    except TimeoutError as exc:
        raise AssertionError(f"timed out waiting for: {name}; {state()}") from exc


def heard(path: Path) -> str:
    played = tail(path, 0.5)
    loud = active(played)
    peak = peak_hz(loud) if loud.size else None
    return f"last 0.5 s: {loud.size} of {played.size} samples active, peak {peak} Hz"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_media_is_survived_counted_and_audio_comes_back(
    case: Case,
    tmp_path: Path,
    broker: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rule = case.rule()  # libopus encodes before the call starts
    if case.pyav:
        monkeypatch.setattr(libopus, "load", lambda: None)
    alsa = alsa_env(tmp_path, monkeypatch)
    # No echo canceller: the far end echoes our own tone, which AEC3 would take for echo
    # and cancel from what we send.
    cfg_a = endpoint_config(
        tmp_path, broker.port, "dev-a", alsa, mic=tone(TONE_HZ, 60), extra=NO_AEC
    )
    cfg_e = endpoint_config(tmp_path, broker.port, "echo", alsa)
    speaker = tmp_path / "spk_dev-a.raw"
    async with (
        collector(broker.port, "edge/v1/#") as c,
        echo_peer(cfg_e) as echo,
        running(cfg_a, install_crash_hooks=False) as a,
    ):
        call = await a.calls_mgr.dial("echo")
        await phase("tone heard before", until(lambda: tone_heard(speaker, 0), timeout=20))
        far_end = echo.calls[call.call_id]
        mangler = Mangler(far_end.getSenders()[0].transport)
        assert call.session is not None
        session = call.session
        before = session.playout.stats()

        hostile_at = len(c.messages)
        mangler.start(rule, case.count)
        await asyncio.wait_for(mangler.done.wait(), 20)
        hostile_end = played_bytes(speaker)
        messages_at = len(c.messages)

        # Good audio again, then a quality message about the call after it.
        await phase(
            "tone heard after",
            until(lambda: tone_heard(speaker, hostile_end), 15),
            lambda: f"{heard(speaker)}; {session.playout.stats()}; {call.state}",
        )
        await phase("quality after", c.wait_for(lambda ms: quality(ms[messages_at:], "dev-a"), 10))
        assert a.calls_mgr.active is call and call.state == "active", call.end_reason
        decode_errors = sum(d.errors for d in receive_decoders(session.pc))
        dropped_late = sum(b.late for b in session._receive_buffers)
        await a.calls_mgr.hangup()
        summary = (await c.wait_for(lambda ms: summaries(ms, "dev-a"), timeout=10))[0]
        after = session.playout.stats()
    qs = quality(c.messages, "dev-a")
    print(
        f"\n{case.name}: sent {mangler.sent_hostile} hostile packets; playout {before} -> {after};"
        f" decode errors {decode_errors}; late packets {dropped_late};"
        f" last quality audio {qs[-1]['audio']};"
        f" summary playout {summary['playout']};"
        f" (loss, jitter, mos) {[(q['loss_pct'], q['jitter_ms'], q['mos']) for q in qs]}"
    )
    for m in c.messages:
        assert_valid(m.topic, m.payload)
    assert (summary["result"], summary["end_reason"]) == ("completed", "local_hangup")
    assert summary["playout"]["max_depth_ms"] <= PLAYOUT_MAX_MS
    assert all(q["playout_delay_ms"] <= PLAYOUT_MAX_MS for q in qs)
    if case.steady_jitter:
        assert all(q["jitter_ms"] is None or q["jitter_ms"] < 100 for q in qs), [
            q["jitter_ms"] for q in qs
        ]
    for name in case.moves:
        if name == "late_frames":
            assert summary["playout"]["late_frames"] > 0 or dropped_late > 0
            continue
        earlier = quality(c.messages[:hostile_at], "dev-a")
        first = earlier[-1]["audio"][name] if earlier else 0
        assert qs[-1]["audio"][name] > first, f"{name} did not move: {first} -> {qs[-1]}"
        if name == "decode_errors":
            assert summary["playout"]["decode_errors"] >= qs[-1]["audio"][name]
    # Published as counted (the summary is taken after, and counters only grow).
    assert summary["playout"]["late_packets"] >= dropped_late
    assert summary["playout"]["decode_errors"] >= decode_errors
    if case.lossless:
        assert all(not q["loss_pct"] for q in qs), [q["loss_pct"] for q in qs]
    keys = ("concealed_frames", "plc_frames", "fec_frames", "decode_errors", "late_packets")
    for key in (*keys, "underruns", "overruns"):
        values = [q["audio"][key] for q in qs]
        assert values == sorted(values), f"{key} went backwards: {values}"
    for marker in CRASH_MARKERS:
        assert marker not in caplog.text, caplog.text[-3000:]


def test_a_timestamp_jump_ahead_within_the_resync_limit_costs_one_overrun() -> None:
    """The push that lands far past `max_ms` moves the buffer's timeline by all of it, so
    the packets after it are contiguous again (no overrun per packet until it catches up)."""
    buf = PlayoutBuffer()
    frame = np.full(960, 1000, dtype=np.int16)
    ts = 0
    for i in range(100):
        if i == 50:
            ts += round(1.9 * RATE)
        buf.push(frame, ts)
        ts += FRAME
        buf.pull()
    stats = buf.stats()
    assert (stats.overruns, stats.resyncs) == (1, 0)
    assert stats.max_depth_ms <= PlayoutSettings().max_ms


def test_a_sequence_jump_is_not_reported_as_loss_but_a_gap_after_an_outage_is() -> None:
    """20000 packets "lost" in a 1 s window: more than a far end can send in that time
    (a renumbering sender); 175 after 3 s of nothing: the outage, seen as a gap."""

    def stats(t_s: float, received: int, lost: int) -> NetworkStats:
        return NetworkStats(at_s=t_s, packets_received=received, packets_lost=lost)

    outages = OutageLoss()
    jumped, _ = outages.adjust(window(stats(0, 50, 0), stats(1, 100, 20000)), media_flowed=True)
    assert (jumped.loss_pct, jumped.packets_lost, outages.renumbered) == (None, 0, 1)
    reports = [stats(1, 100, 20000), stats(2, 100, 20000), stats(3, 100, 20000)]
    reports += [stats(4, 100, 20000), stats(5, 125, 20175)]
    got = [
        outages.adjust(window(a, b), media_flowed=True)[0] for a, b in itertools.pairwise(reports)
    ]
    assert [w.loss_pct for w in got] == [100.0, 100.0, 100.0, 50.0]
    assert outages.renumbered == 1
