"""STUN/TURN wire format (RFC 5389, RFC 5766) for health probes, ICE URLs, and probe results.

Pure: building and parsing messages, long-term credentials, classifying
responses and certificate expiry. The sockets live in `edgeagent.hw.net`.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E

# Methods
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA_METHOD = 0x007
CREATE_PERMISSION = 0x008

# Classes
REQUEST = 0b00
INDICATION = 0b01
SUCCESS = 0b10
ERROR = 0b11

# Attributes
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_TRANSPORT = 0x0019
XOR_MAPPED_ADDRESS = 0x0020
SOFTWARE = 0x8022
FINGERPRINT = 0x8028

TRANSPORT_UDP = 17
_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02
_MI_LEN = 20


class StunParseError(ValueError):
    """Bytes that are not a well-formed STUN message (or a malformed attribute)."""


@dataclass(frozen=True)
class StunMessage:
    """A decoded STUN message; attributes in wire order, values without padding."""

    method: int
    cls: int
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...]

    def get(self, attr_type: int) -> bytes | None:
        """The first value of an attribute, or None."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def text(self, attr_type: int) -> str | None:
        value = self.get(attr_type)
        return None if value is None else value.decode("utf-8", errors="replace")


def new_transaction_id() -> bytes:
    return os.urandom(12)


def _message_type(method: int, cls: int) -> int:
    # The class bits C1 C0 sit at bits 8 and 4, interleaved with the 12 method bits.
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _split_type(msg_type: int) -> tuple[int, int]:
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    cls = ((msg_type >> 4) & 0b01) | ((msg_type >> 7) & 0b10)
    return method, cls


def _pad(value: bytes) -> bytes:
    return value + b"\x00" * (-len(value) % 4)


def _attr(attr_type: int, value: bytes) -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + _pad(value)


def encode_message(
    method: int,
    cls: int,
    transaction_id: bytes,
    attributes: list[tuple[int, bytes]] | tuple[tuple[int, bytes], ...] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = False,
) -> bytes:
    """Serialise a message, appending MESSAGE-INTEGRITY (HMAC-SHA1) and FINGERPRINT when asked."""
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    body = b"".join(_attr(t, v) for t, v in attributes)
    msg_type = _message_type(method, cls)

    def header(length: int) -> bytes:
        return struct.pack("!HHI", msg_type, length, MAGIC_COOKIE) + transaction_id

    if integrity_key is not None:
        # The HMAC covers the header with a length that already counts the MI attribute.
        mac = hmac.new(integrity_key, header(len(body) + 4 + _MI_LEN) + body, hashlib.sha1).digest()
        body += _attr(MESSAGE_INTEGRITY, mac)
    if fingerprint:
        crc = binascii.crc32(header(len(body) + 8) + body) ^ FINGERPRINT_XOR
        body += _attr(FINGERPRINT, struct.pack("!I", crc & 0xFFFFFFFF))
    return header(len(body)) + body


def message_length(header: bytes) -> int:
    """Total size of a message from its first 20 bytes (framing over TCP)."""
    if len(header) < HEADER_LEN:
        raise StunParseError("short STUN header")
    (length,) = struct.unpack_from("!H", header, 2)
    return HEADER_LEN + int(length)


def _walk(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset of the attribute header, type, value) for every attribute."""
    if len(data) < HEADER_LEN:
        raise StunParseError("short STUN header")
    msg_type, length, cookie = struct.unpack_from("!HHI", data, 0)
    if msg_type & 0xC000:
        raise StunParseError("first two bits must be zero")
    if cookie != MAGIC_COOKIE:
        raise StunParseError("no magic cookie")
    if length % 4 or HEADER_LEN + length != len(data):
        raise StunParseError(f"length {length} does not match {len(data) - HEADER_LEN} bytes")
    out: list[tuple[int, int, bytes]] = []
    pos = HEADER_LEN
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunParseError("truncated attribute header")
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + attr_len
        if end > len(data):
            raise StunParseError(f"attribute 0x{attr_type:04x} overruns the message")
        out.append((pos, attr_type, data[pos + 4 : end]))
        pos = end + (-attr_len % 4)
    return out


def decode_message(data: bytes) -> StunMessage:
    """Parse one complete STUN message."""
    attrs = _walk(data)
    (msg_type,) = struct.unpack_from("!H", data, 0)
    method, cls = _split_type(msg_type)
    return StunMessage(
        method=method,
        cls=cls,
        transaction_id=bytes(data[8:20]),
        attributes=tuple((t, v) for _, t, v in attrs),
    )


def verify_fingerprint(data: bytes) -> bool:
    """True when the message ends with a FINGERPRINT that matches its CRC-32."""
    attrs = _walk(data)
    if not attrs or attrs[-1][1] != FINGERPRINT or len(attrs[-1][2]) != 4:
        return False
    pos = attrs[-1][0]
    got = int(struct.unpack("!I", attrs[-1][2])[0])
    return (binascii.crc32(data[:pos]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF == got


def verify_integrity(data: bytes, key: bytes) -> bool:
    """True when MESSAGE-INTEGRITY is present and its HMAC-SHA1 matches under `key`."""
    for pos, attr_type, value in _walk(data):
        if attr_type != MESSAGE_INTEGRITY:
            continue
        if len(value) != _MI_LEN:
            return False
        covered = bytearray(data[:pos])
        struct.pack_into("!H", covered, 2, pos + 4 + _MI_LEN - HEADER_LEN)
        mac = hmac.new(key, bytes(covered), hashlib.sha1).digest()
        return hmac.compare_digest(mac, value)
    return False


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 5389 long-term credential key: MD5(username ":" realm ":" password)."""
    # MD5 is what the protocol mandates here, not a security choice of ours.
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).digest()


