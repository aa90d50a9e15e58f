"""Hostile clients of the local command socket (`security.local_socket`, `edgeagent-ctl
--local`): every bad line answered, the server keeps serving, descriptors come back.

A real CommandServer on a real unix socket; its broker link is never started (the socket
is for when the broker is down), so its audit events wait in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_commands import DEVICE, TOPICS, StaticContext

from edgeagent.clock import SystemClock
from edgeagent.config import MqttConfig
from edgeagent.control.server import (
    MAX_LOCAL_LINE,
    CommandLimits,
    CommandServer,
    build_command_server,
)
from edgeagent.events import EventBus
from edgeagent.mqtt import BrokerLink, SessionCounter
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, LogRing
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.spool import Spool

pytestmark = pytest.mark.timeout(60)

# No per-key rate limit in the way: each test sends more than the default burst.
LIMITS = CommandLimits(request_rate_per_s=1e6, request_burst=1e6)
PING = json.dumps({"cmd": "ping", "args": {}, "id": "good-1"}).encode() + b"\n"


@dataclass
class GatedContext(StaticContext):
    """`metrics` waits for `gate`: a request still running when its client leaves."""

    gate: asyncio.Event | None = None

    async def metrics(self) -> dict[str, Any]:
        assert self.gate is not None
        await self.gate.wait()
        return {"gated": True}


@dataclass
class Local:
    server: CommandServer
    task: asyncio.Task[None]
    sock: Path
    ctx: GatedContext
    baseline_fds: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.sock), limit=1 << 20)

    async def ask(self, line: bytes) -> dict[str, Any]:
        """One line on a fresh connection; its one answer."""
        reader, writer = await self.connect()
        try:
            writer.write(line)
            await writer.drain()
            return await answer(reader)
        finally:
            writer.close()

    async def assert_serving(self) -> None:
        assert not self.task.done(), self.task
        resp = await self.ask(PING)
        assert resp["code"] == 200 and resp["result"]["pong"] is True and resp["id"] == "good-1"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def answer(reader: asyncio.StreamReader) -> dict[str, Any]:
    async with asyncio.timeout(10):
        line = await reader.readline()
    assert line.endswith(b"\n"), line[:200]
    out: dict[str, Any] = json.loads(line)
    return out


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Bounded polling, for what has no event to await (descriptors closing)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def settle(local: Local) -> None:
    """Nothing leaked: the process's descriptors are back to the baseline."""
    await until(lambda: open_fds() <= local.baseline_fds)


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Local]:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    spool = Spool(state_dir / "spool.sqlite3", min_free_mb=0.0)
    link = BrokerLink(
        MqttConfig(port=9),  # never started
        DEVICE,
        sessions=SessionCounter(state_dir / "session"),
        will=lambda s: (TOPICS.status, b'{"state": "lost"}'),
        on_connected=None,
        bus=EventBus(),
    )
    publisher = Publisher(
        link, spool, TOPICS, Breadcrumbs(), wall=time.time, monotonic=time.monotonic,
        events_burst=10_000, events_rate_per_s=10_000,
    )  # fmt: skip
    ctx = GatedContext(
        DEVICE, link, LogRing(100), Breadcrumbs(), state_dir, 9, gate=asyncio.Event()
    )
    sock = tmp_path / "run" / "ctl.sock"
    server = build_command_server(
        device_id=DEVICE,
        topics=TOPICS,
        link=link,
        publisher=publisher,
        context=ctx,
        clock=SystemClock(),
        state_dir=state_dir,
        commands_mode="open",
        keys_file=None,
        max_token_lifetime_s=300,
        armed=[],
        local_socket=sock,
        limits=LIMITS,
    )
    task = asyncio.create_task(server.run())
    try:
        async with asyncio.timeout(10):
            await server.local_ready.wait()
        rig = Local(server, task, sock, ctx, 0)
        await rig.assert_serving()  # first use opens files for good (the spool's WAL)
        gc.collect()  # earlier tests' loops and sockets: closed now, not during the test
        rig.baseline_fds = open_fds()
        yield rig
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        spool.close()
    assert not sock.exists()


BAD_LINES = [
    ("invalid-json", b'{"cmd": "ping",\n', 400, 'expected {"cmd", "args"}'),
    ("binary", bytes(range(256)).replace(b"\n", b"") + b"\n", 400, "expected"),
    ("not-utf8-json", b'{"cmd": "\xff\xfe"}\n', 400, "expected"),
    ("nul-bytes", b"\x00" * 100 + b"\n", 400, "expected"),
    ("json-list", b"[1, 2, 3]\n", 400, "expected"),
    ("json-string", b'"ping"\n', 400, "expected"),
    ("cmd-not-string", b'{"cmd": 5, "args": {}}\n', 400, "expected"),
    ("args-not-table", b'{"cmd": "ping", "args": [1]}\n', 400, "expected"),
    ("deep-json", b'{"cmd": "ping", "args": ' + b"[" * 100_00 + b"]" * 100_00 + b"}\n", 400, ""),
    ("unknown-command", b'{"cmd": "rm -rf /", "args": {}}\n', 404, ""),
    ("bad-arg-type", b'{"cmd": "logs", "args": {"lines": "x"}}\n', 400, "lines"),
    ("arg-out-of-range", b'{"cmd": "logs", "args": {"lines": 1e999}}\n', 400, "lines"),
    ("unknown-arg", b'{"cmd": "ping", "args": {"x": 1}}\n', 400, "x"),
    ("id-not-string", b'{"cmd": "ping", "args": {}, "id": {"a": 1}}\n', 200, ""),
    ("crlf", b'{"cmd": "ping", "args": {}}\r\n', 200, ""),
]


