"""Shared fixtures: a real mosquitto on a free loopback port, temp state dirs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before: two taken in a
    row (a broker's MQTT and websocket listeners) could otherwise be the same one."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            # A connect whose ephemeral source port is `port` itself succeeds with nobody
            # listening (TCP simultaneous open with itself): not a listener.
            if s.connect_ex(("127.0.0.1", port)) == 0 and s.getsockname() != s.getpeername():
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@dataclass
class Broker:
    """A real mosquitto process; `stop`/`start` simulate an outage on the same port."""

    port: int
    ws_port: int
    conf: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)
        if self.proc.poll() is not None:  # it answered, then exited (a listener it could not bind)
            raise RuntimeError(f"mosquitto exited at start ({self.proc.returncode}): {self.conf}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


def write_mosquitto_conf(path: Path, port: int, ws_port: int, extra: str = "") -> None:
    path.write_text(
        f"per_listener_settings false\n"
        f"allow_anonymous true\n"
        f"persistence false\n"
        f"log_dest stderr\n"
        f"set_tcp_nodelay true\n"  # call signaling: small writes, no delayed-ACK stalls
        f"listener {port} 127.0.0.1\n"
        f"listener {ws_port}\n"
        f"socket_domain ipv4\n"
        f"protocol websockets\n"
        f"{extra}"
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto for one test (MQTT on TCP, plus websockets on loopback)."""
    port, ws_port = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    write_mosquitto_conf(conf, port, ws_port)
    b = Broker(port=port, ws_port=ws_port, conf=conf)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _no_foreign_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's EDGEAGENT__* overrides out of the tests."""
    for key in list(os.environ):
        if key.startswith("EDGEAGENT__"):
            monkeypatch.delenv(key)
