"""Issue 7's table in one run: the full agent in a call against baresip 1.0.0, same run.

Run: .venv/bin/python bench/perf.py [--quick] [--window-s 25] [--setup-calls 10]
     [--gather-timeout-s S] [--skip-subbenches] [--phases] [--no-variants] [--cpu-only]
     [--baseline-tree DIR] [--py-spy DIR [--py-spy-rate N] [--gil | --native]]

What runs (all on 127.0.0.1):
- a mosquitto on a free port;
- the echo peer (`python -m edgeagent echo-peer`) and the agent (`python -m edgeagent run`)
  as separate processes, the agent on file PCMs (speech in, speaker to /dev/null, paced)
  with AEC, DSP checks, quality stats and telemetry on, `security.commands = "open"`;
- this script as the operator: it sends `dial` and `hangup` commands (plain JSON claims)
  and listens to the agent's events and to the echo peer's signal topic.

Rows:
- agent CPU per call-second: utime + stime of the agent process alone (/proc/<pid>/stat)
  over a `--window-s` window that starts `settle` seconds after `call.established`,
  divided by the window's wall time; baresip: two 1.0.0 instances calling each other
  (bench/baresip.py), per endpoint, same window length, measured just before the agent;
  and two stock aiortc endpoints calling each other (bench/raw_aiortc.py), what the
  library the agent is built on costs with nothing added.
  Under it, the same window's user/kernel split and CPU per thread (/proc/<pid>/task/*/stat),
  then same-run variants, each a fresh agent and call: AEC off (`[audio.aec] enabled = false`),
  Opus complexity 5, both; and with `--baseline-tree DIR` the agent of another checkout
  (e.g. `git archive HEAD | tar -x -C DIR`) for a before/after row. `--cpu-only` skips the
  set-up calls and the dead-STUN phase (for quick A/B runs).
- agent RSS in that call: VmRSS, and USS/PSS from psutil (smaps).
- offer to connected: arrival (at this script, through the broker) of the agent's offer on
  the echo peer's signal topic to arrival of the agent's `call.established` event; median
  of `--setup-calls` calls. The agent's own `setup_ms` (call start, which includes opening
  the audio devices and creating the offer, to ICE+DTLS connected) is printed beside it.
  Then the same with `stun:127.0.0.1:<closed port>` configured (the agent restarted).
  `--phases` adds where that time goes: the agent's call spans (docs/tracing.md, exported on
  its `traces` topic) as offsets from the call's start, and the echo peer's answer time
  (offer seen on its signal topic -> answer seen on the agent's), medians over the calls.
- added one-way latency, DSP per frame, start to READY and idle CPU: bench/latency.py
  (its clean case: two agents calling each other, `--loss 0`), bench/dsp.py and
  bench/agent.py run as subprocesses, one after another, their figures parsed from their
  output.
Timings on a shared 2-core VM are provisional: compare the ratio, not the absolute values.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import baresip  # noqa: E402
import cpusplit  # noqa: E402
import instructions  # noqa: E402
import latency  # noqa: E402
import raw_aiortc  # noqa: E402
import speech  # noqa: E402
from agent_support import agent_config  # noqa: E402
from conftest import free_port, wait_port, write_mosquitto_conf  # noqa: E402

PREFIX = "edge/v1"
AGENT_ID = "perf-agent"
ECHO_ID = "perf-echo"
RATE = 48000


# --- processes --------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    return baresip.cpu_s(pid)


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS, and USS/PSS (smaps) where readable."""
    out = {"rss": baresip.status_kib(pid, "VmRSS") / 1024}
    with contextlib.suppress(psutil.Error):
        full = psutil.Process(pid).memory_full_info()
        out["uss"] = full.uss / 2**20
        out["pss"] = getattr(full, "pss", float("nan")) / 2**20
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def write_asoundrc(tmp: Path, mic_seconds: float) -> Path:
    mic = tmp / "mic.raw"
    # Zeros after the speech: past its end a file PCM is not to be trusted.
    samples = np.concatenate(
        [speech.speech_signal(tmp, mic_seconds), np.zeros(RATE * 60, dtype=np.int16)]
    )
    mic.write_bytes(samples.astype("<i2").tobytes())
    conf = tmp / "asoundrc"
    conf.write_text(
        "</usr/share/alsa/alsa.conf>\n"
        f'pcm.perf_mic {{ type file slave.pcm "null" infile "{mic}" file "/dev/null" '
        'format "raw" }\n'
        'pcm.perf_spk { type file slave.pcm "null" file "/dev/null" format "raw" }\n'
    )
    return conf


