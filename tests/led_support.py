"""What the LEDs' MockFactory pins did, read back as the documented patterns (docs/leds.md).

`LedTrace` clears the pins' `states` history before the LEDs are built, so each
pin's absolute edge times are the trace start plus the cumulative deltas MockPin
records. The agent's `HealthChanged` events cut the timeline into one segment per
state; the state's name is never read. Each segment is decoded from the pins alone:
which colour was lit (per layout), and whether the lit times fit a rhythm of the
table. Blink threads run on real time, so a segment names every documented state
its pins are consistent with, not one guess from exact timestamps: a short
`connecting` (1.0 s on) that ends during its first on-phase also looks like `good`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from gpiozero.pins.mock import MockFactory

from edgeagent.events import HealthChanged
from edgeagent.hw.leds import PATTERNS, Color

# Blink threads wait with Event.wait(on_s / off_s), so a phase is never early; a busy
# machine makes it late. Late by more than this counts as a different rhythm.
LATE_S = 0.2
EARLY_S = 0.02

THREE = ("green", "amber", "red")
RGB = ("red", "green", "blue")
# What each colour lights: one LED of three, or channels of the RGB LED (amber = red + green).
LIT: dict[str, dict[Color, frozenset[str]]] = {
    "three": {c: frozenset({c.value}) for c in Color},
    "rgb": {
        Color.GREEN: frozenset({"green"}),
        Color.AMBER: frozenset({"red", "green"}),
        Color.RED: frozenset({"red"}),
    },
}


@dataclass(frozen=True, slots=True)
class Lit:
    """One interval with the LED lit; `*_seen` is False where it began or ended off-segment."""

    start: float
    end: float
    start_seen: bool
    end_seen: bool


@dataclass(frozen=True, slots=True)
class Segment:
    """The pins between two health changes, and the documented states they fit."""

    changed_at: float  # the agent announced the state (before it switched the pins)
    start: float  # the switch was done (what follows is the new pattern only)
    end: float
    lit_pins: frozenset[str]
    lit: tuple[Lit, ...]
    states: tuple[str, ...]

    @property
    def name(self) -> str:
        if len(self.states) == 1:
            return self.states[0]
        if not self.states:
            on = [round(i.end - i.start, 3) for i in self.lit]
            return f"?(pins {sorted(self.lit_pins)}, on {on})"
        return "|".join(self.states)


class LedTrace:
    """Records a MockFactory's LED pins from before the agent starts to `stop()`."""

    def __init__(
        self,
        factory: MockFactory,
        *,
        layout: str = "three",
        pins: tuple[int, int, int] = (17, 27, 22),
        active_high: bool = True,
    ) -> None:
        self.layout = layout
        self.names = RGB if layout == "rgb" else THREE
        self.active_high = active_high
        self._pins = {name: factory.pin(n) for name, n in zip(self.names, pins, strict=True)}
        self._t0: dict[str, float] = {}
        for name, pin in self._pins.items():
            pin.clear_states()  # MockPin stamps each later change relative to this moment
            self._t0[name] = time.monotonic()
        self._changes: list[float] = []
        self._settled: list[float] = []
        self._last: str | None = None
        self._end: float | None = None

    def follow(self, agent: Any) -> None:
        """Cut a segment at each health state change of `agent` (call before it runs)."""
        agent.bus.subscribe(HealthChanged, self._on_health)

    def _on_health(self, e: HealthChanged) -> None:
        if e.state == self._last:
            return  # same state, new reasons: the LEDs keep their rhythm
        self._last = e.state
        self._changes.append(time.monotonic())
        # Handlers run before the agent switches the LEDs, in the same loop callback;
        # this callback runs after it, so edges from then on are the new pattern's.
        asyncio.get_running_loop().call_soon(lambda: self._settled.append(time.monotonic()))

    def show(self, leds: Any, state: str) -> None:
        """`leds.show(state)` with a segment cut around it (LEDs driven without an agent)."""
        self._changes.append(time.monotonic())
        leds.show(state)
        self._settled.append(time.monotonic())

    def stop(self) -> None:
        """End the last segment now (before the agent's shutdown turns the LEDs off)."""
        self._end = time.monotonic()

    def _edges(self) -> dict[str, list[tuple[float, bool]]]:
        out: dict[str, list[tuple[float, bool]]] = {}
        for name, pin in self._pins.items():
            t = self._t0[name]
            edges = []
            for s in list(pin.states):
                t += s.timestamp
                edges.append((t, bool(s.state) == self.active_high))
            out[name] = edges
        return out

    async def decoded(self, timeout: float = 5.0) -> str:
        """The state shown now, once its pins fit exactly one documented state (or none).

        Bounded polling: the blink threads signal nothing. A blink needs a full on
        phase to be told from a solid LED of its colour (1.2 s for connecting).
        """
        async with asyncio.timeout(timeout):
            while True:
                # Not before the segment is 2 x EARLY_S old: until then `_within` reads
                # the level "at the switch" earlier than EARLY_S after it, and a write
                # stamped a few ms late reads as an edge after it, so `degraded` (solid)
                # fitted only `offline` for a moment (seen once in a full run). One
                # reading for the test and the answer.
                if (
                    self._settled
                    and time.monotonic() - self._settled[-1] >= 2 * EARLY_S
                    and len((last := self.segments()[-1]).states) <= 1
                ):
                    return last.name
                await asyncio.sleep(0.02)

    def segments(self) -> list[Segment]:
        """One decoded segment per health state shown, in order."""
        end = self._end if self._end is not None else time.monotonic()
        edges = self._edges()
        settled = self._settled[: len(self._changes)]
        out = []
        for i, (changed, start) in enumerate(zip(self._changes, settled, strict=False)):
            stop = self._changes[i + 1] if i + 1 < len(self._changes) else end
            out.append(self._decode(edges, changed, start, stop))
        return out

    def states(self) -> list[str]:
        """The segments' names: a state, `a|b` when the pins fit several, `?(...)` for none."""
        return [s.name for s in self.segments()]

    def _decode(
        self, edges: dict[str, list[tuple[float, bool]]], changed: float, start: float, end: float
    ) -> Segment:
        if end <= start:  # the next change came before this one was shown: unobservable
            return Segment(changed, start, end, frozenset(), (), tuple(PATTERNS))
        blinks = tuple(state for state, p in PATTERNS.items() if p.on_s is not None)
        lit_pins = frozenset(
            name
            for name, pin_edges in edges.items()
            if any(on for _, on in _within(pin_edges, start, end))
        )
        # "Lit" is any of the pins on: one LED of three, or the channels of one colour.
        merged: dict[float, bool] = {}
        times = sorted({t for pin_edges in edges.values() for t, _ in pin_edges})
        for t in times:
            merged[t] = any(_level_at(pin_edges, t) for pin_edges in edges.values())
        lit = _intervals(sorted(merged.items()), start, end)
        if not lit_pins and end - start <= LATE_S:  # a blink's thread had not started yet
            return Segment(changed, start, end, lit_pins, lit, blinks)
        states = tuple(
            state
            for state, pattern in PATTERNS.items()
            if LIT[self.layout][pattern.color] == lit_pins
            and _fits(pattern.on_s, pattern.off_s, lit, changed, start, end)
        )
        return Segment(changed, start, end, lit_pins, lit, states)