def short_term_key(password: str) -> bytes:
    return password.encode()


def decode_address(value: bytes, transaction_id: bytes, *, xor: bool) -> tuple[str, int]:
    """(host, port) from a (XOR-)MAPPED-ADDRESS style value."""
    if len(value) < 4:
        raise StunParseError("short address attribute")
    family, port = value[1], struct.unpack_from("!H", value, 2)[0]
    raw = value[4:]
    if family == _FAMILY_V4 and len(raw) == 4:
        mask = struct.pack("!I", MAGIC_COOKIE)
    elif family == _FAMILY_V6 and len(raw) == 16:
        mask = struct.pack("!I", MAGIC_COOKIE) + transaction_id
    else:
        raise StunParseError(f"bad address family {family} / length {len(raw)}")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=True))
    return str(ipaddress.ip_address(raw)), int(port)


def encode_xor_address(host: str, port: int, transaction_id: bytes) -> bytes:
    """The XOR-MAPPED-ADDRESS value for (host, port) (used to build test responses)."""
    ip = ipaddress.ip_address(host)
    family = _FAMILY_V4 if ip.version == 4 else _FAMILY_V6
    mask = struct.pack("!I", MAGIC_COOKIE) + transaction_id
    raw = bytes(a ^ b for a, b in zip(ip.packed, mask, strict=False))
    return struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + raw


def decode_error_code(value: bytes) -> tuple[int, str]:
    """ERROR-CODE value -> (code, reason phrase)."""
    if len(value) < 4:
        raise StunParseError("short ERROR-CODE")
    code = (value[2] & 0x07) * 100 + value[3]
    return code, value[4:].decode("utf-8", errors="replace")


def encode_error_code(code: int, reason: str) -> bytes:
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()


# --- requests the probes send ---------------------------------------------------------------


def binding_request(transaction_id: bytes) -> bytes:
    return encode_message(BINDING, REQUEST, transaction_id, fingerprint=True)


@dataclass(frozen=True)
class Credentials:
    """Long-term credentials with the realm and nonce a server handed out."""

    username: str
    password: str
    realm: str
    nonce: bytes

    def __repr__(self) -> str:  # the password stays out of logs
        return f"Credentials(username={self.username!r}, realm={self.realm!r})"

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def attributes(self) -> list[tuple[int, bytes]]:
        return [
            (USERNAME, self.username.encode()),
            (REALM, self.realm.encode()),
            (NONCE, self.nonce),
        ]


def allocate_request(transaction_id: bytes, credentials: Credentials | None = None) -> bytes:
    """TURN Allocate for a UDP relay; unauthenticated without credentials (expect 401)."""
    attrs: list[tuple[int, bytes]] = [(REQUESTED_TRANSPORT, bytes([TRANSPORT_UDP, 0, 0, 0]))]
    if credentials is None:
        return encode_message(ALLOCATE, REQUEST, transaction_id, attrs, fingerprint=True)
    return encode_message(
        ALLOCATE,
        REQUEST,
        transaction_id,
        attrs + credentials.attributes(),
        integrity_key=credentials.key,
        fingerprint=True,
    )


def refresh_request(transaction_id: bytes, credentials: Credentials, lifetime_s: int = 0) -> bytes:
    """TURN Refresh; lifetime 0 releases the allocation."""
    attrs = [(LIFETIME, struct.pack("!I", lifetime_s)), *credentials.attributes()]
    return encode_message(
        REFRESH, REQUEST, transaction_id, attrs, integrity_key=credentials.key, fingerprint=True
    )