def write_configs(
    tmp: Path,
    port: int,
    *,
    stun_url: str | None = None,
    gather_timeout_s: float | None = None,
    call_extra: str = "",
    armed: tuple[str, ...] = (),
    tables: str = "",
) -> tuple[Path, Path]:
    stun = f'stun_urls = ["{stun_url}"]\n' if stun_url else ""
    gather = f"gather_timeout_s = {gather_timeout_s}\n" if gather_timeout_s is not None else ""
    agent = agent_config(
        tmp,
        port,
        AGENT_ID,
        extra=f"""
[ice]
host_addresses = ["127.0.0.1"]
{stun}{gather}
[audio]
capture_device = "perf_mic"
playback_device = "perf_spk"
paced = true
[call]
answer = "auto"
default_peer = "{ECHO_ID}"
{call_extra}
[security]
commands = "open"
armed = {json.dumps(list(armed))}
{tables}""",
    )
    echo = agent_config(
        tmp,
        port,
        ECHO_ID,
        extra='[ice]\nhost_addresses = ["127.0.0.1"]\n',
    )
    return agent, echo


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    cwd: Path = ROOT

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, **self.env),
                cwd=self.cwd,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def agent_child(
    cfg: Path, env: dict[str, str], log: Path, extra_env: dict[str, str], root: Path = ROOT
) -> Child:
    """`python -m edgeagent run`; from another checkout `root` (its cwd) for a baseline row."""
    argv = [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)]
    return Child("agent", argv, dict(env, **extra_env), log, cwd=root)


def echo_child(cfg: Path, env: dict[str, str], log: Path) -> Child:
    argv = [sys.executable, "-m", "edgeagent", "echo-peer", "--config", str(cfg)]
    return Child("echo-peer", argv, env, log)


@contextlib.contextmanager
def mosquitto(tmp: Path) -> Any:
    port, ws = free_port(), free_port()
    conf = tmp / "mosquitto.conf"
    write_mosquitto_conf(conf, port, ws)
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


# --- the operator: commands out, events in ----------------------------------------------------


@dataclass
class Msg:
    topic: str
    data: dict[str, Any]
    at: float  # time.monotonic() on arrival here


@dataclass
class Operator:
    """An MQTT client that dials/hangs up the agent and records what it hears, with times."""

    client: aiomqtt.Client
    messages: list[Msg] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def pump(self) -> None:
        async for m in self.client.messages:
            raw = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            self.messages.append(Msg(m.topic.value, data, time.monotonic()))
            async with self.changed:
                self.changed.notify_all()

    async def wait_for(
        self, pred: Callable[[Msg], bool], start: int = 0, within_s: float = 20.0
    ) -> Msg:
        async with asyncio.timeout(within_s), self.changed:
            i = start
            while True:
                while i < len(self.messages):
                    if pred(self.messages[i]):
                        return self.messages[i]
                    i += 1
                await self.changed.wait()

    async def command(self, name: str, args: dict[str, Any], within_s: float = 30.0) -> Msg:
        jti = uuid.uuid4().hex
        now = int(time.time())
        claims = {"jti": jti, "sub": AGENT_ID, "cmd": name, "args": args, "iat": now}
        claims["exp"] = now + 120
        mark = len(self.messages)
        await self.client.publish(f"{PREFIX}/{AGENT_ID}/cmd/{name}", json.dumps(claims), qos=1)
        return await self.wait_for(
            lambda m: "/cmd-res/" in m.topic and m.data.get("id") == jti and m.data["code"] != 202,
            mark,
            within_s,
        )

    def event(self, category: str, call_id: str) -> Callable[[Msg], bool]:
        return lambda m: (
            m.topic.endswith("/events")
            and m.data.get("category") == category
            and m.data.get("call_id") == call_id
        )


@contextlib.asynccontextmanager
async def operator(port: int, phases: bool = False) -> AsyncIterator[Operator]:
    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, identifier="perf-operator"
    ) as client:
        topics = [
            f"{PREFIX}/{AGENT_ID}/events",
            f"{PREFIX}/{AGENT_ID}/cmd-res/#",
            f"{PREFIX}/{AGENT_ID}/status",
            f"{PREFIX}/{ECHO_ID}/signal",
        ]
        if phases:  # the agent's call spans and the echo peer's answers
            topics += [f"{PREFIX}/{AGENT_ID}/traces", f"{PREFIX}/{AGENT_ID}/signal"]
        for t in topics:
            await client.subscribe(t, qos=1)
        op = Operator(client)
        task = asyncio.create_task(op.pump())
        try:
            yield op
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def wait_online(op: Operator, child: Child, within_s: float = 20.0) -> None:
    """Until the agent's retained status says online (and its command server listens)."""
    try:
        await op.wait_for(
            lambda m: m.topic.endswith(f"{AGENT_ID}/status") and m.data.get("state") == "online",
            0,
            within_s,
        )
    except TimeoutError:
        raise RuntimeError(f"agent did not come online:\n{child.tail()}") from None
    # The command server subscribes right after connect; ping until it answers.
    async with asyncio.timeout(within_s):
        while True:
            with contextlib.suppress(TimeoutError):
                if (await op.command("ping", {}, within_s=1.0)).data["code"] == 200:
                    return


