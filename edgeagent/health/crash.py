"""Crash reports as values: frames, fingerprints, faulthandler dumps and the `crash` payload.

Pure functions over tracebacks, text and dicts; `crashguard` does the I/O.

Frames are listed oldest call first and innermost last, as Python prints
them. A fingerprint groups crashes of one cause across devices and releases:
sha256 over the exception type and the module and function of the innermost
application frames, never line numbers, messages or install paths.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import msgspec

from edgeagent.telemetry import payloads as p

FINGERPRINT_FRAMES = 5
MAX_FRAMES = 64

KINDS = ("exception", "fatal_signal", "watchdog", "unclean_shutdown")

# faulthandler's first line names the fatal error; these are the signals it handles.
FAULT_SIGNALS = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}

_FAULT_LINE = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+|\?\?\?) in (?P<func>.*)$')
_THREAD_HEAD = re.compile(
    r"^(?P<current>Current thread|Thread|Stack) ?(?P<ident>0x[0-9a-fA-F]+)?"
    r".*\(most recent call first\):"
)
_STDLIB = re.compile(r"/lib/python3\.\d+/(?P<rel>.*)$")


@dataclass(frozen=True, slots=True)
class Frame:
    """One stack frame as the protocol carries it."""

    file: str
    line: int | None
    function: str
    module: str
    in_app: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ThreadStack:
    """One thread's stack from a faulthandler dump, innermost frame last."""

    ident: str | None
    current: bool
    frames: list[Frame]


@dataclass(frozen=True, slots=True)
class FaultDump:
    """What faulthandler wrote when the process died."""

    error: str
    signal: str | None
    threads: list[ThreadStack] = field(default_factory=list)

    def crashed_thread(self) -> ThreadStack | None:
        """The thread that took the signal (or the only one dumped)."""
        for t in self.threads:
            if t.current:
                return t
        return self.threads[0] if self.threads else None


@dataclass(frozen=True, slots=True)
class ReportContext:
    """Facts about the process that crashed, copied into every report."""

    app_version: str
    python: str
    os: str
    device_model: str
    boot_id: str


# -- modules and paths -----------------------------------------------------------------


def is_app_module(module: str, app_packages: Iterable[str]) -> bool:
    """True when `module` is one of the application's packages or inside one."""
    return any(module == pkg or module.startswith(pkg + ".") for pkg in app_packages)


def module_from_path(path: str, app_packages: Sequence[str], roots: Sequence[str] = ()) -> str:
    """A dotted module name for a source path, independent of the install prefix.

    Tries, in order: below site-/dist-packages, from the last directory named
    after an application package, below the stdlib, below one of `roots` (the
    import path); else the file's stem.
    """
    norm = path.replace("\\", "/")
    rel: str | None = None
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in norm:
            rel = norm.rsplit(marker, 1)[1]
            break
    if rel is None:
        for pkg in app_packages:
            top = pkg.split(".")[0]
            for needle in (f"/{top}/", f"/{top}.py"):
                at = norm.rfind(needle)
                if at >= 0:
                    rel = norm[at + 1 :]
                    break
            if rel is not None:
                break
    if rel is None and (m := _STDLIB.search(norm)):
        rel = m.group("rel")
    if rel is None:
        for root in sorted((r.rstrip("/") for r in roots if r), key=len, reverse=True):
            if norm.startswith(root + "/"):
                rel = norm[len(root) + 1 :]
                break
    if rel is None:
        rel = norm.rsplit("/", 1)[-1]
    parts = [x for x in rel.removesuffix(".py").split("/") if x]
    if len(parts) > 1 and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or norm


def type_name(exc_type: type[BaseException]) -> str:
    """`ValueError` for builtins, `package.module.Class` otherwise."""
    if exc_type.__module__ == "builtins":
        return exc_type.__qualname__
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


# -- frames from a live traceback ------------------------------------------------------------


