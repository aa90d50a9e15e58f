"""Verification of signed remote commands and signed call offers (protocol sections 3 and 4).

A pure check over (topic command, payload bytes) with the trusted keys, a clock and the replay
cache passed in. The order of checks, and the code each failure gets:

1. payload over 16 KiB                                   413
2. not a JWS compact serialization, bad header JSON      400
   (in closed mode a bare JSON object is a missing signature: 401)
3. alg not EdDSA (none, HS*, ...), unknown header params,
   missing or unknown kid, bad signature                 401
4. claims not JSON / a claim missing or mistyped         400
5. sub is not this device                                403
6. cmd is not the topic's command                        400  (a malformed request: the same
                                                               token on its own topic is fine)
7. the topic's command is not in the catalog             404
8. exp <= iat                                            400
9. lifetime exp - iat over the maximum, expired, or
   issued in the future beyond the allowed skew          410
10. before clock sync, a command that is not read-only   403  (expiry and not-yet-valid need
                                                               a true clock: skipped until then;
                                                               lifetime is still checked)
11. key not allowed this command (role or explicit list) 403
12. jti already seen                                     410; replay cache full: 429

The replay cache is touched last, so a rejected request never uses up its jti. Errors carry the
jti when it can be read (possibly from an unauthenticated payload) so the answer has an `id`.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec
from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError

from edgeagent.control.catalog import CATALOG, CommandError, Role, Status
from edgeagent.control.keys import ALG, EDDSA_REGISTRY, TrustedKey
from edgeagent.control.replay import ReplayCache, ReplayCacheFull

__all__ = [
    "JTI_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "Claims",
    "CommandError",
    "Status",
    "VerifiedCommand",
    "Verifier",
    "peek_jti",
]

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES: Final = 16 * 1024
# The jti becomes a topic level (cmd-res/<id>), so no '/', '+', '#' or whitespace.
JTI_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,128}\Z"  # `\Z`: `$` allows a final newline
_JTI_RE: Final = re.compile(JTI_PATTERN)
_B64URL_RE: Final = re.compile(rb"[A-Za-z0-9_-]*")
_HEADER_PARAMS: Final = frozenset({"alg", "kid", "typ", "cty"})
_ALL_ROLES: Final = frozenset(r.value for r in Role)
_NUMERIC_DATE = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class Claims(msgspec.Struct, frozen=True):
    """The claims of a command token; other registered claims are ignored."""

    jti: Annotated[str, msgspec.Meta(pattern=JTI_PATTERN)]
    sub: str
    cmd: str
    iat: _NUMERIC_DATE
    exp: _NUMERIC_DATE
    args: dict[str, Any] = {}


@dataclass(frozen=True, slots=True)
class VerifiedCommand:
    """A request that passed every check; `kid` is None for an unsigned open-mode request."""

    jti: str
    kid: str | None
    cmd: str
    args: dict[str, Any]
    iat: int
    exp: int
    may_force: bool
    roles: frozenset[str]


def _b64url(segment: bytes) -> bytes:
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def _peek_jti(raw: bytes) -> str | None:
    """The jti of an (unverified) claims object, if it is readable and well-formed."""
    try:
        obj = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    jti = obj.get("jti") if isinstance(obj, dict) else None
    return jti if isinstance(jti, str) and _JTI_RE.fullmatch(jti) else None


def peek_jti(payload: bytes) -> str | None:
    """The request id of a command payload, unverified (a JWS or open-mode claims), if readable.

    For answering a request that is not verified (a flood past the server's limits): cheap,
    no signature check, so the id is only the sender's claim.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    text = payload.strip()
    if text.startswith(b"{"):
        return _peek_jti(text)
    parts = text.split(b".")
    if len(parts) != 3 or not _B64URL_RE.fullmatch(parts[1]):
        return None
    try:
        return _peek_jti(_b64url(parts[1]))
    except ValueError:
        return None


class Verifier:
    """Checks command requests and call tokens for one device against its trusted keys.

    `clock` returns wall-clock epoch seconds. `clock_synced` (default: always) says whether
    that clock can be trusted; until it can, only read-only commands are accepted.
    `open_mode` (a bench setting) also accepts the claims as a plain JSON object.
    """

    def __init__(
        self,
        device_id: str,
        keys: dict[str, TrustedKey],
        *,
        max_lifetime_s: int = 300,
        clock_skew_s: int = 30,
        replay: ReplayCache,
        clock: Callable[[], float],
        open_mode: bool = False,
        clock_synced: Callable[[], bool] | None = None,
    ) -> None:
        self.device_id = device_id
        self.keys = dict(keys)
        self.max_lifetime_s = max_lifetime_s
        self.clock_skew_s = clock_skew_s
        self.open_mode = open_mode
        self._replay = replay
        self._clock = clock
        self._clock_synced = clock_synced
        if open_mode:
            logger.warning(
                "commands: OPEN MODE - unsigned commands are accepted from anyone who can "
                "publish to this device's command topics; for benches only"
            )

    def verify(self, topic_cmd: str, payload: bytes) -> VerifiedCommand:
        """Check a request published to `<root>/cmd/<topic_cmd>`; raises CommandError."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise CommandError(Status.TOO_LARGE, f"request over {MAX_PAYLOAD_BYTES} bytes")
        text = payload.strip()
        if text.startswith(b"{"):
            if not self.open_mode:
                raise CommandError(
                    Status.UNAUTHORIZED,
                    "unsigned request: a JWS signed by a trusted key is required",
                    jti=_peek_jti(text),
                )
            key: TrustedKey | None = None
            claims = self._decode_claims(text, None)
        else:
            key, raw = self._authenticate(text)
            claims = self._decode_claims(raw, key.kid)
        return self._authorise(
            claims, key, sub=self.device_id, cmd=topic_cmd, replay_key=claims.jti, call=False
        )

    def verify_call_token(self, token: str, callee_id: str, call_id: str) -> VerifiedCommand:
        """Check the `token` of a signed offer: cmd "call", sub the callee, jti the call_id.

        Always a JWS, also in open mode (signed signaling is its own setting).
        """
        if not isinstance(token, str):
            raise CommandError(Status.BAD_REQUEST, "call token is not a string")
        raw_token = token.encode("utf-8", "replace")
        if len(raw_token) > MAX_PAYLOAD_BYTES:
            raise CommandError(Status.TOO_LARGE, f"token over {MAX_PAYLOAD_BYTES} bytes")
        key, raw = self._authenticate(raw_token.strip())
        claims = self._decode_claims(raw, key.kid)
        if claims.jti != call_id:
            raise CommandError(
                Status.BAD_REQUEST, "token jti is not this call_id", jti=claims.jti, kid=key.kid
            )
        return self._authorise(
            claims, key, sub=callee_id, cmd="call", replay_key=f"call:{call_id}", call=True
        )

    def _authenticate(self, text: bytes) -> tuple[TrustedKey, bytes]:
        """The trusted key that signed this compact JWS, and its verified payload bytes."""
        parts = text.split(b".")
        if len(parts) != 3 or not all(_B64URL_RE.fullmatch(p) for p in parts):
            raise CommandError(Status.BAD_REQUEST, "not a JWS compact serialization")
        try:
            jti = _peek_jti(_b64url(parts[1]))
        except ValueError:
            jti = None
        try:
            header = msgspec.json.decode(_b64url(parts[0]))
        except (ValueError, msgspec.DecodeError, RecursionError):
            header = None
        if not isinstance(header, dict):
            raise CommandError(Status.BAD_REQUEST, "JWS header is not a JSON object", jti=jti)
        alg, kid = header.get("alg"), header.get("kid")
        if alg != ALG:
            raise CommandError(
                Status.UNAUTHORIZED, f"alg {str(alg)[:16]!r} not allowed; EdDSA only", jti=jti
            )
        extra = sorted(str(k)[:32] for k in header if k not in _HEADER_PARAMS)
        if extra:
            raise CommandError(
                Status.UNAUTHORIZED, f"unsupported JWS header parameters {extra[:4]}", jti=jti
            )
        if not isinstance(kid, str) or not kid:
            raise CommandError(Status.UNAUTHORIZED, "JWS header has no kid", jti=jti)
        key = self.keys.get(kid)
        if key is None:
            raise CommandError(Status.UNAUTHORIZED, f"unknown kid {kid[:64]!r}", jti=jti)
        # Only the canonical base64url of a 64-byte signature: no slack bits or stray bytes.
        try:
            signature = _b64url(parts[2])
        except ValueError:
            signature = b""
        canonical = base64.urlsafe_b64encode(signature).rstrip(b"=")
        if len(signature) != 64 or canonical != parts[2]:
            raise CommandError(Status.UNAUTHORIZED, "bad signature", jti=jti, kid=kid)
        try:
            obj = jws.deserialize_compact(text, key.public_key, registry=EDDSA_REGISTRY)
        except BadSignatureError as exc:
            raise CommandError(Status.UNAUTHORIZED, "bad signature", jti=jti, kid=kid) from exc
        except (JoseError, ValueError, TypeError) as exc:
            message = f"rejected JWS: {str(exc)[:120]}"
            raise CommandError(Status.UNAUTHORIZED, message, jti=jti, kid=kid) from exc
        return key, obj.payload

    @staticmethod
    def _decode_claims(raw: bytes, kid: str | None) -> Claims:
        try:
            return msgspec.json.decode(raw, type=Claims)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            raise CommandError(
                Status.BAD_REQUEST, f"bad claims: {exc}", jti=_peek_jti(raw), kid=kid
            ) from exc

    def _authorise(
        self,
        claims: Claims,
        key: TrustedKey | None,
        *,
        sub: str,
        cmd: str,
        replay_key: str,
        call: bool,
    ) -> VerifiedCommand:
        kid = None if key is None else key.kid

        def fail(code: Status, message: str) -> CommandError:
            return CommandError(code, message, jti=claims.jti, kid=kid)

        if claims.sub != sub:
            raise fail(Status.FORBIDDEN, f"token is for {claims.sub[:64]!r}, not {sub!r}")
        if claims.cmd != cmd:
            raise fail(
                Status.BAD_REQUEST, f"token is for command {claims.cmd[:64]!r}, not {cmd[:64]!r}"
            )
        spec = CATALOG.get(cmd)
        if spec is None and not call:
            raise fail(Status.NOT_FOUND, f"unknown command {cmd[:64]!r}")
        if claims.exp <= claims.iat:
            raise fail(Status.BAD_REQUEST, "exp is not after iat")
        if claims.exp - claims.iat > self.max_lifetime_s:
            raise fail(Status.GONE, f"token lives longer than {self.max_lifetime_s} s")
        if self._clock_synced is None or self._clock_synced():
            now = self._clock()
            if claims.iat > now + self.clock_skew_s:
                raise fail(Status.GONE, "token not yet valid (iat in the future)")
            if now > claims.exp + self.clock_skew_s:
                raise fail(Status.GONE, "token expired")
        elif call:
            raise fail(Status.FORBIDDEN, "clock not synchronised: signed offers cannot be checked")
        elif spec is None or not spec.read_only:
            raise fail(Status.FORBIDDEN, "clock not synchronised: only read-only commands run")
        if key is not None and not key.allows(cmd):
            raise fail(Status.FORBIDDEN, f"key {kid!r} may not run {cmd!r}")
        try:
            fresh = self._replay.check_and_add(replay_key, claims.exp, iat=claims.iat)
        except ReplayCacheFull as exc:
            raise fail(Status.RATE_LIMITED, "too many recent requests to remember") from exc
        if not fresh:
            raise fail(Status.GONE, "request id already seen (replay)")
        return VerifiedCommand(
            jti=claims.jti,
            kid=kid,
            cmd=cmd,
            args=dict(claims.args),
            iat=claims.iat,
            exp=claims.exp,
            may_force=False if key is None else key.may_force,
            roles=_ALL_ROLES if key is None else key.effective_roles,
        )
