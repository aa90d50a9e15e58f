"""Crash reports: real child processes that raise, segfault, abort, get SIGKILLed or exit cleanly.

The child (tests/crash_child.py) arms a CrashGuard and dies; this process then
plays the next start (`CrashGuard.recover()`, no hooks installed here) and
delivers reports into a real Spool through a real, unconnected Publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from schema_support import assert_valid

from edgeagent.clock import FakeClock
from edgeagent.config import MqttConfig
from edgeagent.events import EventBus
from edgeagent.health import crash as c
from edgeagent.health.crashguard import CrashGuard, CrashSettings, record_stop_from_env
from edgeagent.mqtt import BrokerLink, SessionCounter
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, Crumb, LogRing
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.topics import Topics

CHILD = Path(__file__).with_name("crash_child.py")
REPO = CHILD.parent.parent
APP = ("edgeagent", "__main__", "crash_child", "buggy_app", __name__)
TOPICS = Topics("edge/v1", "dev-1")


def run_child(
    state_dir: Path, mode: str, *args: str, boot: str = "boot-a", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, str(CHILD), str(state_dir), boot, mode, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
        check=False,
    )


def guard_for(
    state_dir: Path,
    *,
    boot: str = "boot-a",
    environ: dict[str, str] | None = None,
    clock: FakeClock | None = None,
    crumbs: Breadcrumbs | None = None,
) -> CrashGuard:
    """The next start's guard, in this process (recover() only; no hooks are installed)."""
    settings = CrashSettings(
        state_dir=state_dir,
        app_version="10.0.0-next",
        device_model="Test Pi",
        boot_id=boot,
        app_packages=APP,
        max_per_hour=10,
    )
    return CrashGuard(
        settings,
        crumbs=crumbs or Breadcrumbs(),
        logs=LogRing(),
        snapshot=lambda: {"health": "idle"},
        clock=clock,
        environ=environ or {},
    )


def reports(state_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((state_dir / "crash").glob("crash-*.json"))]


def functions(report: dict[str, Any]) -> list[str]:
    return [f["function"] for f in report["exception"]["frames"]]


