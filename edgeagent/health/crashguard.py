"""The crash shell: hooks, faulthandler, the running marker, stop records, report files, delivery.

Reports are written synchronously and atomically (tmp + fsync + rename) into
`<state_dir>/crash/` from the hook that saw the bug, before the process
exits, and spooled as `crash` messages after the restart. A fatal signal
leaves a faulthandler dump and an unclean exit leaves the running marker; the
next `start()` turns either into a report. The marker also carries the last
checkpoint (snapshot, breadcrumbs, log lines), so those reports say what the
process was doing shortly before it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import msgspec

from edgeagent.clock import Clock, SystemClock
from edgeagent.health import crash as c
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, LogRing

logger = logging.getLogger(__name__)

CRASH_DIR = "crash"
MARKER = "running.json"
LAST_STOP = "last_stop.json"
FAULT_LOG = "faulthandler.log"
RATE_FILE = "rate.json"
REPORT_GLOB = "crash-*.json"
HOUR_S = 3600.0
# systemd's $SERVICE_RESULT values (ExecStopPost) that name a watchdog kill.
WATCHDOG_RESULTS = frozenset({"watchdog"})


class Spooler(Protocol):
    """What delivery needs of the Publisher."""

    def base(self) -> dict[str, Any]: ...

    def spool(
        self, topic: str, build: Callable[[int], msgspec.Struct], *, retain: bool = False
    ) -> int | None: ...


@dataclass(frozen=True, slots=True)
class CrashSettings:
    """Where reports live, what goes in them, and how many per hour."""

    state_dir: Path
    app_version: str
    device_model: str
    boot_id: str
    app_packages: tuple[str, ...] = ("edgeagent",)
    max_per_hour: int = 10
    breadcrumbs: int = 100
    log_lines: int = 100
    fingerprint_frames: int = c.FINGERPRINT_FRAMES
    checkpoint_s: float = 30.0


def report_context(settings: CrashSettings) -> c.ReportContext:
    """The running process's versions and identity."""
    return c.ReportContext(
        app_version=settings.app_version,
        python=platform.python_version(),
        os=platform.platform(),
        device_model=settings.device_model,
        boot_id=settings.boot_id,
    )


# -- small durable file helpers ----------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: tmp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None if missing or unreadable."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("crash: unreadable %s: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, default=repr, separators=(",", ":")).encode()


def record_stop_from_env(
    state_dir: Path, environ: Mapping[str, str], now: Callable[[], float] = time.time
) -> dict[str, Any] | None:
    """Record why systemd stopped the service (run from ExecStopPost=).

    Only a failure is recorded: a clean stop wrote its own record already.
    Returns the record written, or None.
    """
    result = environ.get("SERVICE_RESULT")
    if not result or result == "success":
        return None
    record = {
        "reason": "watchdog" if result in WATCHDOG_RESULTS else result,
        "ts": now(),
        "clean": False,
        "source": "systemd",
        "service_result": result,
        "exit_code": environ.get("EXIT_CODE"),
        "exit_status": environ.get("EXIT_STATUS"),
    }
    write_atomic(state_dir / LAST_STOP, _dump(record))
    return record


def _builder(report: dict[str, Any], publisher: Spooler) -> Callable[[int], msgspec.Struct]:
    def build(seq: int) -> msgspec.Struct:
        return c.crash_message(report, publisher.base(), seq)

    return build


# -- the guard ------------------------------------------------------------------------------


