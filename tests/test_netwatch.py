"""NetworkWatch against real coturn servers (plain and TLS), and LeakWatch on synthetic RSS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from turn_support import TURN_PASSWORD, TURN_USER, Coturn, free_port, make_self_signed, turn

from edgeagent.health import probes as p
from edgeagent.health.alerts import NAME_PATTERN
from edgeagent.health.netwatch import (
    AlertLatch,
    LeakWatch,
    NetWatchSettings,
    NetworkWatch,
    alert_name,
    server_key,
)

__all__ = ["turn"]  # the module-scoped coturn fixture, used by name below


@dataclass(frozen=True)
class Call:
    name: str
    state: str
    severity: str
    value: float | None
    threshold: float | None
    message: str
    runbook: str | None


@dataclass
class Alerts:
    """The on_alert callback: records every change and lets a test await a condition."""

    calls: list[Call] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(
        self,
        name: str,
        state: str,
        severity: str,
        value: float | None,
        threshold: float | None,
        message: str,
        runbook: str | None,
    ) -> None:
        self.calls.append(Call(name, state, severity, value, threshold, message, runbook))
        self._changed.set()

    def states(self, name: str) -> list[str]:
        return [c.state for c in self.calls if c.name == name]

    def last(self, name: str) -> Call:
        return [c for c in self.calls if c.name == name][-1]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- pure parts --------------------------------------------------------------------------


def test_alert_latch_reports_changes_only() -> None:
    latch = AlertLatch()
    first = latch.fire("cert_expiring.h-1", "warning", 10.0, 30.0, "m")
    assert first is not None and (first.state, first.severity) == ("firing", "warning")
    assert first.runbook == "https://runbooks.example/edgeagent/cert_expiring"
    assert latch.fire("cert_expiring.h-1", "warning", 9.0, 30.0, "m") is None
    escalated = latch.fire("cert_expiring.h-1", "critical", 6.0, 7.0, "m")
    assert escalated is not None and escalated.severity == "critical"
    resolved = latch.resolve("cert_expiring.h-1", 90.0, 30.0, "renewed")
    assert resolved is not None and (resolved.state, resolved.severity) == ("resolved", "critical")
    assert latch.resolve("cert_expiring.h-1", 90.0, 30.0, "renewed") is None
    assert latch.resolve("never_fired", None, None, "m") is None
    assert latch.firing == {}


def test_settings_derive_tls_and_dns_targets() -> None:
    s = NetWatchSettings(
        stun_urls=("stun:stun.example.org", "stun:192.0.2.7:3478"),
        turn_urls=("turns:turn.example.org?transport=tcp", "turn:turn.example.org:3478"),
        turn_username="u",
        turn_password="very-secret",
        tls_endpoints=(("broker.example.org", 8883),),
        https_urls=("https://api.example.org/health", "https://h.example.org:8443/"),
    )
    assert s.tls_targets() == (
        ("turn.example.org", 5349),
        ("broker.example.org", 8883),
        ("api.example.org", 443),
        ("h.example.org", 8443),
    )
    assert s.dns_targets() == (
        "stun.example.org",
        "turn.example.org",
        "broker.example.org",
        "api.example.org",
        "h.example.org",
    )
    assert "very-secret" not in repr(s)
    assert NetWatchSettings(dns_hosts=("a", "a", "b")).dns_targets() == ("a", "b")


def test_alert_names_are_one_safe_topic_level() -> None:
    assert alert_name("clock_unsynced") == "clock_unsynced"
    assert alert_name("stun_unreachable", "udp:[2001:DB8::1]:3478") == (
        "stun_unreachable.udp-2001-db8-1-3478"
    )
    long_a = alert_name("cert_expiring", "a" * 80 + ".example.org:443")
    long_b = alert_name("cert_expiring", "a" * 80 + ".example.net:443")
    assert len(long_a) == 63 and long_a != long_b
    assert re.fullmatch(NAME_PATTERN, long_a)


def test_server_key_names_transport() -> None:
    assert server_key("stun:127.0.0.1:3478") == "udp:127.0.0.1:3478"
    assert server_key("turn:h:1?transport=tcp") == "tcp:h:1"
    assert server_key("turns:h") == "tls:h:5349"


async def test_dns_failure_fires_after_consecutive_failures() -> None:
    alerts = Alerts()
    watch = NetworkWatch(
        NetWatchSettings(dns_hosts=("localhost", "nonexistent.invalid"), check_clock=False),
        alerts,
    )
    first = await watch.probe_all()
    assert alerts.calls == []  # one failure is not yet an alert (fail_after=2)
    dns = {d["host"]: d for d in first["dns"]}
    assert dns["localhost"]["ok"] and "127.0.0.1" in dns["localhost"]["addresses"]
    assert dns["localhost"]["elapsed_ms"] >= 0
    assert not dns["nonexistent.invalid"]["ok"]
    second = await watch.probe_all()
    assert [(c.name, c.state, c.severity) for c in alerts.calls] == [
        ("dns_failure.nonexistent.invalid", "firing", "warning")
    ]
    assert second["alerts"] == {"dns_failure.nonexistent.invalid": "warning"}


async def test_clock_unsynced_fires_and_resolves() -> None:
    readings = iter([None, False, False, True, None])
    alerts = Alerts()
    watch = NetworkWatch(NetWatchSettings(), alerts, clock_status=lambda: next(readings))
    seen = []
    for _ in range(5):
        fields = await watch.probe_all()
        seen.append(fields["clock_synced"])
    assert seen == [None, False, False, True, None]
    assert [(c.name, c.state) for c in alerts.calls] == [
        ("clock_unsynced", "firing"),
        ("clock_unsynced", "resolved"),
    ]


async def test_partial_round_probes_only_the_asked_checks() -> None:
    readings = iter([False, True])
    alerts = Alerts()
    watch = NetworkWatch(
        NetWatchSettings(dns_hosts=("localhost",)), alerts, clock_status=lambda: next(readings)
    )
    full = await watch.probe_all()
    assert set(full) == {
        "ts",
        "stun",
        "turn",
        "certs",
        "dns",
        "clock_synced",
        "elapsed_ms",
        "alerts",
    }
    assert watch.clock_synced() is False
    dns_only = await watch.probe_all(["dns"])
    assert set(dns_only) == {"ts", "dns", "elapsed_ms", "alerts"}
    assert watch.clock_synced() is False  # kept from the full round; the clock was not asked
    assert dns_only["alerts"] == {"clock_unsynced": "warning"}
    await watch.probe_all(["clock"])
    assert watch.clock_synced() is True
    assert alerts.states("clock_unsynced") == ["firing", "resolved"]
    latest = watch.latest
    assert latest is not None and latest.dns[0].host == "localhost"


# --- STUN/TURN against coturn ------------------------------------------------------------


@pytest.mark.turn
async def test_stun_turn_alerts_fire_and_resolve_across_coturn_restart(tmp_path: Path) -> None:
    server = Coturn(tmp_path / "coturn")
    server.start()
    alerts = Alerts()
    watch = NetworkWatch(
        NetWatchSettings(
            stun_urls=(server.stun_url,),
            turn_urls=(server.turn_url("udp"), server.turn_url("tcp")),
            turn_username=TURN_USER,
            turn_password=TURN_PASSWORD,
            interval_s=0.05,
            timeout_s=0.5,
            fail_after=2,
            check_clock=False,
        ),
        alerts,
    )
    stun = f"stun_unreachable.udp-127.0.0.1-{server.port}"
    turn_udp = f"turn_unreachable.udp-127.0.0.1-{server.port}"
    turn_tcp = f"turn_unreachable.tcp-127.0.0.1-{server.port}"
    names = (stun, turn_udp, turn_tcp)
    task: asyncio.Task[None] | None = None
    try:
        baseline = await watch.probe_all()
        assert baseline["alerts"] == {}
        assert baseline["stun"][0]["status"] == "ok"
        assert baseline["stun"][0]["mapped"].startswith("127.0.0.1:")
        assert baseline["stun"][0]["rtt_ms"] >= 0
        assert [t["authenticated"] for t in baseline["turn"]] == [True, True]
        assert all(t["relayed"].startswith("127.0.0.1:") for t in baseline["turn"])

        task = asyncio.create_task(watch.run())
        server.stop()
        await alerts.wait_for(lambda: all(alerts.states(n) == ["firing"] for n in names))
        # aioice uses only the first STUN and the first TURN url: those are critical.
        assert [alerts.last(n).severity for n in names] == ["critical", "critical", "warning"]
        assert alerts.last(stun).threshold == 2.0
        assert alerts.last(stun).runbook
        latest = watch.latest
        assert latest is not None and latest.stun[0].status is p.ProbeStatus.UNREACHABLE

        server.start()
        await alerts.wait_for(
            lambda: all(alerts.states(n) == ["firing", "resolved"] for n in names)
        )
        assert "reachable again" in alerts.last(stun).message
        assert watch.firing == {}
        assert {c.name for c in alerts.calls} == set(names)  # nothing else fired
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server.stop()


@pytest.mark.turn
async def test_wrong_turn_password_is_an_auth_alert_not_unreachable(turn: Coturn) -> None:
    alerts = Alerts()
    watch = NetworkWatch(
        NetWatchSettings(
            turn_urls=(turn.turn_url(),),
            turn_username=TURN_USER,
            turn_password="wrong",
            fail_after=1,
            check_clock=False,
        ),
        alerts,
    )
    fields = await watch.probe_all()
    assert fields["turn"][0]["status"] == "auth_failed"
    assert [(c.name, c.state, c.severity) for c in alerts.calls] == [
        (f"turn_auth_failed.udp-127.0.0.1-{turn.port}", "firing", "critical")
    ]


@pytest.mark.turn
async def test_a_turn_server_that_allocates_but_will_not_relay_fires_relay_failed(
    tmp_path: Path,
) -> None:
    """coturn with its own relay address denied as a peer: Allocate succeeds, the relay
    loop's CreatePermission is refused (403). Then the same server without the rule."""
    blocked = Coturn(tmp_path / "blocked", extra=("denied-peer-ip=127.0.0.1",))
    blocked.start()
    alerts = Alerts()
    watch = NetworkWatch(
        NetWatchSettings(
            turn_urls=(blocked.turn_url(),),
            turn_username=TURN_USER,
            turn_password=TURN_PASSWORD,
            timeout_s=2.0,
            fail_after=2,
            check_clock=False,
        ),
        alerts,
    )
    name = f"turn_relay_failed.udp-127.0.0.1-{blocked.port}"
    try:
        first = await watch.probe_all()
        assert first["turn"][0]["status"] == "relay_failed"
        assert first["turn"][0]["authenticated"] is True and first["alerts"] == {}
        assert "CreatePermission refused: 403" in first["turn"][0]["detail"]
        second = await watch.probe_all()  # fail_after = 2
        assert name in second["alerts"]
        assert [(c.name, c.state, c.severity) for c in alerts.calls] == [
            (name, "firing", "critical")
        ]  # not unreachable, not the credentials
        assert "allocates but does not relay (2 probes)" in alerts.last(name).message
    finally:
        blocked.stop()
    fixed = Coturn(tmp_path / "fixed", port=blocked.port)
    fixed.start()
    try:
        again = await watch.probe_all()
    finally:
        fixed.stop()
    assert again["turn"][0]["status"] == "ok" and again["turn"][0]["relay_rtt_ms"] >= 0
    assert alerts.states(name) == ["firing", "resolved"]
    assert "relays again" in alerts.last(name).message


