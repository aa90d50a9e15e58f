"""The daemon's event loop: uvloop when importable, asyncio's when turned off."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import pytest

from edgeagent import cli

uvloop = pytest.importorskip("uvloop")


def test_uvloop_is_the_default_and_the_env_switch_turns_it_off() -> None:
    assert cli.use_uvloop({})
    assert cli.use_uvloop({cli.UVLOOP_ENV: "1"})
    for off in ("0", "false", "No", " off "):
        assert not cli.use_uvloop({cli.UVLOOP_ENV: off}), off
    on = cli.new_event_loop({})
    off_loop = cli.new_event_loop({cli.UVLOOP_ENV: "0"})
    try:
        assert isinstance(on, uvloop.Loop)
        assert not isinstance(off_loop, uvloop.Loop)
        assert isinstance(off_loop, asyncio.BaseEventLoop)
    finally:
        on.close()
        off_loop.close()


async def _what_the_agent_does_with_its_loop() -> int:
    """Signal handler, subprocess, UDP (aioice), to_thread, call_soon_threadsafe."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop)
    got_signal = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, got_signal.set)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(got_signal.wait(), 5)
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "print(6 * 7)", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert out.strip() == b"42" and proc.returncode == 0

    received: asyncio.Future[bytes] = loop.create_future()

    class Echo(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not received.done():
                received.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"rtp", transport.get_extra_info("sockname"))
            assert await asyncio.wait_for(received, 5) == b"rtp"
    finally:
        transport.close()

    from_thread: asyncio.Future[str] = loop.create_future()

    def worker() -> str:
        loop.call_soon_threadsafe(from_thread.set_result, "frame")
        return "done"

    assert await asyncio.to_thread(worker) == "done"
    assert await asyncio.wait_for(from_thread, 5) == "frame"
    return 3


def test_run_async_runs_the_agents_loop_features_on_uvloop() -> None:
    assert cli.run_async(_what_the_agent_does_with_its_loop()) == 3
    assert cli.busy_workers() == []
