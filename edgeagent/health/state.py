"""The call-health state shown on the LEDs and published retained on `health`.

Pure: inputs are set by their owners, `current()` derives the state. Faults
(an unusable audio device, ...) win over everything; then the call's own
state; then the broker link (offline); else idle.
"""

from __future__ import annotations

from dataclasses import dataclass

CALL_STATES = ("ringing", "connecting", "good", "degraded", "bad")


@dataclass(frozen=True, slots=True)
class HealthView:
    state: str
    reasons: tuple[str, ...]


class HealthState:
    def __init__(self) -> None:
        self._faults: dict[str, str] = {}
        self._call: str | None = None
        self._call_reasons: tuple[str, ...] = ()
        self._online = False
        self._last: HealthView | None = None

    def set_fault(self, key: str, reason: str | None) -> None:
        """Set (or with None clear) a fault such as `audio_device`."""
        if reason is None:
            self._faults.pop(key, None)
        else:
            self._faults[key] = reason

    def set_call(self, state: str | None, reasons: tuple[str, ...] = ()) -> None:
        if state is not None and state not in CALL_STATES:
            raise ValueError(f"not a call health state: {state}")
        self._call = state
        self._call_reasons = reasons if state else ()

    def set_online(self, online: bool) -> None:
        self._online = online

    def current(self) -> HealthView:
        if self._faults:
            return HealthView("fault", tuple(self._faults.values()) + self._call_reasons)
        if self._call is not None:
            return HealthView(self._call, self._call_reasons)
        if not self._online:
            return HealthView("offline", ("broker unreachable",))
        return HealthView("idle", ())

    def changed(self) -> HealthView | None:
        """The current view if it differs from the last one returned, else None."""
        view = self.current()
        if view == self._last:
            return None
        self._last = view
        return view