# --- certificates ------------------------------------------------------------------------


@dataclass
class TlsServers:
    by_days: dict[int, Coturn]
    ca_bundle: Path


@pytest.fixture(scope="module")
def tls_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServers]:
    """Four TLS coturns whose certificates expire in 60, 10 and 3 days, and 2 days ago."""
    root = tmp_path_factory.mktemp("tls-coturn")
    servers: dict[int, Coturn] = {}
    pems: list[bytes] = []
    try:
        for days in (60, 10, 3, -2):
            # Distinct subjects: in one CA bundle, OpenSSL picks the issuer by name.
            cert, key = make_self_signed(
                root,
                not_after=now_utc() + dt.timedelta(days=days),
                stem=f"days{days}",
                common_name=f"turn-{days}.edge.test",
            )
            pems.append(cert.read_bytes())
            server = Coturn(root / f"s{days}", tls_port=free_port(), cert=cert, pkey=key)
            server.start()
            servers[days] = server
        bundle = root / "ca-bundle.pem"
        bundle.write_bytes(b"".join(pems))
        yield TlsServers(servers, bundle)
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.turn
async def test_certificate_expiry_alerts(tls_servers: TlsServers) -> None:
    s = tls_servers.by_days
    alerts = Alerts()
    watch = NetworkWatch(
        NetWatchSettings(
            turn_urls=(s[10].turns_url, s[-2].turns_url),
            turn_username=TURN_USER,
            turn_password=TURN_PASSWORD,
            tls_endpoints=(("127.0.0.1", s[60].tls_port), ("127.0.0.1", s[3].tls_port)),
            tls_ca_file=tls_servers.ca_bundle,
            fail_after=1,
            check_clock=False,
        ),
        alerts,
    )
    fields = await watch.probe_all()

    def ep(days: int) -> str:
        return f"127.0.0.1:{s[days].tls_port}"

    assert fields["alerts"] == {
        alert_name("cert_expiring", ep(10)): "warning",
        alert_name("cert_expiring", ep(3)): "critical",
        alert_name("cert_expired", ep(-2)): "critical",
        # The postmortem's outage: clients refuse TLS to the expired server
        # (a warning only because it is the second TURN url, which aioice never uses).
        alert_name("turn_unreachable", "tls:" + ep(-2)): "warning",
    }
    ten = alerts.last(alert_name("cert_expiring", ep(10)))
    assert ten.value is not None and 9.9 < ten.value <= 10.0 and ten.threshold == 30.0
    three = alerts.last(alert_name("cert_expiring", ep(3)))
    assert three.value is not None and 2.9 < three.value <= 3.0 and three.threshold == 7.0
    expired = alerts.last(alert_name("cert_expired", ep(-2)))
    assert expired.value is not None and -2.1 < expired.value < -1.9
    assert "expired" in alerts.last(alert_name("turn_unreachable", "tls:" + ep(-2))).message
    certs = {c["endpoint"]: c for c in fields["certs"]}
    assert set(certs) == {ep(60), ep(10), ep(3), ep(-2)}
    assert 59.9 < certs[ep(60)]["days_left"] <= 60
    assert certs[ep(10)]["subject"] == "CN=turn-10.edge.test"
    turns_ok = fields["turn"][0]
    assert (turns_ok["status"], turns_ok["authenticated"]) == ("ok", True)


