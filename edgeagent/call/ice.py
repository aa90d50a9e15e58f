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
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

logger = logging.getLogger(__name__)

_MARK = "_edgeagent_ice_policy"


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


def _connections(pc: RTCPeerConnection) -> list[Any]:
    conns: list[Any] = []
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    for dtls in transports:
        conn = dtls.transport.iceGatherer._connection
        if all(conn is not c for c in conns):
            conns.append(conn)
    return conns


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
    for conn in _connections(pc):
        if getattr(conn, _MARK, None) is None:
            conn.gather_candidates = types.MethodType(_gather_candidates, conn)
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
