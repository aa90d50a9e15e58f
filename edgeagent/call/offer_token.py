"""Signed offers (protocol section 4): checking an offer's token.

Where `security.signaling = "signed"`, every offer must carry `token`, a JWS as in section 3
with cmd "call", sub the callee and jti the call_id, from a key the callee trusts and allows
"call" (an operate key, or one listing "call" in `commands`). The check uses the command
server's `Verifier`, so offers and commands share the trusted keys and the replay cache (an
offer's jti is remembered as `call:<call_id>`, apart from command ids).
"""

from __future__ import annotations

from collections.abc import Callable

from edgeagent.call.signaling import SignalError
from edgeagent.control.catalog import CommandError
from edgeagent.control.tokens import Verifier
from edgeagent.telemetry.payloads import Signal

__all__ = ["offer_check"]


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
