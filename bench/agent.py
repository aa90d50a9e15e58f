"""Foundation numbers: start-to-READY, idle CPU and RSS, spool drain rate to a local mosquitto.

Run: .venv/bin/python bench/agent.py [--only ready|drain] [--drain-n N] [--drain-runs R]
Everything runs on 127.0.0.1: a mosquitto on a free port, the agent as a child
process (READY=1 read from a notify socket this script binds), and an
in-process agent for the drain measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from agent_support import agent_config  # noqa: E402
from conftest import free_port, wait_port, write_mosquitto_conf  # noqa: E402
from tcp_relay import TcpRelay  # noqa: E402

from edgeagent.agent import Agent, AgentSeams  # noqa: E402
from edgeagent.config import load_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drain_socket(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def start_to_ready(tmp: Path, port: int, runs: int = 5) -> tuple[list[float], float, float]:
    cfg = agent_config(tmp, port, "bench-ready")
    times = []
    idle_cpu = rss = float("nan")
    for i in range(runs):
        sock_path = tmp / f"notify-{i}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(10)
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        while True:
            msg = sock.recv(4096).decode()
            if "READY=1" in msg.split("\n"):
                times.append((time.monotonic() - t0) * 1000)
                break
        # Keep reading, as systemd does: a full datagram queue would block sd_notify.
        threading.Thread(target=drain_socket, args=(sock,), daemon=True).start()
        if i == runs - 1:
            time.sleep(5)  # let start-up work settle before measuring idle
            c0, w0 = cpu_s(proc.pid), time.monotonic()
            time.sleep(30)
            idle_cpu = (cpu_s(proc.pid) - c0) / (time.monotonic() - w0) * 100
            rss = rss_mib(proc.pid)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            print(f"run {i}: agent did not stop within 10 s of SIGTERM; killed")
            proc.kill()
            proc.wait()
        sock.close()
    return times, idle_cpu, rss


async def drain_rate(tmp: Path, port: int, n: int = 20000) -> tuple[float, float]:
    relay = TcpRelay(port)
    await relay.start()
    cfg = load_config(agent_config(tmp, relay.port, "bench-drain"), environ={})
    agent = Agent(
        cfg,
        AgentSeams(
            install_signal_handlers=False, install_crash_hooks=False, freeze_gc_after_start=False
        ),
    )
    task = asyncio.create_task(agent.run())
    await agent.link.connected.wait()
    relay.set_open(False)
    await agent.link.disconnected.wait()
    t0 = time.perf_counter()
    for i in range(n):
        agent.publisher.spool(
            agent.topics.events,
            lambda seq, i=i: __import__("edgeagent.telemetry.payloads", fromlist=["Event"]).Event(
                v=1,
                device="bench-drain",
                ts=time.time(),
                seq=seq,
                level="info",
                category="bench",
                message=f"event {i} " + "x" * 300,
            ),
        )
    put_rate = n / (time.perf_counter() - t0)
    pending = agent.spool.stats().pending
    relay.set_open(True)
    await agent.link.connected.wait()
    t1 = time.perf_counter()
    while agent.spool.stats().pending > 0:
        await asyncio.sleep(0.01)
    rate = pending / (time.perf_counter() - t1)
    agent.request_stop("bench over")
    await task
    await relay.stop()
    return put_rate, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["ready", "drain"], help="run one part only")
    parser.add_argument("--drain-n", type=int, default=20000, help="messages spooled offline")
    parser.add_argument("--drain-runs", type=int, default=1, help="drain measurements")
    args = parser.parse_args()
    ready: list[float] = []
    idle_cpu = rss = float("nan")
    puts: list[float] = []
    drains: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port, ws = free_port(), free_port()
        conf = tmp / "mosquitto.conf"
        write_mosquitto_conf(conf, port, ws)
        broker = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(port)
            if args.only in (None, "ready"):
                ready, idle_cpu, rss = start_to_ready(tmp, port)
            if args.only in (None, "drain"):
                for run in range(args.drain_runs):
                    (tmp / f"drain-{run}").mkdir()
                    put_rate, drain = asyncio.run(
                        drain_rate(tmp / f"drain-{run}", port, args.drain_n)
                    )
                    puts.append(put_rate)
                    drains.append(drain)
        finally:
            broker.terminate()
            broker.wait(5)
    print(f"{'metric':44} {'value':>12}  target")
    if ready:
        print(
            f"{'start to READY=1, median of 5 (ms)':44} {statistics.median(ready):12.0f}  <= 1000"
            f"   (runs: {', '.join(f'{t:.0f}' for t in ready)})"
        )
        print(f"{'idle CPU over 30 s (% of a core)':44} {idle_cpu:12.2f}  <= 0.5")
        print(f"{'idle RSS (MiB)':44} {rss:12.1f}")
    if drains:
        runs = ", ".join(f"{r:.0f}" for r in drains)
        print(
            f"{'spool writes through Publisher (events/s)':44} {statistics.median(puts):12.0f}"
            "  >= 5000"
        )
        print(
            f"{'drain after outage to mosquitto (msgs/s)':44} {statistics.median(drains):12.0f}"
            f"  >= 2000   (runs: {runs})"
        )


if __name__ == "__main__":
    main()
