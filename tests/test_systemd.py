"""sd_notify through a test-owned socket, the loop-health watchdog, journald fields, the unit."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.clock import FakeClock, SystemClock
from edgeagent.health.watchdog import Watchdog
from edgeagent.hw.systemd import (
    FieldsFormatter,
    journal_fields,
    journal_handler,
    notify,
    watchdog_interval_s,
)

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edgeagent.service"


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, with NOTIFY_SOCKET pointing at it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


async def receive(sock: socket.socket, wait_s: float = 2.0) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), wait_s)


def pending(sock: socket.socket) -> list[bytes]:
    """Everything already queued on the socket, without waiting."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


class Recorder:
    """A notify function that remembers when each message was sent, then really sends it."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []

    def __call__(self, state: str) -> bool:
        self.sent.append((time.monotonic(), state))
        return notify(state)

    def pings(self) -> list[float]:
        return [t for t, s in self.sent if s == "WATCHDOG=1"]


@contextlib.asynccontextmanager
async def running(wd: Watchdog) -> Any:
    task = asyncio.create_task(wd.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- sd_notify --------------------------------------------------------------------


def test_notify_without_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


@pytest.mark.parametrize("where", ["/run/no/such/notify", "@no-such-abstract-socket"])
def test_notify_to_a_socket_that_is_not_there_returns_false(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A stale NOTIFY_SOCKET (a unit file copied by hand, a test runner) used to raise out
    of the first STATUS= and stop the agent."""
    monkeypatch.setenv("NOTIFY_SOCKET", where)
    assert notify("STATUS=idle") is False
    assert notify("WATCHDOG=1") is False


async def test_ready_status_stopping_arrive_exactly(notify_socket: socket.socket) -> None:
    wd = Watchdog(notify, None, SystemClock())
    assert wd.ready() is True
    assert await receive(notify_socket) == b"READY=1"
    assert wd.set_status("in call c1\n  quality good") is True
    assert await receive(notify_socket) == b"STATUS=in call c1 quality good"
    assert wd.stopping() is True
    assert await receive(notify_socket) == b"STOPPING=1"
    assert pending(notify_socket) == []


async def test_watchdog_pings_periodically(notify_socket: socket.socket) -> None:
    rec = Recorder()
    wd = Watchdog(rec, 0.1, SystemClock())
    assert wd.period_s == pytest.approx(0.05)
    async with running(wd):
        got = [await receive(notify_socket) for _ in range(5)]
    assert got == [b"WATCHDOG=1"] * 5
    pings = rec.pings()
    gaps = [b - a for a, b in itertools.pairwise(pings)][:4]
    assert all(g >= 0.045 for g in gaps), gaps  # never faster than the period


