"""Remote commands end to end: a real mosquitto, the real link, publisher and command server
around a real-valued context, driven by edgeagent-ctl; plus the agent e2e once it is wired.

Also the home of the command test rig (`Rig`, `StaticContext`), imported by test_ctl and
test_fuzz_commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from agent_support import Collector, Received, agent_config, collector
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from schema_support import assert_valid

from edgeagent import ctl
from edgeagent.clock import Clock, FakeClock, SystemClock
from edgeagent.config import MqttConfig
from edgeagent.control.catalog import CATALOG, CommandError, Status
from edgeagent.control.handlers import apply_log_level, check_hangup_target
from edgeagent.control.keys import command_claims, generate_keypair, sign_command
from edgeagent.control.redact import MASK, redact, redact_text
from edgeagent.control.replay import ReplayCache
from edgeagent.control.server import (
    MAX_OUTPUT_BYTES,
    CommandLimits,
    CommandServer,
    build_command_server,
    describe_catalog,
    fit_output,
)
from edgeagent.events import EventBus
from edgeagent.hw.system import SystemReader
from edgeagent.mqtt import BrokerLink, SessionCounter
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, Crumb, LogRing
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.topics import Topics, publish_topic_problem

DEVICE = "dev-1"
TOPICS = Topics("edge/v1", DEVICE)
TURN_PASSWORD = "turn-secret-77"


# --- the rig ----------------------------------------------------------------------------------


@dataclass
class StaticContext:
    """A CommandContext with real values: real log ring, crumbs, system sample, levels."""

    device_id: str
    link: BrokerLink
    log_ring: LogRing
    crumbs: Breadcrumbs
    state_dir: Path
    broker_port: int
    active_call: bool = False
    synced: bool = True
    calls: list[str] = field(default_factory=list)
    dial_tokens: list[str | None] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    levels: list[tuple[str, int]] = field(default_factory=list)
    rebirths: int = 0
    big_logs: bool = False
    diagnose_bug: bool = False
    hang: asyncio.Event = field(default_factory=asyncio.Event)

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": [{"call_id": c} for c in self.calls],
            "ice": {"turn_password": TURN_PASSWORD, "url": f"turn:op:{TURN_PASSWORD}@10.0.0.1"},
            "sdp": "v=0\r\na=ice-ufrag:abcd\r\na=ice-pwd:s3cr3tIcePassw0rd1234\r\n",
        }

    async def metrics(self) -> dict[str, Any]:
        reader = SystemReader(sysfs_root=Path("/"), disk_path=self.state_dir, vcgencmd=None)
        sample = await asyncio.to_thread(reader.sample)
        return dict(sample.to_metrics_fields())

    def info(self) -> dict[str, Any]:
        return {"device": self.device_id, "versions": {"agent": "test"}}

    async def rebirth(self) -> None:
        self.rebirths += 1
        await self.link.publish(TOPICS.info, json.dumps(self.info()).encode(), qos=1, retain=True)

    def logs(self, lines: int, min_level: int, since: float | None) -> list[str]:
        if self.big_logs:
            return [f"line {i} " + "x" * 1000 for i in range(lines)]
        return self.log_ring.lines(lines, min_level=min_level, since=since)

    def breadcrumbs(self, limit: int) -> list[dict[str, Any]]:
        return self.crumbs.snapshot(limit)

    def set_log_level(self, logger: str, level: int, ttl_s: float) -> int:
        self.levels.append((logger, level))
        return apply_log_level(logger, level)

    def call_active(self) -> bool:
        return self.active_call

    async def dial(
        self, peer: str | None, call_id: str | None = None, token: str | None = None
    ) -> dict[str, Any]:
        if self.calls:
            raise CommandError(Status.BUSY, "already in a call")
        call_id = call_id or f"call-{len(self.calls) + 1}"
        self.calls.append(call_id)
        self.dial_tokens.append(token)
        return {"call_id": call_id, "peer": peer or "default-peer"}

    async def hangup(self, call_id: str | None) -> dict[str, Any]:
        active = self.calls[-1] if self.calls else None
        check_hangup_target(active, call_id)  # as the agent does
        if active is None:
            return {"ended": False, "call_id": None, "result": None}
        self.calls = []
        return {"ended": True, "call_id": active, "result": "completed"}

    async def call_test(
        self,
        peer: str | None,
        duration_s: int,
        call_id: str | None = None,
        token: str | None = None,
    ) -> dict[str, Any]:
        started = time.monotonic()
        await asyncio.sleep(0.05)
        return {
            "peer": peer or "echo",
            "duration_s": duration_s,
            "waited_ms": 1000 * (time.monotonic() - started),
        }

    async def diagnose(self, checks: tuple[str, ...]) -> dict[str, Any]:
        if self.diagnose_bug:
            raise ZeroDivisionError("a handler bug")
        out: dict[str, Any] = {}
        for check in checks:
            started = time.monotonic()
            if check == "broker":
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
                writer.close()
                ok = True
            elif check == "dns":
                ok = bool(await asyncio.get_running_loop().getaddrinfo("localhost", None))
            else:
                out[check] = {"result": "skipped"}
                continue
            out[check] = {
                "result": "ok" if ok else "fail",
                "ms": 1000 * (time.monotonic() - started),
            }
        return out

    def clock_synced(self) -> bool:
        return self.synced

    def request_restart(self, reason: str) -> None:
        self.restarts.append(reason)

    def crash_test(self, kind: str) -> None:
        self.crashes.append(kind)
        raise RuntimeError(f"test crash ({kind})")


@dataclass
class Keys:
    """Operator keys written as ctl files, and the device's keys_file."""

    dir: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    private: dict[str, str] = field(default_factory=dict)

    def add(self, kid: str, roles: list[str], **extra: Any) -> Path:
        private, public, _ = generate_keypair(kid)
        self.private[kid] = private
        self.entries.append({"kid": kid, "public_key": public, "roles": roles, **extra})
        path = self.dir / f"{kid}.jwk.json"
        path.write_text(private)
        return path

    def path(self, kid: str) -> Path:
        return self.dir / f"{kid}.jwk.json"

    def write_keys_file(self) -> Path:
        path = self.dir / "operator-keys.json"
        path.write_text(json.dumps({"keys": self.entries}))
        return path

    def token(
        self, cmd: str, args: dict[str, Any] | None = None, *, kid: str = "dbg", **over: Any
    ) -> bytes:
        claims = command_claims(DEVICE, cmd, args)
        claims.update(over)
        return sign_command(self.private[kid], kid, claims).encode()