def assert_trail(report: dict[str, Any]) -> None:
    """The child's breadcrumbs, log lines and snapshot made it into the report."""
    crumbs = [b["message"] for b in report["breadcrumbs"] if b["category"] == "child.step"]
    assert crumbs == ["step 0", "step 1", "step 2"]
    assert any(line.endswith("edgeagent.child: child: step 2") for line in report["logs"])
    assert report["call_id"] == "call-42"
    assert report["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert report["snapshot"]["health"] == "good"
    assert report["app_version"] == "9.9.9-test"
    assert report["device_model"] == "Test Pi"


# -- exceptions --------------------------------------------------------------------------------


def test_bug_in_task_is_reported_before_the_process_exits(state_dir: Path) -> None:
    done = run_child(state_dir, "task")
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: bug inside a task" in done.stderr  # the previous hook still printed it
    [report] = reports(state_dir)
    assert report["kind"] == "exception"
    assert report["exception"]["type"] == "RuntimeError"
    assert report["exception"]["message"] == "bug inside a task"
    assert functions(report)[-1] == "failing_task"
    assert report["exception"]["frames"][-1]["in_app"] is True
    assert report["snapshot"]["group"] == {"type": "ExceptionGroup", "leaves": ["RuntimeError"]}
    assert report["boot_id"] == "boot-a"
    assert_trail(report)
    # The marker says a report explains the exit: the next start adds no unclean_shutdown.
    assert json.loads((state_dir / "running.json").read_text())["fatal"].startswith("crash-")
    assert guard_for(state_dir).recover() == []
    assert not (state_dir / "running.json").exists()
    assert len(reports(state_dir)) == 1


def test_bug_in_loop_callback_goes_through_the_loop_handler(state_dir: Path) -> None:
    done = run_child(state_dir, "callback")
    assert done.returncode == 2, done.stderr
    [report] = reports(state_dir)
    assert report["exception"]["type"] == "KeyError"
    assert functions(report)[-1] == "bad_callback"
    assert report["snapshot"]["context"].startswith("Exception in callback")
    assert_trail(report)
    assert guard_for(state_dir).recover() == []


def test_bug_in_thread_is_reported_and_the_process_goes_on(state_dir: Path) -> None:
    done = run_child(state_dir, "thread")
    assert done.returncode == 0, done.stderr
    [report] = reports(state_dir)
    assert report["exception"]["type"] == "ValueError"
    assert report["snapshot"]["thread"] == "worker-1"
    assert functions(report)[-1] == "thread_body"
    stop = json.loads((state_dir / "last_stop.json").read_text())
    assert stop["clean"] is True
    assert stop["reason"] == "test done"


def test_clean_exit_leaves_no_report(state_dir: Path) -> None:
    done = run_child(state_dir, "clean")
    assert done.returncode == 0, done.stderr
    assert not (state_dir / "running.json").exists()
    stop = json.loads((state_dir / "last_stop.json").read_text())
    assert (stop["reason"], stop["clean"]) == ("test done", True)
    assert guard_for(state_dir).recover() == []
    assert reports(state_dir) == []


# -- fatal signals -----------------------------------------------------------------------------


def test_sigsegv_becomes_fatal_signal_report_on_next_start(state_dir: Path) -> None:
    done = run_child(state_dir, "segv")
    assert done.returncode == -signal.SIGSEGV
    assert reports(state_dir) == []  # nothing Python could do at the time
    guard = guard_for(state_dir)
    [path] = guard.recover()
    report = json.loads(path.read_text())
    assert report["kind"] == "fatal_signal"
    assert report["signal"] == "SIGSEGV"
    assert report["exception"]["type"] == "SIGSEGV"
    names = functions(report)
    assert names[-3:] == ["segv_outer", "segv_inner", "string_at"]
    assert report["exception"]["frames"][-1]["module"] == "ctypes"
    assert report["exception"]["frames"][-1]["in_app"] is False
    assert report["exception"]["frames"][-2]["module"] == "crash_child"
    assert report["exception"]["frames"][-2]["in_app"] is True
    # Breadcrumbs, logs and snapshot from the dead process's last checkpoint;
    # versions are the dead process's, not this one's.
    assert_trail(report)
    assert report["snapshot"]["fatal_error"] == "Segmentation fault"
    assert (state_dir / "crash" / "faulthandler.log").read_text() == ""
    assert guard.recover() == []  # consumed


def test_fatal_signal_fingerprint_ignores_lines_and_prefix(state_dir: Path) -> None:
    dump = textwrap.dedent("""\
        Fatal Python error: Segmentation fault

        Thread 0x00007f0000000001 (most recent call first):
          File "{root}/lib/python3.11/threading.py", line 327 in wait
          File "{root}/edgeagent/hw/alsa.py", line {l1} in _reader

        Current thread 0x00007f0000000002 (most recent call first):
          File "{root}/lib/python3.11/ctypes/__init__.py", line 519 in string_at
          File "{root}/edgeagent/call/session.py", line {l2} in on_track
          File "{root}/edgeagent/agent.py", line {l3} in run

        Extension modules: msgspec._core (total: 1)""")
    a = c.parse_faulthandler(dump.format(root="/opt/ea/1.0/venv", l1=1, l2=2, l3=3), APP)
    b = c.parse_faulthandler(dump.format(root="/usr/local/ea-2", l1=9, l2=99, l3=999), APP)
    assert a is not None and b is not None
    assert a.signal == "SIGSEGV"
    crashed_a, crashed_b = a.crashed_thread(), b.crashed_thread()
    assert crashed_a is not None and crashed_b is not None
    assert [f.module for f in crashed_a.frames] == [
        "edgeagent.agent",
        "edgeagent.call.session",
        "ctypes",
    ]
    assert [t.current for t in a.threads] == [False, True]
    fp = [c.fingerprint("SIGSEGV", [f.to_dict() for f in t.frames]) for t in (crashed_a, crashed_b)]
    assert fp[0] == fp[1]
    other = c.fingerprint("SIGBUS", [f.to_dict() for f in crashed_a.frames])
    assert other != fp[0]
    assert c.parse_faulthandler("", APP) is None


def test_watchdog_abort_is_reported_as_watchdog_with_the_stack(state_dir: Path) -> None:
    done = run_child(state_dir, "abort")
    assert done.returncode == -signal.SIGABRT
    # systemd's ExecStopPost records why it stopped the service.
    env = {"SERVICE_RESULT": "watchdog", "EXIT_CODE": "dumped", "EXIT_STATUS": "ABRT"}
    assert record_stop_from_env(state_dir, env) is not None
    assert record_stop_from_env(state_dir, {"SERVICE_RESULT": "success"}) is None
    [path] = guard_for(state_dir).recover()
    report = json.loads(path.read_text())
    assert report["kind"] == "watchdog"
    assert report["signal"] == "SIGABRT"
    assert "hang_forever" in functions(report)
    assert report["snapshot"]["last_stop"]["exit_status"] == "ABRT"


# -- unclean shutdown --------------------------------------------------------------------------


def test_sigkill_gives_unclean_shutdown_and_boot_change_says_reboot(
    state_dir: Path, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(state_dir), "boot-a", "hang"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    copies = {}
    for name in ("same", "reboot", "watchdog"):
        copies[name] = tmp_path / name
        shutil.copytree(state_dir, copies[name])

    [path] = guard_for(copies["same"]).recover()
    report = json.loads(path.read_text())
    assert report["kind"] == "unclean_shutdown"
    assert report["snapshot"]["cause"] == "killed"
    assert report["snapshot"]["rebooted"] is False
    assert "exception" not in report
    assert report["boot_id"] == "boot-a"
    assert_trail(report)

    [path] = guard_for(copies["reboot"], boot="boot-b").recover()
    rebooted = json.loads(path.read_text())
    assert rebooted["kind"] == "unclean_shutdown"
    assert rebooted["snapshot"]["cause"] == "reboot_or_power_loss"
    assert rebooted["snapshot"]["previous_boot_id"] == "boot-a"
    assert rebooted["fingerprint"] != report["fingerprint"]

    env = {"SERVICE_RESULT": "watchdog", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}
    [path] = guard_for(copies["watchdog"], environ=env).recover()
    assert json.loads(path.read_text())["kind"] == "watchdog"

    assert guard_for(copies["same"]).recover() == []  # marker consumed


# -- fingerprints ------------------------------------------------------------------------------

WORKER = """\
{pad}
async def run(message):
{pad}
    await helper(message)


async def helper(message):
{pad}
    raise {exc}(message)


async def other(message):
    raise {exc}(message)
"""


def write_release(root: Path, *, pad: str = "", exc: str = "LookupError") -> Path:
    pkg = root / "buggy_app"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "worker.py").write_text(WORKER.format(pad=pad, exc=exc))
    return root


def test_same_bug_shares_fingerprint_across_releases_and_messages(
    tmp_path: Path,
) -> None:
    shifted = "# a comment\n\n\n# another release moved every line\n\n"
    runs = {
        "v1": (write_release(tmp_path / "opt/ea/1.0"), "boom 1", "run"),
        "v2": (write_release(tmp_path / "usr/lib/ea-2.0", pad=shifted), "other text 2", "run"),
        "other_fn": (write_release(tmp_path / "opt/ea/3"), "boom 1", "other"),
        "other_type": (write_release(tmp_path / "opt/ea/4", exc="TypeError"), "boom 1", "run"),
    }
    found: dict[str, dict[str, Any]] = {}
    for name, (root, message, fn) in runs.items():
        state = tmp_path / f"state-{name}"
        done = run_child(state, "buggy", str(root), message, fn)
        assert done.returncode == 1, done.stderr
        [found[name]] = reports(state)
    v1, v2 = found["v1"], found["v2"]
    assert v1["exception"]["message"] != v2["exception"]["message"]
    lines = [[f["line"] for f in r["exception"]["frames"] if f["in_app"]] for r in (v1, v2)]
    assert lines[0] != lines[1]
    assert v1["exception"]["frames"][-1]["file"] != v2["exception"]["frames"][-1]["file"]
    assert v1["fingerprint"] == v2["fingerprint"]
    assert found["other_fn"]["fingerprint"] != v1["fingerprint"]
    assert found["other_type"]["fingerprint"] != v1["fingerprint"]
    assert functions(v1)[-2:] == ["run", "helper"]


def _raise_in_alpha(message: str) -> None:
    raise ValueError(message)


def _raise_in_beta(message: str) -> None:
    raise ValueError(message)


def _caught(fn: Any, message: str) -> BaseException:
    try:
        fn(message)
    except ValueError as exc:
        return exc
    raise AssertionError("did not raise")


def test_fingerprint_pure_rules() -> None:
    a1 = c.exception_fingerprint(_caught(_raise_in_alpha, "x=1"), APP)
    a2 = c.exception_fingerprint(_caught(_raise_in_alpha, "x=2, totally different"), APP)
    b = c.exception_fingerprint(_caught(_raise_in_beta, "x=1"), APP)
    assert a1 == a2
    assert a1 != b
    # The same leaf wrapped in a group (as a TaskGroup raises it) keeps its fingerprint.
    leaf = _caught(_raise_in_alpha, "x=3")
    with pytest.raises(ExceptionGroup) as group:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [leaf])
    assert c.exception_fingerprint(group.value, APP) == a1
    # No app frames: library frames are used, so distinct library bugs stay distinct.
    lib = [{"module": "json.decoder", "function": "raw_decode", "in_app": False}]
    lib2 = [{"module": "json.decoder", "function": "decode", "in_app": False}]
    assert c.fingerprint("ValueError", lib) != c.fingerprint("ValueError", lib2)
    assert c.module_from_path("/a/b/site-packages/aiortc/rtp.py", APP) == "aiortc.rtp"
    assert c.module_from_path("/srv/x/edgeagent/call/__init__.py", APP) == "edgeagent.call"
    assert (
        c.module_from_path("/root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/tasks.py", APP)
        == "asyncio.tasks"
    )


