"""Property-based fuzzing of command requests: never a crash, exactly one final answer per
request, and no handler ever runs without a valid signature.

The server runs with a real broker link on an event loop in a helper thread, so hypothesis
(synchronous) drives it example by example: thousands straight into the server's request
pipeline, and a few hundred published through mosquitto and counted on `cmd-res/#`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest
from agent_support import Collector, collector
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schema_support import assert_valid
from test_commands import DEVICE, TOPICS, Rig, make_rig

from edgeagent.control.catalog import CATALOG
from edgeagent.control.keys import command_claims, sign_command
from edgeagent.control.server import CommandLimits
from edgeagent.mqtt import Inbound

pytestmark = [pytest.mark.broker, pytest.mark.slow]

T = TypeVar("T")
# No rate limit or in-flight cap in the way: every request must reach the verifier.
OPEN_LIMITS = CommandLimits(request_rate_per_s=1e6, request_burst=1e6, max_in_flight=10_000)


class LoopThread:
    """An event loop in a thread, for driving async code from synchronous hypothesis tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.run(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Harness:
    lt: LoopThread
    rig: Rig
    collector: Collector | None = None
    client: aiomqtt.Client | None = None


@contextlib.contextmanager
def harness(tmp_path: Path, port: int, *, with_broker_client: bool = False) -> Iterator[Harness]:
    lt = LoopThread()
    stack = contextlib.AsyncExitStack()
    try:
        rig = lt.run(stack.enter_async_context(make_rig(tmp_path, port, limits=OPEN_LIMITS)))
        h = Harness(lt, rig)
        if with_broker_client:
            h.collector = lt.run(
                stack.enter_async_context(collector(port, f"{TOPICS.root}/cmd-res/#"))
            )

            async def connect() -> aiomqtt.Client:  # aiomqtt binds to the running loop
                client = aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5)
                return await stack.enter_async_context(client)

            h.client = lt.run(connect())
        yield h
        assert rig.server_task is not None and not rig.server_task.done()  # never crashed
    finally:
        lt.run(stack.aclose())
        lt.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.one_of(
    st.sampled_from(sorted(CATALOG)), st.text("abcdefghijklmnopqrstuvwxyz_-.", max_size=12)
)


@st.composite
def claims_like(draw: st.DrawFn) -> dict[str, Any]:
    base: dict[str, Any] = command_claims(DEVICE, draw(names), lifetime_s=60)
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del base[key]
        else:
            base[key] = draw(json_values)
    return base


@st.composite
def forged(draw: st.DrawFn) -> bytes:
    """Inputs without a valid signature by a trusted key."""
    kind = draw(st.sampled_from(["bytes", "json", "claims", "jws-random", "jws-claims"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "claims":
        return json.dumps(draw(claims_like())).encode()
    header = {
        "alg": draw(st.sampled_from(["EdDSA", "none", "HS256", "RS256", "ES256", ""])),
        "kid": draw(st.sampled_from(["dbg", "reader", "forcer", "stranger", "", "x" * 80])),
    }
    if draw(st.booleans()):
        header[draw(st.text(max_size=5))] = draw(json_scalars)
    payload: Any = draw(claims_like()) if kind == "jws-claims" else draw(json_values)
    sig = draw(st.binary(min_size=0, max_size=80))
    return (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(sig)}"
    ).encode()


def totals(rig: Rig) -> tuple[int, int]:
    return sum(rig.server.answered.values()), sum(rig.server.executed.values())


def test_fuzz_direct_never_executes_unsigned_and_answers_once(tmp_path: Path, broker: Any) -> None:
    with harness(tmp_path, broker.port) as h:
        rig = h.rig

        @settings(
            max_examples=1500,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(
            name=names,
            case=st.one_of(
                forged().map(lambda b: ("forged", b, 0, 0)),
                st.tuples(st.integers(0, 10_000), st.integers(0, 255)).map(
                    lambda t: ("mutate", b"", t[0], t[1])
                ),
                st.just(("stranger", b"", 0, 0)),
                st.just(("valid", b"", 0, 0)),
            ),
        )
        def check(name: str, case: tuple[str, bytes, int, int]) -> None:
            kind, payload, pos, byte = case
            topic = name
            expect_exec = 0
            if kind in ("mutate", "valid", "stranger"):
                topic = "ping"
                kid = "stranger" if kind == "stranger" else "reader"
                token = sign_command(rig.keys.private[kid], kid, command_claims(DEVICE, "ping"))
                raw = token.encode()
                if kind == "mutate":
                    i = pos % (len(raw) + 1)
                    payload = raw[:i] + bytes([byte]) + raw[i + 1 :]
                    expect_exec = 1 if payload.strip() == raw else 0
                else:
                    payload = raw
                    expect_exec = 1 if kind == "valid" else 0
            answered, executed = totals(rig)
            message = Inbound(f"{TOPICS.root}/cmd/{topic}", payload)
            h.lt.run(rig.server.process(message))
            answered_after, executed_after = totals(rig)
            assert answered_after == answered + 1
            assert executed_after == executed + expect_exec, (kind, payload[:80])

        check()
        assert sum(rig.server.answered.values()) >= 1500
        assert rig.server.executed.keys() <= {"ping"}


def test_fuzz_through_mosquitto_one_answer_per_request(tmp_path: Path, broker: Any) -> None:
    with harness(tmp_path, broker.port, with_broker_client=True) as h:
        c, client = h.collector, h.client
        assert c is not None and client is not None
        sent = [0]

        def finals() -> list[Any]:
            return [m for m in c.messages if m.json()["code"] != 202]

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(name=names.filter(lambda n: n != ""), payload=forged())
        def check(name: str, payload: bytes) -> None:
            h.lt.run(client.publish(f"{TOPICS.root}/cmd/{name}", payload, qos=1))
            sent[0] += 1
            h.lt.run(c.wait_for(lambda ms: len(finals()) >= sent[0]))
            assert len(finals()) == sent[0]

        check()
        # A valid request afterwards: answered, and nothing else turned up late.
        token = h.rig.keys.token("ping", kid="reader")
        h.lt.run(client.publish(f"{TOPICS.root}/cmd/ping", token, qos=1))
        h.lt.run(c.wait_for(lambda ms: len(finals()) >= sent[0] + 1))
        answers = finals()
        assert len(answers) == sent[0] + 1
        assert answers[-1].json()["code"] == 200
        for m in answers:
            assert_valid(m.topic, m.payload)
        assert h.rig.server.executed == {"ping": 1}
