"""STUN/TURN wire format against RFC 5769 vectors, and the probes against a real coturn."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from turn_support import TURN_PASSWORD, TURN_USER, Coturn, turn

from edgeagent.health import probes as p
from edgeagent.hw import net

__all__ = ["turn"]  # the module-scoped coturn fixture, used by name below

# RFC 5769 test vectors, section by section.
SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a683676592020 20"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf".replace(" ", "")
)
SAMPLE_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
LONG_TERM_REQUEST = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e"
    "00060012e3839ee38388e383aae38383e382afe382b90000"
    "0015001c662f2f3439396b39353464364f4c33346f4c394653547679363473 41"
    "0014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666".replace(" ", "")
)
LT_USER = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LT_REALM = "example.org"
LT_NONCE = b"f//499k954d6OL34oL9FSTvy64sA"


# --- RFC 5769 vectors --------------------------------------------------------------------


def test_sample_request_parses_and_verifies() -> None:
    msg = p.decode_message(SAMPLE_REQUEST)
    assert (msg.method, msg.cls) == (p.BINDING, p.REQUEST)
    assert msg.transaction_id == bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert [t for t, _ in msg.attributes] == [
        p.SOFTWARE,
        0x0024,
        0x8029,
        p.USERNAME,
        p.MESSAGE_INTEGRITY,
        p.FINGERPRINT,
    ]
    assert msg.text(p.SOFTWARE) == "STUN test client"
    assert msg.text(p.USERNAME) == "evtj:h6vY"  # 9 bytes; the 3 padding spaces are not part of it
    assert p.verify_integrity(SAMPLE_REQUEST, p.short_term_key(SAMPLE_PASSWORD))
    assert not p.verify_integrity(SAMPLE_REQUEST, p.short_term_key("wrong"))
    assert p.verify_fingerprint(SAMPLE_REQUEST)


def test_fingerprint_catches_a_flipped_bit() -> None:
    damaged = bytearray(SAMPLE_REQUEST)
    damaged[30] ^= 0x01  # inside SOFTWARE
    assert not p.verify_fingerprint(bytes(damaged))
    assert not p.verify_integrity(bytes(damaged), p.short_term_key(SAMPLE_PASSWORD))


@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_sample_responses_give_the_mapped_address(vector: bytes, address: tuple[str, int]) -> None:
    msg = p.decode_message(vector)
    assert (msg.method, msg.cls) == (p.BINDING, p.SUCCESS)
    assert p.verify_integrity(vector, p.short_term_key(SAMPLE_PASSWORD))
    assert p.verify_fingerprint(vector)
    got = p.interpret(msg, authenticated=False)
    assert got.reply is p.Reply.SUCCESS
    assert got.mapped == address
    assert msg.text(p.SOFTWARE) == "test vector"


def test_long_term_request_verifies_and_reencodes_byte_for_byte() -> None:
    key = p.long_term_key(LT_USER, LT_REALM, "TheMatrIX")
    assert p.verify_integrity(LONG_TERM_REQUEST, key)
    assert not p.verify_integrity(LONG_TERM_REQUEST, p.long_term_key(LT_USER, LT_REALM, "x"))
    msg = p.decode_message(LONG_TERM_REQUEST)
    assert msg.text(p.USERNAME) == LT_USER
    assert msg.get(p.NONCE) == LT_NONCE
    attrs = [a for a in msg.attributes if a[0] != p.MESSAGE_INTEGRITY]  # USERNAME, NONCE, REALM
    rebuilt = p.encode_message(p.BINDING, p.REQUEST, msg.transaction_id, attrs, integrity_key=key)
    assert rebuilt == LONG_TERM_REQUEST


# --- encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "cls", "wire"),
    [
        (p.BINDING, p.REQUEST, 0x0001),
        (p.BINDING, p.SUCCESS, 0x0101),
        (p.BINDING, p.ERROR, 0x0111),
        (p.ALLOCATE, p.REQUEST, 0x0003),
        (p.ALLOCATE, p.ERROR, 0x0113),
        (p.REFRESH, p.SUCCESS, 0x0104),
        (0xFFF, p.INDICATION, 0x3EFF),
    ],
)
def test_message_type_interleaves_class_bits(method: int, cls: int, wire: int) -> None:
    txid = bytes(12)
    data = p.encode_message(method, cls, txid)
    assert struct.unpack("!H", data[:2])[0] == wire
    back = p.decode_message(data)
    assert (back.method, back.cls) == (method, cls)


def test_binding_request_is_bare_with_fingerprint() -> None:
    txid = p.new_transaction_id()
    data = p.binding_request(txid)
    assert len(data) == 28
    assert p.verify_fingerprint(data)
    assert p.decode_message(data).transaction_id == txid


def test_authenticated_allocate_carries_credentials_and_valid_integrity() -> None:
    creds = p.Credentials("edge", "pw", "realm.test", b"nonce-1")
    txid = p.new_transaction_id()
    data = p.allocate_request(txid, creds)
    msg = p.decode_message(data)
    assert (msg.method, msg.cls) == (p.ALLOCATE, p.REQUEST)
    assert msg.get(p.REQUESTED_TRANSPORT) == bytes([17, 0, 0, 0])
    assert msg.text(p.USERNAME) == "edge"
    assert msg.text(p.REALM) == "realm.test"
    assert msg.get(p.NONCE) == b"nonce-1"
    assert p.verify_integrity(data, p.long_term_key("edge", "realm.test", "pw"))
    assert p.verify_fingerprint(data)
    assert "pw" not in repr(creds)
    refresh = p.decode_message(p.refresh_request(p.new_transaction_id(), creds, 0))
    assert refresh.method == p.REFRESH
    assert refresh.get(p.LIFETIME) == bytes(4)


@pytest.mark.parametrize(
    ("host", "port"), [("127.0.0.1", 54321), ("::1", 3478), ("2001:db8::5", 1)]
)
def test_xor_address_round_trip(host: str, port: int) -> None:
    txid = p.new_transaction_id()
    value = p.encode_xor_address(host, port, txid)
    assert p.decode_address(value, txid, xor=True) == (host, port)
    assert p.decode_address(value, txid, xor=False) != (host, port)


def test_error_code_round_trip() -> None:
    assert p.decode_error_code(p.encode_error_code(401, "Unauthorized")) == (401, "Unauthorized")
    assert p.decode_error_code(p.encode_error_code(438, "Stale Nonce")) == (438, "Stale Nonce")


def _error(code: int, *, realm: str | None = None, nonce: bytes | None = None) -> p.StunMessage:
    attrs = [(p.ERROR_CODE, p.encode_error_code(code, "x"))]
    if realm is not None:
        attrs.append((p.REALM, realm.encode()))
    if nonce is not None:
        attrs.append((p.NONCE, nonce))
    return p.decode_message(p.encode_message(p.ALLOCATE, p.ERROR, bytes(12), attrs))


def test_interpret_error_responses() -> None:
    challenge = p.interpret(_error(401, realm="r", nonce=b"n"), authenticated=False)
    assert (challenge.reply, challenge.realm, challenge.nonce) == (p.Reply.CHALLENGE, "r", b"n")
    assert p.interpret(_error(401, realm="r", nonce=b"n"), authenticated=True).reply is (
        p.Reply.UNAUTHORIZED
    )
    assert p.interpret(_error(441), authenticated=True).reply is p.Reply.UNAUTHORIZED
    assert p.interpret(_error(438, nonce=b"m"), authenticated=True).reply is p.Reply.STALE_NONCE
    # A 401 without a nonce cannot be answered: not a proof of a working TURN server.
    assert p.interpret(_error(401), authenticated=False).reply is p.Reply.ERROR
    quota = p.interpret(_error(486), authenticated=True)
    assert (quota.reply, quota.code) == (p.Reply.ERROR, 486)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        SAMPLE_REQUEST[:19],
        b"\xc0" + SAMPLE_REQUEST[1:],  # top bits set
        SAMPLE_REQUEST[:4] + b"\x00\x00\x00\x00" + SAMPLE_REQUEST[8:],  # no magic cookie
        SAMPLE_REQUEST[:-4],  # length field disagrees
        bytes.fromhex("000100082112a442") + bytes(12) + bytes.fromhex("00060010aaaaaaaa"),
    ],
)
def test_malformed_messages_are_rejected(data: bytes) -> None:
    with pytest.raises(p.StunParseError):
        p.decode_message(data)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("stun:stun.example.org", p.IceUrl("stun", "stun.example.org", 3478, "udp")),
        ("stun:10.0.0.1:19302", p.IceUrl("stun", "10.0.0.1", 19302, "udp")),
        ("turn:t.example:3479?transport=tcp", p.IceUrl("turn", "t.example", 3479, "tcp")),
        ("turns:t.example", p.IceUrl("turns", "t.example", 5349, "tcp")),
        ("TURN:[2001:db8::1]:3478", p.IceUrl("turn", "2001:db8::1", 3478, "udp")),
    ],
)
def test_parse_ice_url(url: str, expected: p.IceUrl) -> None:
    assert p.parse_ice_url(url) == expected


@pytest.mark.parametrize(
    "url", ["http://x", "stun:", "stun:host:0", "stun:host:abc", "turn:h?transport=sctp"]
)
def test_parse_ice_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        p.parse_ice_url(url)


def test_ice_url_target_brackets_ipv6() -> None:
    assert p.parse_ice_url("turn:[::1]:3478").target == "[::1]:3478"
    assert p.parse_ice_url("turns:h.example").secure


@pytest.mark.parametrize(
    ("days", "state"),
    [
        (90, p.CertState.OK),
        (30.01, p.CertState.OK),
        (30, p.CertState.EXPIRING),
        (10, p.CertState.EXPIRING),
        (7, p.CertState.EXPIRING_SOON),
        (0.5, p.CertState.EXPIRING_SOON),
        (0, p.CertState.EXPIRED),
        (-3, p.CertState.EXPIRED),
    ],
)
def test_classify_cert(days: float, state: p.CertState) -> None:
    assert p.classify_cert(days, warn_days=30, crit_days=7) is state


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("NTPSynchronized=yes\n", True),
        ("NTPSynchronized=no\n", False),
        ("yes\n", True),
        ("", None),
        ("Timezone=UTC\n", None),
    ],
)
def test_parse_ntp_synchronized(text: str, value: bool | None) -> None:
    assert p.parse_ntp_synchronized(text) is value


# --- against a real coturn ---------------------------------------------------------------


@pytest.mark.turn
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_stun_binding_maps_loopback(turn: Coturn, transport: str) -> None:
    url = turn.turn_url(transport) if transport == "tcp" else turn.stun_url
    r = await net.stun_probe(url, timeout_s=2.0)
    assert r.status is p.ProbeStatus.OK, r.detail
    assert r.rtt_ms is not None and 0 < r.rtt_ms < 500
    assert r.mapped is not None and r.mapped[0] == "127.0.0.1" and r.mapped[1] > 0


@pytest.mark.turn
async def test_turn_unauthenticated_allocate_gets_challenge(turn: Coturn) -> None:
    r = await net.turn_probe(turn.turn_url(), timeout_s=2.0)
    assert r.status is p.ProbeStatus.OK
    assert (r.error_code, r.authenticated, r.relayed) == (401, False, None)
    assert r.rtt_ms is not None


@pytest.mark.turn
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_turn_authenticated_allocate_relays(turn: Coturn, transport: str) -> None:
    r = await net.turn_probe(
        turn.turn_url(transport), username=TURN_USER, password=TURN_PASSWORD, timeout_s=2.0
    )
    assert r.status is p.ProbeStatus.OK, r.detail
    assert r.authenticated
    assert r.relay_rtt_ms is not None  # data went out of the relay port and came back
    assert r.relayed is not None and r.relayed[0] == "127.0.0.1"
    assert turn.min_port <= r.relayed[1] <= turn.max_port
    assert r.mapped is not None and r.mapped[0] == "127.0.0.1"


@pytest.mark.turn
async def test_turn_allocations_are_released(turn: Coturn) -> None:
    # The relay range holds 41 ports; without Refresh(lifetime 0) they would run out.
    results = [
        await net.turn_probe(
            turn.turn_url(), username=TURN_USER, password=TURN_PASSWORD, timeout_s=2.0
        )
        for _ in range(30)
    ]
    assert [r for r in results if r.status is not p.ProbeStatus.OK] == []


@pytest.mark.turn
async def test_turn_wrong_password_is_auth_failure(turn: Coturn) -> None:
    r = await net.turn_probe(turn.turn_url(), username=TURN_USER, password="nope", timeout_s=2.0)
    assert r.status is p.ProbeStatus.AUTH_FAILED
    assert r.error_code == 401
    assert r.rtt_ms is not None  # it answered: alive, unlike an unreachable server


@pytest.mark.turn
async def test_probes_across_a_coturn_restart(tmp_path: Path) -> None:
    server = Coturn(tmp_path / "coturn")
    server.start()
    try:
        assert (await net.stun_probe(server.stun_url)).status is p.ProbeStatus.OK
        server.stop()
        for url in (server.stun_url, server.turn_url("tcp")):
            down = await net.stun_probe(url, timeout_s=1.0)
            assert down.status is p.ProbeStatus.UNREACHABLE
            assert down.rtt_ms is None and down.detail
        down_turn = await net.turn_probe(server.turn_url(), timeout_s=1.0)
        assert down_turn.status is p.ProbeStatus.UNREACHABLE
        server.start()
        up = await net.stun_probe(server.stun_url)
        assert up.status is p.ProbeStatus.OK and up.mapped is not None
    finally:
        server.stop()


class ScriptedTurn(asyncio.DatagramProtocol):
    """A tiny TURN twin on loopback: challenge, then a stale nonce, then success; a Send
    indication comes back as a Data indication unless `relays` is False (a relay port
    that is allocated but blocked)."""

    def __init__(self, *, bad_integrity: bool = False, relays: bool = True) -> None:
        self.bad_integrity = bad_integrity
        self.relays = relays
        self.transport: asyncio.DatagramTransport | None = None
        self.seen: list[tuple[int, bytes | None]] = []  # (method, nonce)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        req = p.decode_message(data)
        nonce = req.get(p.NONCE)
        self.seen.append((req.method, nonce))
        txid = req.transaction_id
        if req.method == p.SEND and req.cls == p.INDICATION:
            peer, payload = req.get(p.XOR_PEER_ADDRESS), req.get(p.DATA)
            if self.relays and peer is not None and payload is not None:
                attrs = [(p.XOR_PEER_ADDRESS, peer), (p.DATA, payload)]
                back = p.encode_message(p.DATA_METHOD, p.INDICATION, txid, attrs)
                self.transport.sendto(back, addr)
            return
        key = p.long_term_key(TURN_USER, "twin", TURN_PASSWORD)
        if nonce is None:
            attrs = [(p.ERROR_CODE, p.encode_error_code(401, "Unauthorized"))]
            attrs += [(p.REALM, b"twin"), (p.NONCE, b"n1")]
            reply = p.encode_message(req.method, p.ERROR, txid, attrs)
        elif nonce == b"n1":
            attrs = [(p.ERROR_CODE, p.encode_error_code(438, "Stale Nonce"))]
            attrs += [(p.REALM, b"twin"), (p.NONCE, b"n2")]
            reply = p.encode_message(req.method, p.ERROR, txid, attrs)
        else:
            assert p.verify_integrity(data, key)
            attrs = [(p.XOR_RELAYED_ADDRESS, p.encode_xor_address("127.0.0.1", 50000, txid))]
            signing = b"wrong" if self.bad_integrity else key
            reply = p.encode_message(req.method, p.SUCCESS, txid, attrs, integrity_key=signing)
        self.transport.sendto(reply, addr)


async def _scripted(
    bad_integrity: bool, relays: bool = True
) -> tuple[ScriptedTurn, asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    proto = ScriptedTurn(bad_integrity=bad_integrity, relays=relays)
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
    return proto, transport, transport.get_extra_info("sockname")[1]


async def test_turn_probe_retries_a_stale_nonce_and_releases() -> None:
    proto, transport, port = await _scripted(bad_integrity=False)
    try:
        r = await net.turn_probe(
            f"turn:127.0.0.1:{port}", username=TURN_USER, password=TURN_PASSWORD, timeout_s=2.0
        )
    finally:
        transport.close()
    assert r.status is p.ProbeStatus.OK and r.authenticated
    assert r.relayed == ("127.0.0.1", 50000) and r.relay_rtt_ms is not None
    assert proto.seen == [
        (p.ALLOCATE, None),
        (p.ALLOCATE, b"n1"),
        (p.ALLOCATE, b"n2"),
        (p.CREATE_PERMISSION, b"n2"),
        (p.SEND, None),
        (p.REFRESH, b"n2"),
    ]


async def test_an_allocation_that_does_not_relay_is_relay_failed_and_still_released() -> None:
    proto, transport, port = await _scripted(bad_integrity=False, relays=False)
    try:
        r = await net.turn_probe(
            f"turn:127.0.0.1:{port}", username=TURN_USER, password=TURN_PASSWORD, timeout_s=3.0
        )
    finally:
        transport.close()
    assert r.status is p.ProbeStatus.RELAY_FAILED and r.authenticated
    assert r.detail.startswith("allocated 127.0.0.1:50000, but data sent through it did not")
    sends = [m for m, _ in proto.seen if m == p.SEND]
    assert len(sends) >= 2  # a lost datagram is retried before the verdict
    assert proto.seen[-1] == (p.REFRESH, b"n2")  # released all the same


async def test_turn_probe_rejects_a_forged_success() -> None:
    _, transport, port = await _scripted(bad_integrity=True)
    try:
        r = await net.turn_probe(
            f"turn:127.0.0.1:{port}", username=TURN_USER, password=TURN_PASSWORD, timeout_s=2.0
        )
    finally:
        transport.close()
    assert r.status is p.ProbeStatus.ERROR
    assert "MESSAGE-INTEGRITY" in r.detail


@pytest.fixture
def silent_udp() -> Iterator[socket.socket]:
    """A UDP socket on loopback that receives and never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    try:
        yield s
    finally:
        s.close()


