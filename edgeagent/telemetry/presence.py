"""The consumer rule for `status` (protocol section 1), for operator tools and tests.

A device's Will (`lost`) can reach a consumer after the birth of a newer
connection: a bridge or a delayed Will may reorder them. The rule: keep the
newest `session` seen; ignore an `offline`/`lost` whose session is lower than
the last `online`; an `online` always wins over older sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Presence:
    state: str
    session: int
    ts: float
    reason: str | None = None


class PresenceTracker:
    """Presence per device, applying the session rule."""

    def __init__(self) -> None:
        self._by_device: dict[str, Presence] = {}
        self._online_session: dict[str, int] = {}

    def update(self, payload: dict[str, Any]) -> bool:
        """Apply one status payload; True if it changed what the device is shown as."""
        try:
            device = str(payload["device"])
            state = str(payload["state"])
            session = int(payload["session"])
            ts = float(payload.get("ts", 0.0))
        except (KeyError, TypeError, ValueError):
            return False
        if state == "online":
            if session < self._online_session.get(device, -1):
                return False
            self._online_session[device] = session
        elif session < self._online_session.get(device, -1):
            return False  # a late Will or offline from an older connection
        self._by_device[device] = Presence(state, session, ts, payload.get("reason"))
        return True

    def get(self, device: str) -> Presence | None:
        return self._by_device.get(device)
