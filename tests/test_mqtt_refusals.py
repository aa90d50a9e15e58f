"""A publish the broker refuses (MQTT 5 PUBACK reason code, e.g. its ACL) is said, not lost
silently: a real mosquitto with an ACL that lets the device write everything but `info`;
and a command whose Response Topic the ACL refuses is answered on `cmd-res/<id>`.

aiomqtt completes such a publish like any other; `edgeagent.mqtt._watch_pubacks` reads the
reason code from paho underneath it, so this test also fails if that seam changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from agent_support import agent_config, collector
from call_support import events, running
from conftest import Broker, free_port, write_mosquitto_conf
from test_commands import TOPICS, json_id, make_rig, publish_raw

pytestmark = pytest.mark.broker

ACL = """
topic read edge/v1/#
topic write edge/v1/dev-1/status
topic write edge/v1/dev-1/events
topic write edge/v1/dev-1/health
topic write edge/v1/dev-1/metrics
topic write edge/v1/dev-1/alerts/#
"""


def _acl_broker(tmp_path: Path, rules: str = ACL) -> Broker:
    acl = tmp_path / "edgeagent.acl"
    acl.write_text(rules)
    conf = tmp_path / "mosquitto.conf"
    port, ws_port = free_port(), free_port()
    # As root, mosquitto drops to the `mosquitto` user, who cannot read pytest's tmp dir.
    stay = "user root\n" if os.geteuid() == 0 else ""
    write_mosquitto_conf(conf, port, ws_port, f"acl_file {acl}\n{stay}")
    return Broker(port=port, ws_port=ws_port, conf=conf)


def _refusals(ms: list[Any]) -> list[dict[str, Any]]:
    return [e for e in events(ms, "dev-1") if "refused our publish" in e["message"]]


async def test_a_publish_the_acl_refuses_is_reported_once_with_its_topic(tmp_path: Path) -> None:
    broker = _acl_broker(tmp_path)
    broker.start()
    try:
        cfg = agent_config(tmp_path, broker.port)
        async with collector(broker.port, "edge/v1/#") as c, running(cfg) as agent:
            # Birth and info go out at every connect: info is refused.
            (said,) = await c.wait_for(_refusals)
            assert agent.link.publishes_refused >= 1
            for _ in range(3):  # refused again: counted, not said again within the minute
                await agent.link.publish("edge/v1/dev-1/info", b"{}", qos=1)
            assert agent.link.publishes_refused >= 4
            await agent.link.publish("edge/v1/dev-1/metrics", b"{}", qos=1)  # allowed
        assert not [m for m in c.messages if m.topic == "edge/v1/dev-1/info"]
        assert len(_refusals(c.messages)) == 1
    finally:
        broker.stop()
    assert said["level"] == "warning" and said["category"] == "log.mqtt"
    assert "edge/v1/dev-1/info (Not authorized)" in said["message"]


async def test_an_answer_the_acl_refuses_goes_to_cmd_res_saying_why(tmp_path: Path) -> None:
    # Anyone reads anything; writes only under edge/v1/ (operators/... is refused).
    broker = _acl_broker(tmp_path, "topic read #\ntopic write edge/v1/#\n")
    broker.start()
    inbox = "operators/op-7/inbox"
    try:
        async with (
            make_rig(tmp_path, broker.port) as rig,
            collector(broker.port, f"{TOPICS.root}/cmd-res/#", inbox) as c,
        ):
            t = rig.keys.token("ping")
            await publish_raw(broker.port, "ping", t, response_topic=inbox, correlation=b"c9")
            got = await c.wait_for(
                lambda ms: [m for m in ms if m.topic == TOPICS.cmd_res(json_id(t))]
            )
            assert rig.link.publishes_refused == 1
    finally:
        broker.stop()
    (answer,) = got
    assert answer.json()["code"] == 200 and answer.json()["id"] == json_id(t)
    assert answer.json()["warning"] == (
        f"the broker refused the response topic; answered on {TOPICS.cmd_res(json_id(t))}"
    )
    assert answer.properties.CorrelationData == b"c9"
    assert not [m for m in c.messages if m.topic == inbox]