@dataclass
class CallTimes:
    call_id: str
    offer_to_established_ms: float
    setup_ms: float | None


async def place_call(op: Operator, within_s: float = 20.0) -> CallTimes:
    """Dial the echo peer; returns once `call.established` arrived (the call keeps going)."""
    mark = len(op.messages)
    res = await op.command("dial", {"peer": ECHO_ID})
    if res.data["code"] != 200:
        raise RuntimeError(f"dial refused: {res.data}")
    call_id = res.data["result"]["call_id"]
    offer = await op.wait_for(
        lambda m: (
            m.topic.endswith(f"{ECHO_ID}/signal")
            and m.data.get("type") == "offer"
            and m.data.get("call_id") == call_id
        ),
        mark,
        within_s,
    )
    est = await op.wait_for(
        lambda m: (
            m.topic.endswith("/events")
            and m.data.get("call_id") == call_id
            and m.data.get("category") in ("call.established", "call.closed")
        ),
        mark,
        within_s,
    )
    if est.data["category"] != "call.established":
        raise RuntimeError(f"call {call_id} did not connect: {est.data.get('message')}")
    setup = (est.data.get("data") or {}).get("setup_ms")
    return CallTimes(call_id, (est.at - offer.at) * 1000, setup)


async def end_call(op: Operator, call_id: str, within_s: float = 20.0) -> Msg:
    """Hang up (if still up) and wait for `call.closed`."""
    closed = [m for m in op.messages if op.event("call.closed", call_id)(m)]
    if closed:
        return closed[0]
    await op.command("hangup", {"call_id": call_id})
    return await op.wait_for(op.event("call.closed", call_id), 0, within_s)


# --- measurements -----------------------------------------------------------------------------


def user_sys_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime) of each thread of `pid`, keyed "name/tid"."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_split(before: dict[str, float], after: dict[str, float], wall_s: float) -> str:
    """ms of CPU per second for each thread that used any, busiest first."""
    rates = {k: (v - before.get(k, 0.0)) * 1000 / wall_s for k, v in after.items()}
    busy = sorted(((r, k) for k, r in rates.items() if r > 0.05), reverse=True)
    return ", ".join(f"{k.rsplit('/', 1)[0]} {r:.1f}" for r, k in busy) or "n/a"


@dataclass
class InCall:
    cpu_ms_per_s: float
    window_s: float
    mem: dict[str, float]
    fds: int
    threads: str = ""
    split: cpusplit.Split | None = None  # with --perf: the same window by library


async def measure_in_call(
    op: Operator, agent: Child, window_s: float, settle_s: float, perf_dir: Path | None = None
) -> InCall:
    times = await place_call(op)
    await op.wait_for(op.event("call.media_started", times.call_id), 0, 15)
    await asyncio.sleep(settle_s)
    rec = (
        cpusplit.Recording(agent.pid, perf_dir / "agent.data", "agent")
        if perf_dir is not None
        else None
    )
    if rec is not None:
        rec.enable()
    t0, us0 = thread_cpu_s(agent.pid), user_sys_s(agent.pid)
    c0, w0 = cpu_s(agent.pid), time.monotonic()
    await asyncio.sleep(window_s)
    c1, w1 = cpu_s(agent.pid), time.monotonic()
    if rec is not None:
        rec.stop()
    t1, us1 = thread_cpu_s(agent.pid), user_sys_s(agent.pid)
    mem = memory_mib(agent.pid)
    fds = open_fds(agent.pid)
    if any(op.event("call.closed", times.call_id)(m) for m in op.messages):
        raise RuntimeError("the call ended during the CPU window")
    await end_call(op, times.call_id)
    user, kernel = ((b - a) * 1000 / (w1 - w0) for a, b in zip(us0, us1, strict=True))
    split = f"user {user:.1f}, kernel {kernel:.1f}; " + thread_split(t0, t1, w1 - w0)
    by_lib = rec.split(w1 - w0) if rec is not None else None
    return InCall((c1 - c0) * 1000 / (w1 - w0), w1 - w0, mem, fds, split, by_lib)


async def measure_setup(op: Operator, n: int) -> list[CallTimes]:
    out = []
    for _ in range(n):
        times = await place_call(op)
        out.append(times)
        await end_call(op, times.call_id)
    return out


# --- phases (--phases) -------------------------------------------------------------------------

