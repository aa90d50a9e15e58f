"""The performance reference: two baresip 1.0.0 instances calling each other on 127.0.0.1.

Run alone: .venv/bin/python bench/baresip.py [--window-s 20] [--signal speech|sine]
Used by bench/perf.py, which measures it in the same run as the agent.

Setup (see ../shared/testbed.md, "Reference peer for performance"): no registrar,
`sip:<name>@127.0.0.1:<port>`, Opus mono 32 kbit/s, `aufile` as the source (a stereo
WAV longer than the call: by default the same speech the agent's bench microphone plays,
bench/speech.py; `--signal sine` for the earlier tone sweep) and `aubridge` as a null
player. Never an ALSA file PCM as
the player: baresip busy-loops on it and fills the disk. The callee auto-answers and
loads no UI module; the caller loads `menu` only to take the `/dial` command, with its
once-per-100 ms status line switched off (`statmode_default off`) so it does not cost
CPU. `--secure` runs the media over DTLS-SRTP (the `dtls_srtp` module), as every call of
the agent's does; by default baresip sends plain RTP.
CPU is utime + stime from /proc/<pid>/stat over the window, per endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cpusplit
import speech

TICK = os.sysconf("SC_CLK_TCK")
MODULES = Path("/usr/lib/baresip/modules")


def available() -> bool:
    return shutil.which("baresip") is not None and (MODULES / "aubridge.so").exists()


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kib(pid: int, key: str) -> int:
    """A `Vm*`/`Rss*` line of /proc/<pid>/status, in KiB (0 when missing)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def free_udp_tcp_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (SIP listens on both)."""
    for _ in range(100):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def source_wav(path: Path, seconds: float, signal: str = "speech") -> Path:
    """A stereo 48 kHz WAV of `signal`.

    "speech": the agent's bench microphone signal (bench/speech.py), the same audio
    the agent codes in bench/perf.py. "sine": the earlier reference source, a tone
    sweep with a slow tremolo, which libopus codes for about a third of the CPU.
    """
    if signal == "speech":
        return speech.write_stereo_wav(path, speech.speech_signal(path.parent, seconds))
    if signal != "sine":
        raise ValueError(f"unknown signal {signal!r}")
    subprocess.run(
        [
            "sox",
            "-n",
            "-r",
            "48000",
            "-c",
            "2",
            "-b",
            "16",
            str(path),
            "synth",
            f"{seconds:.0f}",
            "sine",
            "300-900",
            "tremolo",
            "3",
            "60",
            "vol",
            "0.3",
        ],
        check=True,
        capture_output=True,
    )
    return path


def write_instance(
    home: Path, name: str, sip_port: int, rtp_port: int, wav: Path, secure: bool = False
) -> None:
    home.mkdir(parents=True, exist_ok=True)
    # the caller's menu takes the /dial; its once-per-100 ms status line is switched off
    ui = "module_app menu.so\nstatmode_default off\n" if name == "caller" else ""
    # DTLS-SRTP, as a WebRTC endpoint must run it (baresip's default is plain RTP)
    enc = "module dtls_srtp.so\n" if secure else ""
    (home / "config").write_text(
        f"""poll_method epoll