def frames_from_traceback(
    tb: TracebackType | None, app_packages: Sequence[str], limit: int = MAX_FRAMES
) -> list[Frame]:
    """The frames of a traceback, oldest first; only the innermost `limit` are kept."""
    out: list[Frame] = []
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        module = str(frame.f_globals.get("__name__") or "")
        if not module:
            module = module_from_path(code.co_filename, app_packages)
        out.append(
            Frame(
                file=code.co_filename,
                line=tb.tb_lineno,
                function=code.co_qualname,
                module=module,
                in_app=is_app_module(module, app_packages),
            )
        )
        tb = tb.tb_next
    return out[-limit:]


def leaf_exception(exc: BaseException) -> tuple[BaseException, list[TracebackType | None]]:
    """The first leaf of an exception group (depth first), with the tracebacks above it.

    A bug escaping a TaskGroup arrives wrapped in an ExceptionGroup; the report
    is about the bug, and its stack is the group's frames followed by the leaf's.
    """
    tbs: list[TracebackType | None] = []
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        tbs.append(exc.__traceback__)
        exc = exc.exceptions[0]
    tbs.append(exc.__traceback__)
    return exc, tbs


def exception_info(
    exc: BaseException, app_packages: Sequence[str], limit: int = MAX_FRAMES
) -> dict[str, Any]:
    """The report's `exception` object for a (possibly grouped) exception."""
    leaf, tbs = leaf_exception(exc)
    frames: list[Frame] = []
    for tb in tbs:
        frames.extend(frames_from_traceback(tb, app_packages, limit))
    info: dict[str, Any] = {
        "type": type_name(type(leaf)),
        "message": _message(leaf),
        "frames": [f.to_dict() for f in frames[-limit:]],
    }
    return info


def exception_fingerprint(
    exc: BaseException, app_packages: Sequence[str], n: int = FINGERPRINT_FRAMES
) -> str:
    """The fingerprint of a (possibly grouped) exception, from the leaf's own frames.

    Where a group was caught (inside the agent, or only by sys.excepthook)
    changes the group's frames, not the bug; so only the leaf's stack counts.
    """
    leaf, tbs = leaf_exception(exc)
    frames = frames_from_traceback(tbs[-1], app_packages)
    if not frames:
        frames = [f for tb in tbs for f in frames_from_traceback(tb, app_packages)]
    return fingerprint(type_name(type(leaf)), [f.to_dict() for f in frames], n)


def exception_extras(exc: BaseException) -> dict[str, Any]:
    """Snapshot extras for a group (how many leaves) and a chained cause."""
    extras: dict[str, Any] = {}
    if isinstance(exc, BaseExceptionGroup):
        extras["group"] = {
            "type": type_name(type(exc)),
            "leaves": [type_name(type(e)) for e in _leaves(exc)][:16],
        }
    leaf, _ = leaf_exception(exc)
    cause = leaf.__cause__ or (None if leaf.__suppress_context__ else leaf.__context__)
    if cause is not None:
        extras["cause"] = {"type": type_name(type(cause)), "message": _message(cause)}
    return extras


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _message(exc: BaseException) -> str:
    try:
        return str(exc)[:2000]
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the report
        return f"<unprintable {type(exc).__name__}>"


# -- fingerprints ---------------------------------------------------------------------------


