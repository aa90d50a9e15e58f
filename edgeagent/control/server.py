"""The command server: MQTT and local-socket front ends, admission, dispatch and the answer.

Every request that reaches the device gets exactly one final answer (protocol section 3),
whatever it contains: verification and admission failures are `CommandError`s, a handler that
times out or has a bug is answered 500 (the one blind `except` of the command boundary).
Long commands first get a 202. Requests are queued by the link's (synchronous) callback and
run as tasks of `run()`'s TaskGroup, so nothing outlives the server.

Order of checks after the token (tokens.py has its own): catalog (404), arguments (400),
arming of dangerous commands (403), an active call (409 unless the key may force), the one
dangerous command at a time (409), per-key request rate (429), heavy-command rate (429,
persisted so restarts do not refill it).

A flood past the queue or the in-flight cap is answered 429 without verification: the id is
peeked from the payload (unauthenticated; nothing runs), the answers wait in a backlog bounded
in bytes and go out from one task, a batch at a time. Past that backlog, requests are dropped
unanswered (counted, logged): the one place "exactly one answer" yields to staying alive.

Responses go to the request's MQTT 5 Response Topic with its Correlation Data echoed, as the
contract says; the broker's ACL is what limits where a device may publish. A Response Topic
that cannot be published to (`topics.publish_topic_problem`) is not followed: the answer goes to
`<root>/cmd-res/<id>` (`<root>/cmd-res/invalid` when no id could be read) with a `warning`
saying why. Without a Response Topic (MQTT 3.1.1), answers go there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from edgeagent.clock import Clock
from edgeagent.control.catalog import (
    CATALOG,
    CommandError,
    CommandSpec,
    Risk,
    Role,
    Status,
    decode_args,
    get_spec,
)
from edgeagent.control.context import (
    ACCEPT_FIRST,
    MAX_OUTPUT_BYTES,
    CommandContext,
    CommandLimits,
    describe_catalog,
    fit_output,
)
from edgeagent.control.handlers import AfterReply, Handlers
from edgeagent.control.keys import TrustedKey, load_keys_file
from edgeagent.control.ratelimit import RateLimiter
from edgeagent.control.redact import Redactor
from edgeagent.control.replay import ReplayCache
from edgeagent.control.tokens import JTI_PATTERN, VerifiedCommand, Verifier, peek_jti
from edgeagent.mqtt import BrokerLink, BrokerUnavailable, Inbound
from edgeagent.telemetry import payloads as p
from edgeagent.telemetry.publisher import Publisher
from edgeagent.telemetry.topics import Topics, publish_topic_problem

__all__ = [
    "ACCEPT_FIRST",
    "MAX_OUTPUT_BYTES",
    "CommandContext",
    "CommandLimits",
    "CommandServer",
    "build_command_server",
    "describe_catalog",
    "fit_output",
    "load_keys_file",
]

logger = logging.getLogger(__name__)

MAX_LOCAL_LINE: Final = 64 * 1024
# Each local connection holds a descriptor: past this many, a new one is refused at once.
MAX_LOCAL_CLIENTS: Final = 32
LOCAL_IDLE_S: Final = 10.0  # no complete request line for this long: answered 400, closed
LOCAL_WRITE_S: Final = 10.0  # an answer the client does not read for this long: closed
# Answered 202 at once, then finally: they take seconds to a minute.
_JTI_RE: Final = re.compile(JTI_PATTERN)
_CMD_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ALL_ROLES: Final = frozenset(r.value for r in Role)
# A refused request waiting for its 429 is charged its topic, correlation data and this.
_REFUSAL_OVERHEAD_BYTES: Final = 256
_REFUSAL_BATCH: Final = 32  # 429s published concurrently, one batch at a time
DEFAULT_LIMITS: Final = CommandLimits()


ReplySink = Callable[[p.CommandResponse, bool], Awaitable[None]]


@dataclass(slots=True)
class _Request:
    via: str  # "mqtt" | "local"
    topic_cmd: str | None
    payload: bytes = b""
    local: VerifiedCommand | None = None
    response_topic: str | None = None
    correlation: bytes | None = None
    sink: ReplySink | None = None  # local requests answer on their socket
    done: asyncio.Future[None] | None = field(default=None)


class CommandServer:
    """Answers remote (MQTT) and local (unix socket) commands for one device.

    Registers its MQTT subscription at construction, so construct it before the link runs.
    """

    def __init__(
        self,
        topics: Topics,
        link: BrokerLink,
        verifier: Verifier,
        context: CommandContext,
        publisher: Publisher,
        *,
        clock: Clock,
        armed: set[str] | frozenset[str] = frozenset(),
        heavy_limits: RateLimiter,
        request_limits: RateLimiter | None = None,
        limits: CommandLimits = DEFAULT_LIMITS,
        local_socket: Path | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._topics = topics
        self._link = link
        self._verifier = verifier
        self._ctx = context
        self._publisher = publisher
        self._clock = clock
        self.armed = frozenset(armed)
        unknown = self.armed - {n for n, s in CATALOG.items() if s.risk is Risk.DANGEROUS}
        if unknown:
            logger.warning("commands: armed lists non-dangerous commands %s", sorted(unknown))
        self._heavy = heavy_limits
        self._requests = request_limits or RateLimiter(
            limits.request_rate_per_s, limits.request_burst, clock.monotonic
        )
        self.limits = limits
        self.local_socket = local_socket
        self._redact = redactor or Redactor()
        self.handlers = Handlers(context, clock=clock, open_mode=verifier.open_mode)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(limits.queue_size)
        self._in_flight = 0
        self._dangerous: str | None = None
        self.executed: dict[str, int] = {}  # handler runs per command (tests, stats)
        self.answered: dict[int, int] = {}  # final answers per code
        self.received = 0  # MQTT requests that reached on_inbound
        self.dropped = 0  # requests left unanswered: the refusal backlog was full
        self.topics_refused = 0  # Response Topics that could not be published to
        self._refusals: deque[tuple[_Request, str | None, str, int]] = deque()
        self._refusal_bytes = 0
        self._refusals_waiting = asyncio.Event()
        self.local_ready = asyncio.Event()
        self._local_writers: set[asyncio.StreamWriter] = set()
        self.local_max_clients = MAX_LOCAL_CLIENTS
        self.local_idle_s = LOCAL_IDLE_S
        self.local_write_s = LOCAL_WRITE_S
        link.subscribe(topics.cmd_filter, self.on_inbound)

    @property
    def verifier(self) -> Verifier:
        """The token checks, with the trusted keys and replay cache (also for signed offers)."""
        return self._verifier

    # --- front ends -----------------------------------------------------------------------

    def on_inbound(self, message: Inbound) -> None:
        """The link's callback for `<root>/cmd/+`; queues the request (never blocks)."""
        self.received += 1
        request = self._mqtt_request(message)
        if not self._enqueue(request):
            self._refuse(request, "request queue full")

    async def process(self, message: Inbound) -> None:
        """Answer one MQTT request inline: what `run()` does for each queued one."""
        await self._process(self._mqtt_request(message))

    @staticmethod
    def _mqtt_request(message: Inbound) -> _Request:
        return _Request(
            "mqtt",
            message.topic.rsplit("/", 1)[-1],
            message.payload,
            response_topic=message.response_topic,
            correlation=message.correlation_data,
        )

    def _enqueue(self, request: _Request) -> bool:
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            return False
        return True

    def _refuse(self, request: _Request, reason: str) -> None:
        """Queue a 429 for an unverified MQTT request; drop it if the backlog is full."""
        jti = peek_jti(request.payload)
        cost = (
            _REFUSAL_OVERHEAD_BYTES
            + len(request.response_topic or "")
            + len(request.correlation or b"")
        )
        if self._refusal_bytes + cost > self.limits.refusal_backlog_bytes:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning(
                    "commands: flood: %s and the 429 backlog is full; %d dropped unanswered",
                    reason,
                    self.dropped,
                )
            return
        request.payload = b""  # only what the answer needs is kept
        self._refusals.append((request, jti, reason, cost))
        self._refusal_bytes += cost
        self._refusals_waiting.set()

    async def run(self) -> None:
        """Serve until cancelled: the request queue, and the local socket when configured."""
        try:
            async with asyncio.TaskGroup() as tg:
                if self.local_socket is not None:
                    tg.create_task(self._serve_local(self.local_socket), name="cmd-local")
                tg.create_task(self._answer_refusals(), name="cmd-refusals")
                while True:
                    request = await self._queue.get()
                    tg.create_task(self._process(request), name=f"cmd:{request.topic_cmd}")
        finally:
            self.handlers.close()

    # --- the pipeline ---------------------------------------------------------------------

    async def _process(self, req: _Request) -> None:
        """Answer one request exactly once (a 202 may come first)."""
        self._in_flight += 1
        after: Callable[[], None] | None = None
        try:
            if self._in_flight > self.limits.max_in_flight:
                # Unverified, like the queue's refusals: the id is only peeked.
                jti = req.local.jti if req.local is not None else peek_jti(req.payload)
                final = self._response(
                    req, jti, Status.RATE_LIMITED, error="too many requests in flight"
                )
                kid: str | None = None
            else:
                final, kid, after = await self._execute(req)
            await self._answer(req, final, final=True)
            self._audit(req, final, kid)
        finally:
            self._in_flight -= 1
            if req.done is not None and not req.done.done():
                req.done.set_result(None)
        if after is not None:
            after()  # crash/restart: after the answer; may raise into the TaskGroup (crash)

    async def _execute(
        self, req: _Request
    ) -> tuple[p.CommandResponse, str | None, Callable[[], None] | None]:
        jti: str | None = None
        kid: str | None = None
        try:
            if req.local is not None:
                verified = req.local
            else:
                verified = self._verifier.verify(req.topic_cmd or "", req.payload)
            jti, kid = verified.jti, verified.kid
            spec = get_spec(verified.cmd)
            args = decode_args(spec, verified.args)
            self._admit(spec, verified)
        except CommandError as exc:
            jti = exc.jti or jti
            kid = exc.kid or kid
            return self._response(req, jti, exc.code, error=exc.message), kid, None
        except Exception as exc:  # e.g. the replay cache on a full disk: answer, live on
            logger.exception("commands: checking a %s request failed", req.topic_cmd)
            jti = jti or (peek_jti(req.payload) if req.local is None else None)
            why = f"internal error checking the request: {type(exc).__name__}: {exc}"
            return self._response(req, jti, Status.INTERNAL, error=why), kid, None
        dangerous = spec.risk is Risk.DANGEROUS
        if dangerous:
            self._dangerous = spec.name
        try:
            if spec.name in self.limits.accept_first:
                accepted = self._response(req, jti, Status.ACCEPTED, result={"accepted": True})
                await self._answer(req, accepted, final=False)
            code, result, error, after = await self._run_handler(spec, args)
        finally:
            if dangerous:
                self._dangerous = None
        return self._response(req, jti, code, result=result, error=error), kid, after

    def _admit(self, spec: CommandSpec, cmd: VerifiedCommand) -> None:
        def fail(code: Status, message: str) -> CommandError:
            return CommandError(code, message, jti=cmd.jti, kid=cmd.kid)

        if spec.risk is Risk.DANGEROUS and spec.name not in self.armed:
            raise fail(Status.FORBIDDEN, f"{spec.name} is not armed on this device")
        if spec.refuses_during_call and not cmd.may_force and self._ctx.call_active():
            raise fail(Status.BUSY, f"a call is active; {spec.name} refused")
        if spec.risk is Risk.DANGEROUS and self._dangerous is not None:
            raise fail(Status.BUSY, f"busy: {self._dangerous} is running")
        key = cmd.kid or "open"
        if not self._requests.try_acquire(key):
            raise fail(Status.RATE_LIMITED, f"rate limited: too many requests from {key!r}")
        if spec.heavy and not self._heavy.try_acquire(spec.name):
            wait = self._heavy.retry_after(spec.name)
            raise fail(Status.RATE_LIMITED, f"rate limited: {spec.name} again in {wait:.0f} s")

    async def _run_handler(
        self, spec: CommandSpec, args: msgspec.Struct
    ) -> tuple[int, Any, str | None, Callable[[], None] | None]:
        self.executed[spec.name] = self.executed.get(spec.name, 0) + 1
        handler = self.handlers.table[spec.name]
        try:
            async with asyncio.timeout(spec.timeout_s) as scope:
                result = await handler(args)
        except CommandError as exc:
            return exc.code, None, exc.message, None
        except TimeoutError:
            if scope.expired():
                logger.warning("commands: %s timed out after %.0f s", spec.name, spec.timeout_s)
                return Status.INTERNAL, None, f"timed out after {spec.timeout_s:.0f} s", None
            logger.exception("commands: %s failed", spec.name)
            return Status.INTERNAL, None, "internal error: TimeoutError", None
        except Exception as exc:  # the command boundary: answer, never crash
            logger.exception("commands: %s failed", spec.name)
            return Status.INTERNAL, None, f"internal error: {type(exc).__name__}: {exc}", None
        if isinstance(result, AfterReply):
            return Status.OK, result.result, None, result.action
        return Status.OK, result, None, None

    # --- answers --------------------------------------------------------------------------

    def _response(
        self,
        req: _Request,
        jti: str | None,
        code: int,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> p.CommandResponse:
        name = req.topic_cmd if req.topic_cmd and _CMD_NAME_RE.fullmatch(req.topic_cmd) else None
        truncated: bool | None = None
        if result is not None:
            result = self._redact(result)
            budget = self.limits.max_output_bytes - 1024  # the envelope
            result, cut = fit_output(result, budget)
            truncated = True if cut else None
        if error is not None:
            error = self._redact.text(error)[:2000]
        return p.CommandResponse(
            v=p.PROTOCOL_VERSION,
            device=self._topics.device_id,
            ts=self._publisher.ts(),
            id=jti,
            cmd=name,
            ok=200 <= code < 300,
            code=int(code),
            result=result,
            error=error,
            truncated=truncated,
        )

    def _fallback(self, jti: str | None) -> str:
        """`<root>/cmd-res/<id>`: where an answer goes that has no usable Response Topic."""
        return self._topics.cmd_res(jti if jti and _JTI_RE.fullmatch(jti) else "invalid")

    def route(self, req: _Request, jti: str | None) -> tuple[str, str | None]:
        """Where the answer to `req` goes, and why its Response Topic was refused (if it was)."""
        fallback = self._fallback(jti)
        rt = req.response_topic
        if rt is None:
            return fallback, None
        problem = publish_topic_problem(rt)
        if problem is None:
            return rt, None
        return fallback, f"response topic not followed: {problem}; answered on {fallback}"

    async def _answer(self, req: _Request, response: p.CommandResponse, *, final: bool) -> None:
        if final:
            self.answered[response.code] = self.answered.get(response.code, 0) + 1
        if req.sink is not None:
            await req.sink(response, final)
            return
        topic, refused = self.route(req, response.id)
        if refused is not None:
            response = msgspec.structs.replace(response, warning=refused)
            if final:
                self.topics_refused += 1
                log = logger.warning if self.topics_refused == 1 else logger.debug
                log("commands: %s %.80r: %s", response.cmd, req.response_topic, refused)
        try:
            # The Correlation Data is echoed wherever the answer goes (MQTT 5 only).
            taken = await self._link.publish(
                topic, p.encode(response), qos=1, correlation_data=req.correlation
            )
            fallback = self._fallback(response.id)
            if not taken and topic != fallback:
                # The broker refused the Response Topic (its ACL): answered where the
                # device may write, saying so, rather than not at all.
                why = f"the broker refused the response topic; answered on {fallback}"
                response = msgspec.structs.replace(response, warning=why)
                await self._link.publish(
                    fallback, p.encode(response), qos=1, correlation_data=req.correlation
                )
        except BrokerUnavailable as exc:
            logger.warning("commands: answer to %s lost: %s", response.id, exc)

    async def _answer_refusals(self) -> None:
        """Send the queued 429s, a bounded batch at a time, until cancelled."""
        while True:
            await self._refusals_waiting.wait()
            self._refusals_waiting.clear()
            while self._refusals:
                batch = [
                    self._refusals.popleft()
                    for _ in range(min(_REFUSAL_BATCH, len(self._refusals)))
                ]
                await asyncio.gather(*(self._send_refusal(*item) for item in batch))

    async def _send_refusal(self, req: _Request, jti: str | None, reason: str, cost: int) -> None:
        try:
            response = self._response(req, jti, Status.RATE_LIMITED, error=reason)
            await self._answer(req, response, final=True)
        finally:
            self._refusal_bytes -= cost

    def _audit(self, req: _Request, response: p.CommandResponse, kid: str | None) -> None:
        level: p.Level = "info" if response.ok else "warning"
        self._publisher.event(
            level,
            "cmd",
            f"{response.cmd or '?'} -> {response.code}",
            data={
                "kid": kid,
                "cmd": response.cmd,
                "code": response.code,
                "id": response.id,
                "via": req.via,
            },
        )

    # --- local socket ---------------------------------------------------------------------

    async def _serve_local(self, path: Path) -> None:
        try:
            _prepare_socket_dir(path)
            server = await asyncio.start_unix_server(
                self._on_local, path=str(path), limit=MAX_LOCAL_LINE
            )
            os.chmod(path, 0o600)
        except OSError as exc:  # a path check-config passed, changed since: no socket, no crash
            logger.error("commands: local socket %s unavailable (%s); MQTT only", path, exc)
            return
        logger.info("commands: local socket %s", path)
        self.local_ready.set()
        try:
            await asyncio.Future()  # until cancelled
        finally:
            self.local_ready.clear()
            server.close()
            for w in list(self._local_writers):
                w.close()
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _on_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._local_writers) >= self.local_max_clients:
            # Refused without waiting: the answer fits the socket buffer, close frees the fd.
            why = f"too many local connections ({self.local_max_clients}); try again"
            refusal = self._response(_Request("local", None), None, Status.RATE_LIMITED, error=why)
            writer.write(p.encode(refusal) + b"\n")
            writer.close()
            logger.debug("commands: local socket: %s", why)
            return
        self._local_writers.add(writer)
        lock = asyncio.Lock()

        async def sink(response: p.CommandResponse, _final: bool) -> None:
            # Runs in the request's task: a client that left or does not read is closed
            # here, never raised into the server's TaskGroup.
            async with lock:
                if writer.is_closing():
                    return
                writer.write(p.encode(response) + b"\n")
                try:
                    async with asyncio.timeout(self.local_write_s):
                        await writer.drain()
                except (TimeoutError, ConnectionError, OSError) as exc:
                    logger.debug("commands: local client gone or not reading; closed: %r", exc)
                    writer.transport.abort()

        try:
            while not writer.is_closing():  # closed by the sink: lines read ahead are dropped
                try:
                    async with asyncio.timeout(self.local_idle_s):
                        line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    req = _Request("local", None, sink=sink)
                    await self._local_error(req, Status.TOO_LARGE, "line over 64 KiB")
                    return
                except TimeoutError:
                    req = _Request("local", None, sink=sink)
                    why = f"no complete request line in {self.local_idle_s:g} s; closing"
                    await self._answer(
                        req, self._response(req, None, Status.BAD_REQUEST, error=why), final=True
                    )
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                req = self._parse_local(line, sink)
                if req.local is None:
                    await self._local_error(req, Status.BAD_REQUEST, 'expected {"cmd", "args"}')
                    continue
                req.done = asyncio.get_running_loop().create_future()
                if not self._enqueue(req):
                    await self._local_error(req, Status.RATE_LIMITED, "request queue full")
                    continue
                await req.done
        except (ConnectionError, OSError) as exc:
            logger.debug("commands: local client gone: %s", exc)
        finally:
            self._local_writers.discard(writer)
            writer.close()

    def _parse_local(self, line: bytes, sink: ReplySink) -> _Request:
        """A trusted request from one JSON line; without `local` when malformed."""
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            obj = None
        cmd = obj.get("cmd") if isinstance(obj, dict) else None
        args = obj.get("args", {}) if isinstance(obj, dict) else None
        rid = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(rid, str) or not _JTI_RE.fullmatch(rid):
            rid = f"local-{uuid.uuid4().hex[:16]}"
        if not isinstance(cmd, str) or not isinstance(args, dict):
            return _Request("local", cmd if isinstance(cmd, str) else None, sink=sink)
        now = int(self._clock.time())
        verified = VerifiedCommand(
            jti=rid,
            kid="local",
            cmd=cmd,
            args=args,
            iat=now,
            exp=now,
            may_force=True,  # a technician on site may act during a call
            roles=_ALL_ROLES,
        )
        return _Request("local", cmd, local=verified, sink=sink)

    async def _local_error(self, req: _Request, code: Status, message: str) -> None:
        response = self._response(req, None, code, error=message)
        await self._answer(req, response, final=True)
        self._audit(req, response, "local")