def _level_at(edges: list[tuple[float, bool]], t: float) -> bool:
    level = False
    for when, on in edges:
        if when > t:
            break
        level = on
    return level


def _within(edges: list[tuple[float, bool]], start: float, end: float) -> list[tuple[float, bool]]:
    """The level at `start` followed by the edges inside (start, end).

    Edges in the first EARLY_S after `start` count as the switch itself: on a loaded
    machine the pin's own timestamp of the write `show()` made can land a few
    microseconds after the trace noted `show()` returning. (Half the segment at most: a
    state shown only briefly must not read the next one's level.)"""
    settle = start + min(EARLY_S, max(0.0, end - start) / 2)
    return [(start, _level_at(edges, settle)), *[(t, on) for t, on in edges if settle < t < end]]


def _intervals(edges: list[tuple[float, bool]], start: float, end: float) -> tuple[Lit, ...]:
    out: list[Lit] = []
    began: float | None = None
    seen = False
    for t, on in _within(edges, start, end):
        if on and began is None:
            began, seen = t, t > start
        elif not on and began is not None:
            out.append(Lit(began, t, seen, True))
            began = None
    if began is not None:
        out.append(Lit(began, end, seen, False))
    return tuple(out)


def _fits(
    on_s: float | None,
    off_s: float | None,
    lit: tuple[Lit, ...],
    changed: float,
    start: float,
    end: float,
) -> bool:
    """Whether lit intervals in [start, end) can come from this pattern, shown at `changed`."""
    if on_s is None or off_s is None:  # solid: on at once, and on throughout
        return len(lit) == 1 and not lit[0].start_seen and not lit[0].end_seen
    if not lit:  # a blink starts on; only a segment shorter than thread start-up shows nothing
        return end - start <= LATE_S
    if lit[0].start - start > LATE_S:
        return False
    for i in lit:
        # An interval already on at `start` began between `changed` and `start`.
        longest = i.end - (changed if not i.start_seen else i.start)
        shortest = i.end - i.start
        if longest > on_s + LATE_S:
            return False
        if i.end_seen and shortest < on_s - EARLY_S - (start - changed):
            return False
    for a, b in pairwise(lit):
        gap = b.start - a.end
        if not off_s - EARLY_S <= gap <= off_s + LATE_S:
            return False
    return not lit[-1].end_seen or end - lit[-1].end <= off_s + LATE_S


def traced(factory: MockFactory | None = None) -> tuple[dict[str, Any], LedTrace]:
    """Seams for `call_support.running`: LED pins on `factory` (a new MockFactory if None,
    or the one a test also drives a button on), recorded from before the agent starts."""
    factory = factory if factory is not None else MockFactory()
    trace = LedTrace(factory)
    return {"pin_factory": factory, "built": trace.follow}, trace


def assert_led_states(trace: LedTrace, expected: list[str]) -> None:
    """Each segment's pins fit the expected state (and the count of states matches)."""
    segments = trace.segments()
    seen = [s.name for s in segments]
    assert len(segments) == len(expected), f"LED states {seen}, expected {expected}"
    for seg, want in zip(segments, expected, strict=True):
        assert want in seg.states, f"LED states {seen}, expected {expected}"