@pytest.mark.parametrize(
    ("line", "code", "why"), [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
async def test_a_bad_line_is_answered_and_the_connection_goes_on(
    local: Local, line: bytes, code: int, why: str
) -> None:
    reader, writer = await local.connect()
    try:
        writer.write(line + PING)
        await writer.drain()
        first, second = await answer(reader), await answer(reader)
    finally:
        writer.close()
    assert first["code"] == code and first["ok"] is (code == 200), first
    assert why in (first.get("error") or ""), first
    assert second["code"] == 200 and second["id"] == "good-1"
    await local.assert_serving()
    await settle(local)


async def test_a_line_over_the_limit_is_answered_413_and_closed(local: Local) -> None:
    reader, writer = await local.connect()
    writer.write(b'{"cmd": "ping", "args": {"x": "' + b"a" * MAX_LOCAL_LINE + b'"}}\n' + PING)
    await writer.drain()
    resp = await answer(reader)
    assert resp["code"] == 413 and "64 KiB" in resp["error"]
    async with asyncio.timeout(10):
        assert await reader.read() == b""  # closed: the rest of that line is not parsed
    writer.close()
    await local.assert_serving()
    await settle(local)


async def test_a_partial_line_then_close(local: Local) -> None:
    for partial in (b'{"cmd": "pi', b'{"cmd": "ping", "args": {}}', b"\xff" * 1000):
        _reader, writer = await local.connect()
        writer.write(partial)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    await local.assert_serving()
    await settle(local)


async def test_a_client_gone_before_its_answer_does_not_stop_the_server(local: Local) -> None:
    """The answer is written to a closed socket, in the request's task of the TaskGroup."""
    assert local.ctx.gate is not None
    _reader, writer = await local.connect()
    writer.write(b'{"cmd": "metrics", "args": {}, "id": "left"}\n')
    await writer.drain()
    await until(lambda: local.server.executed.get("metrics", 0) == 1)
    writer.close()
    await writer.wait_closed()
    local.ctx.gate.set()
    await until(lambda: local.server.answered.get(200, 0) >= 1)
    await local.assert_serving()
    await settle(local)


async def test_many_lines_at_once_each_answered_in_order(local: Local) -> None:
    lines = []
    for i in range(300):
        kind = i % 3
        if kind == 0:
            lines.append(json.dumps({"cmd": "ping", "args": {}, "id": f"r-{i}"}))
        elif kind == 1:
            lines.append("not json")
        else:
            lines.append(json.dumps({"cmd": "nope", "args": {}, "id": f"r-{i}"}))
    reader, writer = await local.connect()
    writer.write(("\n".join(lines) + "\n").encode())
    await writer.drain()
    answers = [await answer(reader) for _ in lines]
    writer.close()
    assert [a["code"] for a in answers] == [(200, 400, 404)[i % 3] for i in range(300)]
    assert [a["id"] for a in answers if a["code"] != 400] == [
        f"r-{i}" for i in range(300) if i % 3 != 1
    ]
    await settle(local)


async def test_200_idle_connections_are_bounded_and_time_out(local: Local) -> None:
    local.server.local_idle_s = 1.0
    cap = local.server.local_max_clients
    clients = [await local.connect() for _ in range(200)]
    # Past the cap, each is answered 429 and closed at once: descriptors stay bounded.
    await until(lambda: len(local.server._local_writers) == cap)
    assert open_fds() <= local.baseline_fds + 200 + cap + 10  # our 200 ends, the server's cap
    refused = 0
    idle = []
    for reader, writer in clients:
        first = await answer(reader)
        if first["code"] == 429:
            assert "too many local connections" in first["error"]
            refused += 1
        else:
            # The ones held are closed after local_idle_s, saying why.
            assert first["code"] == 400 and "no complete request line" in first["error"]
            idle.append(writer)
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
    assert (refused, len(idle)) == (200 - cap, cap)
    await local.assert_serving()
    await settle(local)


async def test_a_client_that_never_reads_is_closed_and_others_are_served(local: Local) -> None:
    local.server.local_write_s = 0.5
    local.ctx.big_logs = True  # answers of about 128 KiB
    # A plain socket: an asyncio client's transport would read into its buffer anyway.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lazy:
        lazy.setblocking(False)
        await asyncio.get_running_loop().sock_connect(lazy, str(local.sock))
        lazy.sendall(b'{"cmd": "logs", "args": {"lines": 5000}}\n' * 50)
        # Meanwhile, on another connection, others are answered.
        await local.assert_serving()
        # The server gives up on it: aborted, the lines it read ahead dropped, nothing in flight.
        await until(lambda: not local.server._local_writers and local.server._in_flight == 0)
        assert local.server.executed["logs"] < 50
    await local.assert_serving()
    await settle(local)