def _prepare_socket_dir(path: Path) -> None:
    """Parent directory 0700 when we create it; a stale socket file is removed."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700)
        os.chmod(parent, 0o700)  # mkdir's mode is masked by the umask
    elif parent.stat().st_mode & 0o077:
        logger.warning("commands: %s is accessible to others; the socket is 0600", parent)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode):
        path.unlink()
    else:
        raise FileExistsError(f"{path} exists and is not a socket")


def build_command_server(
    *,
    device_id: str,
    topics: Topics,
    link: BrokerLink,
    publisher: Publisher,
    context: CommandContext,
    clock: Clock,
    state_dir: Path,
    commands_mode: str,
    keys_file: Path | None,
    max_token_lifetime_s: int,
    armed: list[str],
    local_socket: Path | None,
    known_secrets: list[str | None] = [],  # noqa: B006 - read only
    limits: CommandLimits = DEFAULT_LIMITS,
) -> CommandServer:
    """The server with its verifier, replay cache and persisted limits, from settings."""
    keys: dict[str, TrustedKey] = {}
    if keys_file is not None:
        keys = load_keys_file(keys_file)
    elif commands_mode != "open":
        logger.warning("commands: no keys_file; every signed command will be refused (401)")
    replay = ReplayCache(state_dir / "replay.sqlite3", clock.time)
    verifier = Verifier(
        device_id,
        keys,
        max_lifetime_s=max_token_lifetime_s,
        replay=replay,
        clock=clock.time,
        open_mode=commands_mode == "open",
        clock_synced=context.clock_synced,
    )
    heavy = RateLimiter(
        limits.heavy_rate_per_s,
        limits.heavy_burst,
        clock.time,
        path=state_dir / "cmd-ratelimit.json",
    )
    return CommandServer(
        topics,
        link,
        verifier,
        context,
        publisher,
        clock=clock,
        armed=set(armed),
        heavy_limits=heavy,
        limits=limits,
        local_socket=local_socket,
        redactor=Redactor(known_secrets),
    )
