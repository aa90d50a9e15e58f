"""The composition root: builds every component from the config and runs them in one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import platform
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from edgeagent import __version__
from edgeagent.call.calltest import run_call_test
from edgeagent.call.ice import ignored_servers, stun_seen_down
from edgeagent.call.ledger import OPEN_CALL, OpenCallLedger
from edgeagent.call.manager import Call, CallManager, OfferCheck, OfferToken
from edgeagent.call.offer_token import CALL_TOKEN_LIFETIME_S, OfferSigner, offer_check
from edgeagent.clock import Clock, SystemClock
from edgeagent.config import Config, config_hash
from edgeagent.control.catalog import CommandError
from edgeagent.control.handlers import apply_log_level, check_hangup_target
from edgeagent.control.keys import load_signing_key
from edgeagent.control.server import build_command_server, describe_catalog
from edgeagent.events import BrokerConnected, BrokerDisconnected, EventBus, HealthChanged, Noted
from edgeagent.health.alerts import (
    AlertChange,
    AlertRules,
    CounterIncrease,
    FailureRateWindow,
    flag,
    rules_from_config,
    system_metrics,
)
from edgeagent.health.crashguard import CrashGuard, CrashSettings, read_json
from edgeagent.health.heap import HeapTrimmer, glibc_malloc_trim
from edgeagent.health.netwatch import CHECKS, LeakWatch, NetWatchSettings, NetworkWatch
from edgeagent.health.state import HealthState
from edgeagent.health.watchdog import Watchdog
from edgeagent.hw import systemd
from edgeagent.hw.alsa import AudioDeviceError, probe_devices
from edgeagent.hw.button import CallButton
from edgeagent.hw.leds import HealthLeds, RgbLedPins, ThreeLedPins
from edgeagent.hw.system import SystemReader, boot_id
from edgeagent.mqtt import BrokerLink, SessionCounter
from edgeagent.telemetry import payloads as p
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, CrumbLogHandler, LogRing
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.topics import Topics
from edgeagent.telemetry.tracing import (
    MqttSpanExporter,
    build_tracer_provider,
    os_description,
    otlp_http_exporter,
)

logger = logging.getLogger(__name__)

# Packages whose own tasks run a call's media: an error in one ends the call, not the agent.
_CALL_STACK_PACKAGES = ("aiortc", "aioice")

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
    install_crash_hooks: bool = True
    # Process-wide like the two above: after start-up, move every object alive into
    # the GC's permanent generation, so the full collection after each call scans
    # only what calls created (~0.1 ms instead of ~20 ms here, 3-5x that on a Pi).
    freeze_gc_after_start: bool = True
    # Calls keep aiortc's audio jitter buffer, which stalls on loss (aiortc#543), instead
    # of the workaround (edgeagent/call/tracks.py): only for bench/latency.py to measure it.
    aiortc_jitter_buffer: bool = False


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
        self.heap = HeapTrimmer(glibc_malloc_trim())
        self.stop_reason: str | None = None
        self._stopping = asyncio.Event()
        self._bg: set[asyncio.Task[None]] = set()
        self.restart_requested = False
        state_dir = cfg.storage.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.boot_id = boot_id(cfg.health.sysfs_root)
        self.system = SystemReader(
            sysfs_root=cfg.health.sysfs_root,
            disk_path=state_dir,
            vcgencmd=cfg.health.vcgencmd or None,
            mmcli=cfg.health.mmcli or None,
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
            boot_id=self.boot_id,
            monotonic=self.clock.monotonic,
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
        s = cfg.security
        self.commands = build_command_server(
            device_id=cfg.device.id,
            topics=self.topics,
            link=self.link,
            publisher=self.publisher,
            context=self,
            clock=self.clock,
            state_dir=state_dir,
            commands_mode=s.commands,
            keys_file=s.keys_file,
            max_token_lifetime_s=s.max_token_lifetime_s,
            armed=s.armed,
            local_socket=s.local_socket,
            known_secrets=[
                cfg.ice.turn_password.get_secret_value() if cfg.ice.turn_password else None,
                cfg.mqtt.password.get_secret_value() if cfg.mqtt.password else None,
            ],
        )
        self.crumb_handler = CrumbLogHandler(self.crumbs, self.publisher.stream_crumb)
        self.leds_factory = pin_factory_for(cfg, self.seams.pin_factory)
        self.leds = build_leds(cfg, self.leds_factory) if cfg.leds.enabled else None
        self.watchdog = Watchdog(
            self.seams.notify,
            systemd.watchdog_interval_s(),
            self.clock,
            max_lag_s=cfg.health.watchdog_max_lag_s,
        )
        self._started = self.clock.monotonic()
        self.crashed = False
        self.crash_guard = CrashGuard(
            CrashSettings(
                state_dir=state_dir,
                app_version=__version__,
                device_model=self.device_model,
                boot_id=self.boot_id,
            ),
            crumbs=self.crumbs,
            logs=self.log_ring,
            snapshot=self.crash_snapshot,
            clock=self.clock,
        )
        self.alerts = AlertRules(rules_from_config(cfg.alerts), self.clock, self._on_alert)
        self.failures = FailureRateWindow(
            cfg.alerts.failure_window_s, cfg.alerts.failure_min_calls, self.clock
        )
        self._spool_drops = CounterIncrease()
        ice = cfg.ice
        self.netwatch = NetworkWatch(
            NetWatchSettings(
                stun_urls=tuple(ice.stun_urls),
                turn_urls=tuple(ice.turn_urls),
                turn_username=ice.turn_username,
                turn_password=ice.turn_password.get_secret_value() if ice.turn_password else None,
                turn_relay_check=ice.turn_relay_check,
                tls_endpoints=((cfg.mqtt.host, cfg.mqtt.port),) if cfg.mqtt.tls.enabled else (),
                dns_hosts=(cfg.mqtt.host,),
            ),
            self._on_probe_alert,
            clock=self.clock,
        )
        self.leak = LeakWatch(self._on_probe_alert)
        self.tracer_provider = self._build_tracer_provider()
        self.calls_mgr = CallManager(
            cfg,
            self.link,
            self.topics,
            self.publisher,
            clock=self.clock,
            on_health=self._on_call_health,
            on_finished=self._on_call_finished,
            on_fault=self._on_audio_fault,
            check_offer=self._offer_check(),
            offer_token=self._offer_signer(),
            alerts=self.alerts,
            stun_down=self._stun_seen_down,
            aiortc_jitter_buffer=self.seams.aiortc_jitter_buffer,
            ledger=OpenCallLedger(state_dir / OPEN_CALL),
            tracer=(
                self.tracer_provider.get_tracer("edgeagent.call", __version__)
                if self.tracer_provider is not None
                else None
            ),
        )
        self._audio_fault = asyncio.Event()
        self.button: CallButton | None = None
        self.bus.subscribe(Noted, self._on_noted)
        self._offline_since: float | None = None  # monotonic, while the broker is away
        self._last_mem_available_mb: float | None = None  # from the last heartbeat
        self.bus.subscribe(BrokerConnected, lambda _e: self._set_online(True))
        self.bus.subscribe(BrokerDisconnected, lambda _e: self._set_online(False))

    def _offer_check(self) -> OfferCheck | None:
        """With signed signaling, offers are checked with the command server's keys."""
        s = self.cfg.security
        if s.signaling != "signed":
            return None
        if s.keys_file is None:
            logger.warning("signaling: signed, but no keys_file; every offer will be refused")
        return offer_check(self.commands.verifier, self.cfg.device.id)

    def _offer_signer(self) -> OfferToken | None:
        """With a call key, every offer this device sends carries a token it signed."""
        s = self.cfg.security
        if s.call_key_file is None:
            return None
        key, kid = load_signing_key(s.call_key_file, s.call_key_id)
        lifetime_s = min(CALL_TOKEN_LIFETIME_S, s.max_token_lifetime_s)
        return OfferSigner(key, kid, clock=self.clock.time, lifetime_s=lifetime_s).token

    def _stun_seen_down(self) -> bool:
        """The latest network probe found the (first, the only used) STUN server dead."""
        latest = self.netwatch.latest
        stun = self.cfg.ice.stun_urls
        return latest is not None and bool(stun) and stun_seen_down(latest.stun, stun[0])

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
            commands=describe_catalog(set(self.cfg.security.armed)),
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
        now = self.clock.monotonic()
        if not online:
            if self._offline_since is None:
                self._offline_since = now
        elif self._offline_since is not None:
            # One event for the outage, in its place in the stream (it is spooled like
            # the rest): how long the broker was away and what waited meanwhile.
            away = now - self._offline_since
            self._offline_since = None
            pending = self.spool.stats().pending
            self.publisher.event(
                "warning" if away >= 60 else "info",
                "mqtt",
                f"broker reachable again after {away:.0f} s; {pending} spooled messages to send",
                data={"offline_s": round(away, 1), "pending": pending},
            )
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

    # --- calls and audio ------------------------------------------------------------------

    def _on_call_health(self, state: str | None, reasons: tuple[str, ...]) -> None:
        self.health.set_call(state, reasons)
        self.calls.active = 1 if self.calls_mgr.active is not None and state else 0
        self.publish_health()

    def _on_call_finished(self, call: Call) -> None:
        self.calls.total += 1
        if call.result == "failed":
            self.calls.failed += 1
        self.calls.active = 0
        self.failures.record_result(call.result or "failed")
        self.alerts.observe("call_failure_rate", self.failures.rate())
        self.alerts.reset_scope("call", call.call_id)
        # Once the session's buffers are gone (its task unwinds right after the summary),
        # give the freed heap back: without it RSS keeps each call's high-water mark.
        release = functools.partial(self.heap.release, collect=True)
        asyncio.get_running_loop().call_later(0.2, release)

    def _on_alert(self, c: AlertChange) -> None:
        """Alert state changes: retained and spooled, and a feedback snapshot during a call."""
        self.publisher.spool(
            self.topics.alert(c.name),
            lambda seq: p.Alert(
                **self._base(),
                seq=seq,
                name=c.name,
                state=c.state,  # type: ignore[arg-type,unused-ignore]
                severity=c.severity,  # type: ignore[arg-type,unused-ignore]
                value=c.value,
                threshold=c.threshold,
                message=c.message,
                runbook=c.runbook,
                call_id=c.call_id,
                since=c.since,
                trace_id=self.calls_mgr.trace_id_for(c.call_id),
            ),
            retain=True,
        )
        self.calls_mgr.note_alert(c.name, c.state, c.severity, c.value, c.call_id)
        logger.log(
            logging.WARNING if c.state == "firing" else logging.INFO,
            "alert %s %s: %s",
            c.name,
            c.state,
            c.message,
        )
        if c.state == "firing" and c.call_id is not None:
            self.publisher.event(
                "info",
                "feedback",
                f"automatic snapshot: alert {c.name} fired during the call",
                data=self.snapshot(),
                call_id=c.call_id,
                trace_id=self.calls_mgr.trace_id_for(c.call_id),
            )

    def _on_probe_alert(
        self,
        name: str,
        state: str,
        severity: str,
        value: float | None,
        threshold: float | None,
        message: str,
        runbook: str | None,
    ) -> None:
        self._on_alert(
            AlertChange(
                name=name,
                state=state,  # type: ignore[arg-type]
                severity=severity,  # type: ignore[arg-type]
                value=value,
                threshold=threshold if threshold is not None else 0.0,
                message=message,
                runbook=runbook,
                since=self.clock.time(),
            )
        )

    # --- tracing ----------------------------------------------------------------------------

    def _build_tracer_provider(self) -> TracerProvider | None:
        """The call tracer's provider (injected into the CallManager, never global)."""
        t = self.cfg.tracing
        if not t.enabled:
            return None
        exporters: list[SpanExporter] = []
        if t.mqtt_export:
            traces = self.topics.traces
            exporters.append(
                MqttSpanExporter(
                    lambda build: self.publisher.spool_bytes(traces, build),
                    device=self.cfg.device.id,
                    wall=self.clock.time,
                    max_spans_per_message=t.max_spans_per_message,
                )
            )
        background: list[SpanExporter] = []
        if t.otlp_endpoint:
            headers = {k: v.get_secret_value() for k, v in t.otlp_headers.items()}
            background.append(
                otlp_http_exporter(t.otlp_endpoint, headers, timeout_s=t.otlp_timeout_s)
            )
        return build_tracer_provider(
            service_version=__version__,
            device_id=self.cfg.device.id,
            board_model=self.device_model,
            os_name=os_description(),
            exporters=exporters,
            background_exporters=background,
            sampler_ratio=t.sample_ratio,
            poor_mos=t.keep_below_mos,
        )

    def _stop_tracing(self) -> None:
        """Flush and stop span export; open traces are kept and spooled (before the spool closes).

        Blocks for at most about the OTLP timeout while a collector is slow or away.
        """
        if self.tracer_provider is None:
            return
        try:
            self.tracer_provider.shutdown()
        except Exception:  # span export must never turn a clean stop into a crash
            logger.warning("tracing: shutdown failed", exc_info=True)

    def crash_snapshot(self) -> dict[str, Any]:
        view = self.health.current()
        call = self.calls_mgr.active
        return {
            "health": view.state,
            "reasons": list(view.reasons),
            "uptime_s": round(self.clock.monotonic() - self._started, 1),
            "broker_up": self.link.connected.is_set(),
            "spool_pending": self.spool.stats().pending,
            "calls": {
                "active": self.calls.active,
                "total": self.calls.total,
                "failed": self.calls.failed,
            },
            "call_id": call.call_id if call else None,
            "trace_id": call.trace_id if call else None,
            # For telling an OOM kill from others at the next start: peak RSS of this
            # process, and memory left on the device at the last heartbeat.
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "mem_available_mb": self._last_mem_available_mb,
        }

    def _contain_loop_error(self, exc: BaseException, task: asyncio.Task[Any] | None) -> bool:
        """An orphaned error from one of aiortc's or aioice's own tasks belongs to a call:
        it ends that call (reason `error`), not the agent. Ours stay fatal (crash-only)."""
        coro = task.get_coro() if task is not None else None
        code = getattr(coro, "cr_code", None)
        filename = code.co_filename if code is not None else ""
        if not any(f"{os.sep}{pkg}{os.sep}" in filename for pkg in _CALL_STACK_PACKAGES):
            return False
        where = getattr(coro, "__qualname__", "?")
        detail = f"{type(exc).__name__} in {where}: {exc}"
        ended = self.calls_mgr.fail_active(detail)
        logger.error("call media: %s (%s)", detail, "call ended" if ended else "no active call")
        return True

    def _on_loop_crash(self, exc: BaseException) -> None:
        self.crashed = True
        self.request_stop("crash")

    def _on_audio_fault(self, reason: str | None) -> None:
        if reason is None:
            return
        if not self._audio_fault.is_set():
            self.publisher.event("error", "audio.device", reason)
            self.alerts.observe("audio_device_missing", 1.0)
        self.health.set_fault("audio_device", reason)
        self._audio_fault.set()
        self.publish_health()

    async def _audio_watch(self) -> None:
        """Probe the audio devices at start and after a fault, with backoff, until they work."""
        audio = self.cfg.audio
        delay = audio.reopen_min_s
        first = True
        while True:
            if not first:
                await self._audio_fault.wait()
                await self.clock.sleep(delay)
            if self.calls_mgr.active is None:
                try:
                    await asyncio.to_thread(
                        probe_devices, audio.capture_device, audio.playback_device
                    )
                except AudioDeviceError as exc:
                    self._on_audio_fault(f"audio device unavailable: {exc}")
                    delay = min(audio.reopen_max_s, delay * 2) if not first else delay
                else:
                    if self._audio_fault.is_set():
                        self.publisher.event("info", "audio.device", "audio device available again")
                    self._audio_fault.clear()
                    self.alerts.observe("audio_device_missing", 0.0)
                    self.health.set_fault("audio_device", None)
                    self.publish_health()
                    delay = audio.reopen_min_s
            first = False

    def _on_button_press(self) -> None:
        if self.cfg.button.press_action == "none":
            return
        mgr = self.calls_mgr
        if mgr.answer_ringing():
            return
        if mgr.active is not None:
            if self.cfg.button.press_action == "dial_or_hangup":
                self._spawn(mgr.hangup("button"))
            return
        self._spawn(self._dial_quietly())

    async def _dial_quietly(self, peer: str | None = None) -> None:
        try:
            await self.calls_mgr.dial(peer)
        except (ValueError, RuntimeError) as exc:
            self.publisher.event("warning", "call.outgoing", f"button: cannot dial: {exc}")

    def _on_button_long_press(self) -> None:
        self.publisher.event(
            "info",
            "feedback",
            "in-call feedback snapshot (button)",
            data=self.snapshot(),
            call_id=self.calls_mgr.active.call_id if self.calls_mgr.active else None,
        )

    # --- the command context (edgeagent.control.context.CommandContext) --------------------

    @property
    def device_id(self) -> str:
        return self.cfg.device.id

    async def metrics(self) -> dict[str, Any]:
        sample = await asyncio.to_thread(self.system.sample)
        fields = sample.to_metrics_fields()
        stats = self.spool.stats()
        fields["calls"] = msgspec.to_builtins(self.calls.payload())
        fields["spool"] = {"pending": stats.pending, "dropped": stats.dropped_total}
        fields["network"] = self.netwatch.metrics_fields()
        return fields

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = msgspec.to_builtins(self.info_payload())
        return info

    async def rebirth(self) -> None:
        await self._on_connected(self.link.session)

    def logs(self, lines: int, min_level: int, since: float | None) -> list[str]:
        return self.log_ring.lines(lines, min_level=min_level, since=since)

    def breadcrumbs(self, limit: int) -> list[dict[str, Any]]:
        return self.crumbs.snapshot(limit)

    def set_log_level(self, logger_name: str, level: int, ttl_s: float) -> int:
        return apply_log_level(logger_name, level)

    def call_active(self) -> bool:
        return self.calls_mgr.active is not None

    def clock_synced(self) -> bool:
        if self.cfg.health.assume_clock_synced:
            return True
        return self.netwatch.clock_synced() is not False

    async def dial(
        self, peer: str | None, call_id: str | None = None, token: str | None = None
    ) -> dict[str, Any]:
        try:
            call = await self.calls_mgr.dial(peer, call_id=call_id, token=token)
        except ValueError as exc:
            raise CommandError(400, str(exc)) from None
        except RuntimeError as exc:
            raise CommandError(409, str(exc)) from None
        return {"call_id": call.call_id, "peer": call.peer, "trace_id": call.trace_id}

    async def hangup(self, call_id: str | None) -> dict[str, Any]:
        active = self.calls_mgr.active
        if call_id is not None and (active is None or active.call_id != call_id):
            # Named a call that has ended (a retried hangup, or one that lost the race
            # with the far end's): nothing to do, and its outcome says how it ended.
            ended = next((c for c in self.calls_mgr.history if c.call_id == call_id), None)
            if ended is not None:
                return {"ended": False, "call_id": call_id, "result": ended.result,
                        "end_reason": ended.end_reason}  # fmt: skip
        check_hangup_target(None if active is None else active.call_id, call_id)
        if active is None:
            return {"ended": False, "call_id": None, "result": None}
        await self.calls_mgr.hangup("remote_command")
        return {"ended": True, "call_id": active.call_id, "result": active.result}

    async def call_test(
        self,
        peer: str | None,
        duration_s: int,
        call_id: str | None = None,
        token: str | None = None,
    ) -> dict[str, Any]:
        """Call the echo peer with a known signal: round trip, levels, echo verdict, score."""
        return await run_call_test(
            self.calls_mgr,
            peer,
            duration_s,
            call_id=call_id,
            token=token,
            clock=self.clock,
            bus=self.bus,
            broker_up=self.link.connected.is_set,
            leds=self._led_view,
        )

    def _led_view(self) -> dict[str, Any] | None:
        """The LED state shown and, with a known pin factory (bench mock), each pin's level."""
        if self.leds is None:
            return None
        leds = self.cfg.leds
        names = ("red", "green", "blue") if leds.layout == "rgb" else ("green", "amber", "red")
        pins = None
        if self.leds_factory is not None and self.leds.enabled:
            pins = {
                name: int(bool(self.leds_factory.pin(pin).state))
                for name, pin in zip(names, leds.pins, strict=True)
            }
        return {"state": self.leds.state, "pins": pins, "active_high": leds.active_high}

    async def diagnose(self, checks: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        net = [c for c in checks if c in CHECKS]
        if net:
            out.update(await self.netwatch.probe_all(net))
        if "broker" in checks:
            out["broker"] = {
                "connected": self.link.connected.is_set(),
                "session": self.link.session,
                "last_error": self.link.last_error,
            }
        if "audio" in checks:
            if self.calls_mgr.active is not None:
                out["audio"] = {"skipped": "a call is using the devices"}
            else:
                t0 = self.clock.monotonic()
                try:
                    await asyncio.to_thread(
                        probe_devices, self.cfg.audio.capture_device, self.cfg.audio.playback_device
                    )
                    ok, err = True, None
                except AudioDeviceError as exc:
                    ok, err = False, str(exc)
                out["audio"] = {
                    "ok": ok,
                    "error": err,
                    "ms": round((self.clock.monotonic() - t0) * 1000, 1),
                }
        return out

    def request_restart(self, reason: str) -> None:
        self.restart_requested = True
        self.request_stop(f"restart: {reason}")

    def crash_test(self, kind: str) -> None:
        if kind == "segfault":
            import ctypes

            ctypes.string_at(0)
        raise RuntimeError("test crash requested by command")

    def dial_on_connect(self, peer: str) -> None:
        """Place one call to `peer` as soon as the broker link is up (bench runs)."""

        def dial(_e: BrokerConnected) -> None:
            unsubscribe()
            self._spawn(self._dial_quietly(peer))

        unsubscribe = self.bus.subscribe(BrokerConnected, dial)

    def snapshot(self) -> dict[str, Any]:
        """The reference chapter's captureCallState: network, audio, call, thermal, memory, logs."""
        call = self.calls_mgr.active
        session = call.session if call else None
        sample = session.record.samples[-1] if session and session.record.samples else None
        system = self.system.sample(quick=True).to_metrics_fields()  # on the loop: no subprocess
        return {
            "health": self.health.current().state,
            "broker": "up" if self.link.connected.is_set() else "down",
            "audio": {
                "capture_device": self.cfg.audio.capture_device,
                "playback_device": self.cfg.audio.playback_device,
                "aec": self.cfg.audio.aec.enabled,
                "levels": sample.audio if sample else None,
            },
            "call": None
            if call is None
            else {
                "call_id": call.call_id,
                "peer": call.peer,
                "state": call.state,
                "direction": call.direction,
                "trace_id": call.trace_id,
                "mos": sample.mos if sample else None,
                "loss_pct": sample.window.loss_pct if sample else None,
                "rtt_ms": sample.window.rtt_ms if sample else None,
                "jitter_ms": sample.window.jitter_ms if sample else None,
            },
            "system": system,
            "logs": self.log_ring.lines(100),
        }

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

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
            self._last_mem_available_mb = sample.mem_available_mb
            stats = self.spool.stats()
            self.leak.observe(self.clock.monotonic(), sample.rss_mb)
            fields = sample.to_metrics_fields()
            fields["network"] = self.netwatch.metrics_fields()
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
                spool=p.SpoolCounters(
                    pending=stats.pending,
                    dropped=stats.dropped_total,
                    unstored=self.publisher.unstored,
                ),
                session=self.link.session,
                extra=fields or None,
            )
            self.publisher.volatile(self.topics.metrics, metrics)
            self.alerts.observe_many(system_metrics(sample))
            self.alerts.observe(
                "spool_dropped_delta", self._spool_drops.update(stats.dropped_total)
            )
            self.alerts.observe("broker_unreachable", flag(not self.link.connected.is_set()))
            self.alerts.tick()
            self.publisher.report_spool_drops()
            self._set_status_line()
            await self.clock.sleep(interval)

    async def _stop_when_asked(self) -> None:
        await self._stopping.wait()
        self.seams.notify("STOPPING=1")
        reason = self.stop_reason or "stopped"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT_S - 0.5
        # Hang up while the link is still up, so the far end hears why (not a dead transport).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):
                await self.calls_mgr.hangup("agent_stopping")
        # Then let that call's summary and spans (and anything else spooled) reach the
        # broker before `offline`; what does not make it stays spooled for the next start.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline - 0.5):
                await self.publisher.flush()
        final = (self.topics.status, p.encode(self._status("offline", self.link.session, reason)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(max(deadline, loop.time() + 0.5)):
                await self.link.close(final)
        raise _Stopped

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        root = logging.getLogger()
        root.addHandler(self.log_ring)
        loop = asyncio.get_running_loop()
        self.crumb_handler.bind_loop(loop)
        root.addHandler(self.crumb_handler)
        if self.seams.install_crash_hooks:
            reports = self.crash_guard.start()
            self.crash_guard.install_loop_handler(
                loop, on_crash=self._on_loop_crash, contain=self._contain_loop_error
            )
        else:
            reports = self.crash_guard.recover()
        crash = crash_of(reports)
        self.crash_guard.deliver(self.publisher, self.topics.crash)
        # A call the previous run died in gets its summary now, naming the crash report.
        self.calls_mgr.recover_open_call(crash)
        if self.seams.install_signal_handlers:
            for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
                loop.add_signal_handler(sig, self.request_stop, name)
        try:
            self.publish_health()
            self.publisher.event(
                "info", "agent", f"edgeagent {__version__} started", data={"boot_id": self.boot_id}
            )
            for line in ignored_servers(self.cfg.ice.stun_urls, self.cfg.ice.turn_urls):
                logger.warning("ice: %s", line)  # a breadcrumb and a `warning` event too
            if self.cfg.button.enabled:
                self.button = CallButton(
                    self.cfg.button.pin,
                    pin_factory=self.leds_factory,
                    long_press_s=self.cfg.button.long_press_s,
                    on_press=self._on_button_press,
                    on_long_press=self._on_button_long_press,
                    loop=loop,
                )
            if self.seams.freeze_gc_after_start:
                gc.collect()
                gc.freeze()
            self.seams.notify("READY=1")
            logger.info("agent: %s ready (device %s)", __version__, self.cfg.device.id)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name="mqtt")
                tg.create_task(self.publisher.run(), name="publisher")
                tg.create_task(self._heartbeat(), name="heartbeat")
                tg.create_task(self.watchdog.run(), name="watchdog")
                tg.create_task(self.calls_mgr.run(), name="calls")
                tg.create_task(self._audio_watch(), name="audio-watch")
                tg.create_task(self.crash_guard.run(), name="crash-checkpoint")
                tg.create_task(self.netwatch.run(), name="netwatch")
                tg.create_task(self.commands.run(), name="commands")
                tg.create_task(self._stop_when_asked(), name="stop")
        except* _Stopped:
            pass
        except* Exception as eg:
            self.crashed = True
            self.crash_guard.record_exception(eg)
            raise
        finally:
            if self.seams.install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            root.removeHandler(self.log_ring)
            root.removeHandler(self.crumb_handler)
            if self.leds is not None:
                self.leds.close()
            if self.button is not None:
                self.button.close()
            reason = "crash" if self.crashed else (self.stop_reason or "stopped")
            self.crash_guard.stop(reason, clean=not self.crashed)
            self.crash_guard.disarm()
            self._stop_tracing()
            self.calls_mgr.close()
            self.spool.close()
        if self.crashed:
            return 70
        # A requested restart exits non-zero so Restart=on-failure brings the agent back.
        return 75 if self.restart_requested else 0


def crash_of(reports: list[Path]) -> tuple[str, str] | None:
    """(crash_id, kind) of the newest crash report among `reports`, if one is readable."""
    for path in sorted(reports, reverse=True):
        doc = read_json(path)
        if doc is not None and isinstance(doc.get("crash_id"), str):
            return doc["crash_id"], str(doc.get("kind"))
    return None


def pin_factory_for(cfg: Config, given: Any) -> Any:
    """The gpiozero pin factory: the one given (tests), MockFactory on the bench, else default."""
    if given is None and cfg.leds.mock:
        from gpiozero.pins.mock import MockFactory

        return MockFactory()
    return given


def build_leds(cfg: Config, pin_factory: Any) -> HealthLeds:
    """LEDs from config on `pin_factory` (None: gpiozero's default)."""
    leds = cfg.leds
    a, b, c = leds.pins
    pins: ThreeLedPins | RgbLedPins = (
        RgbLedPins(a, b, c, active_high=leds.active_high)
        if leds.layout == "rgb"
        else ThreeLedPins(a, b, c, active_high=leds.active_high)
    )
    return HealthLeds(pins, pin_factory=pin_factory)
