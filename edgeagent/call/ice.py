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
  override passes our own `gather_timeout_s`. aiortc does not trickle, so the
  offer waits for the whole timeout: keep it short (config/edgeagent.toml),
  and leave out a STUN server the agent's probes see as down (`without_stun`).
- aioice paces connectivity checks with a fixed 20 ms sleep (the Ta timer) and
  its check loop only notices success after that sleep: on loopback ICE took
  22 ms for a 1 ms check. `_connect` replaces `Connection.connect` on each of
  our connections (again an instance attribute) with the same steps, paced at
  `check_interval_s` (5 ms by default: RFC 8445 section 14.2 allows Ta down to
  5 ms) and ending as soon as the check list completes. The controlling side
  already nominates on its first check (aioice uses aggressive nomination).

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
from collections.abc import Iterable, Sequence
from typing import Any

import aioice.ice
import ifaddr
from aioice.candidate import Candidate
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransport, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.005
"""Ta for our connections: RFC 8445 section 14.2's floor (one stream, a few pairs)."""

_MARK = "_edgeagent_ice_policy"
_PACING = "_edgeagent_ice_pacing"
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
    for line in ignored_servers(stun_urls, turn_urls):  # said once at start, at WARNING
        logger.debug("ice: %s", line)
    if stun_urls:
        servers.append(RTCIceServer(urls=stun_urls[0]))
    if turn_urls:
        servers.append(RTCIceServer(urls=turn_urls[0], username=username, credential=credential))
    if relay_only and not turn_urls:
        raise ValueError("relay_only needs a TURN server")
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


def ignored_servers(stun_urls: Sequence[str], turn_urls: Sequence[str]) -> list[str]:
    """What aiortc will not use of the configured servers (only the first of each kind)."""
    out = []
    for kind, urls in (("STUN", stun_urls), ("TURN", turn_urls)):
        if len(urls) > 1:
            rest = ", ".join(urls[1:])
            out.append(f"aiortc uses only the first {kind} server ({urls[0]}); ignoring {rest}")
    return out


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
    check_interval_s: float = CHECK_INTERVAL_S,
) -> int:
    """Limit ICE host candidates of `pc` to `allowed`, bound gathering time, pace checks.

    `allowed=None` keeps aioice's own address choice (all but loopback) and
    only applies the timeout. Connectivity checks start every `check_interval_s`
    (aioice: 20 ms). Returns how many ICE connections were set up.
    """
    if check_interval_s < CHECK_INTERVAL_S:
        raise ValueError(f"check_interval_s below RFC 8445's {CHECK_INTERVAL_S} s floor")
    count = 0
    for conn, transport in _connections(pc):
        if getattr(conn, _MARK, None) is None:
            conn.gather_candidates = types.MethodType(_gather_candidates, conn)
            conn.connect = types.MethodType(_connect, conn)
        setattr(conn, _TRANSPORT, transport)
        setattr(conn, _MARK, (tuple(allowed) if allowed is not None else None, gather_timeout_s))
        setattr(conn, _PACING, check_interval_s)
        count += 1
    return count


async def _connect(conn: Any) -> None:
    """aioice 0.13 `Connection.connect`, paced at our Ta and done as soon as ICE completes."""
    if not conn._local_candidates_end:
        raise ConnectionError("Local candidates gathering was not performed")
    if conn.remote_username is None or conn.remote_password is None:
        raise ConnectionError("Remote username or password is missing")
    for remote_candidate in conn._remote_candidates:
        conn._pair_remote_candidate(remote_candidate)
    conn.sort_check_list()
    conn._unfreeze_initial()
    for early_check in conn._early_checks:
        conn.check_incoming(*early_check)
    conn._early_checks.clear()
    conn._early_checks_done = True

    interval = getattr(conn, _PACING, CHECK_INTERVAL_S)
    outcome: asyncio.Future[int] = asyncio.ensure_future(conn._check_list_state.get())
    try:
        # aioice sleeps out a whole Ta after each check it starts, even when that
        # check already completed ICE; wait on the outcome instead, at most one Ta.
        while not outcome.done() and conn._check_periodic():
            await asyncio.wait([outcome], timeout=interval)
        res = await outcome if outcome.done() or conn._check_list else aioice.ice.ICE_FAILED
    finally:
        outcome.cancel()
    for check in conn._check_list:
        if check.task:
            check.task.cancel()
    if res != aioice.ice.ICE_COMPLETED:
        raise ConnectionError("ICE negotiation failed")
    conn._query_consent_task = asyncio.create_task(conn.query_consent())


def without_stun(config: RTCConfiguration) -> RTCConfiguration:
    """`config` minus its STUN servers (TURN and the policy kept).

    For a call placed while the agent's own probes see the STUN server down:
    aiortc does not trickle, so a dead STUN server only delays the offer by the
    gathering timeout and adds no candidate.
    """
    servers = [
        s
        for s in config.iceServers or []
        if not any(u.startswith(("stun:", "stuns:")) for u in _urls(s))
    ]
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=config.iceTransportPolicy)


def _urls(server: RTCIceServer) -> list[str]:
    return [server.urls] if isinstance(server.urls, str) else list(server.urls)


def stun_seen_down(probes: Iterable[Any], stun_url: str) -> bool:
    """True when the agent's latest probe of `stun_url` found it unreachable.

    `probes` are `edgeagent.health.probes.ProbeResult`s (netwatch's latest round);
    no probe of that server yet means "not known down".
    """
    return any(
        getattr(r, "url", None) == stun_url and str(getattr(r, "status", "")) == "unreachable"
        for r in probes
    )


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


def ice_progress(pc: RTCPeerConnection) -> str:
    """What ICE had when a call gave up on it, for the operator: the local and remote
    candidate types, and how the candidate pairs' checks stood, e.g.
    "local host x1, relay x0; remote host x2, relay x1; pairs: 3 in progress, 2 failed"
    (no relay among the local ones points at TURN; pairs that never succeed, at a path
    that drops the checks). Reads aioice's connection; empty parts are left out."""
    parts: list[str] = []
    for conn, _ in _connections(pc):
        for side, cands in (
            ("local", getattr(conn, "local_candidates", [])),
            ("remote", getattr(conn, "remote_candidates", [])),
        ):
            kinds: dict[str, int] = {}
            for c in cands:
                kinds[str(getattr(c, "type", "?"))] = kinds.get(str(getattr(c, "type", "?")), 0) + 1
            shown = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"
            parts.append(f"{side} {shown}")
        states: dict[str, int] = {}
        for pair in getattr(conn, "_check_list", []):
            name = str(getattr(getattr(pair, "state", None), "name", "?")).lower().replace("_", " ")
            states[name] = states.get(name, 0) + 1
        if states:
            parts.append("pairs: " + ", ".join(f"{n} {k}" for k, n in sorted(states.items())))
    return "; ".join(parts)


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