@pytest.mark.turn
async def test_certificate_renewal_escalates_then_resolves(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path, not_after=now_utc() + dt.timedelta(days=3))
    server = Coturn(tmp_path / "coturn", tls_port=free_port(), cert=cert, pkey=key)
    server.start()
    alerts = Alerts()
    watch = NetworkWatch(
        NetWatchSettings(tls_endpoints=(("127.0.0.1", server.tls_port),), check_clock=False),
        alerts,
    )
    name = f"cert_expiring.127.0.0.1-{server.tls_port}"
    try:
        await watch.probe_all()
        for days in (20, 90):  # renewed badly (still inside 30 days), then properly
            server.stop()
            make_self_signed(tmp_path, not_after=now_utc() + dt.timedelta(days=days))
            server.start()
            await watch.probe_all()
    finally:
        server.stop()
    assert [(c.state, c.severity) for c in alerts.calls if c.name == name] == [
        ("firing", "critical"),
        ("firing", "warning"),
        ("resolved", "warning"),
    ]
    assert [c.name for c in alerts.calls] == [name] * 3


async def test_unreachable_tls_endpoint_keeps_cert_state_unknown() -> None:
    alerts = Alerts()
    watch = NetworkWatch(
        NetWatchSettings(tls_endpoints=(("127.0.0.1", free_port()),), check_clock=False),
        alerts,
    )
    fields = await watch.probe_all()
    assert fields["certs"][0]["error"]
    assert alerts.calls == []


