"""Several STUN or TURN servers configured: aiortc uses the first; the agent says so at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_support import agent_config, collector
from call_support import events, running

from edgeagent.call.ice import ignored_servers


def test_only_the_servers_after_the_first_of_each_kind_are_named() -> None:
    assert ignored_servers(["stun:a:3478"], ["turn:t:3478"]) == []
    lines = ignored_servers(["stun:a:3478", "stun:b:3478", "stun:c:3478"], ["turn:t:3478"])
    assert lines == [
        "aiortc uses only the first STUN server (stun:a:3478); ignoring stun:b:3478, stun:c:3478"
    ]
    assert ignored_servers([], ["turn:t:1", "turns:t:2"])[0].startswith(
        "aiortc uses only the first TURN server (turn:t:1)"
    )


@pytest.mark.broker
async def test_the_agent_warns_once_at_start_about_servers_it_will_not_use(
    tmp_path: Path, broker
) -> None:  # type: ignore[no-untyped-def]
    # Closed loopback ports: the STUN probes may try them, nothing else is reached.
    extra = '[ice]\nstun_urls = ["stun:127.0.0.1:9", "stun:127.0.0.1:7"]\n'
    cfg = agent_config(tmp_path, broker.port, "dev-1", extra=extra)
    async with collector(broker.port, "edge/v1/dev-1/events") as c, running(cfg):
        found = await c.wait_for(
            lambda ms: [e for e in events(ms, "dev-1") if "only the first STUN" in e["message"]]
        )
    assert len(found) == 1
    assert found[0]["level"] == "warning"
    assert "ignoring stun:127.0.0.1:7" in found[0]["message"]