SETUP_PHASES = (
    "signaling.offer",
    "ice.gathering",
    "signaling.answer_wait",
    "ice.connect",
    "dtls",
)


def call_phases(op: Operator, call_id: str) -> dict[str, tuple[float, float]] | None:
    """{phase: (start, end)} in ms from the root span's start, from the exported trace."""
    spans: list[dict[str, Any]] = []
    for m in op.messages:
        if not m.topic.endswith("/traces"):
            continue
        for rs in m.data.get("resourceSpans", []):
            for ss in rs.get("scopeSpans", []):
                spans += ss.get("spans", [])
    roots = [
        s
        for s in spans
        if s.get("name") == "call"
        and any(
            a.get("key") == "call.id" and a.get("value", {}).get("stringValue") == call_id
            for a in s.get("attributes", [])
        )
    ]
    if not roots:
        return None
    root = roots[0]
    t0 = int(root["startTimeUnixNano"])
    out = {}
    for s in spans:
        if s.get("traceId") == root["traceId"] and s.get("parentSpanId") == root["spanId"]:
            start = (int(s["startTimeUnixNano"]) - t0) / 1e6
            out[s["name"]] = (start, (int(s["endTimeUnixNano"]) - t0) / 1e6)
    return out


def echo_answer_ms(op: Operator, call_id: str) -> float | None:
    """Offer seen on the echo peer's topic -> its answer seen on the agent's (both here)."""

    def seen(topic_end: str, kind: str) -> float | None:
        for m in op.messages:
            if (
                m.topic.endswith(topic_end)
                and m.data.get("type") == kind
                and m.data.get("call_id") == call_id
            ):
                return m.at
        return None

    offer, answer = seen(f"{ECHO_ID}/signal", "offer"), seen(f"{AGENT_ID}/signal", "answer")
    return None if offer is None or answer is None else (answer - offer) * 1000


async def collect_phases(op: Operator, calls: list[CallTimes], within_s: float = 10.0) -> Phases:
    """Wait for every call's trace (exported when the call ends), then take the phases."""
    got: dict[str, dict[str, tuple[float, float]]] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within_s):
            while True:
                for c in calls:
                    if c.call_id not in got and (ph := call_phases(op, c.call_id)) is not None:
                        got[c.call_id] = ph
                if len(got) == len(calls):
                    break
                async with op.changed:
                    await op.changed.wait()
    echo = [e for c in calls if (e := echo_answer_ms(op, c.call_id)) is not None]
    return Phases(list(got.values()), echo)


@dataclass
class Phases:
    calls: list[dict[str, tuple[float, float]]]
    echo_answer_ms: list[float]

    def print(self, label: str) -> None:
        print(f"\nphases of the agent's call set-up ({label}), ms from call start, ", end="")
        print(f"medians of {len(self.calls)} traced calls:")
        print(f"  {'phase':<24} {'start':>8} {'end':>8} {'duration':>9}")
        names = [n for n in SETUP_PHASES if any(n in c for c in self.calls)]
        for name in names:
            have = [c[name] for c in self.calls if name in c]
            start = statistics.median(s for s, _ in have)
            end = statistics.median(e for _, e in have)
            dur = statistics.median(e - s for s, e in have)
            print(f"  {name:<24} {start:8.1f} {end:8.1f} {dur:9.1f}")
        if self.echo_answer_ms:
            print(
                f"  {'echo peer: offer->answer':<24} {'':>8} {'':>8} "
                f"{statistics.median(self.echo_answer_ms):9.1f}  (seen here, incl. 2 broker hops)"
            )


@dataclass
class AgentRun:
    in_call: InCall | None = None
    setup: list[CallTimes] = field(default_factory=list)
    phases: Phases | None = None


async def run_agent_phase(
    tmp: Path,
    port: int,
    env: dict[str, str],
    *,
    label: str,
    stun_url: str | None,
    gather_timeout_s: float | None,
    setup_calls: int,
    window_s: float | None,
    settle_s: float,
    profile_dir: Path | None = None,
    phases: bool = False,
    call_extra: str = "",
    tables: str = "",
    native: bool = False,
    gil: bool = False,
    agent_root: Path = ROOT,
    spy_rate: int = 100,
    perf_dir: Path | None = None,
) -> AgentRun:
    d = tmp / label
    d.mkdir()
    agent_cfg, echo_cfg = write_configs(
        d,
        port,
        stun_url=stun_url,
        gather_timeout_s=gather_timeout_s,
        call_extra=call_extra,
        tables=tables,
    )
    echo = echo_child(echo_cfg, env, d / "echo.log")
    agent = agent_child(agent_cfg, env, d / "agent.log", {}, agent_root)
    result = AgentRun()
    echo.start()
    try:
        async with operator(port, phases) as op:
            agent.start()
            try:
                await wait_online(op, agent)
                # One call to warm up (first-call imports and allocations), not measured.
                warm = await place_call(op)
                await end_call(op, warm.call_id)
                if window_s is not None:
                    result.in_call = await measure_in_call(op, agent, window_s, settle_s, perf_dir)
                result.setup = await measure_setup(op, setup_calls)
                if phases:
                    result.phases = await collect_phases(op, result.setup)
                if profile_dir is not None:
                    await profile_agent(
                        op, agent, echo, profile_dir, window_s or 10.0, native, gil, spy_rate
                    )
            except Exception:
                print(f"--- agent log ({label}):\n{agent.tail()}", file=sys.stderr)
                print(f"--- echo log ({label}):\n{echo.tail()}", file=sys.stderr)
                raise
            finally:
                agent.stop()
    finally:
        echo.stop()
    return result


