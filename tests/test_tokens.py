"""Signed commands: trusted keys, the catalog's typed arguments, every rejection code, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from joserfc.jwk import OKPKey

from edgeagent.clock import FakeClock
from edgeagent.control.catalog import (
    CATALOG,
    CallTestArgs,
    DiagnoseArgs,
    LogsArgs,
    Risk,
    decode_args,
    get_spec,
)
from edgeagent.control.keys import (
    KeyConfigError,
    TrustedKey,
    command_claims,
    expand_roles,
    generate_keypair,
    load_trusted_keys,
    parse_public_key,
    sign_command,
)
from edgeagent.control.replay import ReplayCache
from edgeagent.control.tokens import (
    JTI_PATTERN,
    MAX_PAYLOAD_BYTES,
    Claims,
    CommandError,
    VerifiedCommand,
    Verifier,
    peek_jti,
)

DEVICE = "dev-1"
T0 = 1_800_000_000.0

OP_PRIV, OP_PUB, _ = generate_keypair("op")
READ_PRIV, READ_PUB, _ = generate_keypair("reader")
DBG_PRIV, DBG_PUB, _ = generate_keypair("dbg")
ROGUE_PRIV, _, _ = generate_keypair("op")  # claims a trusted kid, but is not that key

TRUSTED = load_trusted_keys(
    [
        {"kid": "op", "public_key": OP_PUB, "roles": ["operate"]},
        {
            "kid": "reader",
            "public_key": {"kty": "OKP", "crv": "Ed25519", "x": READ_PUB},
            "roles": ["read"],
            "commands": ["hangup"],
        },
        {"kid": "dbg", "public_key": DBG_PUB, "roles": ["debug"], "may_force": True},
    ]
)
PRIVATE = {"op": OP_PRIV, "reader": READ_PRIV, "dbg": DBG_PRIV}


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def claims(cmd: str = "ping", *, drop: tuple[str, ...] = (), **over: Any) -> dict[str, Any]:
    c = command_claims(DEVICE, cmd, now=T0, lifetime_s=60)
    c.update(over)
    for name in drop:
        del c[name]
    return c


def token(cmd: str = "ping", *, kid: str = "op", priv: str | None = None, **over: Any) -> bytes:
    c = claims(cmd, **over)
    return sign_command(priv or PRIVATE[kid], kid, c).encode()


def raw_jws(header: Any, payload: Any, sign: Callable[[bytes], bytes]) -> bytes:
    """A compact JWS with any header, signed by any function (for forged tokens)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(body)
    return signing_input + b"." + b64(sign(signing_input))


def ed25519_signer(private_jwk: str) -> Callable[[bytes], bytes]:
    key = OKPKey.import_key(json.loads(private_jwk)).private_key
    assert key is not None
    return key.sign


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def replay(tmp_path: Path, clock: FakeClock) -> ReplayCache:
    return ReplayCache(tmp_path / "replay.db", clock.time)


@pytest.fixture
def verifier(replay: ReplayCache, clock: FakeClock) -> Verifier:
    return Verifier(DEVICE, TRUSTED, replay=replay, clock=clock.time)


@pytest.fixture
def open_verifier(replay: ReplayCache, clock: FakeClock) -> Verifier:
    return Verifier(DEVICE, TRUSTED, replay=replay, clock=clock.time, open_mode=True)


def reject(v: Verifier, topic: str, payload: bytes) -> CommandError:
    with pytest.raises(CommandError) as info:
        v.verify(topic, payload)
    return info.value


# --- keys ------------------------------------------------------------------------------------


def test_roles_are_ordered_debug_operate_read() -> None:
    assert expand_roles(["debug"]) == {"debug", "operate", "read"}
    assert expand_roles(["operate"]) == {"operate", "read"}
    assert expand_roles(["read"]) == {"read"}
    assert expand_roles([]) == frozenset()
    op, reader, dbg = TRUSTED["op"], TRUSTED["reader"], TRUSTED["dbg"]
    assert op.allows("dial") and op.allows("ping") and op.allows("call")
    assert not op.allows("restart")
    assert reader.allows("logs") and reader.allows("hangup")  # hangup by explicit allow
    assert not reader.allows("dial") and not reader.allows("call")
    assert all(dbg.allows(name) for name in CATALOG)
    assert not dbg.allows("no_such_command")
    assert dbg.may_force and not op.may_force


