"""Spool throughput: puts per second (normal and full durability), drain rate, open time.

Run: .venv/bin/python bench/spool.py [--dir DIR] [--n N]

Writes into DIR (default: the system temp dir; point it at the device's real
storage on a Pi, since /tmp may be tmpfs there). Each put carries a realistic
~400-byte event payload built with its seq. As a reference, the same run times
a plain SQLite insert-per-transaction with the same pragmas and none of our
logic, so the overhead ratio is visible.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from edgeagent.telemetry.spool import Spool

TOPIC = "edge/v1/hp-0042/events"


def event_payload(seq: int) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "device": "hp-0042",
            "ts": "2026-05-09T07:35:25.123456Z",
            "seq": seq,
            "level": "info",
            "category": "call.ice",
            "message": "call 7f3a9c: ICE connected via relay in 412 ms",
            "call_id": "7f3a9c2e-5b1d-4c8e-9a6f-0d2b4e6f8a1c",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "data": {
                "local_type": "relay",
                "remote_type": "srflx",
                "rtt_ms": 38.5,
                "candidates": 7,
                "turn": "turn:turn.example.net:3478?transport=udp",
                "note": "gathered in 180 ms",
            },
        },
        separators=(",", ":"),
    ).encode()


def timed(n: int, op: Callable[[int], object]) -> tuple[float, list[float]]:
    """Run op(i) n times; return (total seconds, per-call microseconds)."""
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        a = time.perf_counter_ns()
        op(i)
        lat.append((time.perf_counter_ns() - a) / 1000)
    return time.perf_counter() - t0, lat


def pct(lat: list[float], q: float) -> float:
    return statistics.quantiles(lat, n=100)[int(q) - 1] if len(lat) > 1 else lat[0]


def bench_spool_put(path: Path, durability: str, n: int) -> tuple[float, list[float]]:
    mode = "full" if durability == "full" else "normal"
    with Spool(path, durability=mode, max_messages=10 * n) as spool:
        return timed(n, lambda _: spool.put(TOPIC, event_payload))


def bench_plain_insert(path: Path, synchronous: str, n: int) -> tuple[float, list[float]]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(
        "CREATE TABLE m (seq INTEGER PRIMARY KEY, topic TEXT, payload BLOB,"
        " retain INTEGER, created_ts REAL)"
    )

    def insert(i: int) -> None:
        conn.execute(
            "INSERT INTO m VALUES (?, ?, ?, 0, ?)",
            (i + 1, TOPIC, event_payload(i + 1), time.time()),
        )

    try:
        return timed(n, insert)
    finally:
        conn.close()


def bench_drain(path: Path, n: int, batch: bool) -> float:
    """Messages per second through pending(100) + ack (each, or ack_many per page)."""
    with Spool(path, max_messages=10 * n) as spool:
        for _ in range(n):
            spool.put(TOPIC, event_payload)
        t0 = time.perf_counter()
        done = 0
        while page := spool.pending(limit=100):
            if batch:
                spool.ack_many(e.seq for e in page)
            else:
                for e in page:
                    spool.ack(e.seq)
            done += len(page)
        return done / (time.perf_counter() - t0)


def bench_drain_window(path: Path, n: int, window: int = 32, group: int = 8) -> float:
    """The Publisher's spool side of a sliding-window drain, broker left out: refill
    the window with pending(room, after=last sent), ack_many per `group` PUBACKs."""
    with Spool(path, max_messages=10 * n) as spool:
        for _ in range(n):
            spool.put(TOPIC, event_payload)
        t0 = time.perf_counter()
        inflight: deque[int] = deque()
        last: int | None = None
        done = 0
        while True:
            page = spool.pending(limit=window - len(inflight), after=last)
            if page:
                inflight.extend(e.seq for e in page)
                last = page[-1].seq
            if not inflight:
                break
            acked = [inflight.popleft() for _ in range(min(group, len(inflight)))]
            spool.ack_many(acked)
            done += len(acked)
        return done / (time.perf_counter() - t0)


def bench_open(path: Path, n: int) -> tuple[float, int]:
    with Spool(path, max_messages=n) as spool:
        for _ in range(n):
            spool.put(TOPIC, event_payload)
    t0 = time.perf_counter()
    with Spool(path, max_messages=n) as spool:
        opened = time.perf_counter() - t0
        return opened, spool.stats().pending_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--n", type=int, default=20_000, help="puts for durability normal")
    parser.add_argument("--n-full", type=int, default=3_000, help="puts for durability full")
    parser.add_argument("--n-open", type=int, default=100_000, help="stored messages to reopen")
    args = parser.parse_args()

    size = len(event_payload(123456))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="spool-bench-") as tmp:
        d = Path(tmp)
        print(f"spool bench in {d}, payload {size} bytes")
        rows: list[tuple[str, int, float, list[float] | None, str]] = []
        ref: dict[str, float] = {}
        for sync, n in (("NORMAL", args.n), ("FULL", args.n_full)):
            total, lat = bench_plain_insert(d / f"plain-{sync}.db", sync, n)
            ref[sync] = n / total
            rows.append((f"plain sqlite insert, sync={sync}", n, n / total, lat, "1.00"))
        for mode, n in (("normal", args.n), ("full", args.n_full)):
            total, lat = bench_spool_put(d / f"spool-{mode}.db", mode, n)
            rate = n / total
            ratio = f"{rate / ref[mode.upper()]:.2f}"
            rows.append((f"Spool.put durability={mode}", n, rate, lat, ratio))
        for name, batch in (("ack each", False), ("ack_many", True)):
            rate = bench_drain(d / f"drain-{batch}.db", args.n, batch)
            rows.append((f"drain: pending(100) + {name}", args.n, rate, None, ""))
        rate = bench_drain_window(d / "drain-window.db", args.n)
        rows.append(("drain: window 32, ack_many per 8", args.n, rate, None, ""))
        opened, stored = bench_open(d / "open.db", args.n_open)

    print()
    head = f"{'case':<36} {'n':>7} {'per s':>9} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>8}"
    print(f"{head} {'vs plain':>8}")
    print("-" * 90)
    for name, n, rate, lat, ratio in rows:
        if lat is None:
            lat_cols = f"{'':>8} {'':>8} {'':>8}"
        else:
            lat_cols = f"{pct(lat, 50):>8.0f} {pct(lat, 99):>8.0f} {max(lat):>8.0f}"
        print(f"{name:<36} {n:>7} {rate:>9.0f} {lat_cols} {ratio:>8}")
    print()
    print(
        f"reopen with {args.n_open} stored messages ({stored / 1e6:.1f} MB payload):"
        f" {opened * 1000:.0f} ms (quick_check + counting)"
    )
    print("target: Spool.put >= 5000 events/s")
    print("drain to a broker (target >= 2000 msgs/s): bench/agent.py --only drain")


if __name__ == "__main__":
    main()