def create_permission_request(
    transaction_id: bytes, credentials: Credentials, peer: tuple[str, int]
) -> bytes:
    """TURN CreatePermission for `peer`'s IP (the port is ignored by the server)."""
    attrs = [
        (XOR_PEER_ADDRESS, encode_xor_address(peer[0], peer[1], transaction_id)),
        *credentials.attributes(),
    ]
    return encode_message(
        CREATE_PERMISSION,
        REQUEST,
        transaction_id,
        attrs,
        integrity_key=credentials.key,
        fingerprint=True,
    )


def send_indication(transaction_id: bytes, peer: tuple[str, int], data: bytes) -> bytes:
    """TURN Send indication: the server relays `data` to `peer` from our relayed address."""
    attrs = [
        (XOR_PEER_ADDRESS, encode_xor_address(peer[0], peer[1], transaction_id)),
        (DATA, data),
    ]
    return encode_message(SEND, INDICATION, transaction_id, attrs, fingerprint=True)


def data_indication(msg: StunMessage) -> tuple[tuple[str, int] | None, bytes] | None:
    """(peer, data) of a TURN Data indication; None for any other message."""
    if msg.method != DATA_METHOD or msg.cls != INDICATION:
        return None
    data = msg.get(DATA)
    if data is None:
        return None
    return _address(msg, XOR_PEER_ADDRESS, xor=True), data


# --- interpreting responses ------------------------------------------------------------------


class Reply(StrEnum):
    """What a response to one of our requests means."""

    SUCCESS = "success"
    CHALLENGE = "challenge"  # 401 with REALM and NONCE: the server is alive and wants credentials
    UNAUTHORIZED = "unauthorized"  # 401 although we sent credentials: wrong user or password
    STALE_NONCE = "stale_nonce"  # 438: retry with the new nonce
    ERROR = "error"


@dataclass(frozen=True)
class Interpreted:
    reply: Reply
    code: int | None = None
    reason: str = ""
    realm: str | None = None
    nonce: bytes | None = None
    mapped: tuple[str, int] | None = None
    relayed: tuple[str, int] | None = None
    lifetime_s: int | None = None


def interpret(msg: StunMessage, *, authenticated: bool) -> Interpreted:
    """Classify a response to a Binding/Allocate/Refresh request (which one is in `msg.method`)."""
    mapped = _address(msg, XOR_MAPPED_ADDRESS, xor=True) or _address(msg, MAPPED_ADDRESS, xor=False)
    if msg.cls == SUCCESS:
        lifetime = msg.get(LIFETIME)
        return Interpreted(
            Reply.SUCCESS,
            mapped=mapped,
            relayed=_address(msg, XOR_RELAYED_ADDRESS, xor=True),
            lifetime_s=struct.unpack("!I", lifetime)[0]
            if lifetime and len(lifetime) == 4
            else None,
        )
    if msg.cls != ERROR:
        return Interpreted(Reply.ERROR, reason=f"unexpected message class {msg.cls}")
    raw = msg.get(ERROR_CODE)
    code, reason = decode_error_code(raw) if raw is not None else (None, "no ERROR-CODE")
    realm, nonce = msg.text(REALM), msg.get(NONCE)
    if code == 401 and not authenticated and realm is not None and nonce is not None:
        return Interpreted(Reply.CHALLENGE, code, reason, realm=realm, nonce=nonce)
    if (code == 401 and authenticated) or code == 441:
        return Interpreted(Reply.UNAUTHORIZED, code, reason, realm=realm, nonce=nonce)
    if code == 438 and nonce is not None:
        return Interpreted(Reply.STALE_NONCE, code, reason, realm=realm, nonce=nonce)
    return Interpreted(Reply.ERROR, code, reason, realm=realm, nonce=nonce)


def _address(msg: StunMessage, attr_type: int, *, xor: bool) -> tuple[str, int] | None:
    value = msg.get(attr_type)
    if value is None:
        return None
    try:
        return decode_address(value, msg.transaction_id, xor=xor)
    except StunParseError:
        return None


# --- ICE server URLs (RFC 7064, RFC 7065) ---------------------------------------------------