def test_load_trusted_keys_reports_every_problem_with_its_path() -> None:
    private = json.loads(OP_PRIV)
    with pytest.raises(KeyConfigError) as info:
        load_trusted_keys(
            [
                {"kid": "a", "public_key": OP_PUB, "roles": ["operat"]},
                {"kid": "a", "public_key": READ_PUB, "roles": ["read"]},
                {"kid": "b", "public_key": "not base64!", "roles": ["read"]},
                {"kid": "c", "public_key": private, "roles": ["read"]},
                {"kid": "d", "public_key": OP_PUB, "commands": ["restrat"], "mayforce": True},
                {"kid": "e f", "public_key": b64(b"x" * 31).decode(), "roles": ["read"]},
                {"kid": "g", "public_key": OP_PUB},
                "nope",
            ]
        )
    errors = info.value.errors
    expected = [
        r"security\.keys\[0\]\.roles: unknown 'operat' \(did you mean 'operate'\?\)",
        r"security\.keys\[1\]\.kid: duplicate kid 'a'",
        r"security\.keys\[2\]\.public_key: not base64url",
        r"security\.keys\[3\]\.public_key: contains private key material",
        r"security\.keys\[4\]\.mayforce: unknown field \(did you mean 'may_force'\?\)",
        r"security\.keys\[4\]\.commands: unknown 'restrat' \(did you mean 'restart'\?\)",
        r"security\.keys\[5\]\.kid: required",
        r"security\.keys\[5\]\.public_key: an Ed25519 public key is 32 bytes, got 31",
        r"security\.keys\[6\]: give 'roles' and/or 'commands'",
        r"security\.keys\[7\]: expected a table",
    ]
    for pattern in expected:
        assert any(re.match(pattern, e) for e in errors), (pattern, errors)
    assert len(errors) == len(expected)


def test_public_key_accepts_raw_b64url_or_jwk_and_refuses_other_curves() -> None:
    a = parse_public_key(OP_PUB)
    b = parse_public_key({"kty": "OKP", "crv": "Ed25519", "x": OP_PUB})
    assert a.thumbprint() == b.thumbprint()
    assert not a.is_private
    with pytest.raises(ValueError, match="Ed25519"):
        parse_public_key({"kty": "OKP", "crv": "X25519", "x": OP_PUB})
    with pytest.raises(ValueError, match="base64url string or an OKP JWK"):
        parse_public_key(42)


def test_generate_keypair_derives_kid_from_thumbprint() -> None:
    private, public, kid = generate_keypair()
    key = OKPKey.import_key(json.loads(private))
    assert key.is_private
    assert kid == key.thumbprint()[:16]
    assert json.loads(private)["kid"] == kid
    assert parse_public_key(public).thumbprint() == key.thumbprint()
    assert generate_keypair("ops-laptop")[2] == "ops-laptop"
    with pytest.raises(ValueError, match="kid"):
        generate_keypair("has space")


def test_signed_command_header_is_eddsa_with_kid() -> None:
    tok = token("ping").split(b".")
    header = json.loads(base64.urlsafe_b64decode(tok[0] + b"=="))
    assert header == {"alg": "EdDSA", "kid": "op"}
    with pytest.raises(ValueError, match="cannot sign"):
        sign_command(json.dumps({"kty": "OKP", "crv": "Ed25519", "x": OP_PUB}), "op", claims())


# --- catalog ---------------------------------------------------------------------------------


def test_catalog_is_the_v1_catalog() -> None:
    assert set(CATALOG) == {
        "ping", "info", "snapshot", "metrics", "logs", "breadcrumbs", "set_log_level", "dial",
        "hangup", "call_test", "diagnose", "memory", "profile", "crash", "restart", "rebirth",
    }  # fmt: skip
    dangerous = {n for n, s in CATALOG.items() if s.risk is Risk.DANGEROUS}
    assert dangerous == {"memory", "profile", "crash", "restart"}
    assert all(CATALOG[n].role == "debug" and CATALOG[n].heavy for n in dangerous)
    assert all(s.refuses_during_call for n, s in CATALOG.items() if n in dangerous)
    read_only = {n for n, s in CATALOG.items() if s.read_only}
    assert read_only.isdisjoint(dangerous | {"dial", "hangup", "set_log_level", "call_test"})
    assert {"ping", "info", "logs", "diagnose"} <= read_only
    for spec in CATALOG.values():
        assert 0 < spec.timeout_s <= 300
    # handlers get at least the time their largest arguments need
    assert CATALOG["memory"].timeout_s > 120 and CATALOG["profile"].timeout_s > 60
    with pytest.raises(CommandError) as info:
        get_spec("format_disk")
    assert info.value.code == 404


