"""The broker link against a real mosquitto: MQTT 3.1.1, TLS, mutual TLS, username/password."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import ipaddress
import json
import logging
import os
import random
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_support import agent_config, collector
from conftest import Broker, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr
from tcp_relay import TcpRelay

from edgeagent.agent import Agent, AgentSeams
from edgeagent.config import MqttConfig, TlsConfig, load_config
from edgeagent.events import EventBus
from edgeagent.mqtt import BrokerLink, Inbound, SessionCounter

pytestmark = pytest.mark.broker

# --- certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the broker does not trust
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("edgeagent test CA", ca_key, None, ca_key, ca=True)
    rogue_ca = _cert("someone else's CA", rogue_ca_key, None, rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    _write(d / "ca.pem", ca, ca_key)
    _write(
        d / "server.pem",
        _cert("localhost", server_key, ca.subject, ca_key, server=True),
        server_key,
    )
    _write(d / "client.pem", _cert("dev-1", client_key, ca.subject, ca_key), client_key)
    _write(d / "rogue.pem", _cert("dev-1", rogue_key, rogue_ca.subject, rogue_ca_key), rogue_key)
    return Pki(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        rogue_cert=d / "rogue.pem",
        rogue_key=d / "rogue.key",
    )


# --- brokers ----------------------------------------------------------------------------


@contextlib.contextmanager
def mosquitto(tmp_path: Path, secure: str, *, anonymous: bool = True) -> Iterator[Broker]:
    """A mosquitto with a plain listener (`.port`, for the test's own collector) and a
    second listener configured by `secure` (`.ws_port` holds its port here)."""
    port, secure_port = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        "per_listener_settings true\n"
        # Started as root, mosquitto drops to user `mosquitto`, which cannot read
        # pytest's 0700 temp dirs (certificates, password file).
        f"{'user root' if os.geteuid() == 0 else ''}\n"
        "persistence false\n"
        "log_dest stderr\n"
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"listener {secure_port} 127.0.0.1\n"
        f"allow_anonymous {'true' if anonymous else 'false'}\n"
        f"{secure}"
    )
    b = Broker(port=port, ws_port=secure_port, conf=conf)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def tls_listener(pki: Pki, *, require_certificate: bool) -> str:
    return (
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"require_certificate {'true' if require_certificate else 'false'}\n"
    )


@contextlib.asynccontextmanager
async def running_link(tmp_path: Path, cfg: MqttConfig) -> AsyncIterator[BrokerLink]:
    """A BrokerLink as the agent runs it (no agent around it)."""
    connects: list[int] = []

    async def on_connected(session: int) -> None:
        connects.append(session)

    link = BrokerLink(
        cfg,
        "dev-1",
        sessions=SessionCounter(tmp_path / "session"),
        will=lambda s: (
            "edge/v1/dev-1/status",
            json.dumps({"state": "lost", "session": s}).encode(),
        ),
        on_connected=on_connected,
        bus=EventBus(),
        rng=random.Random(7),
    )
    task = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        await link.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def link_cfg(port: int, **kw: object) -> MqttConfig:
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        "connect_timeout_s": 5.0,
    }
    return MqttConfig(**(settings | kw))  # type: ignore[arg-type]


async def assert_publish_acked(link: BrokerLink, collector_port: int) -> None:
    """A QoS 1 publish through `link` returns (PUBACK) and reaches a subscriber."""
    async with collector(collector_port, "edge/v1/dev-1/events") as c:
        await asyncio.wait_for(link.connected.wait(), 10)
        await link.publish("edge/v1/dev-1/events", b'{"seq": 1}', qos=1)
        got = await c.wait_for(lambda ms: ms)
        assert got[0].payload == b'{"seq": 1}'


async def assert_keeps_retrying(link: BrokerLink, attempts: int = 3) -> None:
    """Each CONNECT attempt takes a new session number; the link never comes up nor dies."""
    start = link._sessions.value
    async with asyncio.timeout(15):
        while link._sessions.value < start + attempts:
            await asyncio.sleep(0.05)
    assert not link.connected.is_set()


# --- MQTT 3.1.1 -------------------------------------------------------------------------


async def test_mqtt_311_birth_info_publish_and_will(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    relay = TcpRelay(broker.port)
    await relay.start()
    cfg = load_config(
        agent_config(tmp_path, relay.port),
        environ={"EDGEAGENT__MQTT__PROTOCOL": '"3.1.1"'},
    )
    assert cfg.mqtt.protocol == "3.1.1"
    agent = Agent(
        cfg,
        AgentSeams(
            install_signal_handlers=False, install_crash_hooks=False, freeze_gc_after_start=False
        ),
    )
    try:
        async with collector(
            broker.port, "edge/v1/dev-1/status", "edge/v1/dev-1/info", "edge/v1/dev-1/x"
        ) as c:
            task = asyncio.create_task(agent.run())
            online = await c.wait_for(
                lambda ms: [m.json() for m in ms if m.topic.endswith("/status")]
            )
            assert online[0]["state"] == "online" and online[0]["session"] == 1
            info = await c.wait_for(lambda ms: [m.json() for m in ms if m.topic.endswith("/info")])
            assert info[0]["session"] == 1
            assert not agent.link.v5

            await agent.link.publish("edge/v1/dev-1/x", b"acked", qos=1)  # returns on PUBACK
            assert (await c.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/x")]))[
                0
            ].payload == b"acked"

            # Cut the TCP connection without a DISCONNECT: the broker sends the 3.1.1 Will.
            relay.set_open(False)
            lost = await c.wait_for(
                lambda ms: [
                    m.json() for m in ms if m.topic.endswith("/status") and b'"lost"' in m.payload
                ],
                timeout=10,
            )
            assert lost[0]["session"] == 1
            relay.set_open(True)
            again = await c.wait_for(
                lambda ms: [
                    s
                    for m in ms
                    if m.topic.endswith("/status")
                    and (s := m.json())["state"] == "online"
                    and s["session"] == 2
                ],
                timeout=10,
            )
            assert again
            agent.request_stop("test over")
            await asyncio.wait_for(task, 5)
            off = await c.wait_for(
                lambda ms: [
                    m.json() for m in ms if m.topic.endswith("/status") and b"offline" in m.payload
                ]
            )
            assert off[0]["session"] == 2
    finally:
        await relay.stop()


# --- TLS --------------------------------------------------------------------------------


async def test_tls_with_ca_connects_and_publishes(tmp_path: Path, pki: Pki) -> None:
    with mosquitto(tmp_path, tls_listener(pki, require_certificate=False)) as b:
        cfg = link_cfg(b.ws_port, tls=TlsConfig(enabled=True, ca_file=pki.ca))
        async with running_link(tmp_path, cfg) as link:
            await assert_publish_acked(link, b.port)


async def test_tls_rejects_a_server_cert_from_an_unknown_ca(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.mqtt")
    with mosquitto(tmp_path, tls_listener(pki, require_certificate=False)) as b:
        cfg = link_cfg(b.ws_port, tls=TlsConfig(enabled=True, ca_file=pki.rogue_cert))
        async with running_link(tmp_path, cfg) as link:
            await assert_keeps_retrying(link)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # warned once, then DEBUG for the repeats
    assert "certificate verify failed" in warnings[0].getMessage()


async def test_mutual_tls_with_client_certificate(tmp_path: Path, pki: Pki) -> None:
    with mosquitto(tmp_path, tls_listener(pki, require_certificate=True)) as b:
        tls = TlsConfig(
            enabled=True, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
        )
        async with running_link(tmp_path, link_cfg(b.ws_port, tls=tls)) as link:
            await assert_publish_acked(link, b.port)
            assert link.last_error is None


@pytest.mark.parametrize("client", ["missing", "untrusted"])
async def test_mutual_tls_bad_client_cert_is_logged_and_retried(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, client: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.mqtt")
    if client == "missing":
        tls = TlsConfig(enabled=True, ca_file=pki.ca)
    else:
        tls = TlsConfig(
            enabled=True, ca_file=pki.ca, cert_file=pki.rogue_cert, key_file=pki.rogue_key
        )
    with mosquitto(tmp_path, tls_listener(pki, require_certificate=True)) as b:
        async with running_link(tmp_path, link_cfg(b.ws_port, tls=tls)) as link:
            await assert_keeps_retrying(link)
            assert link.last_error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"127.0.0.1:{b.ws_port}" in warnings[0]
    assert "TLS" in warnings[0] or "certificate" in warnings[0], warnings[0]


async def test_client_key_file_missing_is_logged_and_retried(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.mqtt")
    # Gone after the config was read (check-config would have named it): retried, not fatal.
    tls = TlsConfig(
        enabled=True, ca_file=pki.ca, cert_file=pki.client_cert, key_file=tmp_path / "nope.key"
    )
    with mosquitto(tmp_path, tls_listener(pki, require_certificate=True)) as b:
        async with running_link(tmp_path, link_cfg(b.ws_port, tls=tls)) as link:
            await assert_keeps_retrying(link)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nope.key" in warnings[0], warnings


def test_check_config_reads_the_tls_files(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CA or client certificate the agent could not use is a config error before deployment;
    `run` keeps retrying with it (the tests above), so nothing else would say so."""
    from edgeagent.cli import main

    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")

    def check(tls: str) -> tuple[int, str]:
        path = tmp_path / "dev.toml"
        path.write_text(f'[device]\nid = "dev-1"\n[mqtt.tls]\nenabled = true\n{tls}')
        code = main(["check-config", str(path)])
        return code, capsys.readouterr().err

    assert check(f'ca_file = "{pki.ca}"\n') == (0, "")
    both = f'ca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n'
    assert check(both) == (0, "")
    for tls, expect in (
        (f'ca_file = "{tmp_path / "gone.pem"}"\n', f"TLS CA file {tmp_path / 'gone.pem'} unusable"),
        (f'ca_file = "{not_pem}"\n', f"TLS CA file {not_pem} unusable"),
        (
            f'cert_file = "{pki.client_cert}"\nkey_file = "{tmp_path / "gone.key"}"\n',
            f"key {tmp_path / 'gone.key'} unusable",
        ),
        (f'key_file = "{pki.client_key}"\n', "mqtt.tls: key_file is set without cert_file"),
    ):
        code, err = check(tls)
        assert code == 78, (tls, err)
        assert expect in err, (tls, err)
    # Not enabled: the files are not used, and not read.
    path = tmp_path / "off.toml"
    path.write_text(f'[device]\nid = "dev-1"\n[mqtt.tls]\nca_file = "{tmp_path / "gone.pem"}"\n')
    assert main(["check-config", str(path)]) == 0


# --- username / password ----------------------------------------------------------------


async def test_username_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.mqtt")
    passwd = tmp_path / "passwd"
    subprocess.run(  # noqa: ASYNC221 - a one-off setup step before any I/O under test
        ["mosquitto_passwd", "-b", "-c", str(passwd), "dev-1", "s3cret-pw"],
        check=True,
        capture_output=True,
    )
    passwd.chmod(0o600)
    with mosquitto(tmp_path, f"password_file {passwd}\n", anonymous=False) as b:
        good = link_cfg(b.ws_port, username="dev-1", password=SecretStr("s3cret-pw"))
        async with running_link(tmp_path, good) as link:
            await assert_publish_acked(link, b.port)
        (tmp_path / "session").unlink()
        bad = link_cfg(b.ws_port, username="dev-1", password=SecretStr("wrong-pw"))
        async with running_link(tmp_path, bad) as link:
            await assert_keeps_retrying(link)
        anon = link_cfg(b.ws_port)
        async with running_link(tmp_path, anon) as link:
            await assert_keeps_retrying(link)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per refused configuration
    assert all("authoriz" in w.lower() or "password" in w.lower() for w in warnings), warnings
    assert not any(
        "s3cret" in r.getMessage() or "wrong-pw" in r.getMessage() for r in caplog.records
    )


# --- a peer that accepts and hangs up ---------------------------------------------------


async def test_peer_closing_before_connack_fails_the_attempt_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay or load balancer whose broker is down: no waiting out connect_timeout_s."""
    caplog.set_level(logging.DEBUG, logger="edgeagent.mqtt")

    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted % 2:  # every other one with a reset: two reasons, alternating
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = link_cfg(port, connect_timeout_s=30.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with running_link(tmp_path, cfg) as link:
            await assert_keeps_retrying(link, attempts=8)
            assert loop.time() - t0 < 15  # eight attempts, each far below the 30 s timeout
            assert link.last_error is not None
            # The peer closed or reset: seen before CONNACK, or (a reset racing paho's
            # connect thread on a loaded machine) as the connect's own error.
            assert "before CONNACK" in link.last_error or "reset by peer" in link.last_error
    finally:
        server.close()
        await server.wait_closed()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and f"127.0.0.1:{port}" in warnings[0]
    # Once per reason, not once per attempt (each WARNING is also a spooled event).
    assert len(warnings) <= 3, warnings
    assert len(set(warnings)) == len(warnings)


async def test_a_peer_that_never_answers_connect_is_left_with_no_open_connections(
    tmp_path: Path,
) -> None:
    """Each attempt's socket is closed when the CONNECT times out, not when the garbage
    collector finds it: a silent peer used to hold a dozen established connections."""
    open_now: set[asyncio.StreamWriter] = set()
    most = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal most
        open_now.add(writer)
        most = max(most, len(open_now))
        try:
            while await reader.read(4096):  # CONNECT arrives; never a CONNACK
                pass
        finally:
            open_now.discard(writer)
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gc.disable()  # the collector must not be what closes them
        async with running_link(tmp_path, link_cfg(port, connect_timeout_s=0.3)) as link:
            await assert_keeps_retrying(link, attempts=6)
    finally:
        gc.enable()
        server.close()
        await server.wait_closed()
    assert most <= 2, most  # the one in progress (and one being closed)


async def test_a_watch_made_while_the_link_is_still_connecting_is_subscribed(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
) -> None:
    """Between CONNACK and `connected` (the birth is being published) the link has taken
    its list of filters; a watch then (a call starting as the link comes up) must still
    subscribe, not wait for the next reconnect."""
    async with collector(broker.port, "edge/v1/nothing") as other:
        await other.client.publish(
            "edge/v1/peer-1/status", b'{"state": "online"}', qos=1, retain=True
        )
    gap, release = asyncio.Event(), asyncio.Event()

    async def on_connected(session: int) -> None:
        gap.set()
        await release.wait()

    link = BrokerLink(
        link_cfg(broker.port),
        "dev-1",
        sessions=SessionCounter(tmp_path / "session"),
        will=lambda s: ("edge/v1/dev-1/status", b"{}"),
        on_connected=on_connected,
        bus=EventBus(),
    )
    got: list[Inbound] = []
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(gap.wait(), 10)
        assert not link.connected.is_set()
        assert await link.watch("edge/v1/peer-1/status", got.append) is True
        release.set()
        await asyncio.wait_for(link.connected.wait(), 10)
        async with asyncio.timeout(10):
            while not got:
                await asyncio.sleep(0.01)  # the retained status on a live connection
    finally:
        release.set()
        await link.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert got[0].payload == b'{"state": "online"}' and got[0].retain
