"""The broker link: connect, Last Will, birth, reconnect with backoff, publish-with-ack, subscribe.

One `aiomqtt.Client` per connection attempt, because the Will (which carries
the session counter) is fixed at CONNECT. The session counter is persisted and
incremented before every CONNECT, so birth and Will of one connection carry the
same value and a consumer can discard a late Will from an older session.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.config import MqttConfig
from edgeagent.events import BrokerConnected, BrokerDisconnected, EventBus
from edgeagent.telemetry.topics import publish_topic_problem

logger = logging.getLogger(__name__)

# Distinct connect-failure reasons logged at WARNING per outage; the rest at DEBUG.
_WARN_REASONS = 3
# A connection up at least this long ends an outage: the backoff starts again from the
# minimum. A broker that accepts and drops every connection at once (a crash loop, a
# session taken over) otherwise gets a reconnect every `reconnect_min_s`, for ever.
STABLE_S = 10.0
# What a healthy link's silence may exceed its keepalive by (paho's 1 s loop tick and a
# PINGREQ's round trip) before the link counts as stalled.
STALL_GRACE_S = 3.0


class BrokerUnavailable(Exception):
    """Transient: the link is down; spooled data waits, volatile data is dropped."""


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message received from the broker, free of client-library types."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    retain: bool = False  # a retained message the broker sent on subscribing


InboundHandler = Callable[[Inbound], None]


class SessionCounter:
    """The persisted CONNECT counter of protocol section 1, written atomically."""

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            self.value = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            self.value = 0
        except (OSError, ValueError):
            logger.warning("session counter %s unreadable; continuing from 0", path)
            self.value = 0

    def next(self) -> int:
        """The next CONNECT's value, persisted; kept in memory if it cannot be written
        (the state directory gone), so the link still connects."""
        self.value += 1
        tmp = self._path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(str(self.value))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except OSError as exc:
            logger.error("session counter %s not persisted: %s", self._path, exc)
        return self.value


# Nothing the device subscribes to is near this (signals are refused above 64 KiB,
# commands above 16 KiB, both answered); past it the broker drops the message instead
# of a multi-megabyte publish landing in the agent's memory (MQTT 5 only).
MAX_INBOUND_PACKET_BYTES = 1024 * 1024


def _connect_properties() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.MaximumPacketSize = MAX_INBOUND_PACKET_BYTES
    return props


def backoff_delays(min_s: float, max_s: float, rng: random.Random) -> Any:
    """Capped exponential backoff with jitter: each delay in [d/2, d], d doubling to max."""
    delay = min_s
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(max_s, delay * 2)


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context for `cfg`, read from its files now (so a fixed file is picked up
    on the next attempt); BrokerUnavailable naming the file if one is unusable."""
    t = cfg.tls
    if not t.enabled:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(t.ca_file) if t.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnavailable(f"TLS CA file {t.ca_file} unusable: {exc}") from exc
    if t.cert_file:
        try:
            ctx.load_cert_chain(str(t.cert_file), str(t.key_file) if t.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerUnavailable(
                f"TLS client certificate {t.cert_file} / key {t.key_file} unusable: {exc}"
            ) from exc
    if t.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _ClientLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """paho's log for one connection attempt.

    When the broker drops the socket before CONNACK (a TLS alert for a missing or
    untrusted client certificate, say), paho only logs the error and aiomqtt waits
    for its full connect timeout. The error paho logs then is the real reason: it
    is handed to `on_error` (which ends the attempt) and logged at DEBUG, since the
    link reports connect failures itself, once.
    """

    def __init__(self, on_error: Callable[[str], None]) -> None:
        super().__init__(logging.getLogger(f"{__name__}.client"), {})
        self.on_error = on_error
        self.connected = False

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= logging.ERROR and not self.connected:
            text = str(msg) % args if args else str(msg)
            self.on_error(text)
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


_CONNACK_GRACE_TURNS = 20
REFUSAL_QUIET_S = 60.0
"""A topic's refused publishes are warned about at most once a minute (warnings are events)."""


def _connack_refusal(client: aiomqtt.Client) -> BaseException | None:
    """The broker's CONNACK refusal (bad credentials, not authorised) if one was read.

    A refusing broker sends CONNACK and closes at once. aiomqtt records the refusal on
    its `_connected` future as soon as it reads it, but its `__aenter__` reports it only
    after its connect thread returns, which on a loaded machine can come after the
    close: the refusal is still the reason to report. Reaches into aiomqtt.
    """
    connected = getattr(client, "_connected", None)
    if isinstance(connected, asyncio.Future) and connected.done() and not connected.cancelled():
        return connected.exception()
    return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark `future`'s exception as seen (it is reported another way)."""
    if not future.cancelled():
        future.exception()


def _connack_accepted(client: aiomqtt.Client) -> bool:
    """Whether a CONNACK accepting the connection was read (see `_connack_refusal`):
    a drop then is a drop after CONNACK, though aiomqtt's connect had not returned."""
    connected = getattr(client, "_connected", None)
    return (
        isinstance(connected, asyncio.Future)
        and connected.done()
        and not connected.cancelled()
        and connected.exception() is None
    )


_PUBLISH_OUTCOME: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "edgeagent_publish_outcome", default=None
)
"""Set by BrokerLink.publish around one message: the reason codes its PUBACK refused with."""


