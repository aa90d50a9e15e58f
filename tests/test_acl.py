"""The example broker hardening, proven on a real mosquitto: mutual TLS with certificates
from a device CA made here, the CN as username, and config/mosquitto-acl.example.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest
from agent_support import ROOT, Collector
from conftest import Broker, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

pytestmark = pytest.mark.broker


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class DeviceCA:
    """A CA and the certificates it signs, as PEM files in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("edgeagent test device CA"))
            .issuer_name(_name("edgeagent test device CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{cn}.pem", self.dir / f"{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return cert_path, key_path


def tls_broker_conf(tmp_path: Path, ca: DeviceCA, port: int) -> Path:
    """config/mosquitto-tls.example.conf with this test's files, port and ACL."""
    cert, key = ca.issue("localhost", server=True)
    acl = tmp_path / "edgeagent.acl"
    acl.write_text((ROOT / "config" / "mosquitto-acl.example").read_text())
    out = []
    for line in (ROOT / "config" / "mosquitto-tls.example.conf").read_text().splitlines():
        word = line.split(" ", 1)[0]
        replacement = {
            "listener": f"listener {port} 127.0.0.1",
            "certfile": f"certfile {cert}",
            "keyfile": f"keyfile {key}",
            "cafile": f"cafile {ca.ca_file}",
            "acl_file": f"acl_file {acl}",
            "persistence": "persistence false",
            "persistence_location": "",
        }.get(word, line)
        out.append(replacement)
    conf = tmp_path / "mosquitto-tls.conf"
    # As root, mosquitto drops to the `mosquitto` user, who cannot read pytest's 0700 tmp dir.
    stay = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text("\n".join(out) + "\nlog_dest stderr\n" + stay)
    return conf


@pytest.fixture
def tls_setup(tmp_path: Path) -> Iterator[tuple[Broker, DeviceCA]]:
    ca = DeviceCA(tmp_path)
    port = free_port()
    broker = Broker(port=port, ws_port=0, conf=tls_broker_conf(tmp_path, ca, port))
    broker.start()
    try:
        yield broker, ca
    finally:
        broker.stop()


@contextlib.asynccontextmanager
async def client_as(broker: Broker, ca: DeviceCA, cn: str) -> AsyncIterator[Collector]:
    cert, key = ca.issue(cn)
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier=cn,
        tls_context=ctx,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        c = Collector(client)
        task = asyncio.create_task(c._pump())
        try:
            yield c
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


def payloads(c: Collector) -> list[bytes]:
    return [m.payload for m in c.messages]


async def test_devices_are_confined_to_their_own_topics(
    tls_setup: tuple[Broker, DeviceCA],
) -> None:
    broker, ca = tls_setup
    async with (
        client_as(broker, ca, "operator-alice") as op,
        client_as(broker, ca, "dev-a") as a,
        client_as(broker, ca, "dev-b") as b,
    ):
        await op.client.subscribe("edge/v1/#", qos=1)
        await b.client.subscribe("edge/v1/dev-b/cmd/+", qos=1)
        await a.client.subscribe("edge/v1/dev-a/cmd/+", qos=1)
        # mosquitto 2.0 grants this SUBSCRIBE but checks the ACL on every delivery: what
        # matters is that nothing for B ever reaches A (asserted below).
        await a.client.subscribe("edge/v1/dev-b/cmd/+", qos=1)
        await a.client.subscribe("edge/v1/+/cmd/#", qos=1)

        # A publishes a command to B: the broker drops it; the operator's next one arrives.
        await a.client.publish("edge/v1/dev-b/cmd/restart", b"from-a", qos=1)
        await op.client.publish("edge/v1/dev-b/cmd/ping", b"from-operator", qos=1)
        await b.wait_for(lambda ms: b"from-operator" in [m.payload for m in ms])
        assert payloads(b) == [b"from-operator"]

        # A does not read B's commands: a command for B, then one for A; A gets only its own.
        await op.client.publish("edge/v1/dev-b/cmd/info", b"for-b", qos=1)
        await op.client.publish("edge/v1/dev-a/cmd/info", b"for-a", qos=1)
        await a.wait_for(lambda ms: b"for-a" in [m.payload for m in ms])
        assert set(payloads(a)) == {b"for-a"}  # (twice: two of A's filters match)

        # A publishes its own telemetry and answers; it cannot spoof B's telemetry.
        await a.client.publish("edge/v1/dev-b/metrics", b"spoofed", qos=1)
        await a.client.publish("edge/v1/dev-a/cmd-res/x1", b"answer", qos=1)
        # A Response Topic naming B's answers cannot make A answer as B: the ACL, not the
        # device, confines where command answers go (docs/commands.md).
        await a.client.publish("edge/v1/dev-b/cmd-res/x2", b"steered", qos=1)
        await a.client.publish("edge/v1/dev-a/metrics", b"real", qos=1)
        await op.wait_for(lambda ms: [m for m in ms if m.topic == "edge/v1/dev-a/metrics"])
        seen = {(m.topic, m.payload) for m in op.messages}
        assert ("edge/v1/dev-a/cmd-res/x1", b"answer") in seen
        assert ("edge/v1/dev-b/metrics", b"spoofed") not in seen
        assert ("edge/v1/dev-b/cmd-res/x2", b"steered") not in seen
        # Devices cannot impersonate operators on the command topics of others, nor
        # publish commands to themselves (only operators write cmd/).
        await a.client.publish("edge/v1/dev-a/cmd/crash", b"self", qos=1)
        await op.client.publish("edge/v1/dev-a/cmd/ping", b"op-2", qos=1)
        await a.wait_for(lambda ms: b"op-2" in [m.payload for m in ms])
        assert b"self" not in payloads(a)


@pytest.mark.slow
async def test_a_certificate_from_another_ca_is_refused(
    tls_setup: tuple[Broker, DeviceCA], tmp_path: Path
) -> None:
    broker, _ = tls_setup
    rogue_dir = tmp_path / "rogue"
    rogue_dir.mkdir()
    rogue = DeviceCA(rogue_dir)
    cert, key = rogue.issue("dev-a")
    ctx = ssl.create_default_context(cafile=str(tls_setup[1].ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier="rogue", tls_context=ctx, timeout=2
        ):
            pass
