"""The composition root: builds every component from the config and runs them in one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from edgeagent import __version__
from edgeagent.clock import Clock, SystemClock
from edgeagent.config import Config, config_hash
from edgeagent.events import BrokerConnected, BrokerDisconnected, EventBus, HealthChanged, Noted
from edgeagent.health.state import HealthState
from edgeagent.health.watchdog import Watchdog
from edgeagent.hw import systemd
from edgeagent.hw.leds import HealthLeds, RgbLedPins, ThreeLedPins
from edgeagent.hw.system import SystemReader, boot_id
from edgeagent.mqtt import BrokerLink, SessionCounter
from edgeagent.telemetry import payloads as p
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, CrumbLogHandler, LogRing
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.topics import Topics

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 3.0


class _Stopped(Exception):
    """Raised inside the TaskGroup to end it after a clean stop."""


@dataclass
class CallCounters:
    active: int = 0
    total: int = 0
    failed: int = 0

    def payload(self) -> p.CallCounters:
        rate = self.failed / self.total if self.total else 0.0
        return p.CallCounters(
            active=self.active, total=self.total, failed=self.failed, failure_rate=round(rate, 4)
        )


@dataclass
class AgentSeams:
    """What tests and benches swap: the clock, GPIO, the notify function, the loop's signals."""

    clock: Clock = field(default_factory=SystemClock)
    pin_factory: Any = None
    notify: Callable[[str], bool] = systemd.notify
    install_signal_handlers: bool = True


