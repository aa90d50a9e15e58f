"""edgeagent-ctl: the operator's tool (keygen, signed commands, live watch, events, calls).

Exit codes of `cmd` come from the answer's code (see EXIT_CODES): 0 for 200 and 202, a
distinct non-zero value for every error code, and 3 when no answer came in time, 4 when the
broker or socket cannot be reached, 5 for a key problem, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgeagent.control.catalog import CATALOG
from edgeagent.control.keys import (
    call_claims,
    command_claims,
    generate_keypair,
    load_private_key,
    sign_command,
)

__all__ = [
    "EXIT_CODES",
    "BrokerOptions",
    "WatchState",
    "exit_code",
    "main",
    "parse_args_kv",
    "run_main",
    "send_command",
    "send_local",
    "summary_notes",
    "with_call_token",
]

EXIT_CODES: Final = {
    200: 0,
    202: 0,
    400: 10,
    401: 11,
    403: 13,
    404: 14,
    409: 19,
    410: 20,
    413: 23,
    429: 29,
    500: 50,
}
EXIT_USAGE: Final = 2
EXIT_TIMEOUT: Final = 3
EXIT_UNREACHABLE: Final = 4
EXIT_KEY: Final = 5
EXIT_OTHER_CODE: Final = 60
KEY_ENV: Final = "EDGEAGENT_CTL_KEY"


def exit_code(code: int) -> int:
    """The process exit code for a response code."""
    return EXIT_CODES.get(code, EXIT_OTHER_CODE)


class CtlError(Exception):
    """A failure the tool reports with an exit code (no traceback)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit = code


@dataclass(frozen=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "edge/v1"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def root(self, device: str) -> str:
        return f"{self.prefix}/{device}"

    def client(
        self,
        *,
        v5: bool = True,
        identifier: str | None = None,
        clean_session: bool | None = None,
    ) -> aiomqtt.Client:
        tls = None
        if self.ca_file or self.cert_file:
            tls = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                tls.load_cert_chain(self.cert_file, self.key_file)
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=identifier or f"ctl-{uuid.uuid4().hex[:12]}",
            username=self.username,
            password=self.password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=clean_session,
            tls_context=tls,
            timeout=10,
        )


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()


def parse_args_kv(items: Sequence[str]) -> dict[str, Any]:
    """`k=v` pairs; a value is JSON when it parses as JSON (lines=50, checks=["dns"])."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CtlError(f"argument {item!r} is not key=value", EXIT_USAGE)
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _load_key(path: str | None) -> tuple[str, str]:
    """(private JWK JSON, kid) from --key, or $EDGEAGENT_CTL_KEY (a path or the JWK)."""
    source = path or os.environ.get(KEY_ENV)
    if not source:
        raise CtlError(f"no key: give --key FILE or set {KEY_ENV} (or --open)", EXIT_KEY)
    try:
        text = source if source.lstrip().startswith("{") else Path(source).read_text()
        jwk = json.loads(text)
        load_private_key(jwk)
    except (OSError, ValueError) as exc:
        raise CtlError(f"unusable key: {exc}", EXIT_KEY) from exc
    kid = jwk.get("kid")
    if not isinstance(kid, str):
        raise CtlError("the key has no 'kid' (give --kid)", EXIT_KEY)
    return json.dumps(jwk), kid


async def send_command(
    broker: BrokerOptions,
    device: str,
    name: str,
    args: dict[str, Any],
    *,
    private_jwk: str | None,
    kid: str | None,
    timeout_s: float,
    lifetime_s: int = 60,
    wait_final: bool = True,
    on_accepted: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Publish one (signed, or open when private_jwk is None) command and await its answer.

    MQTT 5 with a response topic under the device's `cmd-res/` (where the broker ACL lets a
    device answer: docs/commands.md) and the request id as correlation data. Raises CtlError
    on timeout or when the broker is unreachable.
    """
    claims = command_claims(device, name, args, lifetime_s=lifetime_s)
    jti = claims["jti"]
    if private_jwk is None:
        payload = json.dumps(claims).encode()
    else:
        payload = sign_command(private_jwk, kid or "", claims).encode()
    root = broker.root(device)
    response_topic = f"{root}/cmd-res/{jti}"
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = jti.encode()
    try:
        async with broker.client() as client:
            await client.subscribe(response_topic, qos=1)
            await client.publish(f"{root}/cmd/{name}", payload, qos=1, properties=props)
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    corr = getattr(message.properties, "CorrelationData", None)
                    if corr is not None and corr != jti.encode():
                        continue
                    response = json.loads(_payload_bytes(message.payload))
                    if response.get("code") == 202 and wait_final:
                        if on_accepted is not None:
                            on_accepted(response)
                        continue
                    return dict(response)
    except TimeoutError as exc:
        raise CtlError(f"no answer from {device} within {timeout_s:.0f} s", EXIT_TIMEOUT) from exc
    except aiomqtt.MqttError as exc:
        raise CtlError(f"broker {broker.host}:{broker.port}: {exc}", EXIT_UNREACHABLE) from exc
    raise CtlError("connection closed before an answer", EXIT_UNREACHABLE)