async def test_silent_server_times_out_after_retransmits(silent_udp: socket.socket) -> None:
    port = silent_udp.getsockname()[1]
    start = time.monotonic()
    r = await net.stun_probe(f"stun:127.0.0.1:{port}", timeout_s=0.8)
    elapsed = time.monotonic() - start
    assert r.status is p.ProbeStatus.UNREACHABLE
    assert "no answer" in r.detail
    assert 0.7 < elapsed < 2.0
    seen = []
    while True:
        try:
            seen.append(silent_udp.recv(2048))
        except BlockingIOError:
            break
    assert len(seen) >= 2  # sent at 0 and again after the 0.5 s RTO
    assert len({p.decode_message(d).transaction_id for d in seen}) == 1


async def test_bad_url_is_an_error_result() -> None:
    r = await net.stun_probe("stun:host:99999")
    assert r.status is p.ProbeStatus.ERROR


# --- TLS, DNS, clock ---------------------------------------------------------------------


async def test_certificate_fetch_from_closed_port_is_an_error_result() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = await net.fetch_certificate("127.0.0.1", port, timeout_s=1.0)
    assert r.not_after is None and r.error


async def test_resolve_localhost_is_timed() -> None:
    r = await net.resolve("localhost")
    assert r.ok
    assert "127.0.0.1" in r.addresses
    assert r.elapsed_ms is not None and r.elapsed_ms >= 0