def make_keys(directory: Path) -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    keys = Keys(directory)
    keys.add("dbg", ["debug"])
    keys.add("reader", ["read"])
    keys.add("forcer", ["debug"], may_force=True)
    keys.add("stranger", ["debug"])  # removed from the device's file below
    keys.entries = [e for e in keys.entries if e["kid"] != "stranger"]
    return keys


@dataclass
class Rig:
    port: int
    state_dir: Path
    keys: Keys
    ctx: StaticContext
    server: CommandServer
    link: BrokerLink
    publisher: Publisher
    spool: Spool
    clock: Clock
    log_ring: LogRing
    server_task: asyncio.Task[None] | None = None

    def ctl_argv(self, name: str, *args: str, kid: str = "dbg") -> list[str]:
        return [
            "cmd", DEVICE, name, *args,
            "--json", "--port", str(self.port), "--key", str(self.keys.path(kid)),
        ]  # fmt: skip


async def run_ctl(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> tuple[int, dict[str, Any]]:
    """edgeagent-ctl's main in a worker thread (its own loop); the parsed --json answer."""
    capsys.readouterr()
    rc = await asyncio.to_thread(ctl.main, argv)
    out = capsys.readouterr().out.strip().splitlines()
    return rc, (json.loads(out[-1]) if out else {})


@contextlib.asynccontextmanager
async def make_rig(
    tmp_path: Path,
    port: int,
    *,
    clock: Clock | None = None,
    armed: tuple[str, ...] = (),
    limits: CommandLimits | None = None,
    commands_mode: str = "signed",
    local_socket: Path | None = None,
    start_server: bool = True,
) -> AsyncIterator[Rig]:
    clock = clock or SystemClock()
    state_dir = tmp_path / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    keys = make_keys(tmp_path / "keys")
    keys_file = keys.write_keys_file()
    spool = Spool(state_dir / "spool.sqlite3", min_free_mb=0.0)
    crumbs = Breadcrumbs()
    publisher_ref: list[Publisher] = []

    async def on_connected(_session: int) -> None:
        await publisher_ref[0].on_connected()

    link = BrokerLink(
        MqttConfig(port=port, reconnect_min_s=0.05, reconnect_max_s=0.2),
        DEVICE,
        sessions=SessionCounter(state_dir / "session"),
        will=lambda s: (TOPICS.status, b'{"state": "lost"}'),
        on_connected=on_connected,
        bus=EventBus(),
    )
    publisher = Publisher(
        link, spool, TOPICS, crumbs, wall=time.time, monotonic=time.monotonic, events_burst=10_000,
        events_rate_per_s=10_000,
    )  # fmt: skip
    publisher_ref.append(publisher)
    log_ring = LogRing(500)
    root = logging.getLogger()
    root.addHandler(log_ring)
    ctx = StaticContext(DEVICE, link, log_ring, crumbs, state_dir, port)
    server = build_command_server(
        device_id=DEVICE,
        topics=TOPICS,
        link=link,
        publisher=publisher,
        context=ctx,
        clock=clock,
        state_dir=state_dir,
        commands_mode=commands_mode,
        keys_file=keys_file,
        max_token_lifetime_s=300,
        armed=list(armed),
        local_socket=local_socket,
        known_secrets=[TURN_PASSWORD],
        limits=limits or CommandLimits(),
    )
    rig = Rig(port, state_dir, keys, ctx, server, link, publisher, spool, clock, log_ring)
    tasks = [asyncio.create_task(link.run()), asyncio.create_task(publisher.run())]
    if start_server:
        rig.server_task = asyncio.create_task(server.run())
    try:
        async with asyncio.timeout(10):
            await link.connected.wait()
            if local_socket is not None:
                await server.local_ready.wait()
        yield rig
    finally:
        for task in [*tasks, rig.server_task]:
            if task is not None:
                task.cancel()
        for task in [*tasks, rig.server_task]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        root.removeHandler(log_ring)
        spool.close()


@dataclass(frozen=True)
class Request:
    name: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None


async def publish_many(port: int, requests: list[Request]) -> None:
    """Publish in order from one MQTT 5 client (so they reach the device in this order)."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for r in requests:
            props = None
            if r.response_topic is not None:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = r.response_topic
                if r.correlation is not None:
                    props.CorrelationData = r.correlation
            await client.publish(f"{TOPICS.root}/cmd/{r.name}", r.payload, qos=1, properties=props)


async def publish_raw(
    port: int,
    name: str,
    payload: bytes,
    *,
    response_topic: str | None = None,
    correlation: bytes | None = None,
) -> None:
    await publish_many(port, [Request(name, payload, response_topic, correlation)])


def finals(messages: list[Received]) -> list[dict[str, Any]]:
    return [m.json() for m in messages if "/cmd-res/" in m.topic and m.json()["code"] != 202]


def audits(messages: list[Received]) -> list[dict[str, Any]]:
    return [
        m.json()["data"]
        for m in messages
        if m.topic.endswith("/events") and m.json()["category"] == "cmd"
    ]


async def expect_one(
    c: Collector, request_id: str | None, code: int, *, topic: str | None = None
) -> dict[str, Any]:
    """The final answer with this id (None: on cmd-res/invalid) and code, and its audit event."""
    if request_id is None:
        topic = topic or f"{TOPICS.root}/cmd-res/invalid"

    def match(ms: list[Received]) -> list[Received]:
        return [
            m
            for m in ms
            if "/cmd-res/" in m.topic
            and m.json()["id"] == request_id
            and m.json()["code"] == code
            and (topic is None or m.topic == topic)
        ]

    found = await c.wait_for(match)
    resp = found[-1].json()
    assert_valid(found[-1].topic, found[-1].payload)
    assert resp["ok"] is (code in (200, 202))
    await c.wait_for(
        lambda ms: [a for a in audits(ms) if a["id"] == request_id and a["code"] == code]
    )
    if request_id is not None:
        others = [r for r in finals(c.messages) if r["id"] == request_id]
        assert len(others) == 1, others
    return dict(resp)


pytestmark = pytest.mark.broker


# --- pure: redaction and output caps ----------------------------------------------------------


def test_redact_masks_secret_keys_sdp_tokens_urls_and_known_values() -> None:
    token = sign_command(generate_keypair("k")[0], "k", command_claims(DEVICE, "ping"))
    private_jwk = json.loads(generate_keypair("k")[0])
    value = {
        "turn_password": "pw-1234",
        "max_token_lifetime_s": 300,
        "tokens": 3.0,
        "sdp": (
            "v=0\r\na=ice-ufrag:Ab12\r\na=ice-pwd:VeryS3cretIcePwd00\r\n"
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:KEYKEYKEY|2^20\r\n"
        ),
        "log": f"sent {token} to broker; password=hunter2 ok; url=mqtts://bob:pa55w0rd@host:8883",
        "turn": "turn:alice:opensesame@turn.example:3478",
        "jwk": private_jwk,
        "pem": "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----",
        "free": f"configured {TURN_PASSWORD} here",
        "nested": [{"Authorization": "Bearer abcdefghijkl"}],
    }
    out = redact(value, [TURN_PASSWORD])
    flat = json.dumps(out)
    for secret in ("pw-1234", "VeryS3cretIcePwd00", "KEYKEYKEY", "hunter2", "pa55w0rd",
                   "opensesame", private_jwk["d"], "MC4CAQAw", TURN_PASSWORD, "abcdefghijkl",
                   token.split(".")[2]):  # fmt: skip
        assert secret not in flat, secret
    assert out["max_token_lifetime_s"] == 300 and out["tokens"] == 3.0
    assert "a=ice-ufrag:Ab12" in out["sdp"] and f"a=ice-pwd:{MASK}" in out["sdp"]
    assert out["jwk"]["x"] == private_jwk["x"]  # the public half stays
    assert "bob:" in out["log"] and "@host:8883" in out["log"]
    assert value["turn_password"] == "pw-1234"  # the input is not mutated
    assert (
        redact_text("ordinary text, ice candidates 10.0.0.1")
        == "ordinary text, ice candidates 10.0.0.1"
    )


def test_describe_catalog_for_info() -> None:
    listed = {c["name"]: c for c in describe_catalog({"memory"})}
    assert listed.keys() == CATALOG.keys()
    assert listed["memory"]["armed"] is True and listed["crash"]["armed"] is False
    assert "armed" not in listed["ping"] and listed["logs"]["args"] == ["lines", "level", "since"]


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("operators/op-7/inbox", None),
        (f"{TOPICS.root}/cmd-res/op-42", None),
        ("a/" * 300 + "é😀\ufffd", None),  # deep, and any valid UTF-8
        ("x" * 65_535, None),
        ("", "empty"),
        ("ops/+/inbox", "wildcard"),
        ("ops/#", "wildcard"),
        ("$SYS/broker/x", "broker"),
        ("ops/\x00/inbox", "control character"),
        ("ops\x1b[31m", "control character"),
        ("ops\x85", "control character"),
        ("ops\ufdd0", "noncharacter"),
        ("ops\U0001ffff", "noncharacter"),
        ("ops\udc80", "UTF-8"),  # a lone surrogate
        ("é" * 32_768, "65535 bytes"),
    ],
)
def test_publish_topic_problem(topic: str, problem: str | None) -> None:
    said = publish_topic_problem(topic)
    assert said is None if problem is None else said is not None and problem in said


def test_fit_output_keeps_newest_log_lines_and_fits_the_budget() -> None:
    lines = [f"{i:05d} " + "y" * 500 for i in range(1000)]
    result, cut = fit_output({"lines": lines, "count": 1000}, 64 * 1024)
    assert cut
    assert len(json.dumps(result)) <= 64 * 1024
    assert result["lines"][-1] == lines[-1] and result["count"] == 1000
    small, cut = fit_output({"a": 1}, 100)
    assert small == {"a": 1} and not cut
    ranked, cut = fit_output({"top": [{"f": "x" * 100}] * 2000}, 10_000)
    assert cut and ranked["top"][0] == {"f": "x" * 100}


# --- every command through mosquitto, driven by edgeagent-ctl ---------------------------------


async def test_read_commands_via_ctl(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        make_rig(tmp_path, broker.port) as rig,
        collector(
            broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events", f"{TOPICS.root}/info"
        ) as c,
    ):
        rc, resp = await run_ctl(capsys, rig.ctl_argv("ping", kid="reader"))
        assert rc == 0 and resp["code"] == 200 and resp["result"]["pong"] is True
        assert resp["device"] == DEVICE and resp["cmd"] == "ping"

        rc, resp = await run_ctl(capsys, rig.ctl_argv("info", kid="reader"))
        assert rc == 0 and resp["result"]["device"] == DEVICE and "warning" not in resp["result"]

        rc, resp = await run_ctl(capsys, rig.ctl_argv("rebirth", kid="reader"))
        assert rc == 0 and resp["result"]["republished"] == ["status", "info"]
        await c.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/info")])
        assert rig.ctx.rebirths == 1

        rc, resp = await run_ctl(capsys, rig.ctl_argv("snapshot", kid="reader"))
        flat = json.dumps(resp)
        assert rc == 0 and TURN_PASSWORD not in flat and "s3cr3tIcePassw0rd1234" not in flat
        assert "a=ice-ufrag:abcd" in resp["result"]["sdp"]

        rc, resp = await run_ctl(capsys, rig.ctl_argv("metrics", kid="reader"))
        assert rc == 0 and resp["result"]["rss_mb"] > 1 and resp["result"]["uptime_s"] > 0

        logging.getLogger("edgeagent.testsrc").info("an info line %d", 1)
        logging.getLogger("edgeagent.testsrc").error("an error line %d", 2)
        rc, resp = await run_ctl(
            capsys, rig.ctl_argv("logs", "level=ERROR", "lines=50", kid="reader")
        )
        lines = resp["result"]["lines"]
        assert rc == 0 and any("an error line 2" in line for line in lines)
        assert not any("an info line 1" in line for line in lines)
        assert all(" ERROR " in line or " CRITICAL " in line for line in lines)

        rig.ctx.crumbs.add(Crumb(time.time(), "info", "test", "crumb one"))
        rc, resp = await run_ctl(capsys, rig.ctl_argv("breadcrumbs", "limit=5", kid="reader"))
        crumbs = resp["result"]["breadcrumbs"]
        assert rc == 0 and 1 <= len(crumbs) <= 5
        assert "crumb one" in [b["message"] for b in crumbs]
        assert any(b["category"] == "cmd" for b in crumbs)  # audits are crumbs too
        # Every answer was schema-valid, single, and audited with kid, cmd, code, id.
        got = await c.wait_for(lambda ms: len(audits(ms)) >= 7 and audits(ms))
        assert {a["cmd"] for a in got} >= {
            "ping",
            "info",
            "rebirth",
            "snapshot",
            "metrics",
            "logs",
            "breadcrumbs",
        }
        assert all(a["kid"] == "reader" and a["code"] == 200 and a["id"] for a in got)
        responses = finals(c.messages)
        assert len(responses) == len({r["id"] for r in responses}) == 7
        for m in c.messages:
            if "/cmd-res/" in m.topic:
                assert_valid(m.topic, m.payload)


async def test_set_log_level_reverts_after_ttl(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock(start=time.time())
    target = logging.getLogger("edgeagent.ttltest")
    target.setLevel(logging.WARNING)
    async with make_rig(tmp_path, broker.port, clock=clock) as rig:
        rc, resp = await run_ctl(
            capsys,
            rig.ctl_argv("set_log_level", "logger=edgeagent.ttltest", "level=DEBUG", "ttl_s=5"),
        )
        assert rc == 0 and resp["result"]["previous"] == "WARNING"
        assert target.level == logging.DEBUG
        # A second override extends; the revert still goes back to WARNING.
        rc, resp = await run_ctl(
            capsys,
            rig.ctl_argv("set_log_level", "logger=edgeagent.ttltest", "level=INFO", "ttl_s=5"),
        )
        assert rc == 0 and target.level == logging.INFO and resp["result"]["previous"] == "WARNING"
        await clock.advance(4.9)
        assert target.level == logging.INFO
        await clock.advance(0.2)
        assert target.level == logging.WARNING
        assert rig.ctx.levels == [
            ("edgeagent.ttltest", logging.DEBUG),
            ("edgeagent.ttltest", logging.INFO),
            ("edgeagent.ttltest", logging.WARNING),
        ]
        assert rig.server.handlers.pending_reverts() == {}


async def test_dial_hangup_call_test_diagnose_via_context(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with make_rig(tmp_path, broker.port) as rig:
        rc, resp = await run_ctl(capsys, rig.ctl_argv("dial", "peer=operator-1"))
        assert rc == 0 and resp["result"] == {"call_id": "call-1", "peer": "operator-1"}
        rc, resp = await run_ctl(capsys, rig.ctl_argv("dial", "peer=operator-2"))
        assert resp["code"] == 409 and rc == ctl.EXIT_CODES[409]  # the context said busy
        rc, resp = await run_ctl(capsys, rig.ctl_argv("hangup", "call_id=nope"))
        assert resp["code"] == 400 and rc == ctl.EXIT_CODES[400]
        assert resp["error"] == "call 'nope' is not active; the active call is call-1"
        rc, resp = await run_ctl(capsys, rig.ctl_argv("hangup"))
        assert rc == 0 and resp["result"] == {
            "ended": True,
            "call_id": "call-1",
            "result": "completed",
        }
        # Idempotent: nothing to end is ok and says so; naming a call is still checked.
        rc, resp = await run_ctl(capsys, rig.ctl_argv("hangup"))
        assert rc == 0 and resp["result"] == {"ended": False, "call_id": None, "result": None}
        rc, resp = await run_ctl(capsys, rig.ctl_argv("hangup", "call_id=call-1"))
        assert resp["code"] == 400 and "no call is active" in resp["error"]
        rc, resp = await run_ctl(capsys, rig.ctl_argv("call_test", "duration_s=2"))
        assert rc == 0 and resp["result"]["peer"] == "echo" and resp["result"]["waited_ms"] >= 40
        rc, resp = await run_ctl(capsys, rig.ctl_argv("diagnose", 'checks=["broker","dns","stun"]'))
        assert rc == 0
        assert resp["result"]["broker"]["result"] == "ok" and resp["result"]["stun"] == {
            "result": "skipped"
        }
        rc, resp = await run_ctl(capsys, rig.ctl_argv("dial", "peer=Not_A_Valid_Id"))
        assert resp["code"] == 400 and "peer" in resp["error"]
        rc, resp = await run_ctl(capsys, rig.ctl_argv("dial", "call_id=a/b", "token=x.y.z"))
        assert resp["code"] == 400 and "call_id" in resp["error"]
        argv = rig.ctl_argv("dial", "peer=operator-1", "call_id=op-7", "token=x.y.z")
        rc, resp = await run_ctl(capsys, argv)
        assert rc == 0 and resp["result"]["call_id"] == "op-7"
        assert rig.ctx.dial_tokens == [None, "x.y.z"]
        assert rig.server.executed == {"dial": 3, "hangup": 4, "call_test": 1, "diagnose": 1}


@pytest.mark.slow
async def test_memory_and_profile_return_real_data_when_armed(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        make_rig(tmp_path, broker.port, armed=("memory", "profile")) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        hoard: list[bytearray] = []

        async def busy_and_leaky() -> None:
            while True:
                sum(i * i for i in range(5000))
                hoard.append(bytearray(4096))
                await asyncio.sleep(0.002)

        load = asyncio.create_task(busy_and_leaky())
        try:
            rc, resp = await run_ctl(capsys, rig.ctl_argv("memory", "interval_s=1", "top=10"))
            assert rc == 0, resp
            mem = resp["result"]
            assert mem["rss_mb_after"] > 1 and mem["gc"]["enabled"] is True
            assert any(
                "test_commands.py" in g["where"] and g["size_diff_kib"] > 100
                for g in mem["top_growth"]
            )
            rc, resp = await run_ctl(capsys, rig.ctl_argv("profile", "duration_s=1", "top=15"))
            assert rc == 0, resp
            prof = resp["result"]
            assert prof["samples"] > 50 and 0.9 <= prof["duration_s"] < 3
            assert any(
                "busy_and_leaky" in f["function"] or "genexpr" in f["function"] for f in prof["top"]
            )
        finally:
            load.cancel()

        # Both long commands answered 202 first, then exactly one final answer (the last
        # may reach this subscriber after ctl has had it).
        def codes(ms: list[Any]) -> list[int]:
            return [m.json()["code"] for m in ms if "/cmd-res/" in m.topic]

        await c.wait_for(lambda ms: codes(ms).count(200) >= 2)
        assert sorted(codes(c.messages)) == [200, 200, 202, 202]


async def test_crash_and_restart_only_when_armed(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with make_rig(tmp_path / "a", broker.port) as rig:
        rc, resp = await run_ctl(capsys, rig.ctl_argv("restart", "reason=test"))
        assert resp["code"] == 403 and rc == 13 and "not armed" in resp["error"]
        rc, resp = await run_ctl(capsys, rig.ctl_argv("crash"))
        assert resp["code"] == 403
        assert rig.ctx.restarts == [] and rig.ctx.crashes == [] and rig.server.executed == {}
    async with make_rig(tmp_path / "b", broker.port, armed=("crash", "restart")) as rig:
        rc, resp = await run_ctl(capsys, rig.ctl_argv("restart", "reason=new config"))
        assert rc == 0 and resp["result"] == {"restarting": True, "reason": "new config"}
        assert rig.ctx.restarts == ["new config"]
        # A read key may not crash the device even when armed.
        rc, resp = await run_ctl(capsys, rig.ctl_argv("crash", kid="reader"))
        assert resp["code"] == 403
        rc, resp = await run_ctl(capsys, rig.ctl_argv("crash", "kind=exception"))
        assert rc == 0 and resp["result"] == {"crashing": "exception"}  # answered first
        assert rig.server_task is not None
        with pytest.raises(ExceptionGroup) as info:
            async with asyncio.timeout(5):
                await rig.server_task
        assert info.group_contains(RuntimeError, match="test crash")
        assert rig.ctx.crashes == ["exception"]
        rig.server_task = None


# --- each rejection code, exactly one answer each ---------------------------------------------


async def test_each_rejection_code(tmp_path: Path, broker: Any) -> None:
    limits = CommandLimits(heavy_rate_per_s=1e-6, heavy_burst=2)
    async with (
        make_rig(tmp_path, broker.port, limits=limits, armed=("memory",)) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        k = rig.keys
        port = broker.port

        good = k.token("ping", kid="reader")
        await publish_raw(port, "ping", good)
        await expect_one(c, json_id(good), 200)
        await publish_raw(port, "ping", good)  # replay: a second request, its own answer
        await c.wait_for(
            lambda ms: [r for r in finals(ms) if r["id"] == json_id(good) and r["code"] == 410]
        )

        now = int(time.time())
        old = k.token("ping", iat=now - 200, exp=now - 100)
        await publish_raw(port, "ping", old)
        assert "expired" in (await expect_one(c, json_id(old), 410))["error"]

        other = k.token("ping", sub="dev-2")
        await publish_raw(port, "ping", other)
        await expect_one(c, json_id(other), 403)

        wrong_cmd = k.token("ping")
        await publish_raw(port, "info", wrong_cmd)
        await expect_one(c, json_id(wrong_cmd), 400)

        stranger = k.token("ping", kid="stranger")
        await publish_raw(port, "ping", stranger)
        assert "unknown kid" in (await expect_one(c, json_id(stranger), 401))["error"]

        role = k.token("set_log_level", {"level": "DEBUG"}, kid="reader")
        await publish_raw(port, "set_log_level", role)
        await expect_one(c, json_id(role), 403)

        unarmed = k.token("profile", {"duration_s": 1})
        await publish_raw(port, "profile", unarmed)
        assert "not armed" in (await expect_one(c, json_id(unarmed), 403))["error"]

        rig.ctx.active_call = True
        during = k.token("memory", {"interval_s": 1})
        await publish_raw(port, "memory", during)
        await expect_one(c, json_id(during), 409)
        rig.ctx.active_call = False

        for i in range(3):
            t = k.token("diagnose", {"checks": ["dns"]})
            await publish_raw(port, "diagnose", t)
            await expect_one(c, json_id(t), 200 if i < 2 else 429)

        unknown = k.token("teleport")
        await publish_raw(port, "teleport", unknown)
        await expect_one(c, json_id(unknown), 404)

        await publish_raw(port, "ping", b"x" * (17 * 1024))
        await expect_one(c, None, 413)

        await publish_raw(port, "ping", b"\x00not a token at all")
        await expect_one(c, None, 400)

        bad_args = k.token("logs", {"lines": "many"})
        await publish_raw(port, "logs", bad_args)
        await expect_one(c, json_id(bad_args), 400)

        unsigned = json.dumps(command_claims(DEVICE, "ping")).encode()
        await publish_raw(port, "ping", unsigned)
        await expect_one(c, json.loads(unsigned)["jti"], 401)

        # Exactly one final answer per request (the replayed token was two requests).
        all_final = finals(c.messages)
        assert len(all_final) == 17
        by_id: dict[Any, int] = {}
        for r in all_final:
            by_id[r["id"]] = by_id.get(r["id"], 0) + 1
        assert by_id.pop(json_id(good)) == 2 and by_id.pop(None) == 2
        assert set(by_id.values()) == {1}
        assert len(audits(c.messages)) == 17
        assert rig.server.executed == {"ping": 1, "diagnose": 2}

    # The heavy bucket persists: a restarted server is still limited.
    async with (
        make_rig(tmp_path, broker.port, limits=limits) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        t = rig.keys.token("diagnose")
        await publish_raw(broker.port, "diagnose", t)
        await expect_one(c, json_id(t), 429)


async def test_one_dangerous_command_at_a_time_and_force_during_call(
    tmp_path: Path, broker: Any
) -> None:
    async with (
        make_rig(tmp_path, broker.port, armed=("memory", "profile")) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        rig.ctx.active_call = True
        forced = rig.keys.token("memory", {"interval_s": 1, "top": 3}, kid="forcer")
        await publish_raw(broker.port, "memory", forced)
        await c.wait_for(lambda ms: [m for m in ms if m.json().get("code") == 202])
        second = rig.keys.token("profile", {"duration_s": 1}, kid="forcer")
        await publish_raw(broker.port, "profile", second)
        assert "busy" in (await expect_one(c, json_id(second), 409))["error"]
        await expect_one(c, json_id(forced), 200)


async def test_response_topic_and_correlation_data(tmp_path: Path, broker: Any) -> None:
    inbox = "operators/op-7/inbox"
    async with (
        make_rig(tmp_path, broker.port) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events", inbox) as c,
    ):

        async def answer_on(topic: str, request_id: str | None) -> Received:
            got = await c.wait_for(
                lambda ms: [m for m in ms if m.topic == topic and m.json()["id"] == request_id]
            )
            assert len(got) == 1, got
            assert_valid(TOPICS.cmd_res("x"), got[0].payload)
            return got[0]

        # The contract: the answer goes to the Response Topic, wherever it is, with the
        # Correlation Data echoed (the broker's ACL decides where a device may publish).
        for topic, corr in [(f"{TOPICS.root}/cmd-res/op-42", b"corr-1"), (inbox, b"\x00\xffbin")]:
            t = rig.keys.token("ping")
            await publish_raw(broker.port, "ping", t, response_topic=topic, correlation=corr)
            got = await answer_on(topic, json_id(t))
            assert got.properties.CorrelationData == corr
            assert got.json()["code"] == 200 and "warning" not in got.json()
        # 202 first, then the final answer: both to the Response Topic.
        t = rig.keys.token("call_test", {"duration_s": 1})
        await publish_raw(broker.port, "call_test", t, response_topic=inbox, correlation=b"c2")

        def both(ms: list[Received]) -> list[Received]:
            got = [m for m in ms if m.topic == inbox and m.json()["id"] == json_id(t)]
            return got if len(got) >= 2 else []

        got = await c.wait_for(both)
        assert [m.json()["code"] for m in got] == [202, 200]
        assert {m.properties.CorrelationData for m in got} == {b"c2"}

        # A topic that cannot be published to is not followed: cmd-res/<id> (or invalid),
        # with the correlation data and a warning saying why. The link stays up.
        for bad, why in [("ops/+/inbox", "wildcard"), ("", "empty"), ("$SYS/x", "broker")]:
            t = rig.keys.token("ping")
            await publish_raw(broker.port, "ping", t, response_topic=bad, correlation=b"c3")
            got = await answer_on(TOPICS.cmd_res(json_id(t)), json_id(t))
            assert got.properties.CorrelationData == b"c3"
            assert got.json()["code"] == 200 and why in got.json()["warning"]
            assert TOPICS.cmd_res(json_id(t)) in got.json()["warning"]
        await publish_raw(broker.port, "ping", b"garbage", response_topic="#", correlation=b"c4")
        got = await answer_on(f"{TOPICS.root}/cmd-res/invalid", None)
        assert got.json()["code"] == 400 and "wildcard" in got.json()["warning"]
        assert got.properties.CorrelationData == b"c4"
        assert rig.server.topics_refused == 4 and rig.link.connected.is_set()


async def test_a_burst_past_the_queue_and_in_flight_caps_gets_one_answer_each(
    tmp_path: Path, broker: Any
) -> None:
    inbox = "operators/op-7/inbox"
    limits = CommandLimits(queue_size=4, max_in_flight=2)
    async with (
        make_rig(tmp_path, broker.port, limits=limits, start_server=False) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events", inbox) as c,
    ):

        def answers(ms: list[Received]) -> list[Received]:
            return [m for m in ms if "/cmd-res/" in m.topic or m.topic == inbox]

        burst = [Request("ping", rig.keys.token("ping", kid="reader")) for _ in range(10)]
        burst[3] = replace(burst[3], response_topic=inbox, correlation=b"in-flight")
        burst[7] = replace(burst[7], response_topic=inbox, correlation=b"queue")
        burst[8] = Request("ping", json.dumps(command_claims(DEVICE, "ping")).encode())  # 401
        burst[9] = Request("ping", b"garbage")
        await publish_many(broker.port, burst)
        async with asyncio.timeout(10):
            while rig.server.received < len(burst):  # bounded poll: no event says "arrived"
                await asyncio.sleep(0.01)
        # The first 4 are queued, the other 6 refused at once; all wait for the server.
        assert rig.server.answered == {}
        rig.server_task = asyncio.create_task(rig.server.run())

        got = await c.wait_for(lambda ms: len(answers(ms)) >= len(burst) and answers(ms))
        ids = [json_id(r.payload) for r in burst[:8]] + [
            json.loads(burst[8].payload)["jti"],
            None,
        ]
        by_id = {m.json()["id"]: m for m in got}
        assert len(got) == len(by_id) == len(burst) and set(by_id) == set(ids)
        codes = [by_id[i].json()["code"] for i in ids]
        # Two ran; two more found the in-flight cap full; the queue refused the rest: every
        # refusal is a 429 with the request's (unverified) id, none of them verified or run.
        assert codes == [200, 200, 429, 429, 429, 429, 429, 429, 429, 429]
        assert "in flight" in by_id[ids[2]].json()["error"]
        assert "queue full" in by_id[ids[9]].json()["error"]
        for i, r in zip(ids, burst, strict=True):
            m = by_id[i]
            assert m.topic == (r.response_topic or TOPICS.cmd_res(i or "invalid"))
            assert getattr(m.properties, "CorrelationData", None) == r.correlation
            assert_valid(TOPICS.cmd_res("x"), m.payload)
        assert rig.server.executed == {"ping": 2} and rig.server.dropped == 0
        # Nothing more arrives: one answer each.
        t = rig.keys.token("ping", kid="reader")
        await publish_raw(broker.port, "ping", t)
        await expect_one(c, json_id(t), 200)
        assert len(answers(c.messages)) == len(burst) + 1


async def test_the_429_backlog_of_a_flood_is_bounded(tmp_path: Path, broker: Any) -> None:
    # Room for the 429s of two refused requests (each costs 256 bytes plus its topic and
    # correlation); past that a flood is dropped unanswered and counted, not buffered.
    limits = CommandLimits(queue_size=1, refusal_backlog_bytes=600)
    async with (
        make_rig(tmp_path, broker.port, limits=limits, start_server=False) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        burst = [Request("ping", rig.keys.token("ping", kid="reader")) for _ in range(6)]
        await publish_many(broker.port, burst)
        async with asyncio.timeout(10):
            while rig.server.received < len(burst):  # bounded poll: no event says "arrived"
                await asyncio.sleep(0.01)
        assert rig.server.dropped == 3
        rig.server_task = asyncio.create_task(rig.server.run())
        got = await c.wait_for(lambda ms: len(finals(ms)) >= 3 and finals(ms))
        answered = {r["id"]: r["code"] for r in got}
        ids = [json_id(r.payload) for r in burst]
        assert answered == {ids[0]: 200, ids[1]: 429, ids[2]: 429}
        t = rig.keys.token("ping", kid="reader")
        await publish_raw(broker.port, "ping", t)  # the backlog drained: room again
        await expect_one(c, json_id(t), 200)
        assert len(finals(c.messages)) == 4 and rig.server.answered == {200: 2, 429: 2}


async def test_handler_bug_and_timeout_answer_500_and_the_server_lives_on(
    tmp_path: Path, broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CATALOG, "hangup", replace(CATALOG["hangup"], timeout_s=0.2))
    async with (
        make_rig(tmp_path, broker.port) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        rig.ctx.diagnose_bug = True
        t = rig.keys.token("diagnose")
        await publish_raw(broker.port, "diagnose", t)
        assert "ZeroDivisionError" in (await expect_one(c, json_id(t), 500))["error"]

        async def hang(_call_id: str | None) -> dict[str, Any]:
            await asyncio.Event().wait()
            return {}

        rig.ctx.hangup = hang  # type: ignore[method-assign]
        t = rig.keys.token("hangup")
        await publish_raw(broker.port, "hangup", t)
        assert "timed out" in (await expect_one(c, json_id(t), 500))["error"]
        t = rig.keys.token("ping")
        await publish_raw(broker.port, "ping", t)
        await expect_one(c, json_id(t), 200)


async def test_output_is_capped_at_128_kib(tmp_path: Path, broker: Any) -> None:
    async with (
        make_rig(tmp_path, broker.port) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        rig.ctx.big_logs = True
        t = rig.keys.token("logs", {"lines": 1000})
        await publish_raw(broker.port, "logs", t)
        resp = await expect_one(c, json_id(t), 200)
        raw = next(m.payload for m in c.messages if m.json()["id"] == json_id(t))
        assert len(raw) <= MAX_OUTPUT_BYTES
        assert resp["truncated"] is True
        assert resp["result"]["lines"][-1].startswith("line 999 ")  # the newest lines stay


async def test_open_mode_accepts_plain_claims_and_says_so(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with make_rig(tmp_path, broker.port, commands_mode="open"):
        argv = ["cmd", DEVICE, "info", "--json", "--open", "--port", str(broker.port)]
        rc, resp = await run_ctl(capsys, argv)
        assert rc == 0 and "OPEN MODE" in resp["result"]["warning"]


async def test_clock_not_synced_allows_only_read_only(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with make_rig(tmp_path, broker.port) as rig:
        rig.ctx.synced = False
        rc, resp = await run_ctl(capsys, rig.ctl_argv("ping"))
        assert rc == 0 and resp["result"]["clock_synced"] is False
        rc, resp = await run_ctl(capsys, rig.ctl_argv("dial"))
        assert resp["code"] == 403 and "clock" in resp["error"]


# --- the local socket --------------------------------------------------------------------------


async def test_local_socket_works_with_the_broker_stopped(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "run" / "ctl.sock"
    async with make_rig(tmp_path, broker.port, local_socket=sock) as rig:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        broker.stop()
        await asyncio.wait_for(rig.link.disconnected.wait(), 10)
        pending_before = rig.spool.stats().pending

        rc, resp = await run_ctl(capsys, ["cmd", DEVICE, "ping", "--json", "--local", str(sock)])
        assert rc == 0 and resp["code"] == 200 and resp["result"]["pong"] is True
        rc, resp = await run_ctl(
            capsys, ["cmd", DEVICE, "logs", "lines=3", "--json", "--local", str(sock)]
        )
        assert rc == 0 and len(resp["result"]["lines"]) <= 3
        rc, resp = await run_ctl(capsys, ["cmd", DEVICE, "profile", "--json", "--local", str(sock)])
        assert resp["code"] == 403  # local is trusted, but arming still applies
        rc, resp = await run_ctl(capsys, ["cmd", DEVICE, "nope", "--json", "--local", str(sock)])
        assert resp["code"] == 404 and rc == 14

        # Raw protocol: malformed lines are answered too, and the connection stays usable.
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(
            b"this is not json\n"
            + json.dumps({"cmd": "ping", "args": {}, "id": "r-1"}).encode()
            + b"\n"
        )
        await writer.drain()
        first = json.loads(await reader.readline())
        second = json.loads(await reader.readline())
        writer.close()
        assert first["code"] == 400 and first["id"] is None
        assert second["code"] == 200 and second["id"] == "r-1"
        # Audited while offline: the events wait in the spool.
        assert rig.spool.stats().pending >= pending_before + 6
        cmd_events = [
            json.loads(e.payload)
            for e in rig.spool.pending(limit=1000)
            if e.topic.endswith("/events")
        ]
        assert {"kid": "local", "cmd": "ping", "code": 200, "id": "r-1", "via": "local"} in [
            e["data"] for e in cmd_events if e["category"] == "cmd"
        ]
    assert not sock.exists()


# --- the agent, end to end (once the lead wires `agent.commands`) -----------------------------


@pytest.mark.slow
async def test_agent_e2e_commands(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeagent.agent import Agent, AgentSeams
    from edgeagent.config import load_config

    keys = make_keys(tmp_path / "keys")
    keys_file = keys.write_keys_file()
    sock = tmp_path / "run" / "ctl.sock"
    extra = f"""
[security]
keys_file = "{keys_file}"
armed = ["memory", "profile", "restart"]
local_socket = "{sock}"
"""
    cfg = load_config(agent_config(tmp_path, broker.port, extra=extra))
    agent = Agent(cfg, AgentSeams(install_signal_handlers=False, freeze_gc_after_start=False))
    if not hasattr(agent, "commands"):
        pytest.skip("the command server is wired into Agent by the lead")
    task = asyncio.create_task(agent.run())
    base = ["--json", "--port", str(broker.port), "--key", str(keys.path("dbg"))]
    try:
        async with asyncio.timeout(10):
            await agent.link.connected.wait()
        calls = [("ping", []), ("info", []), ("snapshot", []), ("metrics", []),
                 ("logs", ["lines=5"]), ("breadcrumbs", []), ("rebirth", []),
                 ("memory", ["interval_s=1"]), ("profile", ["duration_s=1"])]  # fmt: skip
        for name, args in calls:
            rc, resp = await run_ctl(capsys, ["cmd", DEVICE, name, *args, *base])
            assert rc == 0, (name, resp)
        rc, resp = await run_ctl(
            capsys,
            [
                "cmd",
                DEVICE,
                "set_log_level",
                "logger=edgeagent.e2e",
                "level=DEBUG",
                "ttl_s=1",
                *base,
            ],
        )
        assert rc == 0
        assert logging.getLogger("edgeagent.e2e").level == logging.DEBUG
        async with asyncio.timeout(5):
            while logging.getLogger("edgeagent.e2e").level == logging.DEBUG:
                await asyncio.sleep(0.05)  # bounded poll: the agent's real clock reverts it
        rc, resp = await run_ctl(capsys, ["cmd", DEVICE, "crash", *base])
        assert resp["code"] == 403
        rc, resp = await run_ctl(capsys, ["cmd", DEVICE, "ping", "--json", "--local", str(sock)])
        assert rc == 0
        rc, resp = await run_ctl(capsys, ["cmd", DEVICE, "restart", "reason=e2e", *base])
        assert rc == 0
        async with asyncio.timeout(10):
            await task
    finally:
        agent.request_stop("test over")
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)


def json_id(token: bytes) -> str:
    """The jti inside a compact JWS (unverified; for matching answers)."""
    import base64

    body = token.split(b".")[1]
    return str(json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))["jti"])


async def test_an_error_while_checking_a_request_answers_500_and_the_server_lives_on(
    tmp_path: Path, broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E.g. the replay cache's sqlite on a full disk: not a crash of the agent."""
    async with (
        make_rig(tmp_path, broker.port) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        real = ReplayCache.check_and_add

        def full(self: ReplayCache, *args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(ReplayCache, "check_and_add", full)
        t = rig.keys.token("ping")
        await publish_raw(broker.port, "ping", t)
        resp = await expect_one(c, json_id(t), 500)
        assert "OperationalError: database or disk is full" in resp["error"]
        monkeypatch.setattr(ReplayCache, "check_and_add", real)
        t = rig.keys.token("ping")
        await publish_raw(broker.port, "ping", t)
        await expect_one(c, json_id(t), 200)


async def test_the_broker_drops_a_megabytes_request_before_it_reaches_the_agent(
    tmp_path: Path, broker: Any
) -> None:
    """MQTT 5 CONNECT carries Maximum Packet Size: a 2 MiB publish to a command topic
    never lands in the agent's memory (a 16 KiB..1 MiB one still gets its 413)."""
    async with (
        make_rig(tmp_path, broker.port) as rig,
        collector(broker.port, f"{TOPICS.root}/cmd-res/#", f"{TOPICS.root}/events") as c,
    ):
        await publish_raw(broker.port, "ping", b"x" * (2 * 1024 * 1024))
        await publish_raw(broker.port, "ping", b"x" * (100 * 1024))
        t = rig.keys.token("ping")
        await publish_raw(broker.port, "ping", t)
        await expect_one(c, json_id(t), 200)  # after the two above, in order
        too_large = [r for r in finals(c.messages) if r["code"] == 413]
        assert len(too_large) == 1  # the 100 KiB one; the 2 MiB one was dropped upstream
        assert rig.link.connected.is_set()