# -- rate limit --------------------------------------------------------------------------------


def test_rate_limit_counts_suppressed_reports_into_the_next(state_dir: Path) -> None:
    done = run_child(state_dir, "flood", "5", env={"CRASH_MAX_PER_HOUR": "2"})
    assert done.returncode == 3, done.stderr
    assert len(reports(state_dir)) == 2
    rate = json.loads((state_dir / "crash" / "rate.json").read_text())
    assert rate["suppressed"] == 3
    # An hour later the next report carries the count.
    clock = FakeClock(start=time.time() + 3601)
    guard = guard_for(state_dir, clock=clock)
    exc = _caught(_raise_in_alpha, "later")
    path = guard.record_exception(exc)
    assert path is not None
    report = json.loads(path.read_text())
    assert report["snapshot"]["suppressed"] == 3
    assert guard.record_exception(exc) is None  # the same exception is not reported twice
    assert json.loads((state_dir / "crash" / "rate.json").read_text())["suppressed"] == 0


async def test_rate_limit_in_process_with_fake_clock(state_dir: Path) -> None:
    clock = FakeClock(start=2_000_000_000.0)
    settings = CrashSettings(
        state_dir=state_dir,
        app_version="1",
        device_model="m",
        boot_id="b",
        app_packages=APP,
        max_per_hour=2,
    )
    guard = CrashGuard(settings, crumbs=Breadcrumbs(), logs=LogRing(), snapshot=dict, clock=clock)
    guard.dir.mkdir(parents=True)
    results = [guard.record_exception(_caught(_raise_in_alpha, str(i))) for i in range(4)]
    assert [r is not None for r in results] == [True, True, False, False]
    await clock.advance(3600.0)
    path = guard.record_exception(_caught(_raise_in_alpha, "after"))
    assert path is not None
    assert json.loads(path.read_text())["snapshot"]["suppressed"] == 2