@dataclass(frozen=True)
class IceUrl:
    scheme: str  # stun | stuns | turn | turns
    host: str
    port: int
    transport: str  # udp | tcp

    @property
    def secure(self) -> bool:
        return self.scheme in ("stuns", "turns")

    @property
    def is_turn(self) -> bool:
        return self.scheme in ("turn", "turns")

    @property
    def target(self) -> str:
        """host:port, the name alerts and results use for this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_ice_url(url: str) -> IceUrl:
    """`stun:host[:port]`, `turn:host[:port][?transport=udp|tcp]`, `stuns:`, `turns:`."""
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
        raise ValueError(f"not a STUN/TURN url: {url!r}")
    rest = rest.removeprefix("//")
    hostport, _, query = rest.partition("?")
    transport = "tcp" if scheme in ("stuns", "turns") else "udp"
    if query:
        values = parse_qs(query).get("transport")
        if values:
            transport = values[0].lower()
    if transport not in ("udp", "tcp"):
        raise ValueError(f"unknown transport in {url!r}")
    default_port = 5349 if scheme in ("stuns", "turns") else 3478
    if hostport.startswith("["):
        host, _, after = hostport[1:].partition("]")
        port_text = after.removeprefix(":")
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"no host in {url!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {url!r}")
    return IceUrl(scheme, host, port, transport)


# --- results ---------------------------------------------------------------------------------


class ProbeStatus(StrEnum):
    OK = "ok"
    UNREACHABLE = "unreachable"  # timeout, refused, TLS or connection failure
    AUTH_FAILED = "auth_failed"  # alive, but our credentials were refused
    RELAY_FAILED = "relay_failed"  # allocates, but data sent through the relay never came back
    ERROR = "error"  # alive, answered with something we cannot use


@dataclass(frozen=True)
class ProbeResult:
    """One STUN Binding or TURN Allocate probe."""

    url: str
    kind: str  # stun | turn
    status: ProbeStatus
    rtt_ms: float | None = None
    mapped: tuple[str, int] | None = None
    relayed: tuple[str, int] | None = None
    authenticated: bool = False
    error_code: int | None = None
    detail: str = ""
    relay_rtt_ms: float | None = None  # the relay loop: Send indication to Data indication

    @property
    def target(self) -> str:
        try:
            return parse_ice_url(self.url).target
        except ValueError:
            return self.url

    def to_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "status": str(self.status)}
        if self.rtt_ms is not None:
            out["rtt_ms"] = round(self.rtt_ms, 2)
        if self.mapped is not None:
            out["mapped"] = f"{self.mapped[0]}:{self.mapped[1]}"
        if self.relayed is not None:
            out["relayed"] = f"{self.relayed[0]}:{self.relayed[1]}"
        if self.kind == "turn":
            out["authenticated"] = self.authenticated
        if self.relay_rtt_ms is not None:
            out["relay_rtt_ms"] = round(self.relay_rtt_ms, 2)
        if self.error_code is not None:
            out["error_code"] = self.error_code
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class CertResult:
    """The certificate a TLS endpoint presented (read without verifying), or why not."""

    endpoint: str  # host:port
    not_after: float | None = None  # epoch seconds
    subject: str | None = None
    issuer: str | None = None
    rtt_ms: float | None = None
    error: str | None = None

    def days_left(self, now: float) -> float | None:
        return None if self.not_after is None else (self.not_after - now) / 86400.0

    def to_fields(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"endpoint": self.endpoint}
        days = self.days_left(now)
        if days is not None:
            out["days_left"] = round(days, 2)
            out["not_after"] = self.not_after
        if self.subject is not None:
            out["subject"] = self.subject
        if self.issuer is not None:
            out["issuer"] = self.issuer
        if self.error is not None:
            out["error"] = self.error
        return out


class CertState(StrEnum):
    OK = "ok"
    EXPIRING = "expiring"  # within the warning window
    EXPIRING_SOON = "expiring_soon"  # within the critical window
    EXPIRED = "expired"


def classify_cert(
    days_left: float, *, warn_days: float = 30.0, crit_days: float = 7.0
) -> CertState:
    """Expiry state from the days left (negative once expired)."""
    if days_left <= 0:
        return CertState.EXPIRED
    if days_left <= crit_days:
        return CertState.EXPIRING_SOON
    if days_left <= warn_days:
        return CertState.EXPIRING
    return CertState.OK


@dataclass(frozen=True)
class DnsResult:
    host: str
    addresses: tuple[str, ...] = ()
    elapsed_ms: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.addresses)

    def to_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"host": self.host, "ok": self.ok, "addresses": list(self.addresses)}
        if self.elapsed_ms is not None:
            out["elapsed_ms"] = round(self.elapsed_ms, 2)
        if self.error is not None:
            out["error"] = self.error
        return out


def parse_ntp_synchronized(text: str) -> bool | None:
    """`timedatectl show -p NTPSynchronized` output (`NTPSynchronized=yes`) -> bool, else None."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep:
            key, value = "NTPSynchronized", key
        if key == "NTPSynchronized":
            v = value.strip().lower()
            if v in ("yes", "true", "1"):
                return True
            if v in ("no", "false", "0"):
                return False
    return None
