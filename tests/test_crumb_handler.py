"""Log records become crumbs and stream as events from any thread, without ever raising."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from edgeagent.telemetry.breadcrumbs import Breadcrumbs, Crumb, CrumbLogHandler


@pytest.fixture
def log() -> logging.Logger:
    logger = logging.getLogger("edgeagent.test_crumbs")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


async def test_a_warning_on_a_worker_thread_reaches_the_sink_on_the_loop_thread(
    log: logging.Logger,
) -> None:
    """The sink writes the spool, whose sqlite connection belongs to the loop's thread:
    a warning from the device sampler's thread used to call it there and raise."""
    got: list[tuple[str, int]] = []
    streamed = asyncio.Event()

    def sink(crumb: Crumb) -> None:
        got.append((crumb.message, threading.get_ident()))
        streamed.set()

    handler = CrumbLogHandler(Breadcrumbs(), sink)
    handler.bind_loop(asyncio.get_running_loop())
    log.addHandler(handler)
    try:
        await asyncio.to_thread(log.warning, "thermal zone unreadable")
        await asyncio.wait_for(streamed.wait(), 5)
    finally:
        log.removeHandler(handler)
    assert got == [("thermal zone unreadable", threading.get_ident())]


def test_a_failing_sink_never_raises_into_the_code_that_logged(
    log: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    crumbs = Breadcrumbs()

    def sink(_crumb: Crumb) -> None:
        raise RuntimeError("spool unusable")

    handler = CrumbLogHandler(crumbs, sink)
    log.addHandler(handler)
    try:
        log.error("disk vanished")  # must not raise
    finally:
        log.removeHandler(handler)
    assert [c["message"] for c in crumbs.snapshot()] == ["disk vanished"]
    assert "spool unusable" in capsys.readouterr().err  # reported as a handler error