def _watch_pubacks(client: aiomqtt.Client, refused: Callable[[str, str], None]) -> None:
    """Call `refused(topic, reason)` for each publish the broker acknowledges with a
    failure reason code; aiomqtt completes those like any other (its `_on_publish`
    drops the reason code). Wraps this connection's paho client; both wrappers only
    observe. Pinned by tests/test_mqtt_refusals.py."""
    paho = client._client
    # mid -> (topic, the publishing call's outcome list), until its PUBACK (or QoS 0 send)
    topics: dict[int, tuple[str, list[str] | None]] = {}
    publish = paho.publish
    on_publish: Any = paho.on_publish  # aiomqtt's, set before the client is entered

    def tracked(topic: str, *args: Any, **kwargs: Any) -> Any:
        info = publish(topic, *args, **kwargs)
        if info.mid:
            # Called inside the task BrokerLink.publish started: its context holds the
            # list this one message's refusal goes to.
            topics[info.mid] = (topic, _PUBLISH_OUTCOME.get())
        return info

    def checked(c: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        try:
            if on_publish is not None:
                on_publish(c, userdata, mid, reason_code, properties)
        finally:
            entry = topics.pop(mid, None)
            value = getattr(reason_code, "value", 0)
            if entry is not None and isinstance(value, int) and value >= 0x80:
                topic, outcome = entry
                if outcome is not None:
                    outcome.append(str(reason_code))
                refused(topic, str(reason_code))

    paho.publish = tracked  # type: ignore[method-assign]
    paho.on_publish = checked


def _granted(code: Any) -> bool:
    """A SUBACK entry: a granted QoS (0-2; MQTT 3.1.1 int or MQTT 5 ReasonCode), not 0x80+."""
    value = getattr(code, "value", code)
    return isinstance(value, int) and value < 0x80


def _close_socket(client: aiomqtt.Client) -> None:
    """Close the socket of a CONNECT that failed (timed out, cancelled): aiomqtt leaves
    it to the garbage collector, and a broker that accepts but never answers would
    otherwise collect a connection per attempt. Reaches into aiomqtt's paho client."""
    paho = getattr(client, "_client", None)
    reset = getattr(paho, "_reset_sockets", None)  # closes and forgets them, as paho does
    if callable(reset):
        with contextlib.suppress(OSError):
            reset()


def _disconnect_reason(client: aiomqtt.Client) -> BaseException | None:
    """Why paho saw the connection end (the broker's DISCONNECT reason, a lost socket),
    marked retrieved. aiomqtt reads it only during message iteration: a drop while the
    link still subscribed or published its birth left it to the loop's exception
    handler ("Future exception was never retrieved"), which the agent counts as a crash.
    Reaches into aiomqtt's `_disconnected`."""
    disconnected = getattr(client, "_disconnected", None)
    if (
        isinstance(disconnected, asyncio.Future)
        and disconnected.done()
        and not disconnected.cancelled()
    ):
        return disconnected.exception()
    return None


def _watch_inbound(client: aiomqtt.Client, ended: list[str]) -> list[float]:
    """[monotonic time bytes last came from the broker], kept current by wrapping paho's
    socket reads (its own record is reset each time it sends a PINGREQ).

    Also ends the connection (saying why in `ended`) on a packet longer than
    MAX_INBOUND_PACKET_BYTES: paho would read all of it into memory and hand it on,
    whatever maximum the CONNECT announced. paho reads a packet's body asking for
    all of its remaining length, so that is checked before any of it is read.
    Reaches into aiomqtt's paho client; without it, paho's keepalive (2x) still applies."""
    last_in = [time.monotonic()]
    paho = getattr(client, "_client", None)
    recv = getattr(paho, "_sock_recv", None)
    if paho is None or recv is None:
        return last_in

    def counted(bufsize: int) -> bytes:
        if bufsize > MAX_INBOUND_PACKET_BYTES:
            ended.append(
                f"the broker sent a packet of {bufsize} bytes, too large"
                f" (at most {MAX_INBOUND_PACKET_BYTES} allowed)"
            )
            raise ConnectionAbortedError(ended[-1])  # paho: the connection is lost
        data: bytes = recv(bufsize)
        last_in[0] = time.monotonic()
        return data

    paho._sock_recv = counted
    return last_in


def _end_connection(client: aiomqtt.Client) -> None:
    """Close the socket as paho's own keepalive does, so aiomqtt and the link see a
    normal loss (message iteration ends, publishes in flight fail)."""
    paho = client._client
    paho._sock_close()
    paho._do_on_disconnect(packet_from_broker=False, v1_rc=paho_mqtt.MQTT_ERR_KEEPALIVE)


def _on_socket_close(client: aiomqtt.Client, closed: Callable[[], None]) -> None:
    """Also call `closed` (on the loop) when paho closes the socket.

    Before CONNACK aiomqtt ignores a closed socket and waits out its whole connect
    timeout; a peer that accepts and hangs up (a relay or load balancer in front of
    a broker that is down) would cost `connect_timeout_s` per attempt. paho's TLS
    errors are caught earlier through its log (`_ClientLog`), with their reason.
    Reaches into aiomqtt's paho client; without it, attempts just take longer.
    """
    paho = getattr(client, "_client", None)
    inner = getattr(paho, "on_socket_close", None)
    if paho is None or inner is None:
        return
    loop = asyncio.get_running_loop()

    def on_close(c: Any, userdata: Any, sock: Any) -> None:
        inner(c, userdata, sock)
        # paho also closes from its __del__, perhaps after the loop has closed.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(closed)

    paho.on_socket_close = on_close


def _register_writes_now(client: aiomqtt.Client) -> None:
    """Watch paho's socket for writing as soon as paho asks, and never once it is closed.

    aiomqtt's `on_socket_register_write` defers its `add_writer` with
    `call_soon_threadsafe`, because paho may ask from the CONNECT thread; it is deferred
    on the loop thread too. A publish made in the loop turn in which paho then reads
    the broker's FIN or RST (the link dropping) closes the socket before the deferred
    `add_writer` runs: paho's unregister had nothing to remove yet, and `add_writer` on
    the closed descriptor raises EBADF in a bare loop callback, which the crash guard
    counts as fatal. The agent stopped instead of reconnecting (had the number been
    reused meanwhile, it would have watched another socket). On the loop thread this
    registers at once; the CONNECT thread's request still waits for the loop, and is
    dropped if the socket is gone or paho no longer wants to write by then. The write
    callback does what aiomqtt's does. Reaches into aiomqtt's paho client and its
    `_disconnected`; pinned by tests/test_link_stall.py.
    """
    paho = getattr(client, "_client", None)
    if paho is None or getattr(paho, "on_socket_register_write", None) is None:
        return
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()

    def writable(c: Any) -> None:
        try:
            c.loop_write()
        except Exception as exc:  # noqa: BLE001 - as aiomqtt: a failed write ends the connection
            disconnected = client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)

    def register(c: Any, sock: Any) -> None:
        if c.socket() is sock and c._registered_write:  # still open, still wanted
            loop.add_writer(sock.fileno(), writable, c)

    def on_register_write(c: Any, userdata: Any, sock: Any) -> None:
        if threading.get_ident() == loop_thread:
            register(c, sock)
        else:
            loop.call_soon_threadsafe(register, c, sock)

    paho.on_socket_register_write = on_register_write


