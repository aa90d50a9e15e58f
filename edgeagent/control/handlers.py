"""The command handlers: one coroutine per catalog command, over the agent's `CommandContext`.

Handlers get typed, already-authorised arguments and return a JSON-like result, raise
`CommandError` for an honest refusal, or return `AfterReply` when the action must follow the
answer (crash, restart). The server owns timeouts, output caps, redaction and the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from edgeagent.clock import Clock
from edgeagent.control import catalog as c
from edgeagent.control.catalog import CommandError, Status
from edgeagent.control.profiling import ProfilerBusy, cpu_profile, memory_profile

if TYPE_CHECKING:
    from edgeagent.control.context import CommandContext

__all__ = [
    "AfterReply",
    "Handler",
    "Handlers",
    "apply_log_level",
    "check_hangup_target",
    "level_number",
]

logger = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class AfterReply:
    """A result to answer with, and an action to run once the answer is on its way."""

    result: Any
    action: Callable[[], None]


def check_hangup_target(active_call_id: str | None, call_id: str | None) -> None:
    """CommandError 400 when `hangup` names a call that is not the active one.

    Without a call_id, hangup is idempotent: no active call is an ok "nothing ended".
    """
    if call_id is None or call_id == active_call_id:
        return
    active = (
        "no call is active" if active_call_id is None else f"the active call is {active_call_id}"
    )
    raise CommandError(Status.BAD_REQUEST, f"call {call_id!r} is not active; {active}")


def level_number(name: str) -> int:
    """logging's number for a level name (DEBUG..CRITICAL)."""
    number = logging.getLevelName(name.upper())
    if not isinstance(number, int):
        raise CommandError(Status.BAD_REQUEST, f"unknown log level {name!r}")
    return number


def apply_log_level(logger_name: str, level: int) -> int:
    """Set a logger's level ("" is the root); returns the previous one (0: inherited).

    The default for `CommandContext.set_log_level`; the agent may do more (its handlers).
    """
    target = logging.getLogger(logger_name or None)
    previous = target.level
    target.setLevel(level)
    return previous


@dataclass(slots=True)
class _Override:
    original: int
    revert: asyncio.Task[None]