class CrashGuard:
    """Catches bugs and fatal signals of this process, and reports those of the last one."""

    def __init__(
        self,
        settings: CrashSettings,
        *,
        crumbs: Breadcrumbs,
        logs: LogRing,
        snapshot: Callable[[], dict[str, Any]],
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self._crumbs = crumbs
        self._logs = logs
        self._snapshot = snapshot
        self._clock: Clock = clock or SystemClock()
        self._environ = os.environ if environ is None else environ
        self._context = report_context(settings)
        self.dir = settings.state_dir / CRASH_DIR
        self.marker_path = settings.state_dir / MARKER
        self.stop_path = settings.state_dir / LAST_STOP
        self.fault_path = self.dir / FAULT_LOG
        self._lock = threading.RLock()
        self._marker: dict[str, Any] | None = None
        self._recorded: list[BaseException] = []
        self._fault_file: IO[str] | None = None
        self._faulthandler_was_enabled = False
        self._prev_sys_hook: Callable[..., Any] | None = None
        self._prev_thread_hook: Callable[[threading.ExceptHookArgs], Any] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> list[Path]:
        """Report what ended the previous run, then arm for this one; returns new reports."""
        written = self.recover()
        self.arm()
        return written

    def recover(self) -> list[Path]:
        """Turn a faulthandler dump and/or a leftover running marker into reports."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        marker = read_json(self.marker_path)
        written: list[Path] = []
        fault = self._recover_fault(marker)
        if fault is not None:
            written.append(fault)
        if marker is not None:
            if fault is None and not marker.get("fatal"):
                path = self._recover_unclean(marker)
                if path is not None:
                    written.append(path)
            with contextlib.suppress(FileNotFoundError):
                self.marker_path.unlink()
        return written

    def arm(self) -> None:
        """Enable faulthandler to the state dir, install the hooks, write the running marker."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._faulthandler_was_enabled = faulthandler.is_enabled()
        # Opened once for the life of the process: a signal handler cannot open files.
        self._fault_file = self.fault_path.open("w", encoding="utf-8")
        faulthandler.enable(file=self._fault_file, all_threads=True)
        self._prev_sys_hook = sys.excepthook
        sys.excepthook = self._sys_hook
        self._prev_thread_hook = threading.excepthook
        threading.excepthook = self._thread_hook
        with self._lock:
            self._marker = {
                "pid": os.getpid(),
                "boot_id": self.settings.boot_id,
                "start_ts": self._clock.time(),
                "app_version": self._context.app_version,
                "python": self._context.python,
                "os": self._context.os,
                "device_model": self._context.device_model,
            }
            self._write_marker()
        logger.info("crash: armed (reports in %s)", self.dir)

    def stop(self, reason: str, *, clean: bool = True) -> None:
        """Record why the process stops and remove the running marker."""
        record = {
            "reason": reason,
            "ts": self._clock.time(),
            "clean": clean,
            "pid": os.getpid(),
            "boot_id": self.settings.boot_id,
            "source": "agent",
        }
        with self._lock:
            try:
                write_atomic(self.stop_path, _dump(record))
                with contextlib.suppress(FileNotFoundError):
                    self.marker_path.unlink()
                fsync_dir(self.marker_path.parent)
            except OSError as exc:
                logger.error("crash: cannot record stop (%s): %s", reason, exc)
            self._marker = None

    def disarm(self) -> None:
        """Restore the hooks and faulthandler as they were before `arm`."""
        if self._prev_sys_hook is not None and sys.excepthook == self._sys_hook:
            sys.excepthook = self._prev_sys_hook
        if self._prev_thread_hook is not None and threading.excepthook == self._thread_hook:
            threading.excepthook = self._prev_thread_hook
        self._prev_sys_hook = self._prev_thread_hook = None
        if self._fault_file is not None:
            faulthandler.disable()
            self._fault_file.close()
            self._fault_file = None
            if self._faulthandler_was_enabled:
                faulthandler.enable(file=sys.__stderr__ or sys.stderr, all_threads=True)

    def install_loop_handler(
        self,
        loop: asyncio.AbstractEventLoop,
        on_crash: Callable[[BaseException], None] | None = None,
        contain: Callable[[BaseException, asyncio.Task[Any] | None], bool] | None = None,
    ) -> None:
        """Report exceptions the loop catches (callbacks, orphaned tasks).

        With `on_crash` they count as fatal: it is called after the report is
        on disk (e.g. to stop the agent with a failure exit code). `contain`
        may take one instead (return True: e.g. a call's media task ends that
        call): it is then reported as not fatal and `on_crash` is not called.
        """
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            fatal = False
            if isinstance(exc, Exception):
                extra: dict[str, Any] = {"context": str(context.get("message", ""))}
                task = context.get("task") or context.get("future")
                if not isinstance(task, asyncio.Task):
                    task = None
                if task is not None:
                    extra["task"] = task.get_name()
                fatal = on_crash is not None and not (contain is not None and contain(exc, task))
                self._record_from_hook(exc, fatal=fatal, extra=extra)
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            if isinstance(exc, Exception) and fatal and on_crash is not None:
                on_crash(exc)

        loop.set_exception_handler(handler)

    # --- recording -----------------------------------------------------------------------------

    def record_exception(
        self,
        exc: BaseException,
        kind: str = "exception",
        *,
        fatal: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> Path | None:
        """Write a report for `exc` now; None if rate limited or already reported."""
        with self._lock:
            if self._seen(exc):
                return None
            self._recorded = [*self._recorded[-7:], exc]
            info = c.exception_info(exc, self.settings.app_packages)
            snapshot = self._take_snapshot()
            snapshot.update(c.exception_extras(exc))
            snapshot["pid"] = os.getpid()
            if extra:
                snapshot.update(extra)
            fp = c.exception_fingerprint(
                exc, self.settings.app_packages, self.settings.fingerprint_frames
            )
            path = self._write_report(
                kind=kind,
                fingerprint=fp,
                crashed_ts=self._clock.time(),
                context=self._context,
                breadcrumbs=self._crumbs.snapshot(self.settings.breadcrumbs),
                logs=self._logs.lines(self.settings.log_lines),
                snapshot=snapshot,
                exception=info,
            )
            if fatal and self._marker is not None:
                self._marker["fatal"] = path.name if path is not None else "suppressed"
                try:
                    self._write_marker()
                except OSError as exc_:
                    logger.error("crash: cannot update the running marker: %s", exc_)
            return path

    def checkpoint(self) -> None:
        """Save snapshot, breadcrumbs and log lines into the marker (for fatal-signal reports)."""
        self._store_checkpoint(self._checkpoint_data())

    async def run(self) -> None:
        """Checkpoint every `checkpoint_s` until cancelled; the file write runs on a thread."""
        while True:
            await self._clock.sleep(self.settings.checkpoint_s)
            data = self._checkpoint_data()  # on the loop: the snapshot reads loop-owned state
            try:
                await asyncio.to_thread(self._store_checkpoint, data)
            except OSError as exc:
                logger.warning("crash: checkpoint failed: %s", exc)

    # --- delivery ------------------------------------------------------------------------------

    def pending_reports(self) -> list[Path]:
        """Report files not yet handed to the spool, oldest first."""
        try:
            return sorted(self.dir.glob(REPORT_GLOB))
        except OSError:
            return []

    def deliver(self, publisher: Spooler, topic: str) -> int:
        """Spool every pending report as a `crash` message; delete each once committed."""
        count = 0
        for path in self.pending_reports():
            report = read_json(path)
            if report is None:
                self._quarantine(path)
                continue
            try:
                c.crash_message(report, publisher.base(), 0)  # validate before spooling
            except msgspec.ValidationError as exc:
                logger.error("crash: report %s is malformed: %s", path.name, exc)
                self._quarantine(path)
                continue
            seq = publisher.spool(topic, _builder(report, publisher))
            if seq is None:
                logger.error("crash: report %s kept on disk: the spool is full", path.name)
                break  # the rest wait for the next start too
            # The spool owns it now. A crash right here delivers it twice (crash_id dedupes).
            path.unlink()
            fsync_dir(self.dir)
            count += 1
            logger.info(
                "crash: report %s (%s) spooled as seq %d",
                report.get("crash_id"),
                report.get("kind"),
                seq,
            )
        return count

    # --- internals -----------------------------------------------------------------------------

    def _sys_hook(self, exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not issubclass(exc_type, KeyboardInterrupt):
            self._record_from_hook(exc, fatal=True)
        prev = self._prev_sys_hook or sys.__excepthook__
        prev(exc_type, exc, tb)

    def _thread_hook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and not issubclass(args.exc_type, SystemExit):
            name = args.thread.name if args.thread is not None else None
            self._record_from_hook(args.exc_value, fatal=False, extra={"thread": name})
        prev = self._prev_thread_hook or threading.__excepthook__
        prev(args)

    def _record_from_hook(
        self, exc: BaseException, *, fatal: bool, extra: dict[str, Any] | None = None
    ) -> None:
        try:
            path = self.record_exception(exc, fatal=fatal, extra=extra)
        except Exception:  # a hook must never hide the original bug
            logger.exception("crash: writing the report failed")
            return
        if path is not None:
            logger.critical("crash: report written to %s", path)

    def _seen(self, exc: BaseException) -> bool:
        leaf, _ = c.leaf_exception(exc)
        return any(r is exc or r is leaf or c.leaf_exception(r)[0] is leaf for r in self._recorded)

    def _take_snapshot(self) -> dict[str, Any]:
        try:
            snap = dict(self._snapshot())
        except Exception as exc:  # noqa: BLE001 - the snapshot is best effort in a crash
            snap = {"snapshot_error": repr(exc)}
        return snap

    def _checkpoint_data(self) -> dict[str, Any]:
        return {
            "ts": self._clock.time(),
            "snapshot": self._take_snapshot(),
            "breadcrumbs": self._crumbs.snapshot(self.settings.breadcrumbs),
            "logs": self._logs.lines(self.settings.log_lines),
        }

    def _store_checkpoint(self, data: dict[str, Any]) -> None:
        with self._lock:
            if self._marker is None:  # stopped meanwhile: do not resurrect it
                return
            self._marker["checkpoint"] = data
            self._write_marker()

    def _write_marker(self) -> None:
        with self._lock:
            if self._marker is not None:
                write_atomic(self.marker_path, _dump(self._marker))

    def _write_report(self, **fields: Any) -> Path | None:
        """Write one report unless over the hourly limit; counts what it suppresses."""
        now = self._clock.time()
        rate = read_json(self.dir / RATE_FILE) or {}
        written = [
            float(t)
            for t in rate.get("written", [])
            if isinstance(t, int | float) and 0 <= now - float(t) < HOUR_S
        ]
        suppressed = int(rate.get("suppressed", 0) or 0)
        if len(written) >= self.settings.max_per_hour:
            self._save_rate(written, suppressed + 1)
            logger.warning("crash: over %d reports this hour; not written", len(written))
            return None
        crash_id = str(uuid.uuid4())
        snapshot = fields.pop("snapshot")
        if suppressed:
            snapshot["suppressed"] = suppressed
        report = c.build_report(crash_id=crash_id, snapshot=snapshot, **fields)
        path = self.dir / f"crash-{int(now * 1000):015d}-{crash_id}.json"
        write_atomic(path, _dump(report))
        self._save_rate([*written, now], 0)
        return path

    def _save_rate(self, written: list[float], suppressed: int) -> None:
        try:
            write_atomic(
                self.dir / RATE_FILE, _dump({"written": written, "suppressed": suppressed})
            )
        except OSError as exc:
            logger.warning("crash: cannot save the report rate: %s", exc)

    def _quarantine(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.rename(path.with_suffix(".bad"))

    def _last_stop_for(self, marker: dict[str, Any] | None) -> dict[str, Any] | None:
        """The stop record of the previous run (from systemd's env or last_stop.json)."""
        result = self._environ.get("SERVICE_RESULT")
        if result and result != "success":
            return {
                "reason": "watchdog" if result in WATCHDOG_RESULTS else result,
                "clean": False,
                "source": "env",
                "service_result": result,
                "exit_code": self._environ.get("EXIT_CODE"),
                "exit_status": self._environ.get("EXIT_STATUS"),
            }
        record = read_json(self.stop_path)
        if record is None:
            return None
        start = float((marker or {}).get("start_ts", 0.0) or 0.0)
        if float(record.get("ts", 0.0) or 0.0) < start:
            return None  # an older run's record
        return record

    def _recover_fault(self, marker: dict[str, Any] | None) -> Path | None:
        try:
            text = self.fault_path.read_text(encoding="utf-8", errors="replace")
            crashed_ts = self.fault_path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("crash: cannot read %s: %s", self.fault_path, exc)
            return None
        dump = c.parse_faulthandler(text, self.settings.app_packages, sys.path)
        if dump is None:
            return None
        stop = self._last_stop_for(marker)
        watchdog = stop is not None and stop.get("reason") == "watchdog"
        crashed = dump.crashed_thread()
        frames = [f.to_dict() for f in crashed.frames] if crashed else []
        signal = dump.signal or "unknown"
        checkpoint = (marker or {}).get("checkpoint") or {}
        snapshot = dict(checkpoint.get("snapshot") or {})
        snapshot["fatal_error"] = dump.error
        snapshot["threads"] = [
            {"id": t.ident, "current": t.current, "frames": [f.to_dict() for f in t.frames]}
            for t in dump.threads
            if t is not crashed
        ]
        self._add_previous(snapshot, marker, checkpoint, stop)
        path = self._write_report(
            kind="watchdog" if watchdog else "fatal_signal",
            fingerprint=c.fingerprint(signal, frames, self.settings.fingerprint_frames),
            crashed_ts=crashed_ts,
            context=c.context_from_marker(marker, self._context),
            breadcrumbs=list(checkpoint.get("breadcrumbs") or []),
            logs=list(checkpoint.get("logs") or []),
            snapshot=snapshot,
            exception={
                "type": signal,
                "message": f"Fatal Python error: {dump.error}",
                "frames": frames,
            },
            signal=signal,
        )
        # Consumed: the next arm() truncates it anyway; do it now so a second recover() is a no-op.
        self.fault_path.write_text("")
        logger.warning("crash: previous run died of %s (%s)", signal, dump.error)
        return path

    def _recover_unclean(self, marker: dict[str, Any]) -> Path | None:
        stop = self._last_stop_for(marker)
        if stop is not None and stop.get("clean"):
            return None  # stopped cleanly, died before the marker went
        rebooted = str(marker.get("boot_id", "")) != self.settings.boot_id
        kind, cause = c.unclean_cause(rebooted=rebooted, stop=stop)
        checkpoint = marker.get("checkpoint") or {}
        snapshot = dict(checkpoint.get("snapshot") or {})
        snapshot["cause"] = cause
        snapshot["rebooted"] = rebooted
        snapshot["previous_boot_id"] = marker.get("boot_id")
        self._add_previous(snapshot, marker, checkpoint, stop)
        last_alive = float(checkpoint.get("ts") or marker.get("start_ts") or self._clock.time())
        path = self._write_report(
            kind=kind,
            fingerprint=c.cause_fingerprint(kind, cause),
            crashed_ts=last_alive,
            context=c.context_from_marker(marker, self._context),
            breadcrumbs=list(checkpoint.get("breadcrumbs") or []),
            logs=list(checkpoint.get("logs") or []),
            snapshot=snapshot,
        )
        logger.warning("crash: previous run (pid %s) ended uncleanly: %s", marker.get("pid"), cause)
        return path

    @staticmethod
    def _add_previous(
        snapshot: dict[str, Any],
        marker: dict[str, Any] | None,
        checkpoint: dict[str, Any],
        stop: dict[str, Any] | None,
    ) -> None:
        m = marker or {}
        snapshot["previous_pid"] = m.get("pid")
        snapshot["previous_start_ts"] = m.get("start_ts")
        if checkpoint.get("ts") is not None:
            snapshot["checkpoint_ts"] = checkpoint["ts"]
        if stop is not None:
            snapshot["last_stop"] = stop
