"""The systemd seam: sd_notify messages, the watchdog interval, and journald logging."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

# Imported by name because the repo's top-level systemd/ folder (the unit file) looks
# like a namespace package to mypy, which then cannot see systemd-python's modules.
journal = importlib.import_module("systemd.journal")
_JournalHandler: Any = journal.JournalHandler

logger = logging.getLogger(__name__)

SYSLOG_IDENTIFIER = "edgeagent"

# journald accepts uppercase ASCII, digits and underscore, not starting with a digit;
# a leading underscore marks fields only journald itself may set.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

# Fields the handler sets itself; an `extra` with the same name does not override them.
_RESERVED = frozenset(
    {"MESSAGE", "PRIORITY", "LOGGER", "THREAD_NAME", "CODE_FILE", "CODE_LINE", "CODE_FUNC"}
)


_notify_failed = False


def notify(state: str) -> bool:
    """Send one sd_notify message ("READY=1", "WATCHDOG=1", "STATUS=..."); False if no
    socket, or if NOTIFY_SOCKET names one that is not there or not taking messages
    (said once, never raised, never blocking)."""
    global _notify_failed
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    try:
        _send_notify(where, state.encode())
        return True
    except OSError as exc:
        if not _notify_failed:
            _notify_failed = True
            logger.warning("systemd: cannot notify %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


NOTIFY_RETRY_S: tuple[float | None, ...] = (0.005, 0.005, None)


def _send_notify(where: str, message: bytes) -> None:
    """sd_notify's datagram, sent without blocking.

    Not `systemd.daemon.notify`: its send blocks while the socket's queue is full (a
    listener that stopped reading), holding the GIL, which freezes every thread of
    the agent. Only the AF_UNIX forms of NOTIFY_SOCKET are supported (path, @abstract).
    """
    if where.startswith("@") and len(where) > 1:
        address = "\0" + where[1:]
    elif where.startswith("/"):
        address = where
    else:
        raise OSError(errno.EINVAL, "not an AF_UNIX socket address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        for wait_s in NOTIFY_RETRY_S:
            try:
                sock.sendto(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, address)
                return
            except BlockingIOError:
                # A queue full for a moment (systemd busy at boot) must not cost READY=1,
                # whose loss gets the unit killed at its start timeout: two short retries.
                if wait_s is None:
                    raise
                time.sleep(wait_s)


def watchdog_interval_s(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """WatchdogSec in seconds when systemd expects pings from this process, else None."""
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != (os.getpid() if pid is None else pid):
                return None  # meant for our parent, inherited through the environment
        except ValueError:
            return None
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("systemd: ignoring malformed WATCHDOG_USEC=%r", raw)
        return None
    return usec / 1_000_000 if usec > 0 else None


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True when started by systemd (it sets INVOCATION_ID, and JOURNAL_STREAM for stdout)."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def journal_fields(record: logging.LogRecord) -> dict[str, str]:
    """The uppercase structured fields a record carries (from `extra={"CALL_ID": ...}`)."""
    return {
        key: str(value)
        for key, value in record.__dict__.items()
        if key not in _RESERVED and _FIELD_NAME.fullmatch(key) and value is not None
    }


class _EdgeJournalHandler(_JournalHandler):  # type: ignore[misc]
    """JournalHandler that sends only valid journal fields.

    The stock handler forwards every LogRecord attribute (msg, args, created, ...),
    which journald drops as invalid names after paying to send them; here only
    the standard fields and the record's uppercase extras go out.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = dict(self._extra)
            fields.update(journal_fields(record))
            self.send(
                self.format(record),
                PRIORITY=str(self.map_priority(record.levelno)),
                LOGGER=record.name,
                THREAD_NAME=record.threadName,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **fields,
            )
        except Exception:  # noqa: BLE001 - logging.Handler contract: report, never raise
            self.handleError(record)


def journal_handler(
    sender: Callable[..., Any] | None = None, environ: Mapping[str, str] | None = None
) -> logging.Handler | None:
    """A journald handler tagged `edgeagent` when running under systemd, else None.

    `sender` replaces `systemd.journal.send` (tests collect the fields with it).
    """
    if not under_systemd(environ):
        return None
    handler: logging.Handler = _EdgeJournalHandler(
        sender_function=journal.send if sender is None else sender,
        SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
    )
    return handler


class FieldsFormatter(logging.Formatter):
    """Formatter for stderr that appends a record's uppercase fields as `KEY=value`."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # formatMessage, not format: the fields stay on the message line, above any traceback.
        text = super().formatMessage(record)
        fields = journal_fields(record)
        if not fields:
            return text
        return text + " " + " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
