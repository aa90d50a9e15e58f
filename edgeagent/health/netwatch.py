"""Network and protocol health over time: probe rounds, the latest results, and their alerts.

`NetworkWatch` probes every configured STUN/TURN server, TLS endpoint and host
name, plus clock sync, once per interval; `LeakWatch` turns RSS samples into the
`memory_leak` alert. Both report alert state changes (never repeats) through an
`on_alert(name, state, severity, value, threshold, message, runbook)` callback.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from edgeagent.clock import Clock, SystemClock
from edgeagent.health import probes as p
from edgeagent.health.alerts import RUNBOOK_BASE
from edgeagent.health.system import RssTracker, Trend
from edgeagent.hw import net

logger = logging.getLogger(__name__)

FIRING = "firing"
RESOLVED = "resolved"

# Alert names are one topic level (`alerts/<name>`): the alert rules' pattern.
_NAME_MAX = 63
_UNSAFE = re.compile(r"[^a-z0-9_.-]+")


class AlertSink(Protocol):
    def __call__(
        self,
        name: str,
        state: str,
        severity: str,
        value: float | None,
        threshold: float | None,
        message: str,
        runbook: str | None,
    ) -> None: ...


@dataclass(frozen=True)
class Transition:
    name: str
    state: str  # firing | resolved
    severity: str  # info | warning | critical
    value: float | None
    threshold: float | None
    message: str
    runbook: str | None


class AlertLatch:
    """Which alerts fire and at what severity; `fire`/`resolve` return a change or None."""

    def __init__(self) -> None:
        self._firing: dict[str, str] = {}

    @property
    def firing(self) -> dict[str, str]:
        return dict(self._firing)

    def fire(
        self, name: str, severity: str, value: float | None, threshold: float | None, message: str
    ) -> Transition | None:
        """A firing change when the alert was not firing, or fires now at another severity."""
        if self._firing.get(name) == severity:
            return None
        self._firing[name] = severity
        return Transition(name, FIRING, severity, value, threshold, message, _runbook(name))

    def resolve(
        self, name: str, value: float | None, threshold: float | None, message: str
    ) -> Transition | None:
        severity = self._firing.pop(name, None)
        if severity is None:
            return None
        return Transition(name, RESOLVED, severity, value, threshold, message, _runbook(name))


def _runbook(name: str) -> str:
    return RUNBOOK_BASE + name.partition(".")[0]


def alert_name(kind: str, subject: str = "") -> str:
    """`kind.subject` folded to `[a-z0-9_.-]`, at most 63 characters (a hash keeps long
    names unique): e.g. `stun_unreachable.udp-127.0.0.1-3478`."""
    if not subject:
        return kind
    name = f"{kind}.{_UNSAFE.sub('-', subject.lower()).strip('-')}"
    if len(name) > _NAME_MAX:
        digest = hashlib.sha256(subject.encode()).hexdigest()[:8]
        name = f"{name[: _NAME_MAX - 9]}-{digest}"
    return name


def _valid_urls(urls: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for url in urls:
        try:
            p.parse_ice_url(url)
        except ValueError:
            logger.warning("netwatch: ignoring bad ICE server url %r", url)
            continue
        out.append(url)
    return tuple(out)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def server_key(url: str) -> str:
    """`udp:host:port`, `tcp:host:port` or `tls:host:port`: which server an alert is about."""
    try:
        u = p.parse_ice_url(url)
    except ValueError:
        return url
    return f"{'tls' if u.secure else u.transport}:{u.target}"


@dataclass(frozen=True)
class NetWatchSettings:
    """What to probe and when to alert. Secrets stay out of repr."""

    stun_urls: tuple[str, ...] = ()
    turn_urls: tuple[str, ...] = ()
    turn_username: str | None = None
    turn_password: str | None = field(default=None, repr=False)
    turn_relay_check: bool = True
    """After an authenticated Allocate, send data through the relay and back."""
    tls_endpoints: tuple[tuple[str, int], ...] = ()
    """Extra TLS endpoints whose certificate to watch (e.g. the mqtts broker)."""
    https_urls: tuple[str, ...] = ()
    dns_hosts: tuple[str, ...] = ()
    """Host names to resolve besides every name in the urls and endpoints above."""
    interval_s: float = 300.0
    timeout_s: float = 3.0
    fail_after: int = 2
    """Consecutive failed rounds before an unreachable/DNS alert fires (one success resolves)."""
    cert_warn_days: float = 30.0
    cert_crit_days: float = 7.0
    check_clock: bool = True
    timedatectl: str | None = "timedatectl"
    tls_ca_file: Path | None = None
    """CA bundle for verifying stuns:/turns: servers during probes (default: the system's)."""

    def tls_targets(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every TLS endpoint: stuns:/turns: urls, tls_endpoints, https urls."""
        out: list[tuple[str, int]] = []
        for url in (*self.stun_urls, *self.turn_urls):
            try:
                u = p.parse_ice_url(url)
            except ValueError:
                continue
            if u.secure:
                out.append((u.host, u.port))
        out.extend(self.tls_endpoints)
        for url in self.https_urls:
            parts = urlsplit(url)
            if parts.hostname:
                out.append((parts.hostname, parts.port or 443))
        return tuple(dict.fromkeys(out))

    def dns_targets(self) -> tuple[str, ...]:
        hosts: list[str] = list(self.dns_hosts)
        for url in (*self.stun_urls, *self.turn_urls):
            try:
                hosts.append(p.parse_ice_url(url).host)
            except ValueError:
                continue
        hosts.extend(h for h, _ in self.tls_targets())
        return tuple(dict.fromkeys(h for h in hosts if not _is_ip(h)))


CHECKS: tuple[str, ...] = ("stun", "turn", "tls", "dns", "clock")
"""Probe kinds, named as the diagnose command names its checks."""
_SECTION = {"stun": "stun", "turn": "turn", "certs": "tls", "dns": "dns", "clock_synced": "clock"}


@dataclass(frozen=True)
class NetworkHealth:
    """One probe round."""

    ts: float
    stun: tuple[p.ProbeResult, ...]
    turn: tuple[p.ProbeResult, ...]
    certs: tuple[p.CertResult, ...]
    dns: tuple[p.DnsResult, ...]
    clock_synced: bool | None

    def to_fields(self) -> dict[str, Any]:
        """The `network` object for metrics and the diagnose command."""
        return {
            "ts": self.ts,
            "stun": [r.to_fields() for r in self.stun],
            "turn": [r.to_fields() for r in self.turn],
            "certs": [c.to_fields(self.ts) for c in self.certs],
            "dns": [d.to_fields() for d in self.dns],
            "clock_synced": self.clock_synced,
        }


def _merge(old: NetworkHealth, new: NetworkHealth, wanted: frozenset[str]) -> NetworkHealth:
    """The latest results: `new` for the kinds just probed, `old` for the rest."""
    return NetworkHealth(
        ts=new.ts,
        stun=new.stun if "stun" in wanted else old.stun,
        turn=new.turn if "turn" in wanted else old.turn,
        certs=new.certs if "tls" in wanted else old.certs,
        dns=new.dns if "dns" in wanted else old.dns,
        clock_synced=new.clock_synced if "clock" in wanted else old.clock_synced,
    )


class NetworkWatch:
    """Periodic network/protocol probes, the latest `NetworkHealth`, and alert changes."""

    def __init__(
        self,
        settings: NetWatchSettings,
        on_alert: AlertSink,
        *,
        clock: Clock | None = None,
        clock_status: Callable[[], bool | None] | None = None,
    ) -> None:
        self._s = settings
        self._on_alert = on_alert
        self._clock = clock or SystemClock()
        self._clock_status = clock_status or (lambda: net.clock_synchronized(settings.timedatectl))
        self._latch = AlertLatch()
        self._fails: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._latest: NetworkHealth | None = None
        self._stun_urls = _valid_urls(settings.stun_urls)
        self._turn_urls = _valid_urls(settings.turn_urls)
        self._ssl: ssl.SSLContext | None = None
        if any(p.parse_ice_url(u).secure for u in (*self._stun_urls, *self._turn_urls)):
            cafile = str(settings.tls_ca_file) if settings.tls_ca_file else None
            self._ssl = ssl.create_default_context(cafile=cafile)

    @property
    def latest(self) -> NetworkHealth | None:
        return self._latest

    @property
    def firing(self) -> dict[str, str]:
        """Alert name -> severity of every alert firing now."""
        return self._latch.firing

    def metrics_fields(self) -> dict[str, Any] | None:
        return None if self._latest is None else self._latest.to_fields()

    async def run(self) -> None:
        """Probe every interval until cancelled."""
        logger.info(
            "netwatch: probing %d STUN, %d TURN, %d TLS, %d DNS every %.0f s",
            len(self._s.stun_urls),
            len(self._s.turn_urls),
            len(self._s.tls_targets()),
            len(self._s.dns_targets()),
            self._s.interval_s,
        )
        try:
            while True:
                await self.probe_all()
                await self._clock.sleep(self._s.interval_s)
        finally:
            logger.debug("netwatch: stopped")

    def clock_synced(self) -> bool | None:
        """Clock sync as of the last round that checked it; None when unknown."""
        return None if self._latest is None else self._latest.clock_synced

    async def probe_all(self, checks: Iterable[str] | None = None) -> dict[str, Any]:
        """Run a round now (for diagnose too), update alerts, return the results.

        `checks` limits it to some of `CHECKS`; the sections not probed keep their
        previous results in `latest` and are left out of the returned dict.
        """
        wanted = frozenset(CHECKS if checks is None else checks) & frozenset(CHECKS)
        async with self._lock:
            start = self._clock.monotonic()
            fresh = await self._round(wanted)
            for change in self._evaluate(fresh):
                self._emit(change)
            self._latest = fresh if self._latest is None else _merge(self._latest, fresh, wanted)
            fields = {
                k: v for k, v in fresh.to_fields().items() if k == "ts" or _SECTION[k] in wanted
            }
            fields["elapsed_ms"] = round((self._clock.monotonic() - start) * 1000.0, 1)
            fields["alerts"] = self._latch.firing
            return fields

    async def _round(self, wanted: frozenset[str]) -> NetworkHealth:
        s = self._s
        t = s.timeout_s

        async def nothing() -> None:
            return None

        stun = [
            net.stun_probe(u, timeout_s=t, ssl_context=self._ssl)
            for u in self._stun_urls
            if "stun" in wanted
        ]
        turn = [
            net.turn_probe(
                u,
                username=s.turn_username,
                password=s.turn_password,
                timeout_s=t,
                ssl_context=self._ssl,
                relay_check=s.turn_relay_check,
            )
            for u in self._turn_urls
            if "turn" in wanted
        ]
        certs = [
            net.fetch_certificate(h, port, timeout_s=t)
            for h, port in s.tls_targets()
            if "tls" in wanted
        ]
        dns = [net.resolve(h, timeout_s=t) for h in s.dns_targets() if "dns" in wanted]
        check_clock = s.check_clock and "clock" in wanted
        stun_r, turn_r, cert_r, dns_r, synced = await asyncio.gather(
            asyncio.gather(*stun),
            asyncio.gather(*turn),
            asyncio.gather(*certs),
            asyncio.gather(*dns),
            asyncio.to_thread(self._clock_status) if check_clock else nothing(),
        )
        return NetworkHealth(
            ts=self._clock.time(),
            stun=tuple(stun_r),
            turn=tuple(turn_r),
            certs=tuple(cert_r),
            dns=tuple(dns_r),
            clock_synced=synced,
        )

    def _emit(self, c: Transition) -> None:
        level = logging.WARNING if c.state == FIRING else logging.INFO
        logger.log(level, "netwatch: alert %s %s (%s): %s", c.name, c.state, c.severity, c.message)
        self._on_alert(c.name, c.state, c.severity, c.value, c.threshold, c.message, c.runbook)

    # --- rules ---------------------------------------------------------------------------

    def _count(self, name: str, failed: bool) -> int:
        n = self._fails.get(name, 0) + 1 if failed else 0
        self._fails[name] = n
        return n

    def _evaluate(self, h: NetworkHealth) -> list[Transition]:
        out: list[Transition | None] = []
        for i, r in enumerate(h.stun):
            out.extend(self._reachability("stun_unreachable", "STUN", r, first=i == 0))
        for i, r in enumerate(h.turn):
            out.extend(self._reachability("turn_unreachable", "TURN", r, first=i == 0))
            name = alert_name("turn_auth_failed", server_key(r.url))
            n = self._count(name, r.status is p.ProbeStatus.AUTH_FAILED)
            if r.status is p.ProbeStatus.AUTH_FAILED:
                # A definite answer, not a lost packet: no need to wait for a second one.
                msg = f"TURN server {r.target} refused the credentials: {r.detail}"
                out.append(self._latch.fire(name, "critical", float(n), 1.0, msg))
            elif r.status in (p.ProbeStatus.OK, p.ProbeStatus.RELAY_FAILED):
                msg = f"TURN server {r.target} accepts the credentials again"
                out.append(self._latch.resolve(name, 0.0, 1.0, msg))
            out.extend(self._relay(r, first=i == 0))
        for c in h.certs:
            out.extend(self._cert(c, h.ts))
        for d in h.dns:
            name = alert_name("dns_failure", d.host)
            n = self._count(name, not d.ok)
            threshold = float(self._s.fail_after)
            if not d.ok and n >= self._s.fail_after:
                msg = f"cannot resolve {d.host} ({n} tries): {d.error or 'no addresses'}"
                out.append(self._latch.fire(name, "warning", float(n), threshold, msg))
            elif d.ok:
                msg = f"{d.host} resolves again ({d.elapsed_ms or 0:.0f} ms)"
                out.append(self._latch.resolve(name, 0.0, threshold, msg))
        if h.clock_synced is False:
            msg = "system clock is not NTP-synchronised"
            out.append(self._latch.fire("clock_unsynced", "warning", 0.0, 1.0, msg))
        elif h.clock_synced is True:
            msg = "system clock is NTP-synchronised"
            out.append(self._latch.resolve("clock_unsynced", 1.0, 1.0, msg))
        return [c for c in out if c is not None]

    def _relay(self, r: p.ProbeResult, *, first: bool) -> list[Transition | None]:
        """`turn_relay_failed`: allocations succeed, but data sent through one does not
        come back (relay ports blocked, a relay-ip the server cannot use): every relayed
        call would fail while the reachability and credential alerts stay quiet."""
        name = alert_name("turn_relay_failed", server_key(r.url))
        failed = r.status is p.ProbeStatus.RELAY_FAILED
        n = self._count(name, failed)
        threshold = float(self._s.fail_after)
        if failed and n >= self._s.fail_after:
            severity = "critical" if first else "warning"
            msg = f"TURN server {r.target} allocates but does not relay ({n} probes): {r.detail}"
            return [self._latch.fire(name, severity, float(n), threshold, msg)]
        if r.status is p.ProbeStatus.OK and r.relay_rtt_ms is not None:
            msg = f"TURN server {r.target} relays again (loop {r.relay_rtt_ms:.1f} ms)"
            return [self._latch.resolve(name, 0.0, threshold, msg)]
        return []

    def _reachability(
        self, kind: str, label: str, r: p.ProbeResult, *, first: bool
    ) -> list[Transition | None]:
        name = alert_name(kind, server_key(r.url))
        # An auth failure proves the server answers: that is the other alert's business.
        down = r.status in (p.ProbeStatus.UNREACHABLE, p.ProbeStatus.ERROR)
        n = self._count(name, down)
        threshold = float(self._s.fail_after)
        if down and n >= self._s.fail_after:
            # aiortc/aioice use only the first STUN and the first TURN url: those are critical.
            severity = "critical" if first else "warning"
            msg = f"{label} server {r.target} unreachable ({n} probes): {r.detail}"
            return [self._latch.fire(name, severity, float(n), threshold, msg)]
        if not down:
            rtt = f"{r.rtt_ms:.1f} ms" if r.rtt_ms is not None else "n/a"
            msg = f"{label} server {r.target} reachable again (rtt {rtt})"
            return [self._latch.resolve(name, 0.0, threshold, msg)]
        return []

    def _cert(self, c: p.CertResult, now: float) -> list[Transition | None]:
        days = c.days_left(now)
        if days is None:
            return []  # unknown this round (unreachable): keep whatever state we had
        s = self._s
        expiring = alert_name("cert_expiring", c.endpoint)
        expired = alert_name("cert_expired", c.endpoint)
        state = p.classify_cert(days, warn_days=s.cert_warn_days, crit_days=s.cert_crit_days)
        value = round(days, 2)
        if state is p.CertState.EXPIRED:
            msg = f"certificate of {c.endpoint} ({c.subject}) expired {-days:.1f} days ago"
            return [
                self._latch.resolve(expiring, value, 0.0, f"certificate of {c.endpoint} expired"),
                self._latch.fire(expired, "critical", value, 0.0, msg),
            ]
        out = [self._latch.resolve(expired, value, 0.0, f"certificate of {c.endpoint} renewed")]
        if state is p.CertState.OK:
            msg = f"certificate of {c.endpoint} valid for {days:.0f} more days"
            out.append(self._latch.resolve(expiring, value, s.cert_warn_days, msg))
            return out
        critical = state is p.CertState.EXPIRING_SOON
        threshold = s.cert_crit_days if critical else s.cert_warn_days
        msg = f"certificate of {c.endpoint} ({c.subject}) expires in {days:.1f} days"
        out.append(
            self._latch.fire(expiring, "critical" if critical else "warning", value, threshold, msg)
        )
        return out


class LeakWatch:
    """The `memory_leak` alert from RSS samples: a steady regression slope over a window.

    Fires when the window spans at least `min_span_s`, RSS grows at least
    `min_slope_mib_per_h` and the line fits (r² >= `min_r2`, so a single step such
    as a call's allocations does not count); resolves when the slope falls below
    `resolve_slope_mib_per_h` (half the firing slope by default).
    """

    NAME = "memory_leak"

    def __init__(
        self,
        on_alert: AlertSink,
        *,
        window_s: float = 6 * 3600.0,
        min_span_s: float = 2 * 3600.0,
        min_slope_mib_per_h: float = 4.0,
        min_r2: float = 0.8,
        resolve_slope_mib_per_h: float | None = None,
        max_samples: int = 1024,
    ) -> None:
        self._on_alert = on_alert
        self._tracker = RssTracker(window_s=window_s, max_samples=max_samples)
        self._min_span_s = min_span_s
        self._min_slope = min_slope_mib_per_h
        self._min_r2 = min_r2
        self._resolve_slope = (
            min_slope_mib_per_h / 2 if resolve_slope_mib_per_h is None else resolve_slope_mib_per_h
        )
        self._latch = AlertLatch()

    @property
    def firing(self) -> bool:
        return self.NAME in self._latch.firing

    def trend(self) -> Trend:
        return self._tracker.trend()

    def observe(self, ts: float, rss_mb: float | None) -> None:
        """Add one sample (monotonic seconds, MiB) and emit a change if the verdict flips."""
        if rss_mb is None:
            return
        self._tracker.add(ts, rss_mb)
        trend = self._tracker.trend()
        if trend.span_s < self._min_span_s:
            return
        slope = round(trend.slope_mib_per_h, 2)
        detail = f"{slope:.1f} MiB/h over {trend.span_s / 3600:.1f} h (r² {trend.r2:.2f})"
        change: Transition | None = None
        if self._tracker.leak_suspected(
            min_span_s=self._min_span_s, min_slope_mib_per_h=self._min_slope, min_r2=self._min_r2
        ):
            msg = f"RSS grows {detail}, now {rss_mb:.0f} MiB"
            change = self._latch.fire(self.NAME, "warning", slope, self._min_slope, msg)
        elif trend.slope_mib_per_h < self._resolve_slope:
            msg = f"RSS stable: {detail}, now {rss_mb:.0f} MiB"
            change = self._latch.resolve(self.NAME, slope, self._min_slope, msg)
        if change is not None:
            level = logging.WARNING if change.state == FIRING else logging.INFO
            logger.log(level, "leakwatch: %s %s: %s", change.name, change.state, change.message)
            self._on_alert(
                change.name,
                change.state,
                change.severity,
                change.value,
                change.threshold,
                change.message,
                change.runbook,
            )
