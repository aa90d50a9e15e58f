"""HealthLeds and CallButton on gpiozero MockFactory pins: pin states, blink timing, presses."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gpiozero import LED, Device
from gpiozero.pins.mock import MockFactory, MockPin
from led_support import LedTrace

from edgeagent.agent import build_leds
from edgeagent.config import load_config
from edgeagent.hw.button import CallButton
from edgeagent.hw.leds import PATTERNS, Color, HealthLeds, RgbLedPins, ThreeLedPins

GREEN, AMBER, RED = 17, 27, 22
PINS = ThreeLedPins(green=GREEN, amber=AMBER, red=RED)
BUTTON = 26


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    f = MockFactory()
    yield f
    f.reset()


@pytest.fixture
def leds(factory: MockFactory) -> Iterator[HealthLeds]:
    led = HealthLeds(PINS, pin_factory=factory)
    yield led
    led.close()


def pin(factory: MockFactory, number: int) -> MockPin:
    p: MockPin = factory.pin(number)
    return p


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Bounded polling: blink threads run on real time and signal nothing else."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def levels(factory: MockFactory) -> tuple[bool, bool, bool]:
    return (pin(factory, GREEN).state, pin(factory, AMBER).state, pin(factory, RED).state)


COLOR_PIN = {Color.GREEN: GREEN, Color.AMBER: AMBER, Color.RED: RED}


def test_patterns_are_distinct_and_cover_every_state() -> None:
    assert set(PATTERNS) == {
        "idle",
        "ringing",
        "connecting",
        "good",
        "degraded",
        "bad",
        "fault",
        "offline",
    }
    looks = {(p.color, p.on_s, p.off_s) for p in PATTERNS.values()}
    assert len(looks) == len(PATTERNS)


def test_docs_table_matches_the_patterns() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "leds.md").read_text()
    rows = {
        cells[0].strip("` "): cells
        for line in doc.splitlines()
        if line.startswith("| `")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == set(PATTERNS)
    for state, pattern in PATTERNS.items():
        _, colour, rhythm, _ = rows[state]
        assert colour == pattern.color.value, state
        if pattern.on_s is None:
            assert rhythm == "solid", state
        else:
            assert f"{pattern.on_s} " in rhythm, state
            assert f"/ {pattern.off_s}" in rhythm, state


@pytest.mark.parametrize("state", sorted(PATTERNS))
def test_each_state_drives_the_documented_pin(
    state: str, factory: MockFactory, leds: HealthLeds
) -> None:
    pattern = PATTERNS[state]
    lit = pin(factory, COLOR_PIN[pattern.color])
    others = [pin(factory, n) for n in (GREEN, AMBER, RED) if n != COLOR_PIN[pattern.color]]
    for p in (lit, *others):
        p.clear_states()

    leds.show(state)

    if pattern.on_s is None:
        lit.assert_states_and_times([(0.0, False), (0.0, True)])
        assert len(lit.states) == 2
    else:
        assert pattern.off_s is not None
        # A full on/off/on cycle when it is quick; the on and off edges when it is slow.
        n = 4 if pattern.on_s + pattern.off_s <= 0.5 else 3
        wait_until(lambda: len(lit.states) >= n)
        expected = [(0.0, False), (0.0, True), (pattern.on_s, False), (pattern.off_s, True)]
        lit.assert_states_and_times(expected[:n])
        assert [s.state for s in lit.states[:n]] == [False, True, False, True][:n]
    for p in others:
        assert [s.state for s in p.states] == [False]
    assert leds.state == state


def test_sequence_of_states_ends_on_the_right_pins(factory: MockFactory, leds: HealthLeds) -> None:
    green, amber, red = (pin(factory, n) for n in (GREEN, AMBER, RED))
    seen = []
    for state in ("idle", "ringing", "connecting", "good", "degraded", "idle"):
        lit = pin(factory, COLOR_PIN[PATTERNS[state].color])
        mark = len(lit.states)
        leds.show(state)
        # Every state switches its own colour on first (blinks start on).
        wait_until(lambda lit=lit, mark=mark: any(s.state for s in lit.states[mark:]))
        seen.append(state)
    assert seen[-1] == "idle"
    # Amber lit exactly once (degraded), red never; green ends blipping, amber off.
    assert [s.state for s in amber.states] == [False, True, False]
    assert [s.state for s in red.states] == [False]
    wait_until(lambda: levels(factory) == (False, False, False))  # the blip ends after 0.1 s
    assert green.states[-2].state is True
    assert leds.state == "idle"


def test_repeating_a_state_keeps_the_blink_rhythm(factory: MockFactory, leds: HealthLeds) -> None:
    green = pin(factory, GREEN)
    leds.show("ringing")
    wait_until(lambda: len(green.states) >= 2)
    green.clear_states()
    leds.show("ringing")  # health events repeat; the blink must not restart
    wait_until(lambda: len(green.states) >= 4)
    # A restart would show an immediate off->on edge; instead edges stay 0.25 s apart.
    assert all(s.timestamp > 0.02 for s in green.states[1:4])
    assert [s.timestamp for s in green.states[2:4]] == pytest.approx([0.25, 0.25], abs=0.05)


def test_unknown_state_is_ignored_with_a_warning(
    factory: MockFactory, leds: HealthLeds, caplog: pytest.LogCaptureFixture
) -> None:
    leds.show("good")
    with caplog.at_level(logging.WARNING, logger="edgeagent.hw.leds"):
        leds.show("party")
    assert leds.state == "good"
    assert levels(factory) == (True, False, False)
    assert "party" in caplog.text


def test_close_turns_everything_off_and_frees_pins(factory: MockFactory) -> None:
    leds = HealthLeds(PINS, pin_factory=factory)
    leds.show("fault")
    wait_until(lambda: pin(factory, RED).state)
    leds.close()
    leds.close()
    assert levels(factory) == (False, False, False)
    assert not leds.enabled
    LED(RED, pin_factory=factory).close()  # the pin is free again


RGB = RgbLedPins(red=5, green=6, blue=13)


def rgb_levels(factory: MockFactory) -> tuple[bool, bool, bool]:
    return (pin(factory, 5).state, pin(factory, 6).state, pin(factory, 13).state)


def test_rgb_layout_colours(factory: MockFactory) -> None:
    leds = HealthLeds(RGB, pin_factory=factory)
    try:
        expected = {
            "good": (False, True, False),
            "degraded": (True, True, False),  # amber = red + green without PWM
            "bad": (True, False, False),
        }
        for state, want in expected.items():
            leds.show(state)
            assert rgb_levels(factory) == want, state
        red = pin(factory, 5)
        red.clear_states()
        leds.show("fault")
        wait_until(lambda: len(red.states) >= 4)
        # From solid red: the blink thread starts on (no edge), then off 0.25, on 0.25.
        red.assert_states_and_times([(0.0, True), (0.25, False), (0.25, True)])
        assert not pin(factory, 6).state
        assert not pin(factory, 13).state
    finally:
        leds.close()
    assert rgb_levels(factory) == (False, False, False)


def test_rgb_common_anode_inverts(factory: MockFactory) -> None:
    leds = HealthLeds(RgbLedPins(red=5, green=6, blue=13, active_high=False), pin_factory=factory)
    try:
        leds.show("good")
        assert rgb_levels(factory) == (True, False, True)  # only green pulled low
        leds.show("degraded")
        assert rgb_levels(factory) == (False, False, True)
    finally:
        leds.close()


@pytest.mark.slow
async def test_trace_reads_every_documented_state_back_from_the_pins(
    factory: MockFactory, leds: HealthLeds
) -> None:
    # LedTrace (tests/led_support.py) is how the call tests read the agent's LEDs; here
    # every row of the table, shown in turn, is named from the pins alone, uniquely.
    trace = LedTrace(factory, pins=(GREEN, AMBER, RED))
    order = ["offline", "idle", "ringing", "connecting", "good", "degraded", "bad", "fault"]
    seen = []
    for state in order:
        trace.show(leds, state)
        seen.append(await trace.decoded())
    assert seen == order


@pytest.mark.parametrize("active_high", [True, False])
async def test_rgb_layout_from_config_shows_idle_good_and_fault_apart(
    tmp_path: Path, factory: MockFactory, active_high: bool
) -> None:
    path = tmp_path / "leds.toml"
    path.write_text(
        f"""