async def test_blocked_loop_skips_the_ping_then_resumes(
    notify_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    period = 0.1
    wd = Watchdog(rec, 2 * period, SystemClock(), max_lag_s=0.1)
    caplog.set_level(logging.INFO, logger="edgeagent.health.watchdog")
    async with running(wd):
        for _ in range(2):
            assert await receive(notify_socket) == b"WATCHDOG=1"
        pending(notify_socket)
        blocked_from = time.monotonic()
        time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point of this test
        blocked_until = time.monotonic()
        # The next ping comes, but only after a full healthy period past the stall.
        assert await receive(notify_socket) == b"WATCHDOG=1"
        for _ in range(2):
            assert await receive(notify_socket) == b"WATCHDOG=1"
    assert wd.skipped >= 1
    assert wd.max_lag_seen_s >= 0.3
    after = [t for t in rec.pings() if t >= blocked_from]
    assert after[0] >= blocked_until + period, after[0] - blocked_until
    assert len(after) >= 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ping skipped" in r.getMessage() for r in warnings)
    assert any("pings resumed" in r.getMessage() for r in caplog.records)


class StallingClock:
    """A FakeClock whose monotonic time can jump, as if the loop had been blocked."""

    def __init__(self) -> None:
        self.fake = FakeClock()
        self.offset = 0.0

    def monotonic(self) -> float:
        return self.fake.monotonic() + self.offset

    def time(self) -> float:
        return self.fake.time() + self.offset

    async def sleep(self, seconds: float) -> None:
        await self.fake.sleep(seconds)

    def stall(self, seconds: float) -> None:
        self.offset += seconds


async def test_watchdog_on_fake_clock_pings_every_half_interval_and_skips_stalls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[str] = []

    def record(state: str) -> bool:
        sent.append(state)
        return True

    clock = StallingClock()
    wd = Watchdog(record, 20.0, clock)  # WatchdogSec=20: ping every 10 s, max lag 10 s
    caplog.set_level(logging.DEBUG, logger="edgeagent.health.watchdog")
    async with running(wd):
        await clock.fake.advance(0)
        assert sent == ["WATCHDOG=1"]  # at once on start
        await clock.fake.advance(30)
        assert wd.pings == 4
        # The loop "blocks" for 11 s twice in a row: two periods skipped, one WARNING.
        await clock.fake.advance(5)
        clock.stall(11)
        await clock.fake.advance(5)
        await clock.fake.advance(5)
        clock.stall(11)
        await clock.fake.advance(5)
        assert (wd.pings, wd.skipped) == (4, 2)
        await clock.fake.advance(10)
        assert (wd.pings, wd.skipped) == (5, 2)
    # Start-up line, one WARNING for the stall, DEBUG for its repeat, INFO on recovery.
    assert [r.levelname for r in caplog.records if r.name == "edgeagent.health.watchdog"] == [
        "INFO",
        "WARNING",
        "DEBUG",
        "INFO",
    ]


async def test_watchdog_without_interval_returns_at_once() -> None:
    wd = Watchdog(lambda s: True, None, FakeClock())
    await asyncio.wait_for(wd.run(), 1)
    assert wd.pings == 0


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 20.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1234"}, 20.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "999"}, None),  # our parent's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_from_environment(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env, pid=1234) == expected


# --- journald --------------------------------------------------------------------


def test_journal_handler_only_under_systemd() -> None:
    assert journal_handler(environ={}) is None
    assert journal_handler(environ={"JOURNAL_STREAM": "8:1234"}) is not None
    assert journal_handler(environ={"INVOCATION_ID": "abc"}) is not None


def test_journal_handler_sends_message_priority_and_uppercase_extras() -> None:
    entries: list[dict[str, Any]] = []

    def sender(MESSAGE: str, **fields: Any) -> None:
        entries.append({"MESSAGE": MESSAGE, **fields})

    handler = journal_handler(sender, environ={"INVOCATION_ID": "abc"})
    assert handler is not None
    log = logging.getLogger("edgeagent.test.journal")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        log.warning("call %s: media stalled", "c-1", extra={"CALL_ID": "c-1", "PEER_ID": 7})
        log.info("plain line", extra={"lower": "dropped", "_TRUSTED": "dropped"})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    first, second = entries
    assert first["MESSAGE"] == "call c-1: media stalled"
    assert first["PRIORITY"] == "4"
    assert first["CALL_ID"] == "c-1"
    assert first["PEER_ID"] == "7"
    assert first["SYSLOG_IDENTIFIER"] == "edgeagent"
    assert first["LOGGER"] == "edgeagent.test.journal"
    assert second["PRIORITY"] == "6"
    assert "CALL_ID" not in second
    for entry in entries:  # only valid journal field names go out
        assert all(k.isupper() and not k.startswith("_") for k in entry), entry


def test_fields_show_on_stderr_too() -> None:
    record = logging.LogRecord("edgeagent.call", logging.INFO, __file__, 1, "call up", (), None)
    record.CALL_ID = "c-9"
    assert journal_fields(record) == {"CALL_ID": "c-9"}
    assert FieldsFormatter("%(message)s").format(record) == "call up CALL_ID=c-9"


# --- the unit file -----------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a systemd unit as ordered (key, value) lists (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {line}"
        assert not line.endswith("\\"), "continuation lines not expected"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def test_unit_file_essentials() -> None:
    unit = parse_unit(UNIT.read_text())
    svc = unit["Service"]

    def one(key: str) -> str:
        found = values(svc, key)
        assert len(found) == 1, (key, found)
        return found[0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == (
        "/opt/edgeagent/venv/bin/edgeagent run --config /etc/edgeagent/edgeagent.toml"
    )
    assert one("WatchdogSec") == "20"
    assert one("Restart") == "on-failure"
    assert "78" in one("RestartPreventExitStatus").split()
    assert one("User") == "edgeagent"
    assert set(one("SupplementaryGroups").split()) >= {"audio", "gpio"}
    assert one("StateDirectory") == "edgeagent"
    assert one("WorkingDirectory") == "/var/lib/edgeagent"  # lgpio writes its pipes here
    assert one("ProtectSystem") == "strict"
    assert one("NoNewPrivileges") == "yes"
    assert one("DevicePolicy") == "closed"
    # PrivateDevices=yes would hide /dev/snd and the GPIO chip.
    assert values(svc, "PrivateDevices") in ([], ["no"], ["false"])
    allowed = values(svc, "DeviceAllow")
    assert "char-alsa rw" in allowed
    assert "/dev/gpiochip0 rw" in allowed
    assert any(a.startswith("/dev/gpiomem") for a in allowed)
    creds = [c.split(":")[0] for c in values(svc, "LoadCredential")]
    assert "operator-keys.json" in creds
    families = set(one("RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    # Start limits belong to [Unit]; in [Service] modern systemd ignores them.
    assert values(unit["Unit"], "StartLimitIntervalSec") == ["300"]
    assert values(unit["Unit"], "StartLimitBurst") == ["10"]
    assert not values(svc, "StartLimitBurst")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_file_verifies_cleanly(tmp_path: Path) -> None:
    # The real ExecStart does not exist on a test machine; everything else is checked as is.
    text = UNIT.read_text()
    lines = [
        line.split("=", 1)[0] + "=/bin/true"
        if line.startswith(("ExecStart=", "ExecStopPost="))
        else line
        for line in text.splitlines()
    ]
    unit = tmp_path / "edgeagent.service"
    unit.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # unknown keys only warn, so fail on any output


def test_exec_stop_post_records_why_systemd_stopped_the_agent(tmp_path: Path) -> None:
    """The unit's ExecStopPost runs `edgeagent record-stop` on the state directory, and that
    command writes systemd's result where the next start's crash guard reads it."""
    unit = parse_unit(UNIT.read_text())
    svc = unit["Service"]
    (post,) = values(svc, "ExecStopPost")
    state = "/var/lib/" + values(svc, "StateDirectory")[0]
    assert post.split()[1:] == ["record-stop", "--state-dir", state]
    env = {**os.environ, "SERVICE_RESULT": "watchdog", "EXIT_CODE": "dumped", "EXIT_STATUS": "ABRT"}
    done = subprocess.run(
        [sys.executable, "-m", "edgeagent", "record-stop", "--state-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "watchdog" in done.stdout
    record = json.loads((tmp_path / "last_stop.json").read_text())
    assert (record["reason"], record["exit_status"]) == ("watchdog", "ABRT")
    env["SERVICE_RESULT"] = "success"  # a clean stop wrote its own record: nothing here
    (tmp_path / "last_stop.json").unlink()
    subprocess.run(
        [sys.executable, "-m", "edgeagent", "record-stop", "--state-dir", str(tmp_path)],
        env=env,
        check=True,
        timeout=60,
    )
    assert not (tmp_path / "last_stop.json").exists()
