"""Signed offers (protocol section 4): checking an offer's token, and minting our own.

Where `security.signaling = "signed"`, every offer must carry `token`, a JWS as in section 3
with cmd "call", sub the callee and jti the call_id, from a key the callee trusts and allows
"call" (an operate key, or one listing "call" in `commands`). The check uses the command
server's `Verifier`, so offers and commands share the trusted keys and the replay cache (an
offer's jti is remembered as `call:<call_id>`, apart from command ids).

A device that calls such peers signs its own offers with `security.call_key_file`; an operator
can instead mint the token and hand it to the `dial` command with its call_id.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Final

from joserfc.jwk import OKPKey

from edgeagent.call.signaling import SignalError
from edgeagent.control.catalog import CommandError
from edgeagent.control.keys import call_claims, sign_command
from edgeagent.control.tokens import Verifier
from edgeagent.telemetry.payloads import Signal

__all__ = ["CALL_TOKEN_LIFETIME_S", "OfferSigner", "offer_check", "token_mismatch"]

CALL_TOKEN_LIFETIME_S: Final = 60
"""Lifetime of the tokens a device mints: an offer is answered within seconds, and a short
life bounds what a captured token is worth (it is single-use at the callee anyway)."""


def offer_check(verifier: Verifier, callee_id: str) -> Callable[[Signal], None]:
    """A `CallManager` offer check: SignalError saying why, for a missing or refused token."""

    def check(msg: Signal) -> None:
        ids = {"call_id": msg.call_id, "sender": msg.from_}
        if msg.token is None:
            raise SignalError("no token (this device takes signed offers only)", **ids)
        try:
            verifier.verify_call_token(msg.token, callee_id, msg.call_id)
        except CommandError as exc:
            raise SignalError(exc.message, **ids) from exc

    return check


class OfferSigner:
    """Mints the tokens of this device's own offers with its call key."""

    def __init__(
        self,
        private_key: OKPKey,
        kid: str,
        *,
        clock: Callable[[], float],
        lifetime_s: int = CALL_TOKEN_LIFETIME_S,
    ) -> None:
        self.kid = kid
        self._key = private_key
        self._clock = clock
        self.lifetime_s = lifetime_s

    def __repr__(self) -> str:
        return f"OfferSigner(kid={self.kid!r}, lifetime_s={self.lifetime_s})"

    def token(self, callee_id: str, call_id: str) -> str:
        """The token for an offer of call `call_id` to `callee_id`."""
        claims = call_claims(callee_id, call_id, lifetime_s=self.lifetime_s, now=self._clock())
        return sign_command(self._key, self.kid, claims)


def token_mismatch(token: str, callee_id: str, call_id: str) -> str | None:
    """Why `token` cannot be this offer's (its claims read, not verified), or None.

    For a token handed to `dial`: the callee will verify it; this only catches a token
    minted for another peer or call before the offer is sent.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return "token is not a JWS compact serialization"
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (ValueError, binascii.Error):
        return "token claims are not readable JSON"
    if not isinstance(claims, dict):
        return "token claims are not a JSON object"
    if claims.get("cmd") != "call":
        return f"token is for command {str(claims.get('cmd'))[:64]!r}, not 'call'"
    if claims.get("sub") != callee_id:
        return f"token is for {str(claims.get('sub'))[:64]!r}, not the peer {callee_id!r}"
    if claims.get("jti") != call_id:
        return f"token jti {str(claims.get('jti'))[:64]!r} is not the call_id {call_id!r}"
    return None