[device]
id = "dev-1"
[leds]
layout = "rgb"
pins = [5, 6, 13]
active_high = {str(active_high).lower()}
"""
    )
    cfg = load_config(path, environ={})
    trace = LedTrace(factory, layout="rgb", pins=(5, 6, 13), active_high=active_high)
    leds = build_leds(cfg, factory)
    try:
        seen = []
        for state in ("idle", "good", "fault"):
            trace.show(leds, state)
            seen.append(await trace.decoded())
    finally:
        leds.close()
    # Decoded from the pins alone: idle and good share green (docs/leds.md) and differ
    # in rhythm (heartbeat blip, solid); fault is the red fast blink.
    assert seen == ["idle", "good", "fault"]
    lit = [s.lit_pins for s in trace.segments()]
    assert lit == [{"green"}, {"green"}, {"red"}]
    # One RGB LED on the configured pins and no other pin: not the three-LED defaults.
    assert {info.name for info in factory.pins} == {"GPIO5", "GPIO6", "GPIO13"}
    assert rgb_levels(factory) == ((False,) * 3 if active_high else (True,) * 3)


def test_pin_in_use_degrades_to_noop(
    factory: MockFactory, caplog: pytest.LogCaptureFixture
) -> None:
    taken = LED(AMBER, pin_factory=factory)
    try:
        with caplog.at_level(logging.WARNING, logger="edgeagent.hw.leds"):
            leds = HealthLeds(PINS, pin_factory=factory)
        assert not leds.enabled
        warnings = [r for r in caplog.records if r.name == "edgeagent.hw.leds"]
        assert len(warnings) == 1
        assert "GPIOPinInUse" in warnings[0].getMessage()
        for state in PATTERNS:
            leds.show(state)  # never raises
        assert leds.state == "offline"
        assert not pin(factory, AMBER).state
        leds.close()
        LED(GREEN, pin_factory=factory).close()  # green, opened before the failure, was released
    finally:
        taken.close()


def test_missing_pin_factory_degrades_to_noop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # gpiozero caches its default factory on a class attribute; clear it so the
    # lookup runs, and name a factory that cannot exist (no GPIO chip here either).
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "no-such-factory")
    with caplog.at_level(logging.WARNING):
        leds = HealthLeds(PINS)
        leds.show("good")
        leds.close()
        loop = asyncio.new_event_loop()
        try:
            button = CallButton(
                BUTTON, on_press=lambda: None, on_long_press=lambda: None, loop=loop
            )
        finally:
            loop.close()
    assert not leds.enabled
    assert not button.enabled
    button.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("leds: GPIO unavailable (BadPinFactory" in m for m in messages) == 1
    assert sum("button: GPIO unavailable (BadPinFactory" in m for m in messages) == 1


# --- the button ---------------------------------------------------------------------


class Presses:
    """Records callbacks (and the thread they ran on) and lets a test await them."""

    def __init__(self) -> None:
        self.short = 0
        self.long = 0
        self.threads: set[int] = set()
        self.short_seen = asyncio.Event()
        self.long_seen = asyncio.Event()

    def on_press(self) -> None:
        self.short += 1
        self.threads.add(threading.get_ident())
        self.short_seen.set()

    def on_long_press(self) -> None:
        self.long += 1
        self.threads.add(threading.get_ident())
        self.long_seen.set()


async def drain_loop() -> None:
    """Run every callback queued so far (call_soon_threadsafe is FIFO)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon_threadsafe(done.set_result, None)
    await done