def test_decode_args_defaults_and_typed_values() -> None:
    assert decode_args(CATALOG["logs"], {}) == LogsArgs(lines=200, level=None, since=None)
    assert decode_args(CATALOG["logs"], {"lines": 5000, "level": "ERROR", "since": 1}).since == 1
    args = decode_args(CATALOG["set_log_level"], {"level": "DEBUG"})
    assert (args.logger, args.level, args.ttl_s) == ("", "DEBUG", 600)  # type: ignore[attr-defined]
    assert decode_args(CATALOG["call_test"], {"peer": "echo-1"}) == CallTestArgs("echo-1", 5)
    diag = decode_args(CATALOG["diagnose"], {"checks": ["dns", "clock", "dns"]})
    assert isinstance(diag, DiagnoseArgs)
    assert diag.selected() == ("dns", "clock")
    assert decode_args(CATALOG["diagnose"], {}).selected()[0] == "stun"  # type: ignore[attr-defined]
    assert decode_args(CATALOG["crash"], {}).kind == "exception"  # type: ignore[attr-defined]
    assert decode_args(CATALOG["ping"], {}) is not None


@pytest.mark.parametrize(
    ("cmd", "args", "path"),
    [
        ("logs", {"lines": 0}, r">= 1 - at `\$.lines`"),
        ("logs", {"lines": 5001}, r"<= 5000 - at `\$.lines`"),
        ("logs", {"lines": "10"}, r"Expected `int`, got `str` - at `\$.lines`"),
        ("logs", {"lines": 10.0}, r"got `float` - at `\$.lines`"),
        ("logs", {"level": "LOUD"}, r"at `\$.level`"),
        ("logs", {"lnes": 3}, r"unknown field `lnes`"),
        ("set_log_level", {}, r"missing required field `level`"),
        ("set_log_level", {"level": "INFO", "ttl_s": 86401}, r"at `\$.ttl_s`"),
        ("set_log_level", {"level": "INFO", "logger": "a/b"}, r"at `\$.logger`"),
        ("dial", {"peer": "Bad_Peer"}, r"at `\$.peer`"),
        ("dial", {"peer": "a" * 64}, r"at `\$.peer`"),
        ("memory", {"interval_s": 121}, r"at `\$.interval_s`"),
        ("memory", {"top": True}, r"got `bool` - at `\$.top`"),
        ("profile", {"duration_s": 61}, r"at `\$.duration_s`"),
        ("diagnose", {"checks": ["dns", "smtp"]}, r"at `\$.checks\[1\]`"),
        ("diagnose", {"checks": []}, r"at `\$.checks`"),
        ("call_test", {"duration_s": 31}, r"at `\$.duration_s`"),
        ("restart", {}, r"missing required field `reason`"),
        ("restart", {"reason": ""}, r"at `\$.reason`"),
        ("crash", {"kind": "oom"}, r"at `\$.kind`"),
        ("ping", {"x": 1}, r"unknown field `x`"),
    ],
)
def test_decode_args_rejects_with_path(cmd: str, args: dict[str, Any], path: str) -> None:
    with pytest.raises(CommandError) as info:
        decode_args(CATALOG[cmd], args)
    assert info.value.code == 400
    assert re.search(path, info.value.message), info.value.message
    assert info.value.message.startswith(f"{cmd}: invalid args")


# --- verification: the happy path ------------------------------------------------------------


def test_valid_token_verifies(verifier: Verifier) -> None:
    c = claims("dial", args={"peer": "door-2"})
    got = verifier.verify("dial", sign_command(OP_PRIV, "op", c).encode())
    assert got == VerifiedCommand(
        jti=c["jti"],
        kid="op",
        cmd="dial",
        args={"peer": "door-2"},
        iat=int(T0),
        exp=int(T0) + 60,
        may_force=False,
        roles=frozenset({"operate", "read"}),
    )
    assert decode_args(CATALOG["dial"], got.args).peer == "door-2"  # type: ignore[attr-defined]


def test_debug_key_may_force_and_has_all_roles(verifier: Verifier) -> None:
    got = verifier.verify("restart", token("restart", kid="dbg", args={"reason": "update"}))
    assert got.may_force
    assert got.roles == {"read", "operate", "debug"}


def test_missing_args_means_empty_and_whitespace_is_tolerated(verifier: Verifier) -> None:
    got = verifier.verify("ping", b"  " + token("ping", drop=("args",)) + b"\n")
    assert got.args == {}


def test_explicit_command_allow_beyond_role(verifier: Verifier) -> None:
    assert verifier.verify("hangup", token("hangup", kid="reader")).kid == "reader"


def test_skew_is_tolerated_both_ways(verifier: Verifier) -> None:
    verifier.verify("ping", token(iat=int(T0) - 89, exp=int(T0) - 29))  # expired 29 s ago
    verifier.verify("ping", token(iat=int(T0) + 29, exp=int(T0) + 60))  # issued 29 s ahead
    verifier.verify("ping", token(iat=int(T0), exp=int(T0) + 300))  # exactly the max lifetime


# --- verification: every rejection -----------------------------------------------------------


