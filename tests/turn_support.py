"""A real coturn on loopback for tests: config per testbed.md, optional TLS with a chosen expiry.

Import the fixture into a test module's namespace (`from turn_support import turn`)
or build `Coturn` yourself for variants (TLS certificates, several servers at once).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import wait_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeagent.health import probes

TURN_USER = "edge"
TURN_PASSWORD = "s3cret-pass"
TURN_REALM = "edge.test"
STEADY_S = 0.06


def free_port() -> int:
    """A loopback port free for both TCP and UDP right now (coturn listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def make_self_signed(
    directory: Path,
    *,
    not_after: dt.datetime,
    not_before: dt.datetime | None = None,
    common_name: str = "turn.edge.test",
    stem: str = "turn",
) -> tuple[Path, Path]:
    """Write a self-signed EC certificate and key (PEM); returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = not_before or min(not_after, dt.datetime.now(dt.UTC)) - dt.timedelta(days=30)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(common_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def stun_ping(port: int, timeout: float = 0.2) -> bool:
    """One blocking STUN Binding over UDP to 127.0.0.1:port; True when a response came."""
    txid = probes.new_transaction_id()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(("127.0.0.1", port))
            s.send(probes.binding_request(txid))
            data = s.recv(2048)
        except OSError:
            return False
    try:
        return probes.decode_message(data).transaction_id == txid
    except probes.StunParseError:
        return False


@dataclass
class Coturn:
    """`turnserver -c FILE` in the foreground; `stop`/`start` simulate an outage on one port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    tls_port: int | None = None
    cert: Path | None = None
    pkey: Path | None = None
    user: str = TURN_USER
    password: str = TURN_PASSWORD
    realm: str = TURN_REALM
    extra: tuple[str, ...] = ()  # more turnserver.conf lines
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A small relay range at a random spot keeps parallel coturns out of each other's way.
        self.min_port = random.randrange(49200, 65000, 50)
        self.max_port = self.min_port + 40
        self.conf = self.workdir / "turnserver.conf"
        self.log = self.workdir / "turnserver.log"
        self.conf.write_text(self._config())

    def _config(self) -> str:
        lines = [
            "listening-ip=127.0.0.1",
            "relay-ip=127.0.0.1",
            f"listening-port={self.port}",
            f"min-port={self.min_port}",
            f"max-port={self.max_port}",
            "lt-cred-mech",
            f"user={self.user}:{self.password}",
            f"realm={self.realm}",
            "no-dtls",
            "no-cli",
            "allow-loopback-peers",
            "fingerprint",
            "log-file=stdout",
            "simple-log",
            f"userdb={self.workdir / 'turndb'}",
            f"pidfile={self.workdir / 'turnserver.pid'}",
        ]
        lines += self.extra
        if self.tls_port is None:
            lines.append("no-tls")
        else:
            assert self.cert is not None and self.pkey is not None
            lines += [
                f"tls-listening-port={self.tls_port}",
                f"cert={self.cert}",
                f"pkey={self.pkey}",
                # coturn also opens alt ports (+1) by default; keep them from clashing.
                f"alt-listening-port={free_port()}",
                f"alt-tls-listening-port={free_port()}",
            ]
        return "\n".join(lines) + "\n"

    @property
    def stun_url(self) -> str:
        return f"stun:127.0.0.1:{self.port}"

    def turn_url(self, transport: str = "udp") -> str:
        return f"turn:127.0.0.1:{self.port}?transport={transport}"

    @property
    def turns_url(self) -> str:
        assert self.tls_port is not None
        return f"turns:127.0.0.1:{self.tls_port}?transport=tcp"

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("turnserver") or "/usr/bin/turnserver"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        # coturn sometimes answers one Binding within its first few ms and then refuses
        # for ~20 ms while its per-CPU UDP listeners come up: ready means answering
        # without a break for STEADY_S.
        steady_since: float | None = None
        while steady_since is None or time.monotonic() - steady_since < STEADY_S:
            if stun_ping(self.port):
                steady_since = steady_since or time.monotonic()
                time.sleep(0.002)
                continue
            steady_since = None
            if self.proc.poll() is not None:
                raise RuntimeError(f"turnserver exited: {self.log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"coturn did not answer STUN on 127.0.0.1:{self.port}")
        if self.tls_port is not None:
            wait_port(self.tls_port, timeout)
        if self.proc.poll() is not None:  # the answer came from someone else's server
            raise RuntimeError(f"turnserver exited: {self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None


@pytest.fixture(scope="module")
def turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """A plain (no TLS) coturn for a whole test module, credentials TURN_USER/TURN_PASSWORD."""
    server = Coturn(tmp_path_factory.mktemp("coturn"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
