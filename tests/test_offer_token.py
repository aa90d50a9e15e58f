"""Signed offers: the check of an offer's token against the trusted keys and replay cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent.call import signaling as sig
from edgeagent.call.offer_token import offer_check
from edgeagent.clock import FakeClock
from edgeagent.control.keys import (
    call_claims,
    generate_keypair,
    load_trusted_keys,
    sign_command,
)
from edgeagent.control.replay import ReplayCache
from edgeagent.control.tokens import Verifier
from edgeagent.telemetry import payloads as p

CALLEE = "dev-b"
T0 = 1_800_000_000.0

OP_PRIV, OP_PUB, _ = generate_keypair("op")
CALLER_PRIV, CALLER_PUB, _ = generate_keypair("dev-a-call")
READ_PRIV, READ_PUB, _ = generate_keypair("reader")
STRANGER_PRIV, _, _ = generate_keypair("stranger")
TRUSTED = load_trusted_keys(
    [
        {"kid": "op", "public_key": OP_PUB, "roles": ["operate"]},
        {"kid": "dev-a-call", "public_key": CALLER_PUB, "commands": ["call"]},
        {"kid": "reader", "public_key": READ_PUB, "roles": ["read"]},
    ]
)
PRIVATE = {"op": OP_PRIV, "dev-a-call": CALLER_PRIV, "reader": READ_PRIV}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def verifier(tmp_path: Path, clock: FakeClock) -> Verifier:
    replay = ReplayCache(tmp_path / "replay.sqlite3", clock.time)
    return Verifier(CALLEE, TRUSTED, replay=replay, clock=clock.time)


def offer(call_id: str = "c-1", token: str | None = None, sender: str = "dev-a") -> p.Signal:
    out = sig.build(
        "offer",
        prefix="edge/v1",
        me=sender,
        to=CALLEE,
        call_id=call_id,
        ts=T0,
        sdp="v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
        token=token,
    )
    return sig.decode_signal(out.payload, me=CALLEE)


def mint(
    call_id: str = "c-1", *, kid: str = "dev-a-call", priv: str | None = None, **over: Any
) -> str:
    claims = call_claims(CALLEE, call_id, now=T0)
    claims.update(over)
    return sign_command(priv or PRIVATE[kid], kid, claims)


def refusal(check: Callable[[p.Signal], None], msg: p.Signal) -> sig.SignalError:
    with pytest.raises(sig.SignalError) as info:
        check(msg)
    assert (info.value.call_id, info.value.sender) == (msg.call_id, msg.from_)
    return info.value


# --- the check of an incoming offer ----------------------------------------------------------


def test_a_valid_token_passes_once(verifier: Verifier) -> None:
    check = offer_check(verifier, CALLEE)
    check(offer("c-1", mint("c-1")))
    check(offer("c-2", mint("c-2", kid="op")))  # an operate key may call as well
    assert "already seen" in str(refusal(check, offer("c-1", mint("c-1"))))


@pytest.mark.parametrize(
    ("make", "call_id", "why"),
    [
        (lambda: None, "c-1", "no token (this device takes signed offers only)"),
        (lambda: mint("c-other"), "c-1", "token jti is not this call_id"),
        (lambda: mint(sub="dev-z"), "c-1", "token is for 'dev-z', not 'dev-b'"),
        (lambda: mint(cmd="dial"), "c-1", "token is for command 'dial', not 'call'"),
        (lambda: mint(kid="stranger", priv=STRANGER_PRIV), "c-1", "unknown kid 'stranger'"),
        (lambda: mint(kid="op", priv=STRANGER_PRIV), "c-1", "bad signature"),
        (lambda: mint(kid="reader"), "c-1", "key 'reader' may not run 'call'"),
        (lambda: mint(exp=int(T0) + 3600), "c-1", "token lives longer than 300 s"),
        (lambda: mint(iat=int(T0) - 200, exp=int(T0) - 100), "c-1", "token expired"),
        (lambda: mint(iat=int(T0) + 120, exp=int(T0) + 180), "c-1", "not yet valid"),
        (lambda: json.dumps(call_claims(CALLEE, "c-1", now=T0)), "c-1", "not a JWS"),
    ],
)
def test_a_bad_token_is_refused_saying_why(
    verifier: Verifier, make: Callable[[], str | None], call_id: str, why: str
) -> None:
    err = refusal(offer_check(verifier, CALLEE), offer(call_id, make()))
    assert why in str(err)


def test_a_refused_token_does_not_use_up_its_call_id(verifier: Verifier) -> None:
    check = offer_check(verifier, CALLEE)
    refusal(check, offer("c-1", mint("c-1", kid="reader")))
    check(offer("c-1", mint("c-1")))


async def test_expiry_follows_the_clock(verifier: Verifier, clock: FakeClock) -> None:
    check = offer_check(verifier, CALLEE)
    first, second = mint("c-1"), mint("c-2")  # 60 s from T0, and 30 s allowed skew
    await clock.advance(89.0)
    check(offer("c-1", first))
    await clock.advance(2.0)
    assert "expired" in str(refusal(check, offer("c-2", second)))


def test_offer_ids_and_command_ids_are_remembered_apart(verifier: Verifier) -> None:
    verifier.verify("ping", sign_command(OP_PRIV, "op", _command("same")).encode())
    offer_check(verifier, CALLEE)(offer("same", mint("same")))


def _command(jti: str) -> dict[str, Any]:
    return {"jti": jti, "sub": CALLEE, "cmd": "ping", "iat": int(T0), "exp": int(T0) + 60}


def test_before_clock_sync_an_offer_cannot_be_checked(tmp_path: Path, clock: FakeClock) -> None:
    replay = ReplayCache(tmp_path / "r.sqlite3", clock.time)
    unsynced = Verifier(
        CALLEE, TRUSTED, replay=replay, clock=clock.time, clock_synced=lambda: False
    )
    err = refusal(offer_check(unsynced, CALLEE), offer("c-1", mint("c-1")))
    assert "clock not synchronised: signed offers cannot be checked" in str(err)