class Handlers:
    """The catalog's handlers bound to one agent context and clock."""

    def __init__(self, context: CommandContext, *, clock: Clock, open_mode: bool = False) -> None:
        self._ctx = context
        self._clock = clock
        self._open_mode = open_mode
        self._overrides: dict[str, _Override] = {}
        self.table: dict[str, Handler] = {
            "ping": self.ping,
            "info": self.info,
            "rebirth": self.rebirth,
            "snapshot": self.snapshot,
            "metrics": self.metrics,
            "logs": self.logs,
            "breadcrumbs": self.breadcrumbs,
            "set_log_level": self.set_log_level,
            "dial": self.dial,
            "hangup": self.hangup,
            "call_test": self.call_test,
            "diagnose": self.diagnose,
            "memory": self.memory,
            "profile": self.profile,
            "crash": self.crash,
            "restart": self.restart,
        }
        missing = set(c.CATALOG) - set(self.table)
        assert not missing, f"catalog commands without a handler: {missing}"

    # --- read ---------------------------------------------------------------------------

    async def ping(self, _args: msgspec.Struct) -> dict[str, Any]:
        return {
            "pong": True,
            "device": self._ctx.device_id,
            "ts": round(self._clock.time(), 3),
            "clock_synced": self._ctx.clock_synced(),
        }

    async def info(self, _args: msgspec.Struct) -> dict[str, Any]:
        info = dict(self._ctx.info())
        if self._open_mode:
            info["warning"] = "OPEN MODE: unsigned commands are accepted (bench setting)"
        return info

    async def rebirth(self, _args: msgspec.Struct) -> dict[str, Any]:
        await self._ctx.rebirth()
        return {"republished": ["status", "info"]}

    async def snapshot(self, _args: msgspec.Struct) -> dict[str, Any]:
        return self._ctx.snapshot()

    async def metrics(self, _args: msgspec.Struct) -> dict[str, Any]:
        return await self._ctx.metrics()

    async def logs(self, args: c.LogsArgs) -> dict[str, Any]:
        min_level = level_number(args.level) if args.level else 0
        lines = self._ctx.logs(args.lines, min_level, args.since)
        return {"lines": lines, "count": len(lines), "level": args.level, "since": args.since}

    async def breadcrumbs(self, args: c.BreadcrumbsArgs) -> dict[str, Any]:
        crumbs = self._ctx.breadcrumbs(args.limit)
        return {"breadcrumbs": crumbs, "count": len(crumbs)}

    # --- operate ------------------------------------------------------------------------

    async def set_log_level(self, args: c.SetLogLevelArgs) -> dict[str, Any]:
        """Set a level now and put the level from before the first override back after ttl."""
        name = args.logger
        level = level_number(args.level)
        previous = self._ctx.set_log_level(name, level, float(args.ttl_s))
        pending = self._overrides.pop(name, None)
        original = previous
        if pending is not None:  # a new override extends, it does not stack
            original = pending.original
            pending.revert.cancel()
        revert = asyncio.get_running_loop().create_task(
            self._revert_after(name, original, args.ttl_s), name=f"log-level-revert:{name}"
        )
        self._overrides[name] = _Override(original, revert)
        logger.info("commands: logger %r at %s for %d s", name or "root", args.level, args.ttl_s)
        return {
            "logger": name or "root",
            "level": args.level,
            "previous": logging.getLevelName(original),
            "ttl_s": args.ttl_s,
            "revert_at": round(self._clock.time() + args.ttl_s, 3),
        }

    async def _revert_after(self, name: str, original: int, ttl_s: float) -> None:
        await self._clock.sleep(ttl_s)
        self._overrides.pop(name, None)
        self._ctx.set_log_level(name, original, 0.0)
        logger.info(
            "commands: logger %r back to %s", name or "root", logging.getLevelName(original)
        )

    def pending_reverts(self) -> dict[str, int]:
        """Loggers with a temporary level, and the level each goes back to."""
        return {name: o.original for name, o in self._overrides.items()}

    def close(self) -> None:
        """Put every temporarily changed level back now (the agent is stopping)."""
        for name, override in list(self._overrides.items()):
            override.revert.cancel()
            with contextlib.suppress(Exception):  # best effort on the way out
                self._ctx.set_log_level(name, override.original, 0.0)
        self._overrides.clear()

    async def dial(self, args: c.DialArgs) -> dict[str, Any]:
        return await self._ctx.dial(args.peer, args.call_id, args.token)

    async def hangup(self, args: c.HangupArgs) -> dict[str, Any]:
        return await self._ctx.hangup(args.call_id)

    async def call_test(self, args: c.CallTestArgs) -> dict[str, Any]:
        return await self._ctx.call_test(args.peer, args.duration_s, args.call_id, args.token)

    async def diagnose(self, args: c.DiagnoseArgs) -> dict[str, Any]:
        return await self._ctx.diagnose(args.selected())

    # --- dangerous ----------------------------------------------------------------------

    async def memory(self, args: c.MemoryArgs) -> dict[str, Any]:
        return await memory_profile(args.interval_s, args.top, self._clock.sleep)

    async def profile(self, args: c.ProfileArgs) -> dict[str, Any]:
        try:
            return await cpu_profile(args.duration_s, args.top, self._clock.sleep)
        except ProfilerBusy as exc:
            raise CommandError(Status.BUSY, f"a profiler is already running: {exc}") from exc

    async def crash(self, args: c.CrashArgs) -> AfterReply:
        kind = args.kind
        logger.warning("commands: test crash (%s) requested", kind)
        return AfterReply({"crashing": kind}, lambda: self._ctx.crash_test(kind))

    async def restart(self, args: c.RestartArgs) -> AfterReply:
        reason = args.reason
        logger.warning("commands: restart requested: %s", reason)
        return AfterReply(
            {"restarting": True, "reason": reason},
            lambda: self._ctx.request_restart(reason),
        )