class BrokerLink:
    """Owns the connection to the broker for the life of the agent."""

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        *,
        sessions: SessionCounter,
        will: Callable[[int], tuple[str, bytes]],
        on_connected: Callable[[int], Awaitable[None]],
        bus: EventBus,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = cfg
        self._client_id = client_id
        self._sessions = sessions
        self._will = will
        self._on_connected = on_connected
        self._bus = bus
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not crypto
        self._client: aiomqtt.Client | None = None
        self._lost: asyncio.Future[None] | None = None  # resolved when this connection ends
        self._subs: dict[str, InboundHandler] = {}
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        self.session = sessions.value
        self.last_error: str | None = None
        self._closing = False
        self._up_since = 0.0  # monotonic time `connected` was last set
        self.publishes_refused = 0  # PUBACKs with a failure reason code (MQTT 5)
        self._refusal_said: dict[str, float] = {}  # topic -> monotonic time of its warning

    @property
    def v5(self) -> bool:
        return self._cfg.protocol == "5"

    def subscribe(self, topic_filter: str, handler: InboundHandler) -> None:
        """Register a handler; (re)subscribed on every connect. Handlers must not block."""
        self._subs[topic_filter] = handler

    async def watch(self, topic_filter: str, handler: InboundHandler) -> bool | None:
        """`subscribe`, and on a live connection subscribe now too.

        Returns whether the broker granted it now (False: refused, e.g. by its ACL), or
        None when not connected (it is sent at the next connect)."""
        self._subs[topic_filter] = handler
        # `_client` is set from CONNACK on: a watch while the connection still subscribes
        # its filters (the list it took may not have this one) subscribes itself.
        client = self._client
        if client is None:
            return None
        try:
            granted = await client.subscribe(topic_filter, qos=1)
        except aiomqtt.MqttError as exc:
            logger.info("mqtt: subscribing to %s failed: %s", topic_filter, exc)
            return None
        return all(_granted(g) for g in granted)

    async def unwatch(self, topic_filter: str) -> None:
        """Drop a subscription made with `watch`."""
        if self._subs.pop(topic_filter, None) is None:
            return
        client = self._client
        if client is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(topic_filter)

    async def run(self) -> None:
        delays = backoff_delays(self._cfg.reconnect_min_s, self._cfg.reconnect_max_s, self._rng)
        # Connect failures already logged at WARNING while down; WARNINGs also become
        # spooled `events`, so attempts alternating between two reasons must not
        # log (and spool) one each.
        warned: set[str] = set()
        while not self._closing:
            try:
                await self._connection()
            except (aiomqtt.MqttError, BrokerUnavailable) as exc:
                self.last_error = str(exc)
            except OSError as exc:  # DNS, TLS files, refused before aiomqtt wraps it
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                if self._lost is not None and not self._lost.done():
                    self._lost.set_result(None)
                was_up = self.connected.is_set()
                self.connected.clear()
                self.disconnected.set()
                self._client = None
            if self._closing:
                return
            if was_up:
                up_s = time.monotonic() - self._up_since
                if up_s >= STABLE_S:
                    delays = backoff_delays(
                        self._cfg.reconnect_min_s, self._cfg.reconnect_max_s, self._rng
                    )
                    warned.clear()
                # A flapping broker is said once per reason, like failed connects.
                say = logger.debug
                if len(warned) < _WARN_REASONS and (self.last_error or "") not in warned:
                    warned.add(self.last_error or "")
                    say = logger.warning
                say("mqtt: connection lost after %.1f s up: %s", up_s, self.last_error)
                self._bus.publish(BrokerDisconnected(self.last_error or "lost"))
            elif len(warned) < _WARN_REASONS and (self.last_error or "") not in warned:
                # Warn once per reason while down; the retries repeat at DEBUG.
                warned.add(self.last_error or "")
                logger.warning(
                    "mqtt: cannot connect to %s:%d (MQTT %s%s): %s; retrying every %g s at most",
                    self._cfg.host,
                    self._cfg.port,
                    self._cfg.protocol,
                    " over TLS" if self._cfg.tls.enabled else "",
                    self.last_error,
                    self._cfg.reconnect_max_s,
                )
            delay = next(delays)
            logger.debug("mqtt: reconnecting in %.1f s (%s)", delay, self.last_error)
            await asyncio.sleep(delay)

    async def _connection(self) -> None:
        session = self._sessions.next()
        will_topic, will_payload = self._will(session)
        cfg = self._cfg
        dropped: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def socket_failed(text: str) -> None:
            if not dropped.done():
                dropped.set_result(text)

        client_log = _ClientLog(socket_failed)
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=self._client_id,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password else None,
            protocol=aiomqtt.ProtocolVersion.V5 if self.v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=True),
            clean_session=None if self.v5 else True,
            keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s,
            tls_context=tls_context(cfg),
            max_inflight_messages=cfg.max_inflight,
            max_queued_incoming_messages=1000,
            logger=client_log,  # type: ignore[arg-type]
            # Call signaling is a few small writes each way: with Nagle on, each waits
            # for the peer's delayed ACK (~40 ms a hop; bench/setup_phases.py).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            properties=_connect_properties() if self.v5 else None,
        )
        _on_socket_close(client, lambda: socket_failed("connection closed by the peer"))
        _register_writes_now(client)
        _watch_pubacks(client, self._refused)
        # aiomqtt warns on every publish while more than this many await their PUBACK;
        # the spool drain keeps `max_inflight` in flight by design (plus health, replies).
        client.pending_calls_threshold = 2 * cfg.max_inflight + 16
        ended: list[str] = []  # why the link itself ended the connection
        last_in = _watch_inbound(client, ended)
        await self._enter(client, dropped)
        client_log.connected = True
        watchdog = asyncio.ensure_future(self._watch_silence(client, last_in, ended))
        try:
            self._lost = asyncio.get_running_loop().create_future()
            self._client = client
            self.session = session
            self.last_error = None
            for topic_filter in list(self._subs):  # `watch` may add one meanwhile
                await client.subscribe(topic_filter, qos=1)
            await self._on_connected(session)
            self.connected.set()
            self.disconnected.clear()
            self._up_since = time.monotonic()
            logger.info(
                "mqtt: connected to %s:%d (session %d, MQTT %s)",
                cfg.host,
                cfg.port,
                session,
                cfg.protocol,
            )
            self._bus.publish(BrokerConnected(session))
            async for message in client.messages:
                self._dispatch(message)
        except aiomqtt.MqttError as exc:
            # "Disconnected during message iteration", a failed subscribe: the reason is
            # what paho saw (the broker's DISCONNECT reason code, a lost socket).
            reason: object = ended[0] if ended else _disconnect_reason(client)
            if dropped.done() and getattr(getattr(reason, "rc", None), "value", None) == 128:
                reason = dropped.result()  # paho's "Unspecified error" for a lost socket
            if reason is None or str(reason) == str(exc):
                raise
            raise BrokerUnavailable(f"{exc}: {reason}") from exc
        finally:
            watchdog.cancel()
            _disconnect_reason(client)
            # A normal DISCONNECT, so the broker discards the Will.
            await client.__aexit__(None, None, None)

    async def _watch_silence(
        self, client: aiomqtt.Client, last_in: list[float], ended: list[str]
    ) -> None:
        """End the connection once the broker has sent nothing for 1.5x keepalive.

        paho sends PINGREQ after a keepalive of silence and gives up only after another
        whole keepalive without PINGRESP; a link that stalls without closing (a NAT or
        a proxy that stops forwarding) held publishes and commands for 2x keepalive.
        A healthy broker answers PINGREQ at once: its silence is at most a keepalive, plus
        up to a second before paho's loop sends the ping, plus the round trip; at least
        3 s are left for those two (a slow cellular link, the shortest keepalive)."""
        keepalive = self._cfg.keepalive_s
        limit = max(1.5 * keepalive, keepalive + STALL_GRACE_S)
        while (silent := time.monotonic() - last_in[0]) < limit:  # noqa: ASYNC110 - a deadline
            await asyncio.sleep(limit - silent + 0.01)
        ended.append(
            f"nothing from the broker for {silent:.1f} s (keepalive {self._cfg.keepalive_s} s):"
            " the link stalled"
        )
        _end_connection(client)

    @staticmethod
    async def _enter(client: aiomqtt.Client, dropped: asyncio.Future[str]) -> None:
        """CONNECT and wait for CONNACK, or fail as soon as the socket is dropped."""
        # aiomqtt's __aenter__ replaces this future if it completed by the time CONNACK
        # was handled: a broker that hangs up right after CONNACK left the link "up" on
        # a dead client (the drop forgotten, its exception unretrieved: fatal in the
        # agent's loop handler). Kept here to see that drop.
        disconnected = client._disconnected
        enter = asyncio.ensure_future(client.__aenter__())
        either: set[asyncio.Future[Any]] = {enter, dropped}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            # A broker that refuses (bad credentials) sends CONNACK and closes at once:
            # the refusal has the better reason, and aiomqtt needs a few loop turns to
            # turn the CONNACK it already read into an error. Turns, not wall time.
            for _ in range(_CONNACK_GRACE_TURNS):
                if enter.done():
                    break
                await asyncio.sleep(0)
        finally:
            if not enter.done():
                enter.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await enter
            if enter.cancelled() or enter.exception() is not None:
                _close_socket(client)
                # The attempt is abandoned, and aiomqtt may record its drop now or later
                # (a CONNACK read while its connect thread had not returned): nobody
                # awaits that future any more, and an unretrieved exception is fatal
                # in the agent's loop handler.
                client._disconnected.add_done_callback(_retrieve)
        if enter.cancelled():
            refused = _connack_refusal(client)
            if refused is not None:
                raise refused
            if _connack_accepted(client):
                # What the link says when aiomqtt's connect had returned: paho's reason
                # (a protocol error), unless paho only saw the socket go.
                reason: object = _disconnect_reason(client)
                if reason is None or getattr(getattr(reason, "rc", None), "value", None) == 128:
                    reason = dropped.result()
                raise BrokerUnavailable(f"connection closed right after CONNACK: {reason}")
            raise BrokerUnavailable(f"connection closed before CONNACK: {dropped.result()}")
        enter.result()
        if disconnected.done():
            reason = None if disconnected.cancelled() else disconnected.exception()
            if not client._disconnected.done():  # nothing left to DISCONNECT
                client._disconnected.set_result(None)
            await client.__aexit__(None, None, None)  # releases aiomqtt's lock
            raise BrokerUnavailable(f"connection closed right after CONNACK: {reason}")

    def _refused(self, topic: str, reason: str, *, by_broker: bool = True) -> None:
        """The broker answered a publish with a failure (MQTT 5 PUBACK: its ACL, quota or
        a bad topic), or the topic could not be sent at all: the message is gone and
        retrying would not help. Said, not silent."""
        self.publishes_refused += 1
        topic = repr(topic[:80])[1:-1]  # a NUL or a newline in it stays readable in the log
        now = time.monotonic()
        if now - self._refusal_said.get(topic, -REFUSAL_QUIET_S) < REFUSAL_QUIET_S:
            return
        if len(self._refusal_said) >= 256:
            self._refusal_said.clear()
        self._refusal_said[topic] = now
        logger.warning(
            "mqtt: the broker refused our publish to %s (%s); check its ACL (%d refused so far)"
            if by_broker
            else "mqtt: a publish to %s was refused here (%s; %d refused so far)",
            topic,
            reason,
            self.publishes_refused,
        )

    def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        handler = next((h for f, h in self._subs.items() if message.topic.matches(f)), None)
        if handler is None:
            return
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        props = message.properties
        inbound = Inbound(
            topic=topic,
            payload=bytes(payload),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
            user_properties=tuple(getattr(props, "UserProperty", ()) or ()) if props else (),
            retain=bool(message.retain),
        )
        try:
            handler(inbound)
        except Exception:  # a handler bug must not take the broker link down
            logger.exception("mqtt: handler for %s failed", topic)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        user_properties: list[tuple[str, str]] | None = None,
        timeout_s: float = 10.0,
    ) -> bool:
        """Publish; with QoS 1 this returns only after the broker's PUBACK, and False
        when that PUBACK was a refusal (MQTT 5: the broker's ACL; said in the log too).
        A topic no broker would take (a wildcard, a NUL: one gets the whole connection
        dropped by mosquitto) is not sent and also gives False."""
        problem = publish_topic_problem(topic)
        if problem is not None:
            self._refused(topic, f"not sent: {problem}", by_broker=False)
            return False
        client = self._client  # set from CONNACK on, so birth can go out before `connected`
        if client is None:
            raise BrokerUnavailable("not connected")
        props = None
        if self.v5 and (correlation_data is not None or user_properties):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if user_properties:
                props.UserProperty = user_properties
        refusals: list[str] = []
        token = _PUBLISH_OUTCOME.set(refusals)  # copied into the send task's context
        try:
            await self._send(client, topic, payload, qos, retain, props, timeout_s)
        finally:
            _PUBLISH_OUTCOME.reset(token)
        return not refusals

    async def _send(
        self,
        client: aiomqtt.Client,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        props: Properties | None,
        timeout_s: float,
    ) -> None:
        lost = self._lost
        send = asyncio.ensure_future(
            client.publish(
                topic, payload, qos=qos, retain=retain, properties=props, timeout=timeout_s
            )
        )
        if lost is not None:
            # aiomqtt leaves a QoS 1 publish waiting for its full timeout when the
            # connection drops; end it at once so the spool resends on the next one.
            await asyncio.wait({send, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not send.done():
                send.cancel()
                raise BrokerUnavailable("connection lost before the broker acknowledged")
        try:
            await send
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def close(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish `final` (the clean `offline` status) and stop reconnecting.

        The owner then cancels `run()`; leaving the client's context sends a
        normal DISCONNECT, so the broker discards the Will.
        """
        self._closing = True
        client = self._client
        if client is not None and final is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(final[0], final[1], qos=1, retain=True, timeout=2.0)
