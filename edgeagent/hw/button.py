"""The call button: a gpiozero Button whose short and long presses land on the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class CallButton:
    """Short press -> `on_press`, held for `long_press_s` -> `on_long_press`, never both.

    gpiozero calls back on its own threads; both callbacks run on `loop`. The button
    is wired between the pin and ground (internal pull-up), so pressed reads low.
    Without usable GPIO it logs one WARNING and does nothing.
    """

    def __init__(
        self,
        pin: int | str,
        *,
        pin_factory: Any = None,
        long_press_s: float = 2.0,
        bounce_s: float | None = 0.05,
        on_press: Callable[[], None],
        on_long_press: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._on_press = on_press
        self._on_long_press = on_long_press
        self._loop = loop
        # gpiozero fires pressed/released on the pin's thread and held on its hold
        # thread; the lock makes "held" and "released" agree on which press this was.
        self._lock = threading.Lock()
        self._pressed = False
        self._held = False
        self._button: Any = None
        # gpiozero (about 2 MiB of RSS) is imported only when the button is enabled.
        from gpiozero import Button, GPIOZeroError, PinFactoryFallback

        # Raised by gpiozero or the pin library underneath when the chip or pin is unusable.
        self._errors: tuple[type[BaseException], ...] = (GPIOZeroError, OSError, RuntimeError)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PinFactoryFallback)
                button = Button(
                    pin,
                    pull_up=True,
                    bounce_time=bounce_s,
                    hold_time=long_press_s,
                    hold_repeat=False,
                    pin_factory=pin_factory,
                )
        except self._errors as exc:
            logger.warning(
                "button: GPIO unavailable (%s: %s); button disabled", type(exc).__name__, exc
            )
            return
        button.when_pressed = self._pressed_cb
        button.when_held = self._held_cb
        button.when_released = self._released_cb
        self._button = button

    @property
    def enabled(self) -> bool:
        """Whether a real (or mock) pin is being watched."""
        return self._button is not None

    def _pressed_cb(self) -> None:
        with self._lock:
            self._pressed = True
            self._held = False

    def _held_cb(self) -> None:
        with self._lock:
            if not self._pressed or self._held:
                return  # a hold that lost the race with its release
            self._held = True
        self._dispatch(self._on_long_press)

    def _released_cb(self) -> None:
        with self._lock:
            if not self._pressed:
                return
            self._pressed = False
            short = not self._held
        if short:
            self._dispatch(self._on_press)

    def _dispatch(self, callback: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:
            logger.debug("button: event loop closed, press dropped")

    def close(self) -> None:
        """Stop watching the pin; safe to call twice."""
        button, self._button = self._button, None
        if button is not None:
            try:
                button.close()
            except self._errors as exc:
                logger.debug("button: close failed: %s", exc)
