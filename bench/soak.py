"""Soak: N consecutive short calls from a running agent to the echo peer; RSS and fds over time.

Run: .venv/bin/python bench/soak.py [--calls 1000] [--media-s 1.5] [--tracemalloc-s 0]
     [--env KEY=VALUE ...]

The agent (`python -m edgeagent run`) and the echo peer (`python -m edgeagent echo-peer`)
run as processes beside a mosquitto on a free loopback port, set up as in bench/perf.py.
This script dials the echo peer with the `dial` command, waits for `call.media_started`,
lets `--media-s` seconds of audio flow, hangs up with the `hangup` command and waits for
`call.closed`. A call fails when it does not connect, does not start media, or closes
with a result other than `completed`.

It samples the agent's VmRSS and open descriptors (/proc/<pid>/fd) after a warm-up call
(the start), at N/2 and at N, each time SETTLE_S after the last call closed (the agent
returns the freed heap a moment after each call; the progress lines in between are taken
right after a call and swing by a call's working set), and prints growth in %
(target <= 5 %), plus the fd kinds that changed. With `--tracemalloc-s S` it sends the
`memory` command (armed in the bench config) after the middle sample: tracemalloc
snapshots S seconds apart while calls continue, and prints the lines that grew (the
leak, if there is one).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from perf import (  # noqa: E402
    AGENT_ID,
    PREFIX,
    Msg,
    Operator,
    agent_child,
    echo_child,
    end_call,
    memory_mib,
    mosquitto,
    operator,
    place_call,
    wait_online,
    write_asoundrc,
    write_configs,
)


def fd_kinds(pid: int) -> collections.Counter[str]:
    """Open descriptors by kind (socket, pipe, anon_inode:[eventfd], a file path...)."""
    kinds: collections.Counter[str] = collections.Counter()
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        kinds[target.split(":[")[0] if ":[" in target else target] += 1
    return kinds


@dataclass
class Sample:
    label: str
    calls: int
    rss_mib: float
    uss_mib: float
    fds: int
    kinds: collections.Counter[str]
    at: float


def sample(label: str, calls: int, pid: int) -> Sample:
    mem = memory_mib(pid)
    kinds = fd_kinds(pid)
    return Sample(
        label,
        calls,
        mem["rss"],
        mem.get("uss", float("nan")),
        sum(kinds.values()),
        kinds,
        time.monotonic(),
    )


async def one_call(op: Operator, media_s: float) -> str | None:
    """One short call; None when it completed, else why it failed."""
    try:
        times = await place_call(op, within_s=20)
    except (RuntimeError, TimeoutError) as exc:
        active = await op.command("hangup", {})  # if a half-set-up call is still active
        return f"setup: {exc or type(exc).__name__} (hangup answered {active.data['code']})"
    try:
        await op.wait_for(op.event("call.media_started", times.call_id), 0, 10)
    except TimeoutError:
        await end_call(op, times.call_id)
        return "no media within 10 s"
    await asyncio.sleep(media_s)
    closed = await end_call(op, times.call_id)
    data = closed.data.get("data") or {}
    # The agent files a hangup by command as result `failed`, reason `remote_command`
    # (manager._finish's "completed" list lacks that reason): that is our own hangup.
    if data.get("result") != "completed" and data.get("end_reason") != "remote_command":
        return f"closed: {closed.data.get('message')}"
    return None


async def start_memory(op: Operator, interval_s: int) -> asyncio.Task[Msg]:
    """Send `memory` while idle (it refuses during a call); calls go on during its interval."""
    jti = uuid.uuid4().hex
    now = int(time.time())
    claims = {"jti": jti, "sub": AGENT_ID, "cmd": "memory", "iat": now, "exp": now + 120}
    claims["args"] = {"interval_s": interval_s, "top": 15}
    mark = len(op.messages)
    await op.client.publish(f"{PREFIX}/{AGENT_ID}/cmd/memory", json.dumps(claims), qos=1)

    def answer(final: bool) -> Callable[[Msg], bool]:
        return lambda m: (
            "/cmd-res/" in m.topic
            and m.data.get("id") == jti
            and (m.data["code"] != 202 or not final)
        )

    await op.wait_for(answer(False), mark, 10)  # 202 accepted: tracing is on
    return asyncio.create_task(op.wait_for(answer(True), mark, interval_s + 60))


def growth(a: float, b: float) -> float:
    return (b - a) / a * 100 if a else float("nan")


SETTLE_S = 1.0


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as d, mosquitto(Path(d)) as port:
        tmp = Path(d)
        env = {"ALSA_CONFIG_PATH": str(write_asoundrc(tmp, 30))}
        agent_cfg, echo_cfg = write_configs(tmp, port, armed=("memory",))
        echo = echo_child(echo_cfg, env, tmp / "echo.log")
        agent_env = dict(kv.split("=", 1) for kv in args.env)
        agent = agent_child(agent_cfg, env, tmp / "agent.log", agent_env)
        failures: list[tuple[int, str]] = []
        samples: list[Sample] = []
        memory_report: asyncio.Task[Msg] | None = None
        echo.start()
        try:
            async with operator(port) as op:
                agent.start()
                try:
                    await wait_online(op, agent)
                    warm = await one_call(op, args.media_s)
                    if warm is not None:
                        raise RuntimeError(f"warm-up call failed: {warm}")
                    await asyncio.sleep(SETTLE_S)
                    samples.append(sample("start", 0, agent.pid))
                    t0 = time.monotonic()
                    for i in range(1, args.calls + 1):
                        why = await one_call(op, args.media_s)
                        if why is not None:
                            failures.append((i, why))
                            print(f"call {i}: FAILED {why}", flush=True)
                        if i == args.calls // 2:
                            await asyncio.sleep(SETTLE_S)
                            samples.append(sample("middle", i, agent.pid))
                            if args.tracemalloc_s > 0:
                                memory_report = await start_memory(op, args.tracemalloc_s)
                        if i % max(1, args.calls // 20) == 0:
                            s = sample("", i, agent.pid)
                            rate = i / (time.monotonic() - t0)
                            print(
                                f"{i:5} calls  RSS {s.rss_mib:6.1f} MiB  USS {s.uss_mib:6.1f} "
                                f"MiB  fds {s.fds:3}  failed {len(failures)}  "
                                f"({rate * 60:.0f} calls/min)",
                                flush=True,
                            )
                    await asyncio.sleep(SETTLE_S)
                    samples.append(sample("end", args.calls, agent.pid))
                    mem = await memory_report if memory_report is not None else None
                except Exception:
                    print(f"--- agent log:\n{agent.tail()}", file=sys.stderr)
                    print(f"--- echo log:\n{echo.tail()}", file=sys.stderr)
                    raise
                finally:
                    agent.stop()
        finally:
            echo.stop()

    start, end = samples[0], samples[-1]
    print()
    print(f"soak: {args.calls} calls of ~{args.media_s:.1f} s media, agent pid alone")
    if args.env:
        print(f"agent environment: {' '.join(args.env)}")
    print(f"{'sample':8} {'calls':>6} {'RSS MiB':>8} {'USS MiB':>8} {'fds':>5}")
    for s in samples:
        print(f"{s.label:8} {s.calls:6} {s.rss_mib:8.1f} {s.uss_mib:8.1f} {s.fds:5}")
    print(
        f"growth start->end: RSS {growth(start.rss_mib, end.rss_mib):+.1f} %, "
        f"USS {growth(start.uss_mib, end.uss_mib):+.1f} %, fds {growth(start.fds, end.fds):+.1f} %"
        f"  (target <= 5 %)"
    )
    if len(samples) == 3:
        mid = samples[1]
        per_call = (end.rss_mib - mid.rss_mib) * 1024 / max(1, end.calls - mid.calls)
        print(f"RSS slope over the second half: {per_call:+.1f} KiB per call")
    changed = {
        k: (start.kinds.get(k, 0), end.kinds.get(k, 0))
        for k in set(start.kinds) | set(end.kinds)
        if start.kinds.get(k, 0) != end.kinds.get(k, 0)
    }
    print(f"fd kinds that changed (start, end): {changed or 'none'}")
    print(f"failed calls: {len(failures)} of {args.calls}")
    for i, why in failures[:20]:
        print(f"  call {i}: {why}")
    if mem is not None:
        result = mem.data.get("result") or {}
        print(
            f"tracemalloc over {args.tracemalloc_s} s of calls (code {mem.data['code']}): "
            f"RSS {result.get('rss_mb_before')} -> {result.get('rss_mb_after')} MiB, "
            f"traced {result.get('traced_mb')} MiB"
        )
        for g in result.get("top_growth", []):
            print(f"  {g['size_diff_kib']:9.1f} KiB  {g['count_diff']:+7}  {g['where']}")
        if "error" in mem.data:
            print(f"  error: {mem.data['error']}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--media-s", type=float, default=1.5)
    parser.add_argument(
        "--tracemalloc-s", type=int, default=0, help="memory command interval (<= 120)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the agent only (e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
