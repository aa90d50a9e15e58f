"""Network probes on real sockets: STUN/TURN with RTT, TLS certificate expiry, DNS, clock sync.

Every probe returns a result value; expected network faults (timeouts, refused,
TLS errors, resolver failures) are results, not exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import time
from typing import Protocol

from cryptography import x509

from edgeagent.health import probes as p
from edgeagent.hw import command

logger = logging.getLogger(__name__)

UDP_RTO_S = 0.5  # RFC 5389 initial retransmission timeout; doubled per retry
_MAX_MESSAGE = 4096


class _Channel(Protocol):
    reliable: bool

    def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    def close(self) -> None: ...


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        # On a connected socket an ICMP port unreachable arrives here as ConnectionRefusedError.
        self.queue.put_nowait(exc)


class _UdpChannel:
    reliable = False

    def __init__(self, transport: asyncio.DatagramTransport, proto: _UdpProtocol) -> None:
        self._transport = transport
        self._proto = proto

    @classmethod
    async def open(cls, host: str, port: int) -> _UdpChannel:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            _UdpProtocol, remote_addr=(host, port)
        )
        return cls(transport, proto)

    @property
    def local(self) -> tuple[str, int]:
        name = self._transport.get_extra_info("sockname")
        return str(name[0]), int(name[1])

    def send(self, data: bytes) -> None:
        self._transport.sendto(data)

    async def recv(self) -> bytes:
        item = await self._proto.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._transport.close()


class _StreamChannel:
    reliable = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, host: str, port: int, ssl_context: ssl.SSLContext | None) -> _StreamChannel:
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self._writer.write(data)

    async def recv(self) -> bytes:
        header = await self._reader.readexactly(p.HEADER_LEN)
        length = p.message_length(header)
        if length > _MAX_MESSAGE:
            raise p.StunParseError(f"message of {length} bytes")
        return header + await self._reader.readexactly(length - p.HEADER_LEN)

    def close(self) -> None:
        self._writer.close()


async def _open(url: p.IceUrl, ssl_context: ssl.SSLContext | None) -> _Channel:
    if url.transport == "udp" and not url.secure:
        return await _UdpChannel.open(url.host, url.port)
    ctx = None
    if url.secure:
        ctx = ssl_context or ssl.create_default_context()
    return await _StreamChannel.open(url.host, url.port, ctx)


async def _transact(
    ch: _Channel, request: bytes, txid: bytes
) -> tuple[p.StunMessage, bytes, float]:
    """Send until the matching response arrives (UDP retransmits with doubling RTO).

    Returns the message, its raw bytes and the RTT in ms from the last transmission.
    The caller bounds the whole exchange with a timeout.
    """
    rto = UDP_RTO_S
    refused = 0
    while True:
        sent = time.perf_counter()
        ch.send(request)
        try:
            async with asyncio.timeout(None if ch.reliable else rto):
                while True:
                    try:
                        data = await ch.recv()
                    except ConnectionRefusedError:
                        # ICMP errors are soft (RFC 1122): a late one for an earlier
                        # socket on this port can land here. A closed port refuses twice.
                        refused += 1
                        if ch.reliable or refused >= 2:
                            raise
                        break
                    try:
                        msg = p.decode_message(data)
                    except p.StunParseError:
                        if ch.reliable:
                            raise
                        continue  # stray datagram
                    if msg.transaction_id == txid:
                        return msg, data, (time.perf_counter() - sent) * 1000.0
        except TimeoutError:
            rto *= 2


def _failure(url: str, kind: str, exc: BaseException, timeout_s: float) -> p.ProbeResult:
    if isinstance(exc, TimeoutError):
        return p.ProbeResult(
            url, kind, p.ProbeStatus.UNREACHABLE, detail=f"no answer in {timeout_s:g} s"
        )
    if isinstance(exc, p.StunParseError):
        return p.ProbeResult(url, kind, p.ProbeStatus.ERROR, detail=f"bad response: {exc}")
    if isinstance(exc, ssl.SSLError):
        return p.ProbeResult(url, kind, p.ProbeStatus.UNREACHABLE, detail=f"TLS: {exc}")
    if isinstance(exc, asyncio.IncompleteReadError):
        return p.ProbeResult(url, kind, p.ProbeStatus.UNREACHABLE, detail="connection closed")
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return p.ProbeResult(
        url, kind, p.ProbeStatus.UNREACHABLE, detail=f"{type(exc).__name__}: {text}"
    )


async def stun_probe(
    url: str, *, timeout_s: float = 2.0, ssl_context: ssl.SSLContext | None = None
) -> p.ProbeResult:
    """One STUN Binding to a stun:/stuns:/turn: url: RTT and the server-reflexive address."""
    try:
        parsed = p.parse_ice_url(url)
    except ValueError as exc:
        return p.ProbeResult(url, "stun", p.ProbeStatus.ERROR, detail=str(exc))
    ch: _Channel | None = None
    try:
        async with asyncio.timeout(timeout_s):
            ch = await _open(parsed, ssl_context)
            txid = p.new_transaction_id()
            msg, _, rtt = await _transact(ch, p.binding_request(txid), txid)
    except (OSError, TimeoutError, p.StunParseError, asyncio.IncompleteReadError) as exc:
        return _failure(url, "stun", exc, timeout_s)
    finally:
        if ch is not None:
            ch.close()
    got = p.interpret(msg, authenticated=False)
    if got.reply is not p.Reply.SUCCESS:
        return p.ProbeResult(
            url, "stun", p.ProbeStatus.ERROR, rtt, error_code=got.code, detail=got.reason
        )
    return p.ProbeResult(url, "stun", p.ProbeStatus.OK, rtt, mapped=got.mapped)


async def turn_probe(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout_s: float = 3.0,
    ssl_context: ssl.SSLContext | None = None,
    relay_check: bool = True,
) -> p.ProbeResult:
    """TURN Allocate: unauthenticated 401 with a nonce proves the server alive; with
    credentials, an authenticated allocate (released again with Refresh lifetime 0),
    and with `relay_check` data sent through the relay and back (`_relay_loop`)."""
    try:
        parsed = p.parse_ice_url(url)
    except ValueError as exc:
        return p.ProbeResult(url, "turn", p.ProbeStatus.ERROR, detail=str(exc))
    channels: list[_Channel] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        async with asyncio.timeout_at(deadline):
            for _ in range(2):
                channels.append(await _open(parsed, ssl_context))
                result = await _turn_exchange(
                    channels[-1],
                    url,
                    username,
                    password,
                    relay_check=relay_check,
                    deadline=deadline,
                )
                # 437: the server still holds an allocation for this 5-tuple (a reused
                # local port). Retry once from another port; the old socket stays open
                # meanwhile so the new one cannot get the same port.
                if result.error_code != 437:
                    break
            return result
    except (OSError, TimeoutError, p.StunParseError, asyncio.IncompleteReadError) as exc:
        return _failure(url, "turn", exc, timeout_s)
    finally:
        for ch in channels:
            ch.close()


async def _turn_exchange(
    ch: _Channel,
    url: str,
    username: str | None,
    password: str | None,
    *,
    relay_check: bool,
    deadline: float,
) -> p.ProbeResult:
    txid = p.new_transaction_id()
    msg, _, rtt = await _transact(ch, p.allocate_request(txid), txid)
    first = p.interpret(msg, authenticated=False)
    if first.reply is p.Reply.SUCCESS:  # a server without auth
        return p.ProbeResult(url, "turn", p.ProbeStatus.OK, rtt, first.mapped, first.relayed)
    if first.reply is not p.Reply.CHALLENGE or first.realm is None or first.nonce is None:
        return p.ProbeResult(
            url, "turn", p.ProbeStatus.ERROR, rtt, error_code=first.code, detail=first.reason
        )
    if username is None or password is None:
        return p.ProbeResult(
            url, "turn", p.ProbeStatus.OK, rtt, error_code=first.code, detail="401 challenge"
        )
    creds = p.Credentials(username, password, first.realm, first.nonce)
    for _ in range(2):  # a second round only for a stale nonce
        txid = p.new_transaction_id()
        msg, raw, _ = await _transact(ch, p.allocate_request(txid, creds), txid)
        got = p.interpret(msg, authenticated=True)
        if got.reply is p.Reply.STALE_NONCE and got.nonce is not None:
            creds = p.Credentials(username, password, creds.realm, got.nonce)
            continue
        if got.reply is p.Reply.UNAUTHORIZED:
            return p.ProbeResult(
                url,
                "turn",
                p.ProbeStatus.AUTH_FAILED,
                rtt,
                error_code=got.code,
                detail=f"credentials refused: {got.code} {got.reason}".strip(),
            )
        if got.reply is not p.Reply.SUCCESS:
            return p.ProbeResult(
                url, "turn", p.ProbeStatus.ERROR, rtt, error_code=got.code, detail=got.reason
            )
        if msg.get(p.MESSAGE_INTEGRITY) is not None and not p.verify_integrity(raw, creds.key):
            return p.ProbeResult(
                url, "turn", p.ProbeStatus.ERROR, rtt, detail="response failed MESSAGE-INTEGRITY"
            )
        relay_rtt, why, note = None, None, ""
        if got.relayed and relay_check:
            # What the probe's timeout leaves, less the release's share: a slow link must
            # not turn a relay verdict into "unreachable" (and skip the release).
            wait_s = min(RELAY_WAIT_S, deadline - asyncio.get_running_loop().time() - 0.5)
            if wait_s >= 0.2:
                relay_rtt, why = await _relay_loop(ch, creds, got.relayed, wait_s)
            else:
                note = "relay not checked: the probe's timeout ran out"
        await _release(ch, creds)
        return p.ProbeResult(
            url,
            "turn",
            p.ProbeStatus.OK if why is None else p.ProbeStatus.RELAY_FAILED,
            rtt,
            got.mapped,
            got.relayed,
            authenticated=True,
            detail=why or note,
            relay_rtt_ms=relay_rtt,
        )
    return p.ProbeResult(
        url, "turn", p.ProbeStatus.ERROR, rtt, error_code=438, detail="stale nonce twice"
    )


RELAY_WAIT_S = 1.0
"""How long the relay loop waits for its data to come back (within the probe's timeout)."""


async def _relay_loop(
    ch: _Channel, creds: p.Credentials, relayed: tuple[str, int], wait_s: float = RELAY_WAIT_S
) -> tuple[float | None, str | None]:
    """Prove the allocation relays: data sent to our own relayed address.

    A permission for the relayed address's IP, then a Send indication to it: the server
    sends the data out of the relay port and straight back in, and hands it to us as a
    Data indication. An allocation whose relay ports are firewalled, or a relay-ip the
    server cannot use, fails here although Allocate succeeded (and every relayed call
    would fail with it). Returns (round trip in ms, None) or (None, why it failed).
    """
    for _ in range(2):  # a second round only for a stale nonce
        txid = p.new_transaction_id()
        request = p.create_permission_request(txid, creds, relayed)
        msg, _, _ = await _transact(ch, request, txid)
        got = p.interpret(msg, authenticated=True)
        if got.reply is p.Reply.STALE_NONCE and got.nonce is not None:
            creds = p.Credentials(creds.username, creds.password, creds.realm, got.nonce)
            continue
        if got.reply is not p.Reply.SUCCESS:
            return None, f"CreatePermission refused: {got.code} {got.reason}".strip()
        break
    else:
        return None, "CreatePermission refused: stale nonce twice"
    token = os.urandom(16)
    peer = f"{relayed[0]}:{relayed[1]}"
    sent = time.perf_counter()
    try:
        async with asyncio.timeout(wait_s):
            rto = UDP_RTO_S
            while True:
                ch.send(p.send_indication(p.new_transaction_id(), relayed, token))
                try:
                    async with asyncio.timeout(None if ch.reliable else rto):
                        while True:
                            try:
                                msg = p.decode_message(await ch.recv())
                            except p.StunParseError:
                                if ch.reliable:
                                    raise
                                continue
                            got_data = p.data_indication(msg)
                            if got_data is not None and got_data[1] == token:
                                return (time.perf_counter() - sent) * 1000.0, None
                except TimeoutError:
                    rto *= 2  # UDP: the indication or its relayed copy was lost; again
    except TimeoutError:
        return None, (
            f"allocated {peer}, but data sent through it did not come back in "
            f"{wait_s:.1f} s (relay ports blocked, or the server cannot reach its relay-ip)"
        )
    except OSError as exc:
        return None, f"relay loop through {peer} failed: {exc}"


async def _release(ch: _Channel, creds: p.Credentials) -> None:
    """Refresh with lifetime 0 frees the relay port now instead of in ten minutes."""
    for _ in range(2):
        txid = p.new_transaction_id()
        msg, _, _ = await _transact(ch, p.refresh_request(txid, creds, 0), txid)
        got = p.interpret(msg, authenticated=True)
        if got.reply is p.Reply.STALE_NONCE and got.nonce is not None:
            creds = p.Credentials(creds.username, creds.password, creds.realm, got.nonce)
            continue
        if got.reply is not p.Reply.SUCCESS:
            logger.debug("turn: release refused: %s %s", got.code, got.reason)
        return


# --- TLS certificates ------------------------------------------------------------------------


def _unverified_context() -> ssl.SSLContext:
    # Deliberately unverified: an expired or self-signed certificate must still
    # yield its expiry date, which is the whole point of this check.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def fetch_certificate(
    host: str, port: int, *, timeout_s: float = 5.0, server_name: str | None = None
) -> p.CertResult:
    """Connect with TLS and read the server certificate's notAfter (not verified)."""
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sni = server_name if server_name is not None else (None if _is_ip(host) else host)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            start = time.perf_counter()
            _, writer = await asyncio.open_connection(
                host, port, ssl=_unverified_context(), server_hostname=sni or ""
            )
            rtt = (time.perf_counter() - start) * 1000.0
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    except TimeoutError:
        return p.CertResult(endpoint, error=f"no TLS handshake in {timeout_s:g} s")
    except OSError as exc:
        return p.CertResult(endpoint, error=f"{type(exc).__name__}: {exc.strerror or exc}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
    if not der:
        return p.CertResult(endpoint, rtt_ms=rtt, error="no certificate presented")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return p.CertResult(endpoint, rtt_ms=rtt, error=f"unreadable certificate: {exc}")
    return p.CertResult(
        endpoint,
        not_after=cert.not_valid_after_utc.timestamp(),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        rtt_ms=rtt,
    )


# --- DNS -------------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _reserved_invalid(host: str) -> bool:
    # RFC 6761 section 6.4: resolvers should answer names under .invalid
    # negatively without asking anyone.
    return host.rstrip(".").lower().rsplit(".", 1)[-1] == "invalid"


async def resolve(host: str, *, timeout_s: float = 3.0) -> p.DnsResult:
    """Resolve a host name through the system resolver, timed."""
    if _is_ip(host):
        return p.DnsResult(host, (host,), 0.0)
    if _reserved_invalid(host):
        return p.DnsResult(host, elapsed_ms=0.0, error="reserved name (RFC 6761 .invalid)")
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except TimeoutError:
        return p.DnsResult(
            host, elapsed_ms=timeout_s * 1000.0, error=f"timeout after {timeout_s:g} s"
        )
    except OSError as exc:
        elapsed = (time.perf_counter() - start) * 1000.0
        return p.DnsResult(host, elapsed_ms=elapsed, error=f"{exc.strerror or exc}")
    elapsed = (time.perf_counter() - start) * 1000.0
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    return p.DnsResult(host, addresses, elapsed)


# --- clock sync ------------------------------------------------------------------------------

STA_UNSYNC = 0x0040
TIME_ERROR = 5


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>, with generous tail padding.
    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 32),
    )


def _timedatectl_synced(exe: str) -> bool | None:
    try:
        out = command.run([exe, "show", "-p", "NTPSynchronized"], timeout_s=2.0, max_bytes=4096)
    except command.CommandError as exc:
        logger.debug("timedatectl: %s", exc)
        return None
    if out.returncode != 0:
        return None
    return p.parse_ntp_synchronized(out.stdout)


def _adjtimex_synced() -> bool | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()  # modes 0: read only, allowed without privileges
        state = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError, ValueError):
        return None
    if state < 0:
        return None
    return not (tx.status & STA_UNSYNC) and state != TIME_ERROR


def clock_synchronized(timedatectl: str | None = "timedatectl") -> bool | None:
    """True/False when the kernel or systemd knows whether NTP synced the clock; None if unknown.

    Blocking (a short subprocess): call from a thread. Never raises.
    """
    if timedatectl:
        exe = shutil.which(timedatectl)
        if exe is not None:
            synced = _timedatectl_synced(exe)
            if synced is not None:
                return synced
    return _adjtimex_synced()