async def test_resolve_invalid_name_fails_fast_without_asking() -> None:
    start = time.monotonic()
    r = await net.resolve("nonexistent.invalid")
    assert not r.ok and r.error
    assert time.monotonic() - start < 0.1


async def test_resolve_ip_literal_needs_no_lookup() -> None:
    assert (await net.resolve("127.0.0.1")).addresses == ("127.0.0.1",)


@pytest.mark.parametrize("timedatectl", ["timedatectl", None, "no-such-timedatectl"])
async def test_clock_status_is_bool_or_none(timedatectl: str | None) -> None:
    status = await asyncio.to_thread(net.clock_synchronized, timedatectl)
    assert status is None or isinstance(status, bool)


async def test_the_relay_loop_can_be_turned_off() -> None:
    """For a server that refuses its own relayed address as a peer (ice.turn_relay_check)."""
    proto, transport, port = await _scripted(bad_integrity=False, relays=False)
    try:
        r = await net.turn_probe(
            f"turn:127.0.0.1:{port}",
            username=TURN_USER,
            password=TURN_PASSWORD,
            timeout_s=2.0,
            relay_check=False,
        )
    finally:
        transport.close()
    assert r.status is p.ProbeStatus.OK and r.relay_rtt_ms is None
    assert [m for m, _ in proto.seen if m in (p.CREATE_PERMISSION, p.SEND)] == []


async def test_a_relay_check_fits_the_probes_timeout_and_still_releases() -> None:
    """With a 1 s probe, the relay wait shrinks to what is left (less the release's
    share): the verdict is relay_failed, not "unreachable", and the allocation is freed."""
    proto, transport, port = await _scripted(bad_integrity=False, relays=False)
    try:
        r = await net.turn_probe(
            f"turn:127.0.0.1:{port}", username=TURN_USER, password=TURN_PASSWORD, timeout_s=1.0
        )
    finally:
        transport.close()
    assert r.status is p.ProbeStatus.RELAY_FAILED, r.detail
    assert proto.seen[-1] == (p.REFRESH, b"n2")