def fingerprint(type_: str, frames: Sequence[dict[str, Any]], n: int = FINGERPRINT_FRAMES) -> str:
    """sha256 over the type and the innermost `n` app frames (module:function).

    Falls back to library frames when no frame belongs to the application.
    Line numbers, messages and paths are not part of it.
    """
    app = [f for f in frames if f.get("in_app")]
    chosen = (app or list(frames))[-n:] if n > 0 else []
    parts = [type_] + [f"{f.get('module', '')}:{f.get('function', '')}" for f in reversed(chosen)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cause_fingerprint(kind: str, cause: str) -> str:
    """Fingerprint of a crash without a stack (an unclean shutdown): its kind and cause."""
    return hashlib.sha256(f"{kind}\n{cause}".encode()).hexdigest()


# -- faulthandler dumps ---------------------------------------------------------------------


def parse_faulthandler(
    text: str, app_packages: Sequence[str], roots: Sequence[str] = ()
) -> FaultDump | None:
    """Parse a faulthandler dump; None when `text` holds no dump."""
    if not text.strip():
        return None
    error = ""
    signal: str | None = None
    threads: list[ThreadStack] = []
    ident: str | None = None
    current = False
    frames: list[Frame] | None = None

    def close() -> None:
        if frames is not None:
            threads.append(ThreadStack(ident, current, list(reversed(frames))))

    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("Fatal Python error:") and not error:
            error = line.removeprefix("Fatal Python error:").strip()
            signal = FAULT_SIGNALS.get(error)
            continue
        head = _THREAD_HEAD.match(line)
        if head:
            close()
            ident = head.group("ident")
            current = head.group("current") in ("Current thread", "Stack")
            frames = []
            continue
        m = _FAULT_LINE.match(line)
        if m and frames is not None:
            path, func = m.group("file"), m.group("func").strip()
            module = module_from_path(path, app_packages, roots)
            lineno = m.group("line")
            frames.append(
                Frame(
                    file=path,
                    line=int(lineno) if lineno.isdigit() else None,
                    function=func,
                    module=module,
                    in_app=is_app_module(module, app_packages),
                )
            )
            continue
        if frames is not None and not line.startswith("  "):
            close()
            frames = None
    close()
    if not error and not threads:
        return None
    return FaultDump(error=error or "unknown fatal error", signal=signal, threads=threads)


# -- reports --------------------------------------------------------------------------------


def build_report(
    *,
    crash_id: str,
    kind: str,
    fingerprint: str,
    crashed_ts: float,
    context: ReportContext,
    breadcrumbs: list[dict[str, Any]],
    logs: list[str],
    snapshot: dict[str, Any],
    exception: dict[str, Any] | None = None,
    signal: str | None = None,
) -> dict[str, Any]:
    """A stored report: every `crash` field except v, device, ts and seq (added on delivery)."""
    if kind not in KINDS:
        raise ValueError(f"unknown crash kind {kind!r}")
    report: dict[str, Any] = {
        "crash_id": crash_id,
        "kind": kind,
        "fingerprint": fingerprint,
        "breadcrumbs": breadcrumbs,
        "logs": logs,
        "snapshot": snapshot,
        "app_version": context.app_version,
        "python": context.python,
        "os": context.os,
        "device_model": context.device_model,
        "boot_id": context.boot_id,
        "crashed_ts": crashed_ts,
    }
    if exception is not None:
        report["exception"] = exception
    if signal is not None:
        report["signal"] = signal
    for key in ("trace_id", "call_id"):
        value = snapshot.get(key)
        if isinstance(value, str) and value:
            report[key] = value
    return report


def context_from_marker(marker: dict[str, Any] | None, now: ReportContext) -> ReportContext:
    """The crashed process's versions from its running marker; this process's where missing."""
    m = marker or {}
    return ReportContext(
        app_version=str(m.get("app_version") or now.app_version),
        python=str(m.get("python") or now.python),
        os=str(m.get("os") or now.os),
        device_model=str(m.get("device_model") or now.device_model),
        boot_id=str(m.get("boot_id") or now.boot_id),
    )


def unclean_cause(*, rebooted: bool, stop: dict[str, Any] | None) -> tuple[str, str]:
    """(kind, cause) of an exit nothing else explains: a watchdog kill, a reboot, or a kill."""
    if stop is not None and stop.get("reason") == "watchdog":
        return "watchdog", "watchdog"
    return "unclean_shutdown", "reboot_or_power_loss" if rebooted else "killed"


def crash_message(report: dict[str, Any], base: dict[str, Any], seq: int) -> p.Crash:
    """The `crash` payload for a stored report; raises msgspec.ValidationError if malformed."""
    fields = {k: v for k, v in report.items() if k in p.Crash.__struct_fields__}
    fields.update(base)
    fields["seq"] = seq
    return msgspec.convert(fields, p.Crash)