# -- delivery ----------------------------------------------------------------------------------


def make_publisher(state_dir: Path) -> tuple[Publisher, Spool]:
    spool = Spool(state_dir / "spool.sqlite3", min_free_mb=0.0)
    link = BrokerLink(
        MqttConfig(port=1),
        "dev-1",
        sessions=SessionCounter(state_dir / "session"),
        will=lambda s: (TOPICS.status, b"{}"),
        on_connected=_noop,
        bus=EventBus(),
    )
    crumbs = Breadcrumbs()
    publisher = Publisher(link, spool, TOPICS, crumbs, wall=time.time, monotonic=time.monotonic)
    return publisher, spool


async def _noop(_session: int) -> None:
    return None


async def test_delivery_spools_valid_crash_messages_and_deletes_files(state_dir: Path) -> None:
    assert run_child(state_dir, "task").returncode == 1
    assert run_child(state_dir, "segv").returncode == -signal.SIGSEGV
    guard = guard_for(state_dir)
    guard.recover()
    pending = guard.pending_reports()
    assert len(pending) == 2
    ids = [json.loads(p.read_text())["crash_id"] for p in pending]
    (state_dir / "crash" / "crash-000000000000001-broken.json").write_text("{not json")

    publisher, spool = make_publisher(state_dir)
    with spool:
        spool.put(TOPICS.events, lambda seq: b"{}")  # seq 1 is taken by something else
        assert guard.deliver(publisher, TOPICS.crash) == 2
        assert guard.pending_reports() == []
        assert (state_dir / "crash" / "crash-000000000000001-broken.bad").exists()
        entries = [e for e in spool.pending() if e.topic == TOPICS.crash]
        assert [e.seq for e in entries] == [2, 3]
        kinds = []
        for entry in entries:
            assert_valid(entry.topic, entry.payload)
            doc = json.loads(entry.payload)
            assert doc["seq"] == entry.seq
            assert doc["device"] == "dev-1"
            kinds.append(doc["kind"])
            assert doc["crash_id"] in ids
            crash = msgspec.json.decode(entry.payload)
            assert crash["breadcrumbs"]
        assert sorted(kinds) == ["exception", "fatal_signal"]
        assert guard.deliver(publisher, TOPICS.crash) == 0


