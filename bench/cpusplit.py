"""Where a process's CPU goes, by library: Linux `perf` sampling grouped by shared object.

Used by `bench/perf.py --perf` on the agent and on both baresip endpoints over the same
CPU windows, so the two can be compared library by library (libopus in each, the
interpreter, the kernel). py-spy names Python functions but cannot weigh native code
against Python fairly on this machine (see docs/profile.md); perf's `cpu-clock` event
samples whatever is on the CPU, native and kernel alike, and works in a VM without a PMU.

Each sample stands for 1/FREQ s of CPU, so samples / FREQ / window gives ms of CPU per
second for each group. Python 3.11 has no perf trampolines, so all Python code shows as
the interpreter (`libpython`): that row is the Python cost as a whole.
"""

from __future__ import annotations

import functools
import os
import re
import select
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

FREQ = 999
PERF = shutil.which("perf")

# (group, pattern on the mapped file's full path); the first match wins.
GROUPS: tuple[tuple[str, str], ...] = (
    ("Python interpreter (all Python code)", r"libpython|/python3\.\d+$"),
    ("AEC3 (pywebrtc_audio)", r"webrtc_audio"),
    ("libopus", r"libopus"),
    ("kernel", r"\[kernel|\[vdso\]"),
    ("numpy / scipy", r"/numpy|/scipy|openblas"),
    ("event loop (uvloop, _asyncio, selectors)", r"uvloop|_asyncio|select\.cpython"),
    ("SRTP (pylibsrtp, libsrtp)", r"pylibsrtp|libsrtp"),
    ("TLS and crypto (OpenSSL, cryptography)", r"cryptography|libssl|libcrypto|_ssl\."),
    ("PyAV and FFmpeg", r"/av/|/av\.libs/|libav|libswresample"),
    ("ALSA (alsa-lib, pyalsaaudio)", r"libasound|alsaaudio"),
    ("libc, libm, libstdc++", r"libc\.so|libm\.so|libstdc\+\+|libgcc|ld-linux"),
    ("baresip and libre", r"baresip|libre\.so|librem|/modules/"),
)


@functools.cache
def available() -> bool:
    """True when `perf record` works here: installed for this kernel, and allowed to sample
    (a container may forbid perf_event_open whatever the user). Tried once, on `true`."""
    if PERF is None:
        return False
    try:
        probe = subprocess.run(
            [PERF, "record", "-q", "-e", "cpu-clock", "-o", os.devnull, "--", "true"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def group_of(dso: str, paths: dict[str, str]) -> str:
    """The group of a perf DSO name, matched on its full mapped path where known."""
    full = paths.get(dso, dso)
    for name, pattern in GROUPS:
        if re.search(pattern, full):
            return name
    return "other"


def mapped_paths(pid: int) -> dict[str, str]:
    """Basename -> full path of every file `pid` has mapped (perf reports basenames)."""
    out: dict[str, str] = {}
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            out.setdefault(Path(parts[5]).name, parts[5])
    return out


@dataclass
class Split:
    """CPU of one process over one window, ms per second by group (largest first)."""

    label: str
    window_s: float
    samples: int
    groups: list[tuple[str, float]]

    @property
    def total_ms(self) -> float:
        return sum(ms for _, ms in self.groups)

    def ms(self, group: str) -> float:
        return next((ms for name, ms in self.groups if name == group), 0.0)


class Recording:
    """`perf record` attached to one process, sampling from `enable()` until `stop()`.

    perf starts with its events off (`-D -1`) and is switched on through its control
    pipe, which acknowledges: sampling covers the caller's CPU window exactly, however
    long perf took to attach.
    """

    def __init__(self, pid: int, out: Path, label: str) -> None:
        if PERF is None:
            raise RuntimeError("perf is not installed")
        self.pid, self.out, self.label = pid, out, label
        self.paths = mapped_paths(pid)
        ctl_r, self._ctl = os.pipe()
        self._ack, ack_w = os.pipe()
        sampling = ["-e", "cpu-clock", "-F", str(FREQ), "-D", "-1"]  # -D -1: starts off
        control = ["--control", f"fd:{ctl_r},{ack_w}"]
        self._proc = subprocess.Popen(
            [PERF, "record", "-q", *sampling, *control, "-p", str(pid), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(ctl_r, ack_w),
        )
        os.close(ctl_r)
        os.close(ack_w)

    def enable(self, timeout_s: float = 10.0) -> None:
        """Start sampling; returns once perf has acknowledged."""
        os.write(self._ctl, b"enable\n")
        ready, _, _ = select.select([self._ack], [], [], timeout_s)
        if not ready or not os.read(self._ack, 64).startswith(b"ack"):
            self._proc.kill()
            raise RuntimeError(f"perf did not start sampling pid {self.pid}")

    def stop(self) -> None:
        """Stop sampling (SIGINT makes perf write its file and exit)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._ctl, self._ack):
            os.close(fd)
        self.paths.update(mapped_paths(self.pid))

    def split(self, window_s: float) -> Split:
        """Samples per shared object, grouped, as ms of CPU per second of `window_s`."""
        assert PERF is not None
        report = subprocess.run(
            [
                PERF,
                "report",
                "-i",
                str(self.out),
                "--sort",
                "dso",
                "-n",
                "--stdio",
                "--no-children",
                "-g",
                "none",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        per: dict[str, int] = {}
        for line in report.splitlines():
            m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(.+?)\s*$", line)
            if m is None:
                continue
            group = group_of(m.group(2), self.paths)
            per[group] = per.get(group, 0) + int(m.group(1))
        samples = sum(per.values())
        groups = sorted(
            ((g, n * 1000.0 / FREQ / window_s) for g, n in per.items()), key=lambda x: -x[1]
        )
        return Split(self.label, window_s, samples, groups)


def print_splits(splits: list[Split]) -> None:
    """One row per group, one column per process: ms of CPU per second."""
    names: list[str] = []
    for s in splits:
        names += [g for g, _ in s.groups if g not in names]
    width = max(len(n) for n in [*names, "group"]) + 2
    print(
        f"{'CPU by library, ms per s (perf cpu-clock)':<{width}}"
        + "".join(f"{s.label:>16}" for s in splits)
    )
    for name in names:
        print(f"  {name:<{width - 2}}" + "".join(f"{s.ms(name):>16.1f}" for s in splits))
    print(f"  {'total sampled':<{width - 2}}" + "".join(f"{s.total_ms:>16.1f}" for s in splits))
