"""Call-health LEDs: one gpiozero pattern per health state, on three LEDs or one RGB LED."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

logger = logging.getLogger(__name__)


class Color(StrEnum):
    GREEN = "green"
    AMBER = "amber"
    RED = "red"


@dataclass(frozen=True, slots=True)
class LedPattern:
    """One colour, solid (`on_s` is None) or blinking `on_s` on / `off_s` off, starting on."""

    color: Color
    on_s: float | None = None
    off_s: float | None = None


# The documented table (docs/leds.md). Every state differs from every other in
# colour or rhythm, so a state can be read off the device without a legend.
PATTERNS: dict[str, LedPattern] = {
    "idle": LedPattern(Color.GREEN, 0.1, 2.9),  # heartbeat blip: alive, nothing going on
    "ringing": LedPattern(Color.GREEN, 0.25, 0.25),
    "connecting": LedPattern(Color.GREEN, 1.0, 1.0),
    "good": LedPattern(Color.GREEN),
    "degraded": LedPattern(Color.AMBER),
    "bad": LedPattern(Color.RED),
    "fault": LedPattern(Color.RED, 0.25, 0.25),
    "offline": LedPattern(Color.AMBER, 1.0, 1.0),
}

# On a non-PWM RGB LED amber can only be red + green (it looks yellow).
_RGB: dict[Color, tuple[int, int, int]] = {
    Color.GREEN: (0, 1, 0),
    Color.AMBER: (1, 1, 0),
    Color.RED: (1, 0, 0),
}


@dataclass(frozen=True, slots=True)
class ThreeLedPins:
    """Separate green, amber and red LEDs (BCM numbers or gpiozero pin names)."""

    green: int | str
    amber: int | str
    red: int | str
    active_high: bool = True


@dataclass(frozen=True, slots=True)
class RgbLedPins:
    """One RGB LED on three pins; common-anode parts need `active_high=False`."""

    red: int | str
    green: int | str
    blue: int | str
    active_high: bool = True


class HealthLeds:
    """Shows one call-health state at a time; a no-op (after one WARNING) without GPIO."""

    def __init__(self, pins: ThreeLedPins | RgbLedPins, *, pin_factory: Any = None) -> None:
        self._state: str | None = None
        self._leds: dict[Color, Any] = {}
        self._rgb: Any = None
        # gpiozero (about 2 MiB of RSS) is imported only when LEDs are built.
        from gpiozero import GPIOZeroError, PinFactoryFallback

        # Raised by gpiozero or the pin library underneath when the chip or pin is unusable.
        self._errors: tuple[type[BaseException], ...] = (GPIOZeroError, OSError, RuntimeError)
        try:
            with warnings.catch_warnings():
                # gpiozero warns once per pin library it fails to load; one WARNING below is enough.
                warnings.simplefilter("ignore", PinFactoryFallback)
                self._open(pins, pin_factory)
        except self._errors as exc:
            self.close()
            logger.warning(
                "leds: GPIO unavailable (%s: %s); LEDs disabled", type(exc).__name__, exc
            )

    def _open(self, pins: ThreeLedPins | RgbLedPins, pin_factory: Any) -> None:
        from gpiozero import LED, RGBLED

        if isinstance(pins, RgbLedPins):
            self._rgb = RGBLED(
                pins.red,
                pins.green,
                pins.blue,
                active_high=pins.active_high,
                pwm=False,
                pin_factory=pin_factory,
            )
            return
        for color, pin in (
            (Color.GREEN, pins.green),
            (Color.AMBER, pins.amber),
            (Color.RED, pins.red),
        ):
            self._leds[color] = LED(pin, active_high=pins.active_high, pin_factory=pin_factory)

    @property
    def enabled(self) -> bool:
        """Whether real (or mock) pins are driven; False after GPIO failed to open."""
        return self._rgb is not None or bool(self._leds)

    @property
    def state(self) -> str | None:
        """The state last shown, or None before the first `show`."""
        return self._state

    def show(self, state: str) -> None:
        """Switch to the pattern for `state`; repeating the current state keeps its rhythm."""
        pattern = PATTERNS.get(state)
        if pattern is None:
            logger.warning("leds: unknown health state %r ignored", state)
            return
        if state == self._state:
            return
        self._state = state
        if not self.enabled:
            return
        try:
            self._apply(pattern)
        except self._errors as exc:
            logger.warning("leds: cannot show %s (%s); LEDs disabled", state, exc)
            self.close()

    def _apply(self, pattern: LedPattern) -> None:
        if self._rgb is not None:
            color = _RGB[pattern.color]
            if pattern.on_s is None:
                self._rgb.color = color
            else:
                self._rgb.blink(
                    on_time=pattern.on_s,
                    off_time=pattern.off_s,
                    on_color=color,
                    off_color=(0, 0, 0),
                    background=True,
                )
            return
        # Everything off first (this also stops blink threads) so no two colours overlap.
        for led in self._leds.values():
            led.off()
        led = self._leds[pattern.color]
        if pattern.on_s is None:
            led.on()
        else:
            led.blink(on_time=pattern.on_s, off_time=pattern.off_s, background=True)

    def close(self) -> None:
        """Turn everything off and release the pins; safe to call twice."""
        devices = [*self._leds.values(), *([self._rgb] if self._rgb is not None else [])]
        self._leds = {}
        self._rgb = None
        for device in devices:
            try:
                device.off()
                device.close()
            except self._errors as exc:
                logger.debug("leds: close failed: %s", exc)
