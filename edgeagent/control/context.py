"""What the command server needs from the agent, its limits, and how answers are capped.

`CommandContext` is the agent's side of the commands (the agent implements it; tests
implement it with fixtures); `CommandLimits` the server's rates, caps and concurrency;
`fit_output` cuts a handler's result to the answer budget, newest log lines kept;
`describe_catalog` is the catalog as `info.commands` lists it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec

from edgeagent.control.catalog import CATALOG, Risk

MAX_OUTPUT_BYTES: Final = 128 * 1024
ACCEPT_FIRST: Final = frozenset({"call_test", "diagnose", "memory", "profile"})
_TAIL_KEYS: Final = frozenset({"lines", "logs", "breadcrumbs", "events"})  # keep the newest


class CommandContext(Protocol):
    """What the handlers need from the agent (the agent implements it)."""

    @property
    def device_id(self) -> str: ...

    def snapshot(self) -> dict[str, Any]:
        """The call-state capture (captureCallState): calls, audio, ICE, health, config."""
        ...

    async def metrics(self) -> dict[str, Any]:
        """A fresh metrics sample, as in the `metrics` payload."""
        ...

    def info(self) -> dict[str, Any]:
        """The `info` payload as a dict."""
        ...

    async def rebirth(self) -> None:
        """Republish the retained status (online) and info."""
        ...

    def logs(self, lines: int, min_level: int, since: float | None) -> list[str]:
        """The newest `lines` log lines at `min_level` or above, since epoch `since`."""
        ...

    def breadcrumbs(self, limit: int) -> list[dict[str, Any]]: ...

    def set_log_level(self, logger: str, level: int, ttl_s: float) -> int:
        """Set a logger's level now ("" = root) and return the previous one.

        The handlers call it again with the previous level when ttl_s has passed (ttl_s=0);
        `handlers.apply_log_level` is a complete implementation.
        """
        ...

    def call_active(self) -> bool: ...

    async def dial(
        self, peer: str | None, call_id: str | None = None, token: str | None = None
    ) -> dict[str, Any]:
        """Start a call (None: the default peer), as `call_id` with offer `token` when given;
        CommandError 409 busy, 400 no valid peer or a token that is not this call's."""
        ...

    async def hangup(self, call_id: str | None) -> dict[str, Any]:
        """End the active call: {"ended", "call_id", "result"}; ended False when none was.

        CommandError 400 when `call_id` is given and is not the active call
        (`handlers.check_hangup_target`).
        """
        ...

    async def call_test(
        self,
        peer: str | None,
        duration_s: int,
        call_id: str | None = None,
        token: str | None = None,
    ) -> dict[str, Any]:
        """Call the echo peer, play a known signal: latency, levels, echo verdict, score.

        `call_id`/`token`: as for `dial` (an offer token minted for this call)."""
        ...

    async def diagnose(self, checks: tuple[str, ...]) -> dict[str, Any]:
        """Each check's result and timing."""
        ...

    def clock_synced(self) -> bool: ...

    def request_restart(self, reason: str) -> None:
        """Stop gracefully with `reason` recorded, so the supervisor starts us again."""
        ...

    def crash_test(self, kind: str) -> None:
        """Crash as a real bug would; may raise (it runs in the server's TaskGroup)."""
        ...


@dataclass(frozen=True, slots=True)
class CommandLimits:
    """Rates, caps and concurrency of the command server."""

    max_output_bytes: int = MAX_OUTPUT_BYTES
    request_rate_per_s: float = 5.0  # per key, in memory
    request_burst: float = 30.0
    heavy_rate_per_s: float = 1 / 60  # per heavy command, persisted
    heavy_burst: float = 5.0
    max_in_flight: int = 32  # requests beyond this are answered 429 unverified
    queue_size: int = 1024  # past this, requests are answered 429 unverified: a flood
    refusal_backlog_bytes: int = 1 << 20  # 429s waiting to go out; past this, dropped (logged)
    accept_first: frozenset[str] = ACCEPT_FIRST


def describe_catalog(armed: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The catalog as `info.commands` lists it: name, role, risk, limits, argument names."""
    return [
        {
            "name": s.name,
            "role": s.role.value,
            "risk": s.risk.value,
            "timeout_s": s.timeout_s,
            "heavy": s.heavy,
            "refuses_during_call": s.refuses_during_call,
            "args": list(s.args_type.__struct_fields__),
            **({"armed": s.name in armed} if s.risk is Risk.DANGEROUS else {}),
        }
        for s in CATALOG.values()
    ]


def _shrink_once(value: Any, key: str | None = None) -> tuple[Any, bool]:
    """Halve the biggest list or string inside `value`; False if nothing could shrink."""
    if isinstance(value, str):
        if len(value) <= 64:
            return value, False
        return value[: len(value) // 2] + "...[truncated]", True
    if isinstance(value, list):
        if len(value) > 1:
            keep = len(value) // 2
            # Logs and crumbs keep their newest (last) entries; ranked lists their head.
            return (value[-keep:] if key in _TAIL_KEYS else value[:keep]), True
        if value:
            inner, changed = _shrink_once(value[0])
            return [inner], changed
        return value, False
    if isinstance(value, dict):
        if not value:
            return value, False
        sizes = {k: len(msgspec.json.encode(v)) for k, v in value.items()}
        for k in sorted(sizes, key=lambda k: sizes[k], reverse=True):
            inner, changed = _shrink_once(value[k], k)
            if changed:
                return {**value, k: inner}, True
        return value, False
    return value, False


def fit_output(result: Any, budget: int) -> tuple[Any, bool]:
    """`result` cut to encode within `budget` bytes; (result, truncated)."""
    size = len(msgspec.json.encode(result))
    if size <= budget:
        return result, False
    for _ in range(200):
        result, changed = _shrink_once(result)
        if not changed:
            break
        if len(msgspec.json.encode(result)) <= budget:
            return result, True
    text = msgspec.json.encode(result).decode()[: max(0, budget // 2)]
    return {"partial_json": text}, True
