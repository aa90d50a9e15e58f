"""edgeagent-ctl: keygen, argument parsing, exit codes, and watch/tail/calls against mosquitto."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from conftest import free_port
from rich.console import Console
from test_commands import DEVICE, TOPICS, make_rig, run_ctl

from edgeagent import ctl
from edgeagent.call import signaling as sig
from edgeagent.call.offer_token import token_mismatch
from edgeagent.control.keys import generate_keypair, load_trusted_keys
from edgeagent.control.replay import ReplayCache
from edgeagent.control.tokens import Verifier
from edgeagent.telemetry import payloads as p


def test_keygen_writes_a_private_key_0600_and_prints_a_trusted_key_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "alice.jwk.json"
    rc = ctl.main(["keygen", "--kid", "alice", "--out", str(out), "--roles", "operate"])
    assert rc == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    private = json.loads(out.read_text())
    assert private["kid"] == "alice" and private["crv"] == "Ed25519" and "d" in private
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert entry == {"kid": "alice", "public_key": private["x"], "roles": ["operate"]}
    keys = load_trusted_keys([entry])
    assert keys["alice"].allows("dial") and not keys["alice"].allows("profile")
    # Never overwrites an existing key.
    with pytest.raises(FileExistsError):
        ctl.main(["keygen", "--kid", "alice", "--out", str(out)])


def test_args_are_json_when_they_parse() -> None:
    assert ctl.parse_args_kv(["lines=50", "level=ERROR", 'checks=["dns","stun"]', "x="]) == {
        "lines": 50,
        "level": "ERROR",
        "checks": ["dns", "stun"],
        "x": "",
    }
    with pytest.raises(ctl.CtlError):
        ctl.parse_args_kv(["novalue"])


def test_exit_codes_are_distinct_per_result_code() -> None:
    assert ctl.exit_code(200) == ctl.exit_code(202) == 0
    errors = [ctl.exit_code(c) for c in (400, 401, 403, 404, 409, 410, 413, 429, 500)]
    assert 0 not in errors and len(set(errors)) == len(errors)
    assert not {ctl.EXIT_TIMEOUT, ctl.EXIT_UNREACHABLE, ctl.EXIT_KEY, ctl.EXIT_USAGE} & set(errors)
    assert ctl.exit_code(418) == ctl.EXIT_OTHER_CODE


def test_usage_and_key_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ctl.main([]) == ctl.EXIT_USAGE
    monkeypatch.delenv(ctl.KEY_ENV, raising=False)
    assert ctl.main(["cmd", DEVICE, "ping", "--port", str(free_port())]) == ctl.EXIT_KEY
    bad = tmp_path / "bad.json"
    bad.write_text('{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}')
    assert ctl.main(["cmd", DEVICE, "ping", "--key", str(bad)]) == ctl.EXIT_KEY
    assert ctl.main(["cmd", DEVICE, "ping", "--local", str(tmp_path / "none.sock")]) == (
        ctl.EXIT_UNREACHABLE
    )


def test_unreachable_broker_exits_4(tmp_path: Path) -> None:
    assert ctl.main(["cmd", DEVICE, "ping", "--open", "--port", str(free_port())]) == (
        ctl.EXIT_UNREACHABLE
    )


@pytest.mark.broker
def test_no_answer_exits_3(broker: Any) -> None:
    argv = ["cmd", "nobody-home", "ping", "--open", "--port", str(broker.port), "--timeout", "0.5"]
    assert ctl.main(argv) == ctl.EXIT_TIMEOUT


@pytest.mark.broker
async def test_cmd_human_output_and_key_from_environment(
    tmp_path: Path, broker: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_rig(tmp_path, broker.port) as rig:
        monkeypatch.setenv(ctl.KEY_ENV, str(rig.keys.path("reader")))
        capsys.readouterr()
        rc = await asyncio.to_thread(ctl.main, ["cmd", DEVICE, "ping", "--port", str(broker.port)])
        out = capsys.readouterr().out
        assert rc == 0 and "200" in out and '"pong": true' in out
        rc = await asyncio.to_thread(
            ctl.main, ["cmd", DEVICE, "dial", "--port", str(broker.port)]
        )  # a read key may not dial
        captured = capsys.readouterr()
        assert rc == ctl.EXIT_CODES[403] and "403" in captured.out
        # The private key may also be given inline in the variable.
        monkeypatch.setenv(ctl.KEY_ENV, rig.keys.private["dbg"])
        rc, resp = await run_ctl(
            capsys, ["cmd", DEVICE, "dial", "--json", "--port", str(broker.port)]
        )
        assert rc == 0 and resp["result"]["call_id"] == "call-1"


def test_cmd_human_output_shows_a_warning() -> None:
    console = Console(record=True, width=200)
    response = {"code": 200, "ok": True, "cmd": "ping", "id": "r-1", "result": {"pong": True}}
    warning = "response topic not followed: it contains a wildcard; answered on x/cmd-res/r-1"
    ctl._print_response(console, {**response, "warning": warning})
    assert warning in console.export_text()
    ctl._print_response(console, response)
    assert console.export_text().count("not followed") == 0  # export_text clears


def test_watch_state_folds_the_device_topics() -> None:
    st = ctl.WatchState("edge/v1/dev-1")
    assert st.apply("edge/v1/dev-1/status", b'{"state": "online", "session": 3}')
    assert st.apply("edge/v1/dev-1/health", b'{"state": "good", "reasons": []}')
    assert st.apply("edge/v1/dev-1/calls/c1/quality", b'{"call_id": "c1", "mos": 4.2}')
    fire = b'{"state": "firing", "severity": "warning", "message": "hot"}'
    assert st.apply("edge/v1/dev-1/alerts/temp", fire)
    assert not st.apply("edge/v1/dev-1/events", b"{}")
    assert not st.apply("edge/v1/dev-1/status", b"not json")
    assert st.alerts.keys() == {"temp"} and st.quality["mos"] == 4.2
    assert st.apply("edge/v1/dev-1/alerts/temp", b'{"state": "resolved"}')
    assert st.alerts == {} and st.updates == 5


async def _publish(port: int, items: list[tuple[str, bytes, bool]]) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for topic, payload, retain in items:
            await client.publish(topic, payload, qos=1, retain=retain)


def _base() -> dict[str, Any]:
    return {"v": 1, "device": DEVICE, "ts": round(time.time(), 3)}


@pytest.mark.broker
async def test_watch_shows_status_health_metrics_quality_and_alerts(
    broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    status = p.Status(**_base(), state="online", session=7, boot_id="b", version="0")
    health = p.Health(**_base(), state="degraded", reasons=["loss"])
    alert = p.Alert(
        **_base(), seq=1, name="temp", state="firing", severity="warning", value=81.0,
        threshold=80.0, message="CPU hot",
    )  # fmt: skip
    await _publish(
        broker.port,
        [
            (TOPICS.status, p.encode(status), True),
            (TOPICS.health, p.encode(health), True),
            (TOPICS.alert("temp"), p.encode(alert), True),
        ],
    )
    argv = ["watch", DEVICE, "--port", str(broker.port), "--count", "5", "--duration", "10"]
    watcher = asyncio.create_task(asyncio.to_thread(ctl.main, argv))
    quality = {"call_id": "c-9", "mos": 3.9, "loss_pct": 1.5, "jitter_ms": 12, "rtt_ms": 40}
    metrics = {"cpu_pct": 12.5, "rss_mb": 48.0, "uptime_s": 100, "calls": {"active": 1}}
    # Retained ones arrive at once; keep feeding live ones until the watcher has 5 updates.
    while not watcher.done():
        await _publish(
            broker.port,
            [
                (TOPICS.metrics, json.dumps(metrics).encode(), False),
                (TOPICS.quality("c-9"), json.dumps(quality).encode(), False),
            ],
        )
        await asyncio.wait({watcher}, timeout=0.2)
    assert watcher.result() == 0
    out = capsys.readouterr().out
    for text in ("online", "session 7", "degraded", "loss", "cpu 12.5%", "mos 3.9", "CPU hot"):
        assert text in out, (text, out)


@pytest.mark.broker
async def test_tail_prints_events_and_calls_lists_summaries_since_last_run(
    broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    port = ["--port", str(broker.port)]
    tail = asyncio.create_task(
        asyncio.to_thread(ctl.main, ["tail", DEVICE, *port, "--count", "2", "--duration", "10"])
    )
    # `calls` registers its persistent session first (nothing yet).
    rc = await asyncio.to_thread(ctl.main, ["calls", DEVICE, *port, "--wait", "0.3"])
    assert rc == 0 and "no summaries" in capsys.readouterr().out

    summary = p.Summary(
        **_base(), seq=5, call_id="c-77", trace_id=None, direction="outgoing", peer="console",
        result="completed", end_reason="hangup", setup_ms=210.0, duration_s=31.5, codec="opus",
        mos_avg=4.1, mos_min=3.8, loss_pct=0.2, jitter_ms_avg=8.0, rtt_ms_avg=35.0,
        audio_issues={}, ice=p.IcePair(local_type="host", remote_type="relay"),
    )  # fmt: skip
    events = [
        p.Event(**_base(), seq=i, level="warning", category="call.ice", message=f"event {i}")
        for i in (1, 2)
    ]
    while not tail.done():
        await _publish(broker.port, [(TOPICS.events, p.encode(e), False) for e in events])
        await asyncio.wait({tail}, timeout=0.2)
    assert tail.result() == 0
    out = capsys.readouterr().out
    assert "WARNING call.ice: event 1" in out and "#2" in out

    await _publish(broker.port, [(TOPICS.summary("c-77"), p.encode(summary), False)])
    argv = ["calls", DEVICE, *port, "--wait", "5", "--count", "1", "--json"]
    rc = await asyncio.to_thread(ctl.main, argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and json.loads(lines[-1])["call_id"] == "c-77"
    # Consumed: the next run starts empty again.
    rc = await asyncio.to_thread(ctl.main, ["calls", DEVICE, *port, "--wait", "0.3"])
    assert "no summaries" in capsys.readouterr().out


def test_run_main_exits_with_mains_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["edgeagent-ctl", "cmd", DEVICE, "ping", "--open", "--port",
                                     str(free_port())])  # fmt: skip
    with pytest.raises(SystemExit) as info:
        ctl.run_main()
    assert info.value.code == ctl.EXIT_UNREACHABLE


def test_keygen_for_a_call_key_grants_call_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dev-a-call.jwk.json"
    assert ctl.main(["keygen", "--kid", "dev-a-call", "--out", str(out), "--commands", "call"]) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(entry) == {"kid", "public_key", "commands"} and entry["commands"] == ["call"]
    key = load_trusted_keys([entry])["dev-a-call"]
    assert key.allows("call") and not key.allows("ping") and not key.allows("dial")


def test_call_token_args_are_what_the_callee_verifies(tmp_path: Path) -> None:
    private, public, _ = generate_keypair("op")
    args = ctl.with_call_token({"peer": "dev-b"}, private, "op", lifetime_s=30)
    assert sig.CALL_ID.match(args["call_id"]) and args["peer"] == "dev-b"
    assert token_mismatch(args["token"], "dev-b", args["call_id"]) is None
    trusted = load_trusted_keys([{"kid": "op", "public_key": public, "roles": ["operate"]}])
    verifier = Verifier(
        "dev-b", trusted, replay=ReplayCache(tmp_path / "r.sqlite3", time.time), clock=time.time
    )
    got = verifier.verify_call_token(args["token"], "dev-b", args["call_id"])
    assert got.exp - got.iat == 30
    given = ctl.with_call_token({"peer": "dev-b", "call_id": "mine-1"}, private, "op")
    assert given["call_id"] == "mine-1"
    with pytest.raises(ctl.CtlError, match="needs peer=ID"):
        ctl.with_call_token({}, private, "op")
    assert ctl.main(["cmd", "dev-a", "ping", "--call-token", "--open"]) == ctl.EXIT_USAGE


def test_summary_notes_say_what_explains_a_bad_call() -> None:
    lost = {
        "end_reason": "agent_lost",
        "crash_id": "6f0c1d2e-aaaa-bbbb",
        "no_media_s": 0.0,
        "device_alerts": ["thermal_throttled"],
        "audio_issues": {"no_audio": 1, "echo": 2},
    }
    assert ctl.summary_notes(lost) == (
        "crash 6f0c1d2e; device: thermal_throttled; audio: echo, no_audio"
    )
    assert ctl.summary_notes({"no_media_s": 9.0, "audio_issues": {}}) == "no media 9 s"
    assert ctl.summary_notes({"device_alerts": None, "crash_id": None}) == ""