class Agent:
    """Owns the component graph for one run of the daemon."""

    def __init__(self, cfg: Config, seams: AgentSeams | None = None) -> None:
        self.cfg = cfg
        self.seams = seams or AgentSeams()
        self.clock = self.seams.clock
        self.bus = EventBus()
        self.topics = Topics(cfg.mqtt.prefix, cfg.device.id)
        self.crumbs = Breadcrumbs(cfg.telemetry.breadcrumbs)
        self.log_ring = LogRing(cfg.telemetry.log_lines)
        self.health = HealthState()
        self.calls = CallCounters()
        self.stop_reason: str | None = None
        self._stopping = asyncio.Event()
        state_dir = cfg.storage.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.boot_id = boot_id(cfg.health.sysfs_root)
        self.system = SystemReader(
            sysfs_root=cfg.health.sysfs_root,
            disk_path=state_dir,
            vcgencmd=cfg.health.vcgencmd or None,
        )
        self.device_model = cfg.device.model or self.system.board_model()
        self.sessions = SessionCounter(state_dir / "session")
        self.spool = Spool(
            state_dir / "spool.sqlite3",
            max_messages=cfg.storage.spool_max_messages,
            max_bytes=int(cfg.storage.spool_max_mib * 1024 * 1024),
            max_age_s=cfg.storage.spool_max_age_h * 3600,
            min_free_mb=cfg.storage.spool_min_free_mb,
            durability=cfg.storage.durability,
            clock=self.clock.time,
        )
        self.link = BrokerLink(
            cfg.mqtt,
            cfg.device.id,
            sessions=self.sessions,
            will=lambda s: (self.topics.status, p.encode(self._status("lost", s))),
            on_connected=self._on_connected,
            bus=self.bus,
        )
        self.publisher = Publisher(
            self.link,
            self.spool,
            self.topics,
            self.crumbs,
            wall=self.clock.time,
            monotonic=self.clock.monotonic,
            events_rate_per_s=cfg.telemetry.events_rate_per_s,
            events_burst=cfg.telemetry.events_burst,
            window=cfg.mqtt.max_inflight,
        )
        self.crumb_handler = CrumbLogHandler(self.crumbs, self.publisher.stream_crumb)
        self.leds = build_leds(cfg, self.seams.pin_factory) if cfg.leds.enabled else None
        self.watchdog = Watchdog(
            self.seams.notify,
            systemd.watchdog_interval_s(),
            self.clock,
            max_lag_s=cfg.health.watchdog_max_lag_s,
        )
        self.bus.subscribe(Noted, self._on_noted)
        self.bus.subscribe(BrokerConnected, lambda _e: self._set_online(True))
        self.bus.subscribe(BrokerDisconnected, lambda _e: self._set_online(False))

    # --- payloads -------------------------------------------------------------------------

    def _base(self) -> dict[str, Any]:
        return {"v": p.PROTOCOL_VERSION, "device": self.cfg.device.id, "ts": self.publisher.ts()}

    def _status(self, state: str, session: int, reason: str | None = None) -> p.Status:
        return p.Status(
            **self._base(),
            state=state,  # type: ignore[arg-type]
            session=session,
            boot_id=self.boot_id,
            version=__version__,
            reason=reason,
        )

    def info_payload(self) -> p.Info:
        versions = {"agent": __version__, "python": platform.python_version()}
        for dist in ("aiortc", "aioice", "aiomqtt", "paho-mqtt"):
            with contextlib.suppress(metadata.PackageNotFoundError):
                versions[dist] = metadata.version(dist)
        versions["os"] = platform.platform()
        security: dict[str, str] = {
            "commands": self.cfg.security.commands,
            "signaling": self.cfg.security.signaling,
        }
        return p.Info(
            **self._base(),
            versions=versions,
            device_model=self.device_model,
            capabilities=["metrics", "events", "alerts", "spool"],
            commands=[],
            config_hash=config_hash(self.cfg),
            session=self.link.session,
            boot_id=self.boot_id,
            security=security,
            topic_root=self.topics.root,
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def _on_connected(self, session: int) -> None:
        """Birth and info, published before the link reports itself up."""
        await self.link.publish(
            self.topics.status, p.encode(self._status("online", session)), qos=1, retain=True
        )
        await self.link.publish(self.topics.info, p.encode(self.info_payload()), qos=1, retain=True)
        await self.publisher.on_connected()

    def _set_online(self, online: bool) -> None:
        self.health.set_online(online)
        self.publish_health()

    def publish_health(self) -> None:
        view = self.health.changed()
        if view is None:
            return
        self.bus.publish(HealthChanged(view.state, view.reasons))
        if self.leds is not None:
            self.leds.show(view.state)
        self.publisher.health(
            p.Health(**self._base(), state=view.state, reasons=list(view.reasons))  # type: ignore[arg-type]
        )
        self._set_status_line()

    def _on_noted(self, e: Noted) -> None:
        self.publisher.event(
            e.level,  # type: ignore[arg-type]
            e.category,
            e.message,
            data=e.data,
            call_id=e.call_id,
            trace_id=e.trace_id,
        )

    def _set_status_line(self) -> None:
        view = self.health.current()
        link = f"broker {'up' if self.link.connected.is_set() else 'down'}"
        spool = self.spool.stats()
        self.seams.notify(f"STATUS={view.state}; {link}; spool {spool.pending} pending")

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            logger.info("agent: stopping (%s)", reason)
        self._stopping.set()

    async def _heartbeat(self) -> None:
        interval = self.cfg.telemetry.heartbeat_s
        while True:
            sample = await asyncio.to_thread(self.system.sample)
            stats = self.spool.stats()
            fields = sample.to_metrics_fields()
            throttled = fields.pop("throttled", None)
            metrics = p.Metrics(
                **self._base(),
                uptime_s=fields.pop("uptime_s"),
                cpu_pct=fields.pop("cpu_pct"),
                load_1m=fields.pop("load_1m"),
                mem_available_mb=fields.pop("mem_available_mb"),
                rss_mb=fields.pop("rss_mb"),
                temp_c=fields.pop("temp_c"),
                throttled=p.Throttled(**throttled) if throttled else None,
                disk_free_mb=fields.pop("disk_free_mb"),
                net=fields.pop("net"),
                calls=self.calls.payload(),
                spool=p.SpoolCounters(pending=stats.pending, dropped=stats.dropped_total),
                session=self.link.session,
                extra=fields or None,
            )
            self.publisher.volatile(self.topics.metrics, metrics)
            self.publisher.report_spool_drops()
            self._set_status_line()
            await self.clock.sleep(interval)

    async def _stop_when_asked(self) -> None:
        await self._stopping.wait()
        self.seams.notify("STOPPING=1")
        reason = self.stop_reason or "stopped"
        final = (self.topics.status, p.encode(self._status("offline", self.link.session, reason)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT_S - 0.5):
                await self.link.close(final)
        raise _Stopped

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        root = logging.getLogger()
        root.addHandler(self.log_ring)
        root.addHandler(self.crumb_handler)
        loop = asyncio.get_running_loop()
        if self.seams.install_signal_handlers:
            for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
                loop.add_signal_handler(sig, self.request_stop, name)
        try:
            self.publish_health()
            self.publisher.event(
                "info", "agent", f"edgeagent {__version__} started", data={"boot_id": self.boot_id}
            )
            self.seams.notify("READY=1")
            logger.info("agent: %s ready (device %s)", __version__, self.cfg.device.id)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name="mqtt")
                tg.create_task(self.publisher.run(), name="publisher")
                tg.create_task(self._heartbeat(), name="heartbeat")
                tg.create_task(self.watchdog.run(), name="watchdog")
                tg.create_task(self._stop_when_asked(), name="stop")
        except* _Stopped:
            pass
        finally:
            if self.seams.install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            root.removeHandler(self.log_ring)
            root.removeHandler(self.crumb_handler)
            if self.leds is not None:
                self.leds.close()
            self.spool.close()
        return 0


def build_leds(cfg: Config, pin_factory: Any) -> HealthLeds:
    """LEDs from config; `leds.mock` drives gpiozero's MockFactory (bench)."""
    leds = cfg.leds
    if len(leds.pins) != 3:
        logger.warning("leds: need exactly three pins, got %s; LEDs disabled", leds.pins)
        pin_factory = None
    if pin_factory is None and leds.mock:
        from gpiozero.pins.mock import MockFactory

        pin_factory = MockFactory()
    a, b, c = [*leds.pins, 0, 0, 0][:3]
    pins: ThreeLedPins | RgbLedPins = (
        RgbLedPins(a, b, c, active_high=leds.active_high)
        if leds.layout == "rgb"
        else ThreeLedPins(a, b, c, active_high=leds.active_high)
    )
    return HealthLeds(pins, pin_factory=pin_factory)