def _hs256_with_public_key() -> bytes:
    secret = base64.urlsafe_b64decode(OP_PUB + "=")
    return raw_jws(
        {"alg": "HS256", "kid": "op"},
        claims(),
        lambda si: hmac.new(secret, si, hashlib.sha256).digest(),
    )


def _hs256_with_public_key_text() -> bytes:
    return raw_jws(
        {"alg": "HS256", "kid": "op"},
        claims(),
        lambda si: hmac.new(OP_PUB.encode(), si, hashlib.sha256).digest(),
    )


def _alg_none(signature: bytes = b"") -> bytes:
    return raw_jws({"alg": "none", "kid": "op"}, claims(), lambda si: signature)


T = int(T0)
CASES: list[tuple[str, str, Callable[[], bytes], int]] = [
    ("garbage", "ping", lambda: b"\x00\xffhello", 400),
    ("empty", "ping", lambda: b"", 400),
    ("two segments", "ping", lambda: b".".join(token().split(b".")[:2]), 400),
    ("header not json", "ping", lambda: b"bm90LWpzb24." + token().split(b".", 1)[1], 400),
    ("header a list", "ping", lambda: b64(b"[1]") + b"." + token().split(b".", 1)[1], 400),
    (
        "claims not json",
        "ping",
        lambda: raw_jws({"alg": "EdDSA", "kid": "op"}, b"{", ed25519_signer(OP_PRIV)),
        400,
    ),
    ("jti missing", "ping", lambda: token(drop=("jti",)), 400),
    ("jti not a topic level", "ping", lambda: token(jti="a/+/#"), 400),
    ("jti with a trailing newline", "ping", lambda: token(jti="req-1\n"), 400),
    ("iat a string", "ping", lambda: token(iat="now"), 400),
    ("exp a float", "ping", lambda: token(exp=T0 + 60.5), 400),
    ("exp a bool", "ping", lambda: token(exp=True), 400),
    ("args a list", "ping", lambda: token(args=[1]), 400),
    ("sub missing", "ping", lambda: token(drop=("sub",)), 400),
    ("exp before iat", "ping", lambda: token(iat=T, exp=T - 1), 400),
    ("wrong command", "restart", lambda: token("ping"), 400),
    ("wrong device", "ping", lambda: token(sub="dev-2"), 403),
    ("unknown command", "format_disk", lambda: token("format_disk"), 404),
    ("alg none", "ping", _alg_none, 401),
    ("alg none with a signature", "ping", lambda: _alg_none(b"s" * 64), 401),
    ("HS256 keyed with the public key", "ping", _hs256_with_public_key, 401),
    ("HS256 keyed with the public key text", "ping", _hs256_with_public_key_text, 401),
    (
        "alg Ed25519 (not the protocol's name)",
        "ping",
        lambda: raw_jws({"alg": "Ed25519", "kid": "op"}, claims(), ed25519_signer(OP_PRIV)),
        401,
    ),
    (
        "missing kid",
        "ping",
        lambda: raw_jws({"alg": "EdDSA"}, claims(), ed25519_signer(OP_PRIV)),
        401,
    ),
    (
        "kid not a string",
        "ping",
        lambda: raw_jws({"alg": "EdDSA", "kid": 1}, claims(), ed25519_signer(OP_PRIV)),
        401,
    ),
    ("unknown kid", "ping", lambda: token(kid="stranger", priv=OP_PRIV), 401),
    ("signed by another key", "ping", lambda: token(priv=ROGUE_PRIV), 401),
    (
        "embedded jwk header",
        "ping",
        lambda: raw_jws(
            {"alg": "EdDSA", "kid": "op", "jwk": {"kty": "OKP"}}, claims(), ed25519_signer(OP_PRIV)
        ),
        401,
    ),
    (
        "crit header",
        "ping",
        lambda: raw_jws(
            {"alg": "EdDSA", "kid": "op", "crit": ["exp"]}, claims(), ed25519_signer(OP_PRIV)
        ),
        401,
    ),
    (
        "typ not a string",
        "ping",
        lambda: raw_jws({"alg": "EdDSA", "kid": "op", "typ": 1}, claims(), ed25519_signer(OP_PRIV)),
        401,
    ),
    ("signature truncated", "ping", lambda: token()[:-2], 401),
    ("unsigned JSON in closed mode", "ping", lambda: json.dumps(claims()).encode(), 401),
    ("role not allowed", "restart", lambda: token("restart", args={"reason": "x"}), 403),
    ("read key operating", "dial", lambda: token("dial", kid="reader"), 403),
    ("unknown claims are ignored", "ping", lambda: token(kid="reader", aud="x", nbf=[1]), 0),
    ("expired", "ping", lambda: token(iat=T - 91, exp=T - 31), 410),
    ("not yet valid", "ping", lambda: token(iat=T + 31, exp=T + 60), 410),
    ("lifetime over the maximum", "ping", lambda: token(iat=T, exp=T + 301), 410),
    ("oversized", "ping", lambda: token(args={"pad": "x" * MAX_PAYLOAD_BYTES}), 413),
    ("oversized garbage", "ping", lambda: b"x" * (MAX_PAYLOAD_BYTES + 1), 413),
]