@pytest.fixture
def presses() -> Presses:
    return Presses()


@pytest.fixture
async def button(factory: MockFactory, presses: Presses) -> CallButton:
    b = CallButton(
        BUTTON,
        pin_factory=factory,
        long_press_s=0.1,
        bounce_s=0.05,
        on_press=presses.on_press,
        on_long_press=presses.on_long_press,
        loop=asyncio.get_running_loop(),
    )
    assert b.enabled
    return b


async def test_short_press_calls_on_press_once(
    factory: MockFactory, button: CallButton, presses: Presses
) -> None:
    p = pin(factory, BUTTON)
    assert p.state is True  # pulled up, not pressed
    p.drive_low()
    p.drive_high()
    await asyncio.wait_for(presses.short_seen.wait(), 2)
    await drain_loop()
    assert (presses.short, presses.long) == (1, 0)
    assert presses.threads == {threading.get_ident()}
    # A later long press finishing proves the short one's hold never fired meanwhile.
    p.drive_low()
    await asyncio.wait_for(presses.long_seen.wait(), 2)
    p.drive_high()
    await drain_loop()
    assert (presses.short, presses.long) == (1, 1)
    button.close()


async def test_long_press_calls_on_long_press_once_and_not_on_press(
    factory: MockFactory, button: CallButton, presses: Presses
) -> None:
    p = pin(factory, BUTTON)
    p.drive_low()
    await asyncio.wait_for(presses.long_seen.wait(), 2)
    assert (presses.short, presses.long) == (0, 1)
    p.drive_high()
    await drain_loop()
    assert (presses.short, presses.long) == (0, 1)
    # gpiozero's hold thread fired it, yet the callback ran on the loop's thread.
    assert presses.threads == {threading.get_ident()}
    # The next short press is a short press again.
    p.drive_low()
    p.drive_high()
    await asyncio.wait_for(presses.short_seen.wait(), 2)
    await drain_loop()
    assert (presses.short, presses.long) == (1, 1)
    button.close()
    button.close()


async def test_button_pin_in_use_degrades_to_noop(
    factory: MockFactory, presses: Presses, caplog: pytest.LogCaptureFixture
) -> None:
    taken = LED(BUTTON, pin_factory=factory)
    try:
        with caplog.at_level(logging.WARNING, logger="edgeagent.hw.button"):
            b = CallButton(
                BUTTON,
                pin_factory=factory,
                on_press=presses.on_press,
                on_long_press=presses.on_long_press,
                loop=asyncio.get_running_loop(),
            )
        assert not b.enabled
        assert "GPIOPinInUse" in caplog.text
        b.close()
    finally:
        taken.close()
