"""Signed offers: the check of an offer's token, the tokens a device mints, the call key config."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent import cli
from edgeagent.call import signaling as sig
from edgeagent.call.offer_token import OfferSigner, offer_check, token_mismatch
from edgeagent.clock import FakeClock
from edgeagent.config import EXIT_CONFIG, ConfigError, parse_config
from edgeagent.control.catalog import CATALOG, CommandError, DialArgs, decode_args
from edgeagent.control.keys import (
    call_claims,
    generate_keypair,
    load_private_key,
    load_signing_key,
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


# --- the tokens a device mints ---------------------------------------------------------------


def test_the_signer_mints_what_the_callee_accepts(verifier: Verifier, clock: FakeClock) -> None:
    signer = OfferSigner(load_private_key(CALLER_PRIV), "dev-a-call", clock=clock.time)
    token = signer.token(CALLEE, "c-7")
    claims = _claims_of(token)
    assert claims["cmd"] == "call" and claims["sub"] == CALLEE and claims["jti"] == "c-7"
    assert claims["exp"] - claims["iat"] == 60 and claims["iat"] == int(T0)
    offer_check(verifier, CALLEE)(offer("c-7", token))
    assert json.loads(CALLER_PRIV)["d"] not in repr(signer)
    assert token_mismatch(token, CALLEE, "c-7") is None


def _claims_of(token: str) -> Any:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


@pytest.mark.parametrize(
    ("token", "callee", "call_id", "why"),
    [
        (mint("c-1"), "dev-c", "c-1", "token is for 'dev-b', not the peer 'dev-c'"),
        (mint("c-1"), CALLEE, "c-2", "token jti 'c-1' is not the call_id 'c-2'"),
        (mint("c-1", cmd="dial"), CALLEE, "c-1", "token is for command 'dial', not 'call'"),
        ("abc", CALLEE, "c-1", "not a JWS compact serialization"),
        ("a.!!!.c", CALLEE, "c-1", "not readable JSON"),
        ("a.WzFd.c", CALLEE, "c-1", "not a JSON object"),
    ],
)
def test_a_handed_token_is_checked_against_the_call(
    token: str, callee: str, call_id: str, why: str
) -> None:
    assert why in (token_mismatch(token, callee, call_id) or "")


def test_dial_args_take_a_call_id_and_a_bounded_token() -> None:
    spec = CATALOG["dial"]
    args = decode_args(spec, {"peer": CALLEE, "call_id": "op.1-x_2", "token": "a.b.c"})
    assert args == DialArgs(peer=CALLEE, call_id="op.1-x_2", token="a.b.c")
    for bad in (
        {"call_id": "has/slash"},
        {"call_id": "x" * 65},
        {"call_id": ""},
        {"token": ""},
        {"token": "x" * 4097},
        {"token": 5},
    ):
        with pytest.raises(CommandError) as info:
            decode_args(spec, bad)
        assert info.value.code == 400, bad


# --- the call key in the config ----------------------------------------------------------------


def security(**keys: Any) -> Any:
    return parse_config({"device": {"id": "dev-a"}, "security": keys}, environ={}).security


def test_the_call_key_is_read_with_its_kid(tmp_path: Path) -> None:
    path = tmp_path / "call.jwk.json"
    path.write_text(CALLER_PRIV)
    assert security(call_key_file=str(path)).call_key_file == path
    assert load_signing_key(path)[1] == "dev-a-call"
    assert load_signing_key(path, "other")[1] == "other"
    sec = security(call_key_file=str(path), call_key_id="renamed")
    assert sec.call_key_id == "renamed"
    assert CALLER_PRIV not in repr(sec)


def _errors(**keys: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        security(**keys)
    return info.value.errors


def test_a_bad_call_key_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    public = json.loads(CALLER_PRIV)
    del public["d"]
    files = {
        "public.json": json.dumps(public),
        "text.json": "not json",
        "list.json": "[]",
        "nokid.json": json.dumps({k: v for k, v in json.loads(CALLER_PRIV).items() if k != "kid"}),
        "rsa.json": json.dumps({"kty": "RSA", "n": "x", "e": "AQAB", "d": "y"}),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = {
        "missing.json": "cannot read",
        "public.json": "a public key cannot sign",
        "text.json": "is not JSON",
        "list.json": "is not a JSON object",
        "nokid.json": "has no 'kid'",
        "rsa.json": "expected an OKP Ed25519 private JWK",
    }
    for name, why in cases.items():
        (line,) = _errors(call_key_file=str(tmp_path / name))
        assert line.startswith("security.call_key_file: ") and why in line, line
        assert '"d"' not in line and json.loads(CALLER_PRIV)["d"] not in line
    (line,) = _errors(call_key_id="dev-a")
    assert line.startswith("security.call_key_file: ") and "call_key_id" in line
    assert _errors(call_key_id="bad kid", call_key_file=str(tmp_path / "missing.json"))[0]


def test_check_config_reports_a_bad_call_key_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "edgeagent.toml"
    key = tmp_path / "call.jwk.json"
    cfg.write_text(f'[device]\nid = "dev-a"\n[security]\ncall_key_file = "{key}"\n')
    assert cli.main(["check-config", str(cfg)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"security.call_key_file: Value error, cannot read {key}" in err
    key.write_text(CALLER_PRIV)
    assert cli.main(["check-config", str(cfg)]) == 0
