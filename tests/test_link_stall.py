"""A publish made as the broker link drops must leave the link to reconnect.

The "no reconnect after the relay reopened" of commit 3bdf89e: a publish handed to paho
in the loop turn in which paho reads the broker's FIN had aiomqtt defer its
`add_writer` past paho closing the socket; it then raised EBADF in a bare loop callback,
which the agent's crash guard counts as fatal, so the agent stopped. Any publish can
meet a dropping link (the drain, health, a command's answer), not only that variant.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import collector
from tcp_relay import TcpRelay
from test_mqtt_transport import link_cfg, running_link

from edgeagent.mqtt import BrokerUnavailable

pytestmark = pytest.mark.broker

TOPIC = "edge/v1/dev-1/events"


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler: in the agent, a crash report and a stop."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


def readable(sock: socket.socket) -> None:
    """Until the relay's FIN is in `sock`: paho reads it in the loop's next turn."""
    ready, _, _ = select.select([sock], [], [], 5.0)
    assert ready, "the relay's close never reached the link's socket"


async def test_a_publish_as_the_link_drops_leaves_it_to_reconnect(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
) -> None:
    relay = TcpRelay(broker.port)
    await relay.start()
    try:
        with loop_errors() as errors:
            async with running_link(tmp_path, link_cfg(relay.port)) as link:
                await asyncio.wait_for(link.connected.wait(), 10)
                client = link._client
                assert client is not None
                paho_sock = client._client.socket()
                assert isinstance(paho_sock, socket.socket)
                loop = asyncio.get_running_loop()
                # Turn 1 (now): the publish is started and the relay closed. Turn 2: the
                # publish starts aiomqtt's, the relay's sockets close, and the FIN is in
                # the link's socket. Turn 3: aiomqtt's publish hands the packet to paho
                # (which asks for the socket to be watched for writing), then paho reads
                # the FIN and closes the socket. Scheduling order, not timing.
                publish = asyncio.ensure_future(link.publish(TOPIC, b'{"seq": 1}', qos=1))
                relay.set_open(False)
                loop.call_soon(readable, paho_sock)
                with pytest.raises(BrokerUnavailable):  # the spool sends it again
                    await asyncio.wait_for(publish, 10)
                await asyncio.wait_for(link.disconnected.wait(), 10)

                async with collector(broker.port, TOPIC) as c:
                    relay.set_open(True)
                    await asyncio.wait_for(link.connected.wait(), 10)
                    assert await link.publish(TOPIC, b'{"seq": 2}', qos=1)
                    await c.wait_for(lambda ms: [m for m in ms if m.payload == b'{"seq": 2}'])
                assert link.session >= 2  # a new connection, not the old one
        failures = [(e.get("message"), repr(e.get("exception"))) for e in errors]
        assert failures == [], f"errors reached the loop (fatal in the agent): {failures}"
    finally:
        await relay.stop()


@pytest.mark.parametrize(
    "topic", ["edge/v1/evil/#/signal", "edge/v1/a+b/signal", "edge/v1/evil\x00x/signal", ""]
)
async def test_a_topic_no_broker_takes_is_refused_here_and_the_link_stays_up(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
    topic: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A NUL in a topic gets the whole connection dropped by mosquitto; a wildcard makes
    # paho raise ValueError, which callers that expect BrokerUnavailable do not catch.
    with loop_errors() as errors:
        async with running_link(tmp_path, link_cfg(broker.port)) as link:
            await asyncio.wait_for(link.connected.wait(), 10)
            session = link.session
            assert await link.publish(topic, b"{}", qos=1) is False
            assert link.publishes_refused == 1
            async with collector(broker.port, TOPIC) as c:
                assert await link.publish(TOPIC, b'{"after": 1}', qos=1)
                await c.wait_for(lambda ms: [m for m in ms if m.payload == b'{"after": 1}'])
            assert link.session == session and link.connected.is_set()
    assert errors == []
    (said,) = [r for r in caplog.records if "was refused here" in r.getMessage()]
    assert said.levelname == "WARNING"
    assert "\x00" not in said.getMessage()
