"""What the broker says of the endpoints this device is in calls with (protocol section 1).

An unanswered call, a call that never connects and a call whose media stops look alike
from this end; the far end's retained `status` tells them apart: `lost` (its Last Will:
it dropped off the broker), `offline` (it stopped cleanly, `reason` says why) or
`online` (present, so the fault is between us). `PeerPresence` subscribes to the status
of each endpoint a call is with, keeps the last one (the protocol's rule: an
`offline`/`lost` whose `session` is below the last `online` seen is ignored), and
describes it for the `call.closed` event of a call that failed.

At most `max_peers` endpoints are watched; the least recently called is dropped first.
A broker whose ACL refuses the subscription is said so in the description, not raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from edgeagent.mqtt import BrokerLink, Inbound

logger = logging.getLogger(__name__)

MAX_PEERS = 16


class _Status(msgspec.Struct):
    """The fields of a peer's status this end reads (others are ignored)."""

    state: str
    ts: float
    session: int = 0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PeerStatus:
    state: str  # online | offline | lost
    ts: float  # the peer's: its birth or stop; a Will's is of the CONNECT that registered it
    session: int
    reason: str | None
    seen_ts: float | None  # ours, when it changed while we watched (None: found retained)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "ts": self.ts,
            "session": self.session,
            "reason": self.reason,
            "seen_ts": self.seen_ts,
        }


STATES = frozenset({"online", "offline", "lost"})
MAX_TS = 253402300800.0  # 10000-01-01: past it, gmtime cannot render a status's time


class PeerPresence:
    """The last retained status of up to `max_peers` peers, by endpoint id."""

    def __init__(
        self,
        link: BrokerLink,
        prefix: str,
        *,
        max_peers: int = MAX_PEERS,
        time_fn: Callable[[], float] = time.time,
        on_change: Callable[[str, PeerStatus], None] | None = None,
    ) -> None:
        """`on_change(peer, status)`: each status taken (a retained one found on
        subscribing included)."""
        self._on_change = on_change
        self._link = link
        self._prefix = prefix
        self._max = max_peers
        self._time = time_fn
        self._status: dict[str, PeerStatus] = {}
        self._online_session: dict[str, int] = {}
        self._refused: set[str] = set()
        self._watched: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def topic(self, peer: str) -> str:
        return f"{self._prefix}/{peer}/status"

    def watch(self, peer: str) -> None:
        """Follow `peer`'s status from now on (a retained one arrives at once)."""
        if peer in self._watched:
            self._watched.move_to_end(peer)
            return
        self._watched[peer] = None
        while len(self._watched) > self._max:
            old, _ = self._watched.popitem(last=False)
            self._forget(old)
            self._spawn(self._unsubscribe(old))
        self._spawn(self._subscribe(peer))

    def status(self, peer: str) -> PeerStatus | None:
        return self._status.get(peer)

    def describe(self, peer: str) -> str:
        """One clause for a call's detail: what the broker says of `peer`."""
        if peer in self._refused:
            return f"{peer}'s presence could not be read (the broker refused the subscription)"
        st = self._status.get(peer)
        if st is None:
            return f"no status from {peer} on the broker (never connected, or not an edgeagent)"
        if st.state == "lost":
            if st.seen_ts is not None:
                return f"{peer} lost its broker connection {self._when(st.seen_ts)} (its Last Will)"
            return (
                f"{peer} has lost its broker connection (its Last Will is retained; "
                f"it had connected {self._when(st.ts)})"
            )
        if st.state == "online":
            return f"{peer} is online (connected {self._when(st.ts)})"
        why = f": {st.reason}" if st.reason else ""
        return f"{peer} is offline (stopped {self._when(st.ts)}{why})"

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # --- internals ----------------------------------------------------------------------

    def _when(self, ts: float) -> str:
        ago = max(0.0, self._time() - ts)
        try:
            clock = time.strftime("%H:%M:%S", time.gmtime(ts))
        except (OverflowError, OSError, ValueError):
            return f"at ts {ts!r}"
        return f"at {clock} UTC, {_ago(ago)} ago"

    async def _subscribe(self, peer: str) -> None:
        try:
            granted = await self._link.watch(self.topic(peer), lambda m: self._on_status(peer, m))
        except Exception:  # presence is context for call records: never worth the agent
            logger.exception("calls: cannot watch %s", self.topic(peer))
            return
        if granted is False:
            self._refused.add(peer)
            logger.info("calls: the broker refused a subscription to %s", self.topic(peer))
        elif granted:
            self._refused.discard(peer)

    async def _unsubscribe(self, peer: str) -> None:
        try:
            await self._link.unwatch(self.topic(peer))
        except Exception:
            logger.exception("calls: cannot stop watching %s", self.topic(peer))

    def _on_status(self, peer: str, msg: Inbound) -> None:
        if peer not in self._watched:
            return
        if not msg.payload:  # retained status cleared
            self._forget(peer)
            return
        try:
            st = msgspec.json.decode(msg.payload, type=_Status)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.info("calls: unusable status from %s: %s", peer, exc)
            return
        except RecursionError:  # nested past msgspec's depth limit, even in an ignored field
            logger.info("calls: unusable status from %s: JSON nested too deeply", peer)
            return
        if st.state not in STATES:
            logger.info("calls: unknown state %r in %s's status", st.state[:32], peer)
            return
        if not 0.0 <= st.ts < MAX_TS:  # NaN fails too; the far end wrote it, not us
            logger.info("calls: %s's status has an impossible ts %r", peer, st.ts)
            return
        reason = st.reason[:200] if isinstance(st.reason, str) else None
        if st.state == "online":
            self._online_session[peer] = st.session
        elif st.session < self._online_session.get(peer, -1):
            return  # an older connection's Will or stop: the peer is back since
        seen = None if msg.retain else self._time()
        status = PeerStatus(st.state, st.ts, st.session, reason, seen)
        self._status[peer] = status
        if self._on_change is not None:
            self._on_change(peer, status)

    def _forget(self, peer: str) -> None:
        self._status.pop(peer, None)
        self._online_session.pop(peer, None)
        self._refused.discard(peer)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