@pytest.mark.parametrize(
    ("topic", "make", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rejections_have_the_documented_code(
    verifier: Verifier, topic: str, make: Callable[[], bytes], code: int
) -> None:
    payload = make()
    if code == 0:  # a control case: unknown extra claims are ignored
        assert verifier.verify(topic, payload).kid == "reader"
        return
    err = reject(verifier, topic, payload)
    assert err.code == code, err.message


def test_error_carries_jti_when_readable(verifier: Verifier) -> None:
    c = claims(iat="soon")
    err = reject(verifier, "ping", sign_command(OP_PRIV, "op", c).encode())
    assert (err.code, err.jti, err.kid) == (400, c["jti"], "op")
    assert "`$.iat`" in err.message
    err = reject(verifier, "ping", token(priv=ROGUE_PRIV, jti="req-9"))
    assert (err.code, err.jti) == (401, "req-9")
    err = reject(verifier, "ping", token(jti="bad id with spaces"))
    assert (err.code, err.jti) == (400, None)
    assert reject(verifier, "ping", b"garbage").jti is None
    assert reject(verifier, "ping", b"{not json").jti is None
    assert reject(verifier, "ping", b"x" * (MAX_PAYLOAD_BYTES + 1)).jti is None


def test_peek_jti_reads_the_unverified_id_of_either_form() -> None:
    assert peek_jti(token(jti="req-1")) == "req-1"
    assert peek_jti(b"  " + token(priv=ROGUE_PRIV, jti="req-2") + b"\n") == "req-2"  # unverified
    assert peek_jti(json.dumps(claims(jti="req-3")).encode()) == "req-3"
    assert peek_jti(token(jti="bad id with spaces")) is None
    for garbage in (b"", b"garbage", b"{not json", b"a.b", b"a.!!.c", b"a.YQ.c", b"[1]"):
        assert peek_jti(garbage) is None, garbage
    big = json.dumps({**claims(jti="req-4"), "pad": "x" * MAX_PAYLOAD_BYTES}).encode()
    assert peek_jti(big) is None  # the verifier answers it 413 without an id too


def test_replay_is_refused(verifier: Verifier) -> None:
    tok = token("ping")
    verifier.verify("ping", tok)
    err = reject(verifier, "ping", tok)
    assert (err.code, err.message) == (410, "request id already seen (replay)")
    # the same jti under a fresh signature is still a replay
    jti = json.loads(base64.urlsafe_b64decode(tok.split(b".")[1] + b"=="))["jti"]
    assert reject(verifier, "info", token("info", kid="dbg", jti=jti)).code == 410


def test_replay_is_refused_after_restart(tmp_path: Path, clock: FakeClock) -> None:
    tok = token("ping")
    first = ReplayCache(tmp_path / "r.db", clock.time)
    Verifier(DEVICE, TRUSTED, replay=first, clock=clock.time).verify("ping", tok)
    first.close()
    second = ReplayCache(tmp_path / "r.db", clock.time)
    err = reject(Verifier(DEVICE, TRUSTED, replay=second, clock=clock.time), "ping", tok)
    assert err.code == 410


def test_rejected_request_does_not_use_up_its_jti(verifier: Verifier) -> None:
    tok = token("dial")
    assert reject(verifier, "hangup", tok).code == 400
    assert verifier.verify("dial", tok).cmd == "dial"


async def test_token_expires_as_time_passes(verifier: Verifier, clock: FakeClock) -> None:
    tok = token("ping")  # exp = T0 + 60; skew 30
    await clock.advance(90.5)
    err = reject(verifier, "ping", tok)
    assert (err.code, err.message) == (410, "token expired")


def test_full_replay_cache_answers_429(tmp_path: Path, clock: FakeClock) -> None:
    cache = ReplayCache(tmp_path / "r.db", clock.time, max_entries=2)
    v = Verifier(DEVICE, TRUSTED, replay=cache, clock=clock.time)
    v.verify("ping", token())
    v.verify("ping", token())
    assert reject(v, "ping", token()).code == 429


def test_configured_limits_are_used(replay: ReplayCache, clock: FakeClock) -> None:
    v = Verifier(
        DEVICE, TRUSTED, replay=replay, clock=clock.time, max_lifetime_s=30, clock_skew_s=0
    )
    assert reject(v, "ping", token(iat=T, exp=T + 31)).code == 410
    assert reject(v, "ping", token(iat=T - 30, exp=T - 1)).code == 410
    assert v.verify("ping", token(iat=T, exp=T + 30)).exp == T + 30


def test_before_clock_sync_only_read_only_commands(replay: ReplayCache) -> None:
    wrong_now = 86_400.0  # an unsynchronised RTC in 1970
    v = Verifier(
        DEVICE, TRUSTED, replay=replay, clock=lambda: wrong_now, clock_synced=lambda: False
    )
    assert v.verify("ping", token("ping")).cmd == "ping"
    assert v.verify("diagnose", token("diagnose")).cmd == "diagnose"
    err = reject(v, "dial", token("dial"))
    assert (err.code, err.message) == (403, "clock not synchronised: only read-only commands run")
    # lifetime, signature and replay are still checked
    assert reject(v, "ping", token(iat=T, exp=T + 301)).code == 410
    assert reject(v, "ping", token(priv=ROGUE_PRIV)).code == 401
    assert reject(v, "call", token("call")).code == 404


def test_open_mode_accepts_plain_claims_with_all_roles(open_verifier: Verifier) -> None:
    c = claims("restart", args={"reason": "bench"})
    got = open_verifier.verify("restart", json.dumps(c).encode())
    assert (got.kid, got.roles, got.may_force) == (None, {"read", "operate", "debug"}, False)
    assert got.args == {"reason": "bench"}
    # the remaining checks still apply
    assert reject(open_verifier, "restart", json.dumps(c).encode()).code == 410
    assert reject(open_verifier, "ping", json.dumps(claims(sub="x")).encode()).code == 403
    assert reject(open_verifier, "ping", json.dumps(claims(exp="x")).encode()).code == 400
    # a JWS is still verified in open mode
    assert reject(open_verifier, "ping", token(priv=ROGUE_PRIV)).code == 401
    assert reject(open_verifier, "restart", token("restart", args={"reason": "x"})).code == 403
    assert open_verifier.verify("ping", token()).kid == "op"


def test_open_mode_is_announced(
    replay: ReplayCache, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    Verifier(DEVICE, TRUSTED, replay=replay, clock=clock.time)
    assert "OPEN MODE" not in caplog.text
    Verifier(DEVICE, TRUSTED, replay=replay, clock=clock.time, open_mode=True)
    assert [r.levelname for r in caplog.records if "OPEN MODE" in r.message] == ["WARNING"]


# --- signed call offers ----------------------------------------------------------------------


def call_token(call_id: str, *, kid: str = "op", **over: Any) -> str:
    c = command_claims(DEVICE, "call", now=T0, jti=call_id)
    c.update(over)
    return sign_command(PRIVATE[kid], kid, c)


def test_call_token_verifies_and_is_single_use(verifier: Verifier) -> None:
    got = verifier.verify_call_token(call_token("call-1"), DEVICE, "call-1")
    assert (got.cmd, got.jti, got.kid) == ("call", "call-1", "op")
    with pytest.raises(CommandError) as info:
        verifier.verify_call_token(call_token("call-1"), DEVICE, "call-1")
    assert info.value.code == 410


@pytest.mark.parametrize(
    ("make", "callee", "call_id", "code"),
    [
        (lambda: call_token("c-1"), "dev-2", "c-1", 403),  # for another callee
        (lambda: call_token("c-1"), DEVICE, "c-2", 400),  # for another call
        (lambda: call_token("c-1", cmd="dial"), DEVICE, "c-1", 400),  # not a call token
        (lambda: call_token("c-1", kid="reader"), DEVICE, "c-1", 403),  # read key may not call
        (lambda: call_token("c-1", exp=T + 400), DEVICE, "c-1", 410),
        (lambda: json.dumps(claims("call", jti="c-1")), DEVICE, "c-1", 400),  # unsigned
        (lambda: "x" * (MAX_PAYLOAD_BYTES + 1), DEVICE, "c-1", 413),
    ],
)
def test_call_token_rejections(
    open_verifier: Verifier, make: Callable[[], str], callee: str, call_id: str, code: int
) -> None:
    with pytest.raises(CommandError) as info:
        open_verifier.verify_call_token(make(), callee, call_id)
    assert info.value.code == code, info.value.message


def test_call_token_on_the_command_topic_is_not_a_command(verifier: Verifier) -> None:
    err = reject(verifier, "call", call_token("c-9").encode())
    assert err.code == 404
    assert verifier.verify_call_token(call_token("c-9"), DEVICE, "c-9").jti == "c-9"


def test_call_and_command_ids_do_not_collide(verifier: Verifier) -> None:
    verifier.verify_call_token(call_token("same-id"), DEVICE, "same-id")
    assert verifier.verify("ping", token(jti="same-id")).jti == "same-id"


# --- fuzzing ---------------------------------------------------------------------------------

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
VALID_JTI = "<fresh uuid>"
TOPICS = [*CATALOG, "call", "nope", ""]
ABSENT = object()


def mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually (8 in 10) a valid value, else junk or missing (ABSENT)."""
    return st.integers(0, 9).flatmap(
        lambda i: valid if i < 8 else junk if i == 8 else st.just(ABSENT)
    )


@st.composite
def claims_for(draw: st.DrawFn, topic: str) -> dict[str, Any]:
    """Claims near the valid region for `topic`: each field valid, junk, or missing."""
    iat = draw(mostly(st.integers(T - 120, T + 40), JSON_VALUES))
    near_exp = st.integers(-3, 310).map(lambda d: iat + d) if type(iat) is int else st.just(T)
    fields = {
        "jti": draw(mostly(st.just(VALID_JTI), JSON_VALUES | st.text(max_size=140))),
        "sub": draw(mostly(st.just(DEVICE), st.sampled_from(["dev-2", "", DEVICE.upper()]))),
        "cmd": draw(mostly(st.just(topic), st.sampled_from(TOPICS) | JSON_VALUES)),
        "iat": iat,
        "exp": draw(mostly(near_exp, st.integers() | JSON_VALUES)),
        "args": draw(
            st.one_of(
                st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3),
                JSON_VALUES,
                st.just(ABSENT),
            )
        ),
        "nbf": draw(st.one_of(st.just(ABSENT), JSON_VALUES)),
    }
    return {k: v for k, v in fields.items() if v is not ABSENT}


TOPIC_AND_CLAIMS = st.sampled_from(TOPICS).flatmap(
    lambda topic: st.tuples(st.just(topic), claims_for(topic))
)


def _fresh(c: dict[str, Any]) -> dict[str, Any]:
    """Make a well-formed jti unique, so that only deliberate replays are replays."""
    jti = c.get("jti")
    if jti == VALID_JTI:
        return {**c, "jti": str(uuid.uuid4())}
    if isinstance(jti, str) and re.fullmatch(JTI_PATTERN, jti):
        return {**c, "jti": f"{jti[:90]}.{uuid.uuid4().hex}"}
    return c


def _is_int(x: object) -> bool:
    return type(x) is int and 0 <= x <= 2**53


def valid_claims(c: dict[str, Any], topic: str, key: TrustedKey | None) -> bool:
    """An independent statement of what a valid request is (protocol section 3)."""
    iat, exp = c.get("iat"), c.get("exp")
    return (
        isinstance(c.get("jti"), str)
        and re.fullmatch(JTI_PATTERN, c["jti"]) is not None
        and c.get("sub") == DEVICE
        and c.get("cmd") == topic
        and topic in CATALOG
        and _is_int(iat)
        and _is_int(exp)
        and 0 < exp - iat <= 300  # type: ignore[operator]
        and iat <= T0 + 30  # type: ignore[operator]
        and exp + 30 >= T0  # type: ignore[operator]
        and isinstance(c.get("args", {}), dict)
        and (key is None or key.allows(topic))
    )


@settings(FUZZ, max_examples=1500)
@given(payload=st.binary(max_size=600), topic=st.sampled_from(TOPICS))
def test_fuzz_arbitrary_bytes_are_answered_never_accepted(
    verifier: Verifier, payload: bytes, topic: str
) -> None:
    with pytest.raises(CommandError) as info:
        verifier.verify(topic, payload)
    assert info.value.code in (400, 401, 413)


SEGMENT = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.", max_size=120
)


@settings(FUZZ, max_examples=800)
@given(
    parts=st.lists(SEGMENT | st.sampled_from(["eyJhbGciOiJFZERTQSIsImtpZCI6Im9wIn0"]), max_size=4)
)
def test_fuzz_jws_shaped_garbage_is_answered_never_accepted(
    verifier: Verifier, parts: list[str]
) -> None:
    with pytest.raises(CommandError) as info:
        verifier.verify("ping", ".".join(parts).encode())
    assert info.value.code in (400, 401)


@settings(FUZZ, max_examples=500)
@given(
    case=TOPIC_AND_CLAIMS
    | st.tuples(
        st.sampled_from(TOPICS), st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5)
    )
)
def test_fuzz_plain_json_objects(
    verifier: Verifier, open_verifier: Verifier, case: tuple[str, dict[str, Any]]
) -> None:
    topic, obj = case[0], _fresh(case[1])
    payload = json.dumps(obj).encode()
    with pytest.raises(CommandError) as info:
        verifier.verify(topic, payload)
    assert info.value.code == 401  # closed mode never runs an unsigned request
    if valid_claims(obj, topic, None):
        event("open mode: accepted")
        got = open_verifier.verify(topic, payload)
        assert (got.jti, got.cmd, got.kid) == (obj["jti"], topic, None)
    else:
        with pytest.raises(CommandError):
            open_verifier.verify(topic, payload)


@settings(FUZZ, max_examples=800)
@given(case=TOPIC_AND_CLAIMS, kid=st.sampled_from(sorted(PRIVATE)))
def test_fuzz_signed_claims_verify_exactly_when_valid(
    verifier: Verifier, case: tuple[str, dict[str, Any]], kid: str
) -> None:
    topic, c = case[0], _fresh(case[1])
    payload = sign_command(PRIVATE[kid], kid, c).encode()
    if valid_claims(c, topic, TRUSTED[kid]):
        event("signed: accepted")
        got = verifier.verify(topic, payload)
        assert (got.jti, got.cmd, got.kid, got.args) == (c["jti"], topic, kid, c.get("args", {}))
    else:
        with pytest.raises(CommandError) as info:
            verifier.verify(topic, payload)
        event(f"signed: {info.value.code}")
        assert info.value.code in (400, 403, 404, 410)


ALGS = st.sampled_from(["none", "HS256", "ES256", "Ed25519", "eddsa", "EdDSA "])


@st.composite
def headers(draw: st.DrawFn) -> dict[str, Any]:
    """JWS headers near {"alg": "EdDSA", "kid": "op"}, with odd extras now and then."""
    rarely = st.just(ABSENT) | st.just(ABSENT) | st.just(ABSENT)
    fields = {
        "alg": draw(mostly(st.just("EdDSA"), ALGS | JSON_VALUES)),
        "kid": draw(mostly(st.just("op"), st.sampled_from(["dbg", "nobody", ""]) | JSON_VALUES)),
        "typ": draw(rarely | st.just("JWT") | JSON_VALUES),
        "cty": draw(rarely | st.just("json")),
        "crit": draw(rarely | st.lists(st.text(max_size=5), max_size=2)),
        "b64": draw(rarely | st.booleans()),
        "jwk": draw(rarely | st.just({"kty": "OKP", "crv": "Ed25519", "x": DBG_PUB})),
        "x5u": draw(rarely | st.text(max_size=10)),
    }
    return {k: v for k, v in fields.items() if v is not ABSENT}


@settings(FUZZ, max_examples=500)
@given(header=headers())
def test_fuzz_headers_only_eddsa_with_the_signing_kid_passes(
    verifier: Verifier, header: dict[str, Any]
) -> None:
    c = claims("ping", jti=str(uuid.uuid4()))
    payload = raw_jws(header, c, ed25519_signer(OP_PRIV))  # always signed by "op"
    ok = (
        header.get("alg") == "EdDSA"
        and header.get("kid") == "op"
        and set(header) <= {"alg", "kid", "typ", "cty"}
        and isinstance(header.get("typ", ""), str)
    )
    if ok:
        event("header: accepted")
        assert verifier.verify("ping", payload).jti == c["jti"]
    else:
        with pytest.raises(CommandError) as info:
            verifier.verify("ping", payload)
        assert info.value.code == 401


MUTATION_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00é"


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_fuzz_mutated_tokens_never_verify(verifier: Verifier, data: st.DataObject) -> None:
    kid = data.draw(st.sampled_from(sorted(PRIVATE)))
    original = token("ping", kid=kid, jti=str(uuid.uuid4())).decode()
    segments = original.split(".")
    op = data.draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swap", "splice"]))
    i = data.draw(st.integers(0, len(original) - 1))
    char = data.draw(st.sampled_from(MUTATION_CHARS))
    if op == "replace":
        mutated = original[:i] + char + original[i + 1 :]
    elif op == "insert":
        mutated = original[:i] + char + original[i:]
    elif op == "delete":
        mutated = original[:i] + original[i + 1 :]
    elif op == "truncate":
        mutated = original[:i]
    elif op == "swap":
        a, b = data.draw(st.permutations(range(3)))[:2]
        segments[a], segments[b] = segments[b], segments[a]
        mutated = ".".join(segments)
    else:  # the claims of another valid token under this signature
        other = token("ping", kid=kid, jti=str(uuid.uuid4())).decode().split(".")
        mutated = ".".join([segments[0], other[1], segments[2]])
    assume(mutated.strip() != original)
    event(f"mutation: {op}")
    with pytest.raises(CommandError):
        verifier.verify("ping", mutated.encode())
    # the untouched token is valid, and the failed attempt did not use up its jti
    assert verifier.verify("ping", original.encode()).kid == kid


def test_claims_struct_matches_protocol_fields() -> None:
    assert set(Claims.__struct_fields__) == {"jti", "sub", "cmd", "args", "iat", "exp"}
    assert msgspec.json.decode(json.dumps(claims()).encode(), type=Claims).cmd == "ping"