sip_listen 127.0.0.1:{sip_port}
net_interface 127.0.0.1
call_local_timeout 120
call_max_calls 4
audio_player aubridge,nil
audio_source aufile,{wav}
audio_alert aubridge,nil
ausrc_srate 48000
auplay_srate 48000
ausrc_channels 2
auplay_channels 2
audio_level no
rtp_ports {rtp_port}-{rtp_port + 3}
rtp_stats no
jitter_buffer_delay 5-10
module_path {MODULES}
module opus.so
module aufile.so
module aubridge.so
{enc}module_app account.so
{ui}opus_bitrate 32000
opus_stereo no
opus_sprop_stereo no
"""
    )
    (home / "accounts").write_text(
        f"<sip:{name}@127.0.0.1:{sip_port}>;regint=0;answermode=auto;audio_codecs=opus/48000/2"
        + (";mediaenc=dtls_srtp" if secure else "")
        + "\n"
    )
    (home / "contacts").write_text("")


@dataclass
class BaresipPair:
    caller: subprocess.Popen[bytes]
    callee: subprocess.Popen[bytes]
    caller_log: Path
    callee_log: Path
    secure: bool = False

    def established(self) -> bool:
        text = self.caller_log.read_text(errors="replace") + self.callee_log.read_text(
            errors="replace"
        )
        if self.secure and text.count("DTLS-SRTP complete (audio/RTP)") < 2:
            return False
        return text.count("Call established") >= 2


def _rtp_ports() -> tuple[int, int]:
    # Two disjoint 4-port ranges from the ephemeral area; collisions are retried by baresip.
    base = free_udp_tcp_port() // 8 * 8
    return base, base + 4


@contextlib.contextmanager
def baresip_pair(
    tmp: Path, call_s: float, signal: str = "speech", secure: bool = False
) -> Iterator[BaresipPair]:
    """Two baresip processes in a call with each other for up to `call_s` seconds."""
    wav = source_wav(tmp / "source.wav", call_s + 30, signal)
    caller_port, callee_port = free_udp_tcp_port(), free_udp_tcp_port()
    rtp_a, rtp_b = _rtp_ports()
    write_instance(tmp / "caller", "caller", caller_port, rtp_a, wav, secure)
    write_instance(tmp / "callee", "callee", callee_port, rtp_b, wav, secure)
    logs = tmp / "caller.log", tmp / "callee.log"
    with open(logs[1], "wb") as out:
        callee = subprocess.Popen(
            ["baresip", "-4", "-f", str(tmp / "callee")],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    caller = None
    try:
        deadline = time.monotonic() + 10
        while "baresip is ready" not in logs[1].read_text(errors="replace"):
            if time.monotonic() > deadline or callee.poll() is not None:
                raise RuntimeError(f"baresip callee did not start: {logs[1].read_text()[-2000:]}")
            time.sleep(0.05)
        with open(logs[0], "wb") as out:
            caller = subprocess.Popen(
                [
                    "baresip",
                    "-4",
                    "-f",
                    str(tmp / "caller"),
                    "-e",
                    f"/dial sip:callee@127.0.0.1:{callee_port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        pair = BaresipPair(caller, callee, *logs, secure=secure)
        deadline = time.monotonic() + 15
        while not pair.established():
            if time.monotonic() > deadline or caller.poll() is not None:
                raise RuntimeError(f"baresip call failed: {logs[0].read_text()[-2000:]}")
            time.sleep(0.05)
        yield pair
    finally:
        for proc in (caller, callee):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@dataclass(frozen=True)
class BaresipResult:
    cpu_ms_per_call_s: tuple[float, float]  # caller, callee
    rss_mib: tuple[float, float]
    window_s: float
    splits: tuple[cpusplit.Split, ...] = ()  # with `perf_dir`: caller, callee by library

    @property
    def per_endpoint_ms(self) -> float:
        return sum(self.cpu_ms_per_call_s) / 2


def measure(
    window_s: float = 20.0,
    settle_s: float = 4.0,
    perf_dir: Path | None = None,
    signal: str = "speech",
    secure: bool = False,
) -> BaresipResult:
    """CPU ms per call-second of each endpoint over `window_s`, after `settle_s` of media.

    Both endpoints send `signal` (see `source_wav`); with `secure`, the media runs over
    DTLS-SRTP as the agent's does (and the call must say so in both logs).
    With `perf_dir`, both endpoints are also sampled with Linux perf over the same
    window and the result carries their CPU by library (bench/cpusplit.py).
    """
    with tempfile.TemporaryDirectory(prefix="bench-baresip-") as d:
        with baresip_pair(Path(d), settle_s + window_s + 10, signal, secure) as pair:
            time.sleep(settle_s)  # media starts ~3 s after the 200 OK in 1.0.0's aufile
            pids = (pair.caller.pid, pair.callee.pid)
            recs = (
                [
                    cpusplit.Recording(pid, perf_dir / f"baresip-{name}.data", f"baresip {name}")
                    for pid, name in zip(pids, ("caller", "callee"), strict=True)
                ]
                if perf_dir is not None
                else []
            )
            for rec in recs:
                rec.enable()
            c0, w0 = [cpu_s(p) for p in pids], time.monotonic()
            time.sleep(window_s)
            c1, w1 = [cpu_s(p) for p in pids], time.monotonic()
            for rec in recs:
                rec.stop()
            rss = tuple(status_kib(p, "VmRSS") / 1024 for p in pids)
            if any(p.poll() is not None for p in (pair.caller, pair.callee)):
                raise RuntimeError("baresip call ended during the window")
        wall = w1 - w0
        per = tuple((b - a) * 1000 / wall for a, b in zip(c0, c1, strict=True))
        splits = tuple(rec.split(wall) for rec in recs)
        return BaresipResult((per[0], per[1]), (rss[0], rss[1]), wall, splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument(
        "--signal",
        choices=("speech", "sine"),
        default="speech",
        help="what both endpoints send (default: the agent bench's speech)",
    )
    parser.add_argument("--secure", action="store_true", help="media over DTLS-SRTP")
    args = parser.parse_args()
    if not available():
        raise SystemExit("baresip-core is not installed")
    r = measure(args.window_s, signal=args.signal, secure=args.secure)
    media = "DTLS-SRTP" if args.secure else "plain RTP"
    print(
        f"baresip 1.0.0 ({args.signal}, {media}), {r.window_s:.1f} s window: "
        f"caller {r.cpu_ms_per_call_s[0]:.1f}, "
        f"callee {r.cpu_ms_per_call_s[1]:.1f} ms CPU per call-second "
        f"(per endpoint {r.per_endpoint_ms:.1f}); RSS {r.rss_mib[0]:.1f} / {r.rss_mib[1]:.1f} MiB"
    )


if __name__ == "__main__":
    main()
