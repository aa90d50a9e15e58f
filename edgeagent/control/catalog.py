"""The v1 remote-command catalog: each command's role, risk, limits and typed arguments.

Metadata only; handlers live elsewhere. `CommandError` is defined here (and re-exported by
`edgeagent.control.tokens`) because handlers raise it as much as the token checks do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Final, Literal

import msgspec

from edgeagent.call.signaling import CALL_ID_PATTERN

__all__ = [
    "CALL_ROLE",
    "CATALOG",
    "DEVICE_ID_PATTERN",
    "CommandError",
    "CommandSpec",
    "Risk",
    "Role",
    "Status",
    "decode_args",
    "get_spec",
]

# `\Z`: msgspec searches with Python's re, where `$` also matches before a final newline.
DEVICE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{0,62}\Z"
MAX_CALL_TOKEN_CHARS: Final = 4096  # a call token is ~300; the whole request is 16 KiB


class Status(IntEnum):
    """Response codes of protocol section 3."""

    OK = 200
    ACCEPTED = 202
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    BUSY = 409
    GONE = 410
    TOO_LARGE = 413
    RATE_LIMITED = 429
    INTERNAL = 500


class CommandError(Exception):
    """A request that gets an error answer (never a crash).

    `jti` and `kid` are whatever could be read from the request, for the response `id` and the
    audit event; on 400/401 they come from an unauthenticated payload, so treat them as labels.
    """

    def __init__(
        self, code: int, message: str, *, jti: str | None = None, kid: str | None = None
    ) -> None:
        super().__init__(code, message)
        self.code = int(code)
        self.message = message
        self.jti = jti
        self.kid = kid

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Role(StrEnum):
    """Key roles, ordered: debug implies operate, operate implies read."""

    READ = "read"
    OPERATE = "operate"
    DEBUG = "debug"


class Risk(StrEnum):
    READ = "read"
    OPERATE = "operate"
    DANGEROUS = "dangerous"  # needs local arming; one at a time


# A signed offer (protocol section 4) is authorised like an operate command.
CALL_ROLE: Final = Role.OPERATE

PeerId = Annotated[str, msgspec.Meta(pattern=DEVICE_ID_PATTERN)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
DiagnoseCheck = Literal["stun", "turn", "tls", "dns", "broker", "audio", "clock"]
DIAGNOSE_CHECKS: Final[tuple[str, ...]] = ("stun", "turn", "tls", "dns", "broker", "audio", "clock")


class NoArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Commands that take no arguments."""


class LogsArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    lines: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 200
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None
    since: Annotated[float, msgspec.Meta(ge=0)] | None = None  # epoch seconds


class BreadcrumbsArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class SetLogLevelArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    level: LogLevel
    logger: Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[A-Za-z0-9_.]*\Z")] = ""
    ttl_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 600


class DialArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    peer: PeerId | None = None  # None: the configured default peer
    # The call's id (as signaling allows), and an offer token minted for it (cmd "call",
    # sub the peer, jti this call_id) for a peer with signed signaling; the token needs it.
    call_id: Annotated[str, msgspec.Meta(pattern=CALL_ID_PATTERN)] | None = None
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CALL_TOKEN_CHARS)] | None = None


class HangupArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # None: the active call, if any; a call_id that is not the active call is a 400.
    call_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None


class CallTestArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    peer: PeerId | None = None  # None: the configured echo peer
    duration_s: Annotated[int, msgspec.Meta(ge=1, le=30)] = 5
    # As for dial: an operator-minted offer token for an echo peer with signed signaling.
    call_id: Annotated[str, msgspec.Meta(pattern=CALL_ID_PATTERN)] | None = None
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CALL_TOKEN_CHARS)] | None = None


class DiagnoseArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    checks: (
        Annotated[list[DiagnoseCheck | Literal["all"]], msgspec.Meta(min_length=1, max_length=8)]
        | Literal["all"]
    ) = "all"

    def selected(self) -> tuple[str, ...]:
        """The checks to run, in catalog order, with `all` expanded."""
        wanted = {self.checks} if isinstance(self.checks, str) else set(self.checks)
        if "all" in wanted:
            return DIAGNOSE_CHECKS
        return tuple(c for c in DIAGNOSE_CHECKS if c in wanted)


class MemoryArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    interval_s: Annotated[int, msgspec.Meta(ge=1, le=120)] = 10
    top: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20


class ProfileArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    duration_s: Annotated[int, msgspec.Meta(ge=1, le=60)] = 10
    top: Annotated[int, msgspec.Meta(ge=1, le=100)] = 30


class CrashArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["exception", "segfault"] = "exception"


class RestartArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What a command needs and how it may run.

    heavy: rate limited with buckets that persist across restarts.
    refuses_during_call: answered 409 while a call is active (unless the key may force).
    read_only: changes nothing on the device, so it may run before the clock is synchronised.
    timeout_s: the handler's ceiling for the largest allowed arguments.
    """

    name: str
    role: Role
    risk: Risk
    timeout_s: float
    args_type: type[msgspec.Struct]
    heavy: bool = False
    refuses_during_call: bool = False
    read_only: bool = False


def _spec(
    name: str,
    role: Role,
    risk: Risk,
    timeout_s: float,
    args_type: type[msgspec.Struct] = NoArgs,
    **flags: bool,
) -> tuple[str, CommandSpec]:
    return name, CommandSpec(name, role, risk, timeout_s, args_type, **flags)


_R, _O, _D = Role.READ, Role.OPERATE, Role.DEBUG

CATALOG: Final[dict[str, CommandSpec]] = dict(
    [
        _spec("ping", _R, Risk.READ, 5, read_only=True),
        _spec("info", _R, Risk.READ, 5, read_only=True),
        _spec("rebirth", _R, Risk.READ, 10, read_only=True),
        _spec("snapshot", _R, Risk.READ, 10, read_only=True),
        _spec("metrics", _R, Risk.READ, 10, read_only=True),
        _spec("logs", _R, Risk.READ, 15, LogsArgs, read_only=True),
        _spec("breadcrumbs", _R, Risk.READ, 5, BreadcrumbsArgs, read_only=True),
        # diagnose only observes (and checking the clock is most useful before sync).
        _spec("diagnose", _O, Risk.OPERATE, 60, DiagnoseArgs, heavy=True, read_only=True),
        _spec("set_log_level", _O, Risk.OPERATE, 5, SetLogLevelArgs),
        _spec("dial", _O, Risk.OPERATE, 45, DialArgs, refuses_during_call=True),
        _spec("hangup", _O, Risk.OPERATE, 10, HangupArgs),
        _spec(
            "call_test", _O, Risk.OPERATE, 75, CallTestArgs, heavy=True, refuses_during_call=True
        ),
        _spec("memory", _D, Risk.DANGEROUS, 150, MemoryArgs, heavy=True, refuses_during_call=True),
        _spec("profile", _D, Risk.DANGEROUS, 90, ProfileArgs, heavy=True, refuses_during_call=True),
        _spec("crash", _D, Risk.DANGEROUS, 10, CrashArgs, heavy=True, refuses_during_call=True),
        _spec("restart", _D, Risk.DANGEROUS, 30, RestartArgs, heavy=True, refuses_during_call=True),
    ]
)


def get_spec(name: str) -> CommandSpec:
    """The spec of a catalog command; CommandError(404) for anything else."""
    spec = CATALOG.get(name)
    if spec is None:
        raise CommandError(Status.NOT_FOUND, f"unknown command {name[:64]!r}")
    return spec


def decode_args(spec: CommandSpec, raw: dict[str, Any]) -> msgspec.Struct:
    """Typed, bounded arguments for `spec`; CommandError(400) naming the offending path."""
    try:
        return msgspec.convert(raw, type=spec.args_type, strict=True)
    except msgspec.ValidationError as exc:
        raise CommandError(Status.BAD_REQUEST, f"{spec.name}: invalid args: {exc}") from exc