# --- memory leak -------------------------------------------------------------------------


def rss_series(
    hours: float,
    slope_mib_per_h: float,
    *,
    noise_mib: float,
    start_h: float = 0.0,
    base: float = 80.0,
) -> list[tuple[float, float]]:
    """Samples every 30 s (the heartbeat) with gaussian noise, from a seeded generator."""
    rng = random.Random(int(hours * 1000 + slope_mib_per_h * 10 + start_h))
    n = int(hours * 120)
    return [
        (
            (start_h + i / 120) * 3600,
            base + slope_mib_per_h * i / 120 + rng.gauss(0, noise_mib),
        )
        for i in range(n)
    ]


def test_leak_watch_fires_on_steady_growth() -> None:
    alerts = Alerts()
    leak = LeakWatch(alerts)
    for ts, rss in rss_series(3, 30, noise_mib=2.0):
        leak.observe(ts, rss)
    assert [(c.name, c.state, c.severity) for c in alerts.calls] == [
        ("memory_leak", "firing", "warning")
    ]
    fired = alerts.calls[0]
    assert fired.value is not None and 25 < fired.value < 35
    assert fired.threshold == 4.0
    assert leak.firing
    # Not before the window spans the minimum 2 h.
    first = LeakWatch(Alerts())
    for ts, rss in rss_series(1.9, 30, noise_mib=2.0):
        first.observe(ts, rss)
    assert not first.firing


def test_leak_watch_ignores_a_flat_noisy_series_and_a_single_step() -> None:
    alerts = Alerts()
    leak = LeakWatch(alerts)
    for ts, rss in rss_series(8, 0, noise_mib=3.0):
        leak.observe(ts, rss)
    # One call's allocations: a 30 MiB step that stays, in an otherwise flat series.
    for ts, rss in rss_series(8, 0, noise_mib=1.0, start_h=8):
        leak.observe(ts, rss + 30)
    leak.observe(16 * 3600, None)  # an unreadable sample is skipped
    assert alerts.calls == []
    assert abs(leak.trend().slope_mib_per_h) < 1.0


def test_leak_watch_resolves_when_growth_stops() -> None:
    alerts = Alerts()
    leak = LeakWatch(alerts)
    for ts, rss in rss_series(3, 30, noise_mib=2.0):
        leak.observe(ts, rss)
    assert alerts.states("memory_leak") == ["firing"]
    plateau = 80 + 30 * 3
    for ts, rss in rss_series(7, 0, noise_mib=2.0, start_h=3):
        leak.observe(ts, rss + plateau - 80)
    assert alerts.states("memory_leak") == ["firing", "resolved"]
    assert not leak.firing
    resolved = alerts.last("memory_leak")
    assert resolved.value is not None and resolved.value < 2.0
