"""ICE policy for our peer connections: servers, relay-only, host addresses, gathering timeout.

Facts about aiortc 1.16 / aioice 0.13 this module works around:

- `RTCConfiguration(iceServers=None)` (the default) silently adds
  stun:stun.l.google.com:19302; an explicit list, even empty, does not.
  `ice_configuration` always passes a list.
- Only the first STUN and the first TURN URL are used (aiortc's
  `connection_kwargs` skips the rest); we pass only those and warn.
- aioice gathers host candidates from every interface except 127.0.0.1 and
  has no option to choose. `restrict_host_addresses` replaces
  `gather_candidates` on each of the connection's own aioice `Connection`
  objects (an instance attribute, nothing process-wide), binding only the
  allowed addresses, loopback included when asked for.
- A dead STUN/TURN server holds gathering for 5 s (aioice#4); the same
  override passes our own `gather_timeout_s`.

- aioice swallows a failed TURN allocation (wrong credentials, dead server)
  and, since aiortc never signals end-of-candidates, a connection without a
  single local candidate (relay-only with a refused TURN allocation) is
  never started by aiortc: the call would sit until the connect timeout. The
  override logs why and fails such a transport at once (`ice_failed`);
  `ice_failure(pc)` gives the reason for the call's detail.

Call `restrict_host_addresses(pc, ...)` before every `setLocalDescription`:
the offerer after adding its tracks, the answerer after `setRemoteDescription`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import types
from collections.abc import Sequence
from typing import Any

import aioice.ice
import ifaddr
from aioice.candidate import Candidate
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransport, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

logger = logging.getLogger(__name__)

_MARK = "_edgeagent_ice_policy"
_FAILURE = "_edgeagent_ice_failure"
_TRANSPORT = "_edgeagent_ice_transport"


def ice_configuration(
    stun_urls: Sequence[str] = (),
    turn_urls: Sequence[str] = (),
    username: str | None = None,
    credential: str | None = None,
    relay_only: bool = False,
) -> RTCConfiguration:
    """An RTCConfiguration with exactly our servers (never aiortc's public STUN default)."""
    servers: list[RTCIceServer] = []
    if len(stun_urls) > 1:
        logger.warning("ice: aiortc uses only the first STUN server; ignoring %s", stun_urls[1:])
    if len(turn_urls) > 1:
        logger.warning("ice: aiortc uses only the first TURN server; ignoring %s", turn_urls[1:])
    if stun_urls:
        servers.append(RTCIceServer(urls=stun_urls[0]))
    if turn_urls:
        servers.append(RTCIceServer(urls=turn_urls[0], username=username, credential=credential))
    if relay_only and not turn_urls:
        raise ValueError("relay_only needs a TURN server")
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


def resolve_host_addresses(allowed: Sequence[str]) -> list[str]:
    """Map entries (IP addresses or interface names like eth0, wlan0, lo) to local IPs.

    IPv6 link-local addresses are skipped (aioice cannot bind them without a
    scope). Unknown interface names resolve to nothing (an unplugged modem is
    not an error); the caller sees an empty list if nothing is left.
    """
    adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
    result: list[str] = []
    for entry in allowed:
        try:
            result.append(str(ipaddress.ip_address(entry)))
            continue
        except ValueError:
            pass
        adapter = adapters.get(entry)
        if adapter is None:
            logger.debug("ice: no interface named %s", entry)
            continue
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                result.append(ip.ip)
            elif ip.ip[2] == 0 and not ipaddress.ip_address(ip.ip[0]).is_link_local:
                result.append(ip.ip[0])
    return list(dict.fromkeys(result))


def _connections(pc: RTCPeerConnection) -> list[tuple[Any, RTCIceTransport]]:
    """The aioice connections of `pc` (one per bundle), each with its RTCIceTransport."""
    conns: list[tuple[Any, RTCIceTransport]] = []
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    for dtls in transports:
        conn = dtls.transport.iceGatherer._connection
        if all(conn is not c for c, _ in conns):
            conns.append((conn, dtls.transport))
    return conns


def selected_candidates(pc: RTCPeerConnection) -> tuple[Candidate, Candidate] | None:
    """The (local, remote) candidates of the pair ICE nominated for audio, or None yet."""
    for conn, _ in _connections(pc):
        pairs = list(conn._nominated.values())
        if pairs:
            return pairs[0].local_candidate, pairs[0].remote_candidate
    return None


def restrict_host_addresses(
    pc: RTCPeerConnection,
    allowed: Sequence[str] | None,
    *,
    gather_timeout_s: float = 3.0,
) -> int:
    """Limit ICE host candidates of `pc` to `allowed` and bound STUN/TURN gathering time.

    `allowed=None` keeps aioice's own address choice (all but loopback) and
    only applies the timeout. Returns how many ICE connections were set up.
    """
    count = 0
    for conn, transport in _connections(pc):
        if getattr(conn, _MARK, None) is None:
            conn.gather_candidates = types.MethodType(_gather_candidates, conn)
        setattr(conn, _TRANSPORT, transport)
        setattr(conn, _MARK, (tuple(allowed) if allowed is not None else None, gather_timeout_s))
        count += 1
    return count


async def _gather_candidates(conn: Any) -> None:
    """aioice 0.13 `Connection.gather_candidates` with our addresses and timeout."""
    allowed, timeout = getattr(conn, _MARK)
    if conn._local_candidates_start:
        return
    conn._local_candidates_start = True
    addresses: list[str] = []
    if conn._transport_policy == aioice.ice.TransportPolicy.ALL:
        if allowed is None:
            addresses = aioice.ice.get_host_addresses(
                use_ipv4=conn._use_ipv4, use_ipv6=conn._use_ipv6
            )
        else:
            addresses = resolve_host_addresses(allowed)
            if not addresses:
                logger.warning("ice: none of %s has an address; no host candidates", allowed)
    coros = [
        conn.get_component_candidates(component=c, addresses=addresses, timeout=timeout)
        for c in conn._components
    ]
    for candidates in await asyncio.gather(*coros):
        conn._local_candidates += candidates
    conn._local_candidates_end = True
    logger.debug("ice: gathered %s", [c.to_sdp() for c in conn._local_candidates])
    failure = gathering_failure(
        relay_only=conn._transport_policy == aioice.ice.TransportPolicy.RELAY,
        turn_server=_server_text(conn.turn_server, conn.turn_transport),
        candidate_types=[c.type for c in conn._local_candidates],
        host_addresses=addresses,
        remote_has_candidates=bool(conn._components),
    )
    if failure is not None:
        logger.warning("ice: %s", failure)
        setattr(conn, _FAILURE, failure)
        transport = getattr(conn, _TRANSPORT, None)
        if not conn._local_candidates and transport is not None:
            # aiortc never starts ICE without a local candidate, so the call would sit in
            # "new" until the connect timeout: fail the transport now (-> ice_failed).
            asyncio.get_running_loop().call_soon(_fail_transport, transport)


def gathering_failure(
    *,
    relay_only: bool,
    turn_server: str | None,
    candidate_types: Sequence[str],
    host_addresses: Sequence[str],
    remote_has_candidates: bool = True,
) -> str | None:
    """Why the gathered candidates cannot work as configured, or None when they can.

    `remote_has_candidates` is False when we answer an offer that carried none
    (aioice then drops every component and gathers nothing).
    """
    if not remote_has_candidates:
        return "the remote description has no ICE candidates (its gathering or TURN failed)"
    if turn_server is not None and "relay" not in candidate_types:
        why = f"TURN allocation on {turn_server} failed (credentials refused or no answer)"
        return f"{why}; relay-only leaves no candidates" if relay_only else why
    if not candidate_types:
        if relay_only:
            return "relay-only without a TURN server: no candidates"
        return f"no local candidates (allowed host addresses: {list(host_addresses)})"
    return None


def _server_text(server: tuple[str, int] | None, transport: str) -> str | None:
    return None if server is None else f"{transport}:{server[0]}:{server[1]}"


def _fail_transport(transport: RTCIceTransport) -> None:
    if transport.state == "new":
        # RTCIceTransport has no public way to fail; its own start() does exactly this.
        transport._RTCIceTransport__setState("failed")  # type: ignore[attr-defined]


def ice_failure(pc: RTCPeerConnection) -> str | None:
    """What gathering found wrong on `pc` (a refused TURN allocation, no candidates), if anything.

    Meant as the detail of an `ice_failed` call end: the summary says ICE failed,
    this says why.
    """
    for conn, _ in _connections(pc):
        failure = getattr(conn, _FAILURE, None)
        if failure is not None:
            return str(failure)
    return None
