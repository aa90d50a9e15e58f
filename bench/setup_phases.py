"""Where call set-up time goes: offer to connected and its phases, under broker/TCP variants.

Run: .venv/bin/python bench/setup_phases.py [--calls 8] [--dead-stun] [--gather-timeout-s S]
     [--variants default,broker-nodelay,nodelay]

Same processes and measurement as bench/perf.py (agent and echo peer on loopback, the
agent dials by command, offer on the wire -> `call.established` seen here), repeated for
each variant in one run so the rows compare:

- default: mosquitto as the tests and bench/perf.py run it;
- broker-nodelay: mosquitto with `set_tcp_nodelay true`;
- client-nodelay: mosquitto as in default, TCP_NODELAY on the children's MQTT sockets;
- nodelay: that, plus TCP_NODELAY on the agent's and echo peer's MQTT sockets. This
  simulates the proposed one-line change in edgeagent/mqtt.py (aiomqtt's
  `socket_options`) with a sitecustomize shim in the children only; the shipped agent
  does not have it until mqtt.py does.

Why: every signaling message is a small write on a TCP connection that just carried
another small one (QoS 1 PUBLISH after a PUBACK). With Nagle on, the second waits for the
ACK of the first, which the receiver delays (40 ms minimum on Linux): two such waits per
call set-up (the broker's send of the answer to the agent, the echo peer's send of the
answer to the broker).
Timings on a shared 2-core VM are provisional: compare rows of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import perf  # noqa: E402

VARIANTS = ("default", "broker-nodelay", "client-nodelay", "nodelay")

SHIM = '''"""bench/setup_phases.py: TCP_NODELAY on aiomqtt sockets (the proposed mqtt.py change)."""
import socket

import aiomqtt

_init = aiomqtt.Client.__init__


def _with_nodelay(self, *args, **kwargs):
    opts = list(kwargs.pop("socket_options", None) or ())
    opts.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
    _init(self, *args, socket_options=opts, **kwargs)


aiomqtt.Client.__init__ = _with_nodelay
'''


@contextlib.contextmanager
def broker(tmp: Path, extra: str) -> Iterator[int]:
    port, ws = perf.free_port(), perf.free_port()
    conf = tmp / "mosquitto.conf"
    perf.write_mosquitto_conf(conf, port, ws, extra)
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        perf.wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


async def run_variant(
    tmp: Path, variant: str, args: argparse.Namespace, stun_url: str | None
) -> perf.AgentRun:
    d = tmp / variant
    d.mkdir()
    env = {"ALSA_CONFIG_PATH": str(perf.write_asoundrc(d, 30.0))}
    if variant in ("client-nodelay", "nodelay"):
        shim = d / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SHIM)
        env["PYTHONPATH"] = str(shim)
    extra = "set_tcp_nodelay true\n" if variant in ("broker-nodelay", "nodelay") else ""
    with broker(d, extra) as port:
        return await perf.run_agent_phase(
            d,
            port,
            env,
            label="run",
            stun_url=stun_url,
            gather_timeout_s=args.gather_timeout_s,
            setup_calls=args.calls,
            window_s=None,
            settle_s=0.0,
            phases=True,
        )


async def main_async(args: argparse.Namespace) -> None:
    stun_url = f"stun:127.0.0.1:{perf.free_port()}" if args.dead_stun else None
    results: dict[str, perf.AgentRun] = {}
    with tempfile.TemporaryDirectory(prefix="bench-setup-") as d:
        for variant in args.variants:
            print(f"{variant}: {args.calls} calls ...", flush=True)
            results[variant] = await run_variant(Path(d), variant, args, stun_url)
    gt = "default" if args.gather_timeout_s is None else f"{args.gather_timeout_s} s"
    stun = f"unreachable STUN {stun_url}" if stun_url else "no STUN"
    print(f"\ncall set-up, loopback, {stun}, ICE gather timeout {gt}; medians (ms)")
    print(f"  {'variant':<16} {'offer->connected':>17} {'range':>14} {'start->connected':>17}")
    for variant, run in results.items():
        o2c = [c.offer_to_established_ms for c in run.setup]
        setup = [c.setup_ms for c in run.setup if c.setup_ms is not None]
        print(
            f"  {variant:<16} {statistics.median(o2c):17.1f} "
            f"{f'{min(o2c):.1f}-{max(o2c):.1f}':>14} "
            f"{statistics.median(setup) if setup else float('nan'):17.1f}"
        )
    for variant, run in results.items():
        if run.phases is not None:
            run.phases.print(variant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=8, help="measured calls per variant")
    parser.add_argument("--dead-stun", action="store_true", help="configure an unreachable STUN")
    parser.add_argument("--gather-timeout-s", type=float, default=None)
    parser.add_argument(
        "--variants",
        type=lambda s: [v for v in s.split(",") if v],
        default=list(VARIANTS),
        help=f"comma-separated, of {','.join(VARIANTS)}",
    )
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
