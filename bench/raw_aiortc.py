"""Stock aiortc as a second reference: two endpoints calling each other on 127.0.0.1.

Run alone: .venv/bin/python bench/raw_aiortc.py [--window-s 20]
Used by bench/perf.py, which measures it in the same run as the agent and baresip.

What an aiortc user gets with nothing added: each endpoint is its own process with one
`RTCPeerConnection`, sends the bench speech (the stereo WAV baresip's `aufile` plays,
bench/baresip.py) through aiortc's `MediaPlayer`, and consumes what it receives with
`MediaBlackhole` (decoded and dropped, as baresip's `aubridge` null player does). The
codec, jitter buffer, decoder thread and sender are aiortc 1.16's own: Opus at its fixed
96 kbit/s stereo, over DTLS-SRTP as every aiortc call is. The one change is the host
address list (loopback only, the network rule), made through the agent's
`restrict_host_addresses`. No echo canceller, no checks, no statistics.
CPU is utime + stime from /proc/<pid>/stat over the window, per endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import baresip

ROOT = Path(__file__).resolve().parent.parent


async def peer(role: str, wav: Path) -> None:
    """One endpoint, signalling over stdin/stdout (JSON lines); runs until stdin closes."""
    from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaBlackhole, MediaPlayer
    from av.frame import Frame
    from av.packet import Packet

    from edgeagent.call.ice import restrict_host_addresses

    pc = RTCPeerConnection()
    hole = MediaBlackhole()
    received = 0
    player = MediaPlayer(str(wav))
    connected = asyncio.Event()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        hole.addTrack(track)
        # Count what MediaBlackhole drains: the call must carry audio both ways.
        inner = track.recv

        async def counted() -> Frame | Packet[Any]:
            nonlocal received
            frame = await inner()
            received += 1
            return frame

        track.recv = counted  # type: ignore[method-assign]

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected":
            connected.set()

    assert player.audio is not None
    pc.addTrack(player.audio)

    async def line() -> dict[str, str]:
        text = await asyncio.to_thread(sys.stdin.readline)
        if not text:
            raise SystemExit(0)
        result: dict[str, str] = json.loads(text)
        return result

    def say(obj: dict[str, str]) -> None:
        print(json.dumps(obj), flush=True)

    if role == "offer":
        offer = await pc.createOffer()
        restrict_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(offer)
        say({"sdp": pc.localDescription.sdp})
        remote = await line()
        await pc.setRemoteDescription(RTCSessionDescription(remote["sdp"], "answer"))
    else:
        remote = await line()
        await pc.setRemoteDescription(RTCSessionDescription(remote["sdp"], "offer"))
        answer = await pc.createAnswer()
        restrict_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(answer)
        say({"sdp": pc.localDescription.sdp})
    await hole.start()
    await asyncio.wait_for(connected.wait(), 20)
    say({"state": "connected"})
    await asyncio.to_thread(sys.stdin.readline)  # until the bench closes stdin
    await hole.stop()
    await pc.close()
    say({"frames_received": str(received)})


@dataclass(frozen=True)
class RawResult:
    cpu_ms_per_call_s: tuple[float, float]  # offerer, answerer
    rss_mib: tuple[float, float]
    window_s: float
    frames_received: tuple[int, int]  # decoded 20 ms frames, whole call

    @property
    def per_endpoint_ms(self) -> float:
        return sum(self.cpu_ms_per_call_s) / 2


def _pipes(p: subprocess.Popen[str]) -> tuple[IO[str], IO[str]]:
    if p.stdin is None or p.stdout is None:
        raise RuntimeError("endpoint started without pipes")
    return p.stdin, p.stdout


def _relay(src: subprocess.Popen[str], dst: subprocess.Popen[str]) -> None:
    """One signalling line from `src` to `dst`."""
    line = _pipes(src)[1].readline()
    if not line:
        raise RuntimeError("a stock aiortc endpoint ended before signalling")
    dst_in = _pipes(dst)[0]
    dst_in.write(line)
    dst_in.flush()


def measure(window_s: float = 20.0, settle_s: float = 3.0) -> RawResult:
    """CPU ms per call-second of each stock aiortc endpoint over `window_s` of speech."""
    with tempfile.TemporaryDirectory(prefix="bench-aiortc-") as d:
        wav = baresip.source_wav(Path(d) / "speech.wav", settle_s + window_s + 30)
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--peer", role, "--wav", str(wav)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for role in ("offer", "answer")
        ]
        offerer, answerer = procs
        try:
            _relay(offerer, answerer)  # the offer
            _relay(answerer, offerer)  # the answer
            for p in procs:
                state = json.loads(_pipes(p)[1].readline() or "{}")
                if state.get("state") != "connected":
                    raise RuntimeError("stock aiortc endpoints did not connect")
            time.sleep(settle_s)
            pids = [p.pid for p in procs]
            c0, w0 = [baresip.cpu_s(p) for p in pids], time.monotonic()
            time.sleep(window_s)
            c1, w1 = [baresip.cpu_s(p) for p in pids], time.monotonic()
            rss = tuple(baresip.status_kib(p, "VmRSS") / 1024 for p in pids)
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a stock aiortc endpoint ended during the window")
            for p in procs:
                _pipes(p)[0].close()
            frames = tuple(
                int(json.loads(_pipes(p)[1].readline() or "{}").get("frames_received", 0))
                for p in procs
            )
            if min(frames) < window_s * 40:  # 50 a second: the audio must flow both ways
                raise RuntimeError(f"stock aiortc call carried too little audio: {frames}")
        finally:
            for p in procs:
                if p.stdin is not None and not p.stdin.closed:
                    p.stdin.close()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        wall = w1 - w0
        per = tuple((b - a) * 1000 / wall for a, b in zip(c0, c1, strict=True))
        return RawResult((per[0], per[1]), (rss[0], rss[1]), wall, (frames[0], frames[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--peer", choices=("offer", "answer"), help=argparse.SUPPRESS)
    parser.add_argument("--wav", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer is not None:
        asyncio.run(peer(args.peer, args.wav))
        return
    r = measure(args.window_s)
    print(
        f"stock aiortc 1.16 (speech, DTLS-SRTP), {r.window_s:.1f} s window: "
        f"offerer {r.cpu_ms_per_call_s[0]:.1f}, answerer {r.cpu_ms_per_call_s[1]:.1f} ms CPU "
        f"per call-second (per endpoint {r.per_endpoint_ms:.1f}); "
        f"RSS {r.rss_mib[0]:.1f} / {r.rss_mib[1]:.1f} MiB; "
        f"frames received {r.frames_received[0]} / {r.frames_received[1]}"
    )


if __name__ == "__main__":
    main()