async def send_local(
    socket_path: Path,
    name: str,
    args: dict[str, Any],
    *,
    timeout_s: float,
    wait_final: bool = True,
    on_accepted: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One request over the agent's unix socket (newline-delimited JSON)."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=1 << 20)
    except OSError as exc:
        raise CtlError(f"local socket {socket_path}: {exc}", EXIT_UNREACHABLE) from exc
    try:
        writer.write(json.dumps({"cmd": name, "args": args}).encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            while True:
                line = await reader.readline()
                if not line:
                    raise CtlError("the agent closed the socket", EXIT_UNREACHABLE)
                response = json.loads(line)
                if response.get("code") == 202 and wait_final:
                    if on_accepted is not None:
                        on_accepted(response)
                    continue
                return dict(response)
    except TimeoutError as exc:
        raise CtlError(f"no answer within {timeout_s:.0f} s", EXIT_TIMEOUT) from exc
    finally:
        writer.close()


# --- presentation -----------------------------------------------------------------------


def _print_response(console: Console, response: dict[str, Any]) -> None:
    code = response.get("code")
    ok = response.get("ok")
    style = "green" if ok else "red"
    head = f"[{style}]{code}[/] {response.get('cmd') or '?'} [dim]{response.get('id')}[/]"
    console.print(head)
    if response.get("error"):
        console.print(f"[red]{response['error']}[/]", markup=True, highlight=False)
    if response.get("warning"):  # e.g. the device did not follow the Response Topic
        console.print(str(response["warning"]), style="yellow", markup=False, highlight=False)
    result = response.get("result")
    if isinstance(result, dict) and isinstance(result.get("lines"), list):
        for line in result["lines"]:
            console.print(str(line), markup=False, highlight=False)
    elif result is not None:
        console.print_json(data=result)
    if response.get("truncated"):
        console.print("[yellow](output truncated)[/]")


@dataclass
class WatchState:
    """What `watch` shows, folded from the device's topics."""

    root: str
    status: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    updates: int = 0

    def apply(self, topic: str, payload: bytes) -> bool:
        """Fold one message; False if it is not one `watch` shows."""
        try:
            data = json.loads(payload) if payload else {}
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        rest = topic.removeprefix(self.root + "/")
        if rest == "status":
            self.status = data
        elif rest == "health":
            self.health = data
        elif rest == "metrics":
            self.metrics = data
        elif rest.startswith("calls/") and rest.endswith("/quality"):
            self.quality = data
        elif rest.startswith("alerts/"):
            name = rest.removeprefix("alerts/")
            if data.get("state") == "firing":
                self.alerts[name] = data
            else:
                self.alerts.pop(name, None)
        else:
            return False
        self.updates += 1
        return True

    def table(self) -> Table:
        t = Table(title=self.root, show_header=False, expand=False)
        t.add_column("what", style="bold")
        t.add_column("value")
        st = self.status
        t.add_row("status", f"{st.get('state', '?')} (session {st.get('session', '?')})")
        h = self.health
        reasons = ", ".join(h.get("reasons", [])) if h else ""
        t.add_row("health", f"{h.get('state', '?')} {reasons}".strip())
        m = self.metrics
        if m:
            calls = m.get("calls") or {}
            t.add_row(
                "metrics",
                f"cpu {m.get('cpu_pct')}%  mem avail {m.get('mem_available_mb')} MB  "
                f"rss {m.get('rss_mb')} MB  temp {m.get('temp_c')} C  "
                f"uptime {m.get('uptime_s')} s  calls {calls.get('active', '?')} active",
            )
        else:
            t.add_row("metrics", "-")
        q = self.quality
        if q:
            t.add_row(
                "call quality",
                f"{q.get('call_id')}: mos {q.get('mos')}  loss {q.get('loss_pct')}%  "
                f"jitter {q.get('jitter_ms')} ms  rtt {q.get('rtt_ms')} ms",
            )
        else:
            t.add_row("call quality", "no call")
        if self.alerts:
            for name, a in sorted(self.alerts.items()):
                t.add_row(f"alert {name}", f"{a.get('severity')}: {a.get('message')}")
        else:
            t.add_row("alerts", "none firing")
        return t


def _event_line(data: dict[str, Any]) -> str:
    ts = data.get("ts")
    when = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) else "?"
    extra = f" {json.dumps(data['data'], sort_keys=True)}" if data.get("data") else ""
    return (
        f"{when} #{data.get('seq')} {str(data.get('level', '?')).upper():7} "
        f"{data.get('category')}: {data.get('message')}{extra}"
    )


async def _stream(
    broker: BrokerOptions,
    topics: list[str],
    on_message: Callable[[str, bytes], bool],
    *,
    count: int | None,
    duration_s: float | None,
    v5: bool = True,
    identifier: str | None = None,
    clean_session: bool | None = None,
) -> int:
    """Subscribe and feed messages to `on_message` until `count` accepted or `duration_s`."""
    seen = 0
    try:
        async with broker.client(
            v5=v5, identifier=identifier, clean_session=clean_session
        ) as client:
            for topic in topics:
                await client.subscribe(topic, qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(duration_s):
                    async for message in client.messages:
                        data = _payload_bytes(message.payload)
                        if on_message(message.topic.value, data):
                            seen += 1
                            if count is not None and seen >= count:
                                break
    except aiomqtt.MqttError as exc:
        raise CtlError(f"broker {broker.host}:{broker.port}: {exc}", EXIT_UNREACHABLE) from exc
    return seen


# --- subcommands ------------------------------------------------------------------------


def _cmd_keygen(ns: argparse.Namespace, console: Console) -> int:
    private, public, kid = generate_keypair(ns.kid)
    out = Path(ns.out) if ns.out else Path(f"{kid}.jwk.json")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private + "\n")
    entry: dict[str, Any] = {"kid": kid, "public_key": public}
    if ns.roles or not ns.commands:
        entry["roles"] = ns.roles or ["read"]
    if ns.commands:
        entry["commands"] = ns.commands
    console.print(f"private key written to {out} (keep it secret)", style="dim", highlight=False)
    print(json.dumps(entry))  # for the device's keys_file
    return 0


def summary_notes(s: dict[str, Any]) -> str:
    """What else a summary says that explains a bad call, in a few words: the crash that
    cut it, seconds without inbound audio, device alerts and audio issues during it."""
    notes: list[str] = []
    crash = s.get("crash_id")
    if isinstance(crash, str):
        notes.append(f"crash {crash[:8]}")
    no_media = s.get("no_media_s")
    if isinstance(no_media, int | float) and no_media > 0:
        notes.append(f"no media {no_media:g} s")
    alerts = s.get("device_alerts")
    if isinstance(alerts, list) and alerts:
        notes.append("device: " + ", ".join(str(a) for a in alerts[:4]))
    issues = s.get("audio_issues")
    if isinstance(issues, dict) and issues:
        notes.append("audio: " + ", ".join(str(k) for k in sorted(issues)[:4]))
    return "; ".join(notes)


def with_call_token(
    args: dict[str, Any], private_jwk: str, kid: str, *, lifetime_s: int = 60
) -> dict[str, Any]:
    """`dial` args with an offer token for a peer with signed signaling (protocol section 4):
    cmd "call", sub the peer, jti the call_id (the given one, else a fresh one)."""
    peer = args.get("peer")
    if not isinstance(peer, str):
        raise CtlError("--call-token needs peer=ID: the token is for that callee", EXIT_USAGE)
    call_id = args.get("call_id") or secrets.token_hex(8)
    if not isinstance(call_id, str):
        raise CtlError("call_id must be a string", EXIT_USAGE)
    claims = call_claims(peer, call_id, lifetime_s=lifetime_s)
    return {**args, "call_id": call_id, "token": sign_command(private_jwk, kid, claims)}


async def _cmd_cmd(ns: argparse.Namespace, console: Console, err: Console) -> int:
    if ns.name not in CATALOG and not ns.any_name:
        err.print(f"[yellow]note: {ns.name!r} is not in the v1 catalog[/]")
    args = parse_args_kv(ns.args)
    if ns.call_token:
        if ns.name not in ("dial", "call_test"):
            raise CtlError("--call-token is for the dial and call_test commands", EXIT_USAGE)
        call_key, call_kid = _load_key(ns.key)
        args = with_call_token(args, call_key, ns.kid or call_kid, lifetime_s=ns.lifetime)
    spec = CATALOG.get(ns.name)
    timeout_s = ns.timeout if ns.timeout is not None else (spec.timeout_s if spec else 10) + 10

    def accepted(resp: dict[str, Any]) -> None:
        err.print(f"[dim]202 accepted ({resp.get('id')}); waiting for the result[/]")

    if ns.local:
        response = await send_local(
            Path(ns.local),
            ns.name,
            args,
            timeout_s=timeout_s,
            wait_final=not ns.no_wait,
            on_accepted=accepted,
        )
    else:
        private, kid = (None, None) if ns.open else _load_key(ns.key)
        if ns.kid:
            kid = ns.kid
        response = await send_command(
            _broker(ns),
            ns.device,
            ns.name,
            args,
            private_jwk=private,
            kid=kid,
            timeout_s=timeout_s,
            lifetime_s=ns.lifetime,
            wait_final=not ns.no_wait,
            on_accepted=accepted,
        )
    if ns.json:
        print(json.dumps(response, sort_keys=True))
    else:
        _print_response(console, response)
    return exit_code(int(response.get("code", 500)))


async def _cmd_watch(ns: argparse.Namespace, console: Console) -> int:
    broker = _broker(ns)
    root = broker.root(ns.device)
    state = WatchState(root)
    topics = [f"{root}/{t}" for t in ("status", "health", "metrics", "calls/+/quality")]
    topics.append(f"{root}/alerts/+")
    if console.is_terminal:
        with Live(state.table(), console=console, refresh_per_second=4) as live:

            def update(topic: str, payload: bytes) -> bool:
                changed = state.apply(topic, payload)
                if changed:
                    live.update(state.table())
                return changed

            await _stream(broker, topics, update, count=ns.count, duration_s=ns.duration)
    else:
        await _stream(broker, topics, state.apply, count=ns.count, duration_s=ns.duration)
        console.print(state.table())
    return 0


async def _cmd_tail(ns: argparse.Namespace, console: Console) -> int:
    broker = _broker(ns)
    root = broker.root(ns.device)

    def show(_topic: str, payload: bytes) -> bool:
        try:
            data = json.loads(payload)
        except ValueError:
            return False
        if ns.json:
            print(json.dumps(data, sort_keys=True), flush=True)
        else:
            console.print(_event_line(data), markup=False, highlight=False)
        return True

    await _stream(broker, [f"{root}/events"], show, count=ns.count, duration_s=ns.duration)
    return 0


async def _cmd_calls(ns: argparse.Namespace, console: Console) -> int:
    """Summaries kept by the broker for this tool's persistent session since its last run."""
    broker = _broker(ns)
    root = broker.root(ns.device)
    summaries: list[dict[str, Any]] = []

    def keep(_topic: str, payload: bytes) -> bool:
        try:
            data = json.loads(payload)
        except ValueError:
            return False
        summaries.append(data)
        return True

    ident = ns.session or f"edgeagent-ctl-calls-{ns.device}"[:64]
    await _stream(
        broker,
        [f"{root}/calls/+/summary"],
        keep,
        count=ns.count,
        duration_s=ns.wait,
        v5=False,  # a 3.1.1 persistent session keeps QoS 1 summaries between runs
        identifier=ident,
        clean_session=False,
    )
    if ns.json:
        for s in summaries:
            print(json.dumps(s, sort_keys=True))
        return 0
    t = Table(title=f"{root}: calls")
    for col in ("started", "call_id", "dir", "peer", "result", "reason", "dur s", "mos", "loss%",
                "notes"):  # fmt: skip
        t.add_column(col)
    for s in summaries:
        ts = s.get("started_ts") or s.get("ts")
        when = time.strftime("%m-%d %H:%M:%S", time.localtime(ts)) if ts else "?"
        t.add_row(
            when,
            str(s.get("call_id")),
            str(s.get("direction")),
            str(s.get("peer")),
            str(s.get("result")),
            str(s.get("end_reason")),
            str(s.get("duration_s")),
            str(s.get("mos_avg")),
            str(s.get("loss_pct")),
            summary_notes(s),
        )
    console.print(t)
    if not summaries:
        console.print("[dim]no summaries since the last run of `calls` for this device[/]")
    return 0


def _broker(ns: argparse.Namespace) -> BrokerOptions:
    return BrokerOptions(
        host=ns.host,
        port=ns.port,
        prefix=ns.prefix,
        username=ns.username,
        password=os.environ.get("EDGEAGENT_CTL_PASSWORD"),
        ca_file=ns.ca,
        cert_file=ns.cert,
        key_file=ns.cert_key,
    )


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="edgeagent-ctl", description=__doc__.splitlines()[0])
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--host", default=env("EDGEAGENT_CTL_HOST", "127.0.0.1"))
    conn.add_argument("--port", type=int, default=int(env("EDGEAGENT_CTL_PORT", "1883")))
    conn.add_argument("--prefix", default=env("EDGEAGENT_CTL_PREFIX", "edge/v1"))
    conn.add_argument("--username", default=env("EDGEAGENT_CTL_USERNAME"))
    conn.add_argument("--ca", help="CA file for TLS")
    conn.add_argument("--cert", help="client certificate for mutual TLS")
    conn.add_argument("--cert-key", help="client certificate key")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair; prints the keys_file entry")
    p.add_argument("--kid")
    p.add_argument("--out", help="private key file (default <kid>.jwk.json, mode 0600)")
    p.add_argument("--roles", nargs="*", choices=["read", "operate", "debug"])
    p.add_argument(
        "--commands",
        nargs="*",
        help="commands the key may run whatever its roles; a device's call key: call",
    )

    p = sub.add_parser("cmd", parents=[conn], help="send one command and print the answer")
    p.add_argument("device")
    p.add_argument("name")
    p.add_argument("args", nargs="*", help="key=value (values parsed as JSON when possible)")
    p.add_argument("--json", action="store_true", help="print the raw response")
    p.add_argument("--local", metavar="SOCKET", help="use the agent's unix socket")
    p.add_argument("--key", help=f"private JWK file (default ${KEY_ENV})")
    p.add_argument("--kid", help="override the key's kid")
    p.add_argument("--open", action="store_true", help="unsigned claims (open-mode benches)")
    p.add_argument("--timeout", type=float, help="seconds to wait (default: per command)")
    p.add_argument("--lifetime", type=int, default=60, help="token lifetime in seconds")
    p.add_argument("--no-wait", action="store_true", help="return at a 202")
    p.add_argument(
        "--call-token",
        action="store_true",
        help="dial, call_test: sign the offer's token (a peer with signed signaling) with --key",
    )
    p.add_argument("--any-name", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("watch", parents=[conn], help="live status, health, metrics, alerts")
    p.add_argument("device")
    p.add_argument("--count", type=int, help="stop after this many updates")
    p.add_argument("--duration", type=float, help="stop after this many seconds")

    p = sub.add_parser("tail", parents=[conn], help="follow the device's events")
    p.add_argument("device")
    p.add_argument("--json", action="store_true")
    p.add_argument("--count", type=int)
    p.add_argument("--duration", type=float)

    p = sub.add_parser("calls", parents=[conn], help="call summaries since the last run")
    p.add_argument("device")
    p.add_argument("--json", action="store_true")
    p.add_argument("--wait", type=float, default=2.0, help="seconds to collect")
    p.add_argument("--count", type=int)
    p.add_argument("--session", help="persistent session id (default per device)")
    return parser


async def _dispatch(ns: argparse.Namespace, console: Console, err: Console) -> int:
    if ns.command == "cmd":
        return await _cmd_cmd(ns, console, err)
    if ns.command == "watch":
        return await _cmd_watch(ns, console)
    if ns.command == "tail":
        return await _cmd_tail(ns, console)
    if ns.command == "calls":
        return await _cmd_calls(ns, console)
    raise CtlError(f"unknown command {ns.command}", EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Run edgeagent-ctl with `argv` (default sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        if ns.command == "keygen":
            return _cmd_keygen(ns, console)
        return asyncio.run(_dispatch(ns, console, err))
    except CtlError as exc:
        err.print(f"[red]edgeagent-ctl: {exc}[/]", highlight=False)
        return exc.exit
    except KeyboardInterrupt:
        return 130


def run_main() -> None:
    """Console entry point."""
    sys.exit(main())
