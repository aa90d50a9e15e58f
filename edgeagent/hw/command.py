"""Running a device helper command (vcgencmd, mmcli, timedatectl) within hard bounds.

A helper that hangs, floods its output or forks must cost one reading, not the sampler:
the command gets a deadline and an output cap, runs in its own process group, and the
whole group is killed when it times out, overflows, or exits (a wrapper script's
children cannot outlive it). Blocking: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

logger = logging.getLogger(__name__)

_CHUNK = 65536
_REAP_S = 1.0  # after SIGKILL; only a process stuck in the kernel (D state) takes longer


class CommandError(Exception):
    """The command could not start, did not finish in time, or printed too much."""


@dataclass(frozen=True)
class Finished:
    returncode: int  # negative: killed by that signal
    stdout: str  # decoded leniently: a helper printing binary is bad output, not a crash
    stderr: str


def run(argv: Sequence[str], *, timeout_s: float, max_bytes: int) -> Finished:
    """Run `argv` to completion; `CommandError` if it outlasts `timeout_s` or writes more
    than `max_bytes` to stdout or stderr. Never leaves a process of its group behind."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed whole below
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise CommandError(f"cannot start: {exc}") from exc
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        out, err = _collect(proc, proc.stdout, proc.stderr, timeout_s, max_bytes)
    finally:
        # The leader is not reaped yet, so its pid still names its group: kill stragglers.
        _kill_group(proc.pid)
        proc.stdout.close()
        proc.stderr.close()
        try:
            proc.wait(_REAP_S)
        except subprocess.TimeoutExpired:  # Popen reaps it later, when it can
            logger.warning("command %s: pid %d not gone after SIGKILL", argv[0], proc.pid)
    return Finished(
        proc.returncode,
        out.decode("utf-8", errors="replace"),
        err.decode("utf-8", errors="replace"),
    )


def _collect(
    proc: subprocess.Popen[bytes],
    stdout: IO[bytes],
    stderr: IO[bytes],
    timeout_s: float,
    max_bytes: int,
) -> tuple[bytes, bytes]:
    """Read both pipes until the leader has exited and they are closed."""
    deadline = time.monotonic() + timeout_s
    bufs = {stdout.fileno(): bytearray(), stderr.fileno(): bytearray()}
    open_fds = set(bufs)
    pidfd = _pidfd(proc.pid)
    exited = False
    with selectors.DefaultSelector() as sel, contextlib.ExitStack() as stack:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if pidfd is not None:
            stack.callback(os.close, pidfd)
            sel.register(pidfd, selectors.EVENT_READ)
        while open_fds or not exited:
            if pidfd is None and not exited and _has_exited(proc.pid):
                exited = True
                _kill_group(proc.pid)  # what it left running would hold the pipes open
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandError(f"no answer in {timeout_s:g} s")
            # Without a pidfd (kernels before 5.3) the leader's exit is polled.
            wait = left if pidfd is not None or exited else min(left, 0.05)
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd == pidfd:
                    sel.unregister(fd)
                    exited = True
                    _kill_group(proc.pid)  # what it left running would hold the pipes open
                    continue
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    continue
                bufs[fd] += chunk
                if len(bufs[fd]) > max_bytes:
                    raise CommandError(f"more than {max_bytes} bytes of output")
    return bytes(bufs[stdout.fileno()]), bytes(bufs[stderr.fileno()])


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _has_exited(pid: int) -> bool:
    """True once `pid` has exited; it stays unreaped (a zombie still owns its group id)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