# --- py-spy (--py-spy DIR) ---------------------------------------------------------------------


PY_SPY = Path(sys.executable).with_name("py-spy")


async def py_spy_start(
    pid: int, out: Path, rate: int, fmt: str = "raw", native: bool = False, gil: bool = False
) -> asyncio.subprocess.Process:
    """`py-spy record` on `pid` until stopped with SIGINT (non-blocking unless `native`:
    native stacks need the process paused while they are unwound)."""
    return await asyncio.create_subprocess_exec(
        str(PY_SPY),
        "record",
        *(["--native"] if native else ["--nonblocking"]),
        *(["--gil"] if gil else []),
        "-p",
        str(pid),
        "-r",
        str(rate),
        "-f",
        fmt,
        "-o",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def py_spy_stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def summarize_collapsed(path: Path, top: int = 20) -> str:
    """Top functions by self and by inclusive samples from py-spy's raw (collapsed) output."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return f"{path}: no profile written"
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n
    lines = [f"{path.name}: {total} samples"]
    lines.append("  self %   function")
    lines += [f"  {100 * c / total:6.1f}   {f}" for f, c in self_n.most_common(top)]
    lines.append("  incl %   function")
    lines += [f"  {100 * c / total:6.1f}   {f}" for f, c in incl_n.most_common(top)]
    return "\n".join(lines)


async def profile_agent(
    op: Operator,
    agent: Child,
    echo: Child,
    out: Path,
    window_s: float,
    native: bool = False,
    gil: bool = False,
    rate: int = 100,
) -> None:
    """py-spy over one call's steady state, then over setup calls (agent and echo peer)."""
    times = await place_call(op)
    await op.wait_for(op.event("call.media_started", times.call_id), 0, 15)
    await asyncio.sleep(3)
    spies = [
        await py_spy_start(agent.pid, out / "call-agent.txt", rate, native=native, gil=gil),
    ]
    if not native and not gil:  # two native samplers would pause the agent twice as often
        spies.append(
            await py_spy_start(agent.pid, out / "call-agent.speedscope.json", 100, "speedscope")
        )
    await asyncio.sleep(window_s)
    for spy in spies:
        await py_spy_stop(spy)
    await end_call(op, times.call_id)
    await asyncio.sleep(1)
    spies = [
        await py_spy_start(agent.pid, out / "setup-agent.txt", 1000),
        await py_spy_start(echo.pid, out / "setup-echo.txt", 1000),
    ]
    await asyncio.sleep(1)
    cpu = []
    for _ in range(10):
        c0, e0 = cpu_s(agent.pid), cpu_s(echo.pid)
        t = await place_call(op)
        cpu.append((t.offer_to_established_ms, cpu_s(agent.pid) - c0, cpu_s(echo.pid) - e0))
        await end_call(op, t.call_id)
    for spy in spies:
        await py_spy_stop(spy)
    for name in ("call-agent.txt", "setup-agent.txt", "setup-echo.txt"):
        text = summarize_collapsed(out / name)
        (out / name).with_suffix(".summary").write_text(text + "\n")
        print(text)
    print("under py-spy: offer->established ms; agent, echo CPU s (dial->established)")
    for o2c, a, e in cpu:
        print(f"  {o2c:6.1f}  {a:5.2f}  {e:5.2f}")


# --- the sub-benchmarks -----------------------------------------------------------------------


def run_sub(script: str, args: list[str], timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        print(f"bench/{script} failed ({proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
    return proc.stdout


def parse_float(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else None


@dataclass
class Subs:
    latency_ms: float | None = None
    dsp_us: float | None = None
    ready_ms: float | None = None
    idle_pct: float | None = None
    idle_rss: float | None = None


# The audio work every call does (bench/instructions.py stages), timed alone in one process.
AUDIO_STAGES = ("aec", "checks", "encode", "plcdecode")


def audio_work_alone() -> tuple[dict[str, float], float | None]:
    """ms per call-second of each stage in `AUDIO_STAGES` back to back, and of all of
    them at 20 ms intervals (`instructions.py --time --paced-s`)."""
    args = ["--time", "--frames", "500", "--paced-s", "10"]
    args += [a for st in AUDIO_STAGES for a in ("--stage", st)]
    out = run_sub("instructions.py", args, 300)
    return instructions.parse_times(out), instructions.parse_paced(out)


def run_subbenches(quick: bool) -> Subs:
    s = Subs()
    # The clean case only: the lossy cases (aiortc#543 on the agent's path) are for
    # docs/benchmarks.md, run on their own.
    out = run_sub("latency.py", ["--runs", "1" if quick else "3", "--loss", "0"], 600)
    s.latency_ms = latency.parse_median(out)
    dsp_args = ["--seconds", "3", "--repeats", "3"] if quick else []
    out = run_sub("dsp.py", dsp_args, 600)
    s.dsp_us = parse_float(r"^ALL CHECKS, 3 streams \+ echo\s+([\d.]+)", out)
    out = run_sub("agent.py", [], 900)
    s.ready_ms = parse_float(r"^start to READY=1, median of \d+ \(ms\)\s+([\d.]+)", out)
    s.idle_pct = parse_float(r"^idle CPU over 30 s \(% of a core\)\s+([\d.]+)", out)
    s.idle_rss = parse_float(r"^idle RSS \(MiB\)\s+([\d.]+)", out)
    return s


# --- the table --------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def row(metric: str, value: str, target: str, note: str = "") -> None:
    print(f"{metric:48} {value:>14}  {target:14} {note}")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def main_async(args: argparse.Namespace) -> None:
    settle_s = 3.0
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as d, mosquitto(Path(d)) as port:
        tmp = Path(d)
        perf_dir = tmp if args.perf else None
        conf = write_asoundrc(tmp, settle_s + args.window_s + 30)
        env = {"ALSA_CONFIG_PATH": str(conf)}
        ref = ref_sine = ref_secure = None
        stock: raw_aiortc.RawResult | None = None
        alone: dict[str, float] = {}
        alone_paced: float | None = None
        if baresip.available():
            print(f"baresip reference: {args.window_s:.0f} s window ...", flush=True)
            ref = baresip.measure(args.window_s, settle_s=4.0, perf_dir=perf_dir)
            print(
                f"baresip on the earlier tone sweep: {args.window_s:.0f} s window ...", flush=True
            )
            ref_sine = baresip.measure(args.window_s, settle_s=4.0, signal="sine")
            print(f"baresip with DTLS-SRTP: {args.window_s:.0f} s window ...", flush=True)
            ref_secure = baresip.measure(args.window_s, settle_s=4.0, secure=True)
            print(f"stock aiortc endpoints: {args.window_s:.0f} s window ...", flush=True)
            stock = raw_aiortc.measure(args.window_s, settle_s=settle_s)
            print("the agent's audio work alone (bench/instructions.py --time) ...", flush=True)
            alone, alone_paced = audio_work_alone()
        else:
            print("baresip-core is not installed: no reference", file=sys.stderr)
        print(f"agent in a call with the echo peer: {args.window_s:.0f} s window ...", flush=True)
        plain = await run_agent_phase(
            tmp,
            port,
            env,
            label="plain",
            stun_url=None,
            gather_timeout_s=args.gather_timeout_s,
            setup_calls=args.setup_calls,
            window_s=args.window_s,
            settle_s=settle_s,
            phases=args.phases,
            perf_dir=perf_dir,
        )
        variants: dict[str, InCall] = {}
        if args.baseline_tree is not None:
            print(f"baseline agent from {args.baseline_tree} ...", flush=True)
            run = await run_agent_phase(
                tmp,
                port,
                env,
                label="baseline",
                stun_url=None,
                gather_timeout_s=args.gather_timeout_s,
                setup_calls=0,
                window_s=args.window_s,
                settle_s=settle_s,
                agent_root=args.baseline_tree,
            )
            assert run.in_call is not None
            variants["baseline tree"] = run.in_call
        if not args.no_variants:
            for label, call_extra, tables in VARIANTS:
                print(f"agent in a call, {label}: {args.window_s:.0f} s window ...", flush=True)
                run = await run_agent_phase(
                    tmp,
                    port,
                    env,
                    label=re.sub(r"\W+", "-", label),
                    stun_url=None,
                    gather_timeout_s=args.gather_timeout_s,
                    setup_calls=0,
                    window_s=args.window_s,
                    settle_s=settle_s,
                    call_extra=call_extra,
                    tables=tables,
                )
                assert run.in_call is not None
                variants[label] = run.in_call
        if args.py_spy is not None:
            print(f"py-spy profiles into {args.py_spy} ...", flush=True)
            await run_agent_phase(
                tmp,
                port,
                env,
                label="profile",
                stun_url=None,
                gather_timeout_s=args.gather_timeout_s,
                setup_calls=0,
                window_s=None,
                settle_s=settle_s,
                profile_dir=args.py_spy,
                native=args.native,
                gil=args.gil,
                spy_rate=args.py_spy_rate,
            )
        print("agent with an unreachable STUN server ...", flush=True)
        dead_port = free_port()  # nothing listens there (UDP: the port is only probed as TCP)
        dead = (
            await run_agent_phase(
                tmp,
                port,
                env,
                label="deadstun",
                stun_url=f"stun:127.0.0.1:{dead_port}",
                gather_timeout_s=args.gather_timeout_s,
                setup_calls=0 if args.cpu_only else max(3, args.setup_calls // 2),
                window_s=None,
                settle_s=settle_s,
                phases=args.phases,
            )
            if not args.cpu_only
            else AgentRun()
        )
    subs = Subs()
    if not args.skip_subbenches:
        print("sub-benchmarks: latency.py, dsp.py, agent.py ...", flush=True)
        subs = run_subbenches(args.quick)

    ic = plain.in_call
    assert ic is not None
    o2c = [c.offer_to_established_ms for c in plain.setup]
    setup = [c.setup_ms for c in plain.setup if c.setup_ms is not None]
    o2c_dead = [c.offer_to_established_ms for c in dead.setup]
    setup_dead = [c.setup_ms for c in dead.setup if c.setup_ms is not None]
    gt = "default" if args.gather_timeout_s is None else f"{args.gather_timeout_s} s"
    print()
    print(
        f"edgeagent performance, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} CPUs, window {ic.window_s:.1f} s, ICE gather timeout {gt}"
    )
    row("metric", "value", "target", "note")
    row("-" * 48, "-" * 14, "-" * 14, "-" * 20)
    if ref is not None:
        ratio = ic.cpu_ms_per_s / ref.per_endpoint_ms
        row(
            "agent CPU per call-second / baresip endpoint's",
            f"{ratio:.2f}",
            "<= 1.0 (i3 1.5)",
            f"agent {ic.cpu_ms_per_s:.1f} ms/s vs baresip {ref.per_endpoint_ms:.1f} ms/s",
        )
        row(
            "  baresip 1.0.0 per endpoint (ms CPU per s)",
            f"{ref.per_endpoint_ms:.1f}",
            "",
            f"caller {ref.cpu_ms_per_call_s[0]:.1f}, callee {ref.cpu_ms_per_call_s[1]:.1f}; "
            f"RSS {ref.rss_mib[0]:.1f} MiB; sending the agent's bench speech",
        )
    if ref_secure is not None:
        row(
            "  baresip with DTLS-SRTP (ms CPU per s)",
            f"{ref_secure.per_endpoint_ms:.1f}",
            "",
            f"ratio on it {ic.cpu_ms_per_s / ref_secure.per_endpoint_ms:.2f}; "
            "the media security the agent's WebRTC calls always run",
        )
    if ref_sine is not None:
        row(
            "  baresip on a tone sweep (earlier reference)",
            f"{ref_sine.per_endpoint_ms:.1f}",
            "",
            f"ratio on it {ic.cpu_ms_per_s / ref_sine.per_endpoint_ms:.2f}; "
            "libopus codes a tone for about a third of speech's CPU",
        )
    if ref is not None and stock is not None:
        row(
            "  stock aiortc 1.16 per endpoint (ms CPU per s)",
            f"{stock.per_endpoint_ms:.1f}",
            "",
            f"ratio {stock.per_endpoint_ms / ref.per_endpoint_ms:.2f} to baresip, the agent "
            f"{ic.cpu_ms_per_s / stock.per_endpoint_ms:.2f}x it; MediaPlayer speech in, "
            "MediaBlackhole out, no AEC or checks (bench/raw_aiortc.py)",
        )
    if ref is not None and alone:
        total = sum(alone.values())
        row(
            "  agent's audio work alone, one process (ms/s)",
            f"{total:.1f}",
            "",
            f"ratio {total / ref.per_endpoint_ms:.2f}; "
            + ", ".join(f"{k} {v:.1f}" for k, v in alone.items())
            + "; one process, no transport (bench/instructions.py --time)",
        )
    if ref is not None and alone_paced is not None:
        row(
            "  the same, one frame every 20 ms (ms/s)",
            f"{alone_paced:.1f}",
            "",
            f"ratio {alone_paced / ref.per_endpoint_ms:.2f}; at a call's cadence the caches "
            "are cold at each tick (bench/instructions.py --paced-s)",
        )
    row("  agent (ms CPU per call-second)", f"{ic.cpu_ms_per_s:.1f}", "", "agent process only")
    row("    per thread (ms CPU per s)", "", "", ic.threads)
    for label, v in variants.items():
        note = f"same run; threads: {v.threads}"
        if ref is not None:
            note = f"ratio {v.cpu_ms_per_s / ref.per_endpoint_ms:.2f}; {note}"
        row(f"  agent, {label} (ms/s)", f"{v.cpu_ms_per_s:.1f}", "", note)
    note = f"USS {fmt(ic.mem.get('uss'))}, PSS {fmt(ic.mem.get('pss'))} MiB; {ic.fds} open fds"
    row("agent RSS during a call (MiB)", f"{ic.mem['rss']:.1f}", "<= 64", note)
    row(
        "offer to connected, loopback (ms)",
        fmt(median(o2c)),
        "<= 30 (i3 50)",
        f"offer on the wire -> established; median of {len(o2c)}, "
        f"range {fmt(min(o2c, default=None))}-{fmt(max(o2c, default=None))}",
    )
    row(
        "  call start to connected, loopback (ms)",
        fmt(median(setup)),
        "",
        "agent setup_ms: + device open, offer creation and ICE gathering",
    )
    row(
        "call start to connected, dead STUN (ms)",
        fmt(median(setup_dead)),
        "<= 1000",
        f"agent setup_ms, median of {len(setup_dead)}; offer on the wire -> established "
        f"{fmt(median(o2c_dead))} ms (gathering happens before the offer is sent)",
    )
    row(
        "added one-way latency, bench loop (ms)",
        fmt(subs.latency_ms),
        "<= 60 (i3 80)",
        "bench/latency.py --loss 0 (two agents)",
    )
    row("all DSP checks per 20 ms frame (µs)", fmt(subs.dsp_us, ".2f"), "<= 40", "bench/dsp.py")
    row("start to READY=1 (ms)", fmt(subs.ready_ms, ".0f"), "<= 1000", "bench/agent.py")
    row(
        "idle CPU (% of a core)",
        fmt(subs.idle_pct, ".2f"),
        "<= 0.5",
        f"bench/agent.py; idle RSS {fmt(subs.idle_rss)} MiB",
    )
    if args.perf:
        print()
        splits = ([ic.split] if ic.split is not None else []) + list(ref.splits if ref else ())
        cpusplit.print_splits(splits)
    if plain.phases is not None:
        plain.phases.print("loopback")
    if dead.phases is not None:
        dead.phases.print("unreachable STUN server")


# Same-run variants of the in-call CPU row: (label, extra [call] keys, extra tables).
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("AEC off", "", "[audio.aec]\nenabled = false\n"),
    ("Opus complexity 5", "opus_complexity = 5\n", ""),
    ("AEC off + complexity 5", "opus_complexity = 5\n", "[audio.aec]\nenabled = false\n"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, fewer runs")
    parser.add_argument("--window-s", type=float, default=None, help="CPU window (default 25)")
    parser.add_argument("--setup-calls", type=int, default=None, help="default 10 (quick 5)")
    parser.add_argument(
        "--gather-timeout-s",
        type=float,
        default=None,
        help="ice.gather_timeout_s for the agent (default: the product default)",
    )
    parser.add_argument("--skip-subbenches", action="store_true")
    parser.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the same-run rows with AEC off and Opus complexity 5",
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        metavar="DIR",
        help="also measure an agent run from another checkout (e.g. `git archive HEAD`), "
        "for a same-run before/after row",
    )
    parser.add_argument(
        "--cpu-only",
        action="store_true",
        help="only the in-call CPU rows: no set-up calls, no dead-STUN phase",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="with --py-spy: native (C) frames too; pauses the agent while sampling",
    )
    parser.add_argument(
        "--py-spy-rate", type=int, default=100, help="samples per second in the call profile"
    )
    parser.add_argument(
        "--gil",
        action="store_true",
        help="with --py-spy: sample only the thread holding the GIL (Python on CPU)",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also print where set-up time goes (the agent's call spans, the echo peer's answer)",
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="also split the agent's and both baresip endpoints' CPU windows by library "
        "(Linux perf; bench/cpusplit.py)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="also profile a call and 10 setups with py-spy (extra phase, not in the table)",
    )
    args = parser.parse_args()
    if args.perf and not cpusplit.available():
        parser.error("--perf needs Linux perf and permission to sample other processes")
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    if args.window_s is None:
        args.window_s = 10.0 if args.quick else 25.0
    if args.setup_calls is None:
        args.setup_calls = 5 if args.quick else 10
    if args.cpu_only:
        args.setup_calls = 0
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
