"""Test harness: agent configs, the agent as a real process, and an MQTT collector."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent


def agent_config(
    tmp_path: Path, port: int, device_id: str = "dev-1", extra: str = "", **sections: str
) -> Path:
    """Write a bench-like config for a test agent and return its path."""
    path = tmp_path / f"{device_id}.toml"
    state = tmp_path / f"state-{device_id}"
    text = f"""
[device]
id = "{device_id}"
[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_min_s = 0.1
reconnect_max_s = 0.5
[storage]
state_dir = "{state}"
[health]
vcgencmd = ""
assume_clock_synced = true
sysfs_root = "{tmp_path / "sysroot"}"
[leds]
mock = true
{extra}
"""
    path.write_text(text)
    return path


@dataclass
class AgentProcess:
    """`python -m edgeagent run` (or `command`, e.g. `echo-peer`) as a child process.

    `args` follow `--config PATH` (`--dial PEER`); the output goes to `log`, by default
    next to the config (give one for a config that is not in tmp_path).
    """

    config: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    command: str = "run"
    args: tuple[str, ...] = ()

    def start(self) -> None:
        env = dict(os.environ, **self.env)
        if self.log is None:
            self.log = self.config.with_suffix(".log")
        argv = ["-m", "edgeagent", self.command, "--config", str(self.config), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any = None

    def json(self) -> Any:
        return json.loads(self.payload)


class Collector:
    """Subscribes and records every message; tests await predicates over what arrived."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[Received] = []
        self._changed = asyncio.Condition()

    async def _pump(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append(Received(m.topic.value, payload, m.retain, m.properties))
            async with self._changed:
                self._changed.notify_all()

    def on(self, suffix: str) -> list[Received]:
        return [m for m in self.messages if m.topic.endswith(suffix)]

    async def wait_for(
        self,
        predicate: Callable[[list[Received]], Any],
        timeout: float = 10.0,
    ) -> Any:
        """Wait until predicate(messages) is truthy and return its value."""
        try:
            return await self._wait_for(predicate, timeout)
        except TimeoutError:
            seen = [(m.topic, m.payload[:200]) for m in self.messages[-20:]]
            raise TimeoutError(f"waited {timeout} s; last messages: {seen}") from None

    async def _wait_for(self, predicate: Callable[[list[Received]], Any], timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            async with self._changed:
                while True:
                    result = predicate(self.messages)
                    if result:
                        return result
                    await self._changed.wait()


@contextlib.asynccontextmanager
async def collector(
    port: int, *topics: str, v5: bool = True, persistent_id: str | None = None
) -> AsyncIterator[Collector]:
    """Subscribe to `topics`; with `persistent_id`, an MQTT 3.1.1 persistent session."""
    if persistent_id is not None:
        v5 = False
    proto = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        protocol=proto,
        identifier=persistent_id,
        clean_session=False if persistent_id is not None else None,
    ) as client:
        for t in topics:
            await client.subscribe(t, qos=1)
        c = Collector(client)
        task = asyncio.create_task(c._pump())
        try:
            yield c
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