def test_checkpoint_and_stop_in_process(state_dir: Path) -> None:
    crumbs = Breadcrumbs()
    guard = guard_for(state_dir, crumbs=crumbs)
    guard.dir.mkdir(parents=True)
    guard._marker = {"pid": 1, "boot_id": "boot-a", "start_ts": 1.0}
    guard._write_marker()
    crumbs.add(Crumb(ts=5.0, level="info", category="x", message="before"))
    guard.checkpoint()
    marker = json.loads(guard.marker_path.read_text())
    assert marker["checkpoint"]["breadcrumbs"][-1]["message"] == "before"
    guard.stop("SIGTERM")
    assert not guard.marker_path.exists()
    guard.checkpoint()  # after stop: does not bring the marker back
    assert not guard.marker_path.exists()
    assert json.loads(guard.stop_path.read_text())["reason"] == "SIGTERM"


@pytest.mark.parametrize("kind", ["bogus"])
def test_build_report_rejects_unknown_kind(kind: str) -> None:
    ctx = c.ReportContext("1", "3.11", "Linux", "Pi", "b")
    with pytest.raises(ValueError, match="unknown crash kind"):
        c.build_report(
            crash_id="x",
            kind=kind,
            fingerprint="f",
            crashed_ts=0.0,
            context=ctx,
            breadcrumbs=[],
            logs=[],
            snapshot={},
        )


async def test_arm_checkpoints_and_disarm_restores_hooks(state_dir: Path) -> None:
    clock = FakeClock(start=time.time())
    crumbs = Breadcrumbs()
    guard = guard_for(state_dir, clock=clock, crumbs=crumbs)
    before = (sys.excepthook, threading.excepthook, faulthandler.is_enabled())
    guard.start()
    try:
        assert sys.excepthook != before[0]
        assert threading.excepthook != before[1]
        assert faulthandler.is_enabled()
        marker = json.loads(guard.marker_path.read_text())
        assert (marker["pid"], marker["boot_id"]) == (os.getpid(), "boot-a")
        assert marker["app_version"] == "10.0.0-next"
        assert "checkpoint" not in marker
        crumbs.add(Crumb(ts=5.0, level="info", category="x", message="tick"))
        task = asyncio.create_task(guard.run())
        await clock.advance(guard.settings.checkpoint_s)
        for _ in range(500):  # bounded: the write runs on a worker thread
            marker = json.loads(guard.marker_path.read_text())
            if "checkpoint" in marker:
                break
            await asyncio.sleep(0.01)
        assert marker["checkpoint"]["breadcrumbs"][-1]["message"] == "tick"
        assert marker["checkpoint"]["snapshot"] == {"health": "idle"}
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        guard.stop("SIGTERM")
    finally:
        guard.disarm()
    assert (sys.excepthook, threading.excepthook, faulthandler.is_enabled()) == before
    assert not guard.marker_path.exists()
    assert guard_for(state_dir).recover() == []
