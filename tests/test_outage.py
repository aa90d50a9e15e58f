"""Offline-first delivery against a real mosquitto that goes away and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agent_support import agent_config, collector
from call_support import until
from schema_support import assert_valid
from tcp_relay import TcpRelay

from edgeagent.agent import Agent, AgentSeams
from edgeagent.config import load_config

pytestmark = pytest.mark.broker

OUTAGE_S = float(os.environ.get("EDGEAGENT_TEST_OUTAGE_S", "60"))


@contextlib.asynccontextmanager
async def running_agent(cfg_path: Path) -> AsyncIterator[Agent]:
    agent = Agent(
        load_config(cfg_path, environ={}),
        AgentSeams(install_signal_handlers=False, freeze_gc_after_start=False),
    )
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.request_stop("test over")
        await asyncio.wait_for(task, 5)


SPOOLED = ("edge/v1/dev-1/events", "edge/v1/dev-1/alerts/#")


def event_seqs(messages: list) -> list[int]:  # type: ignore[type-arg]
    """Seqs of spooled messages (events and alerts share one counter), live ones only:
    a retained alert handed out again on subscribe is not a new delivery."""
    return [m.json()["seq"] for m in messages if "seq" in m.json() and not m.retain]


@pytest.mark.slow
@pytest.mark.timeout(OUTAGE_S + 90)
async def test_broker_outage_delivers_every_spooled_message_once_in_order(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
) -> None:
    # The agent reaches the broker through a relay, so the test's observer can
    # subscribe to the restarted broker before the agent is let back in.
    relay = TcpRelay(broker.port)
    await relay.start()
    cfg = agent_config(tmp_path, relay.port)
    async with running_agent(cfg) as agent:
        async with collector(broker.port, *SPOOLED) as before:
            await agent.link.connected.wait()
            for i in range(20):
                agent.publisher.event("info", "test.stream", f"live {i}")
            await before.wait_for(lambda ms: len(event_seqs(ms)) >= 21)  # + "started"
            # Everything spooled so far (alerts of the start-up included) is delivered.
            await until(lambda: agent.spool.stats().pending == 0)
            last = agent.spool.stats().next_seq - 1
            await before.wait_for(lambda ms: last in event_seqs(ms))
        live = event_seqs(before.messages)

        relay.set_open(False)
        broker.stop()
        await agent.link.disconnected.wait()
        # A steady stream while the broker is away: 20 events a second.
        loop = asyncio.get_running_loop()
        end = loop.time() + OUTAGE_S
        n = 0
        while loop.time() < end:
            agent.publisher.event("info", "test.stream", f"offline {n}")
            n += 1
            await asyncio.sleep(0.05)
        spooled = agent.spool.stats().pending
        assert spooled >= n
        broker.start()

        async with collector(broker.port, *SPOOLED) as after:
            relay.set_open(True)
            await agent.link.connected.wait()
            # Plus the one event the agent adds on reconnecting ("broker reachable again").
            await after.wait_for(lambda ms: len(event_seqs(ms)) >= spooled + 1, timeout=30)
            await asyncio.sleep(0.2)  # a duplicate would arrive right behind
            for m in after.messages:
                assert_valid(m.topic, m.payload)
        delivered = live + event_seqs(after.messages)
        assert len(delivered) == len(live) + spooled + 1, delivered
        back = [m.json() for m in after.messages if m.json().get("category") == "mqtt"]
        assert len(back) == 1 and back[0]["data"]["pending"] >= spooled
        expected = list(range(delivered[0], delivered[0] + len(delivered)))
        assert delivered == expected, f"gap, duplicate or reorder: {delivered}"
        assert agent.spool.stats().pending == 0
        assert agent.link.session >= 2  # reconnected with a new session
    await relay.stop()


async def test_storage_cap_drops_oldest_and_reports_the_range(
    tmp_path: Path,
    broker,  # type: ignore[no-untyped-def]
) -> None:
    relay = TcpRelay(broker.port)
    await relay.start()
    cfg = agent_config(tmp_path, relay.port)
    text = cfg.read_text().replace("[storage]\n", "[storage]\nspool_max_messages = 10\n")
    cfg.write_text(text)
    async with running_agent(cfg) as agent:
        await agent.link.connected.wait()
        relay.set_open(False)
        await agent.link.disconnected.wait()
        seqs = [agent.publisher.event("info", "test.cap", f"m{i}") for i in range(30)]
        assert all(s is not None for s in seqs)
        assert agent.spool.stats().pending == 10
        async with collector(broker.port, "edge/v1/dev-1/events") as c:
            relay.set_open(True)
            last = seqs[-1]
            assert last is not None

            def accounted(ms: list) -> set[int] | None:  # type: ignore[type-arg]
                """Every seq up to the last one put is delivered or reported dropped."""
                seen = {m.json()["seq"] for m in ms}
                for m in ms:
                    if m.json().get("category") == "spool":
                        d = m.json()["data"]
                        seen.update(range(d["first_seq"], d["last_seq"] + 1))
                return seen if set(range(1, last + 1)) <= seen else None

            await c.wait_for(accounted, timeout=10)
            back = await c.wait_for(
                lambda ms: [m.json() for m in ms if m.json().get("category") == "mqtt"]
            )
            # One event says how long the broker was away and what waited meanwhile.
            assert back[0]["message"].startswith("broker reachable again after ")
            assert back[0]["data"]["offline_s"] > 0 and back[0]["data"]["pending"] >= 10
            drops = [m.json() for m in c.messages if m.json().get("category") == "spool"]
            assert drops[0]["level"] == "error"
            assert drops[0]["data"]["reason"] == "count"
            # Oldest first: the first report starts at the oldest seq.
            assert drops[0]["data"]["first_seq"] == 1
            delivered = [m.json()["seq"] for m in c.messages]
            assert delivered == sorted(delivered)
            assert len(delivered) == len(set(delivered))
            # The newest messages survived the cap.
            assert seqs[-1] in delivered
            assert max(delivered) > seqs[-1] - 10
            for m in c.messages:
                assert_valid(m.topic, m.payload)
        assert agent.link.connected.is_set()  # still running and connected
    await relay.stop()
