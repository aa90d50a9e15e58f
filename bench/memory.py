"""Memory floor: what a process costs with each layer of imports, and a raw aiortc call.

Run: .venv/bin/python bench/memory.py [--media-s 5]

Each row is a fresh interpreter (same venv), measured from /proc/<pid>/smaps_rollup:
RSS, USS (private pages) and PSS. The import rows show what the agent cannot go below
while it uses aiortc, PyAV and numpy; `raw aiortc call` is a process holding one
RTCPeerConnection in a connected call on 127.0.0.1 (aiortc's own Opus encoder on a
440 Hz tone, inbound audio decoded and dropped) against a peer in this process, measured
after `--media-s` seconds of media. Compare with bench/perf.py's in-call agent row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = textwrap.dedent(
    """
    def _mem():
        d = {}
        for line in open("/proc/self/smaps_rollup"):
            p = line.split()
            if len(p) >= 2 and p[1].isdigit():
                d[p[0]] = int(p[1]) / 1024
        return {"rss": d["Rss:"], "uss": d["Private_Clean:"] + d["Private_Dirty:"],
                "pss": d["Pss:"], "modules": len(__import__("sys").modules)}
    """
)

LAYERS = [
    ("bare python", ""),
    ("import aiortc", "import aiortc"),
    ("import aiortc, numpy", "import aiortc, numpy"),
    ("import edgeagent.agent", "import edgeagent.agent"),
]

RAW_CALL = MEASURE + textwrap.dedent(
    """
    import asyncio, fractions, json, sys
    import numpy as np
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
    from av import AudioFrame

    class Tone(AudioStreamTrack):
        def __init__(self):
            super().__init__()
            self.n = 0
            self.pcm = (np.sin(2 * np.pi * 440 * np.arange(960) / 48000) * 8000).astype(np.int16)

        async def recv(self):
            frame = await super().recv()  # paces at 20 ms, returns silence of the right shape
            f = AudioFrame.from_ndarray(self.pcm.reshape(1, -1), format="s16", layout="mono")
            f.sample_rate, f.pts, f.time_base = 48000, frame.pts, fractions.Fraction(1, 48000)
            return f

    async def main():
        pc = RTCPeerConnection()
        received = 0

        @pc.on("track")
        def on_track(track):
            async def drain():
                nonlocal received
                try:
                    while True:
                        await track.recv()
                        received += 1
                except MediaStreamError:  # the track ends when the call closes
                    pass
            asyncio.ensure_future(drain())

        pc.addTrack(Tone())
        offer = await pc.createOffer()
        # Loopback only (the network rule): aioice's own choice is every address but lo.
        from edgeagent.call.ice import restrict_host_addresses
        restrict_host_addresses(pc, ["127.0.0.1"])
        await pc.setLocalDescription(offer)
        print(json.dumps({"sdp": pc.localDescription.sdp}), flush=True)
        answer = json.loads(await asyncio.to_thread(sys.stdin.readline))
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        media_s = float(sys.argv[1])
        await asyncio.sleep(media_s)
        out = _mem()
        out["frames_received"] = received
        print(json.dumps(out), flush=True)
        await pc.close()

    asyncio.run(main())
    """
)


def layer(code: str) -> dict[str, float]:
    script = MEASURE + code + "\nimport json; print(json.dumps(_mem()))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def raw_call(media_s: float) -> dict[str, float]:
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaBlackhole
    from aiortc.mediastreams import AudioStreamTrack

    from edgeagent.call.ice import restrict_host_addresses

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RAW_CALL,
        str(media_s),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    offer = json.loads(await proc.stdout.readline())
    pc = RTCPeerConnection()
    hole = MediaBlackhole()

    @pc.on("track")
    def on_track(track: object) -> None:
        hole.addTrack(track)  # type: ignore[arg-type]

    pc.addTrack(AudioStreamTrack())  # silence back, Opus-encoded by aiortc
    await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
    answer = await pc.createAnswer()
    restrict_host_addresses(pc, ["127.0.0.1"])  # loopback only, as the offer
    await pc.setLocalDescription(answer)
    await hole.start()
    proc.stdin.write((json.dumps({"sdp": pc.localDescription.sdp}) + "\n").encode())
    await proc.stdin.drain()
    result: dict[str, float] = json.loads(await proc.stdout.readline())
    await proc.wait()
    await hole.stop()
    await pc.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media-s", type=float, default=5.0)
    args = parser.parse_args()
    rows = [(name, layer(code)) for name, code in LAYERS]
    call = asyncio.run(raw_call(args.media_s))
    rows.append((f"raw aiortc call ({call.pop('frames_received'):.0f} frames in)", call))
    print(f"{'process':40} {'RSS MiB':>8} {'USS MiB':>8} {'PSS MiB':>8} {'modules':>8}")
    for name, m in rows:
        print(f"{name:40} {m['rss']:8.1f} {m['uss']:8.1f} {m['pss']:8.1f} {m['modules']:8.0f}")


if __name__ == "__main__":
    main()
