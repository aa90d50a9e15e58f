"""Config: typed defaults, every error at once, did-you-mean, env overrides, exit 78."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from edgeagent.cli import main
from edgeagent.config import Config, ConfigError, env_overrides, load_config, parse_config
from edgeagent.control.keys import generate_keypair

ROOT = Path(__file__).resolve().parent.parent


def test_documented_example_loads_and_lists_every_key() -> None:
    cfg = load_config(ROOT / "config" / "edgeagent.toml", environ={})
    assert cfg.device.id == "help-point-0001"
    assert cfg.mqtt.prefix == "edge/v1"
    # Every key of every section appears in the example, commented out or set.
    text = (ROOT / "config" / "edgeagent.toml").read_text()

    def walk(model: type[BaseModel], path: str) -> None:
        for key, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                assert f"[{path}{key}]" in text, f"[{path}{key}] undocumented"
                walk(sub, f"{path}{key}.")
            else:
                assert f"\n{key} =" in text or f"# {key} =" in text, f"{path}{key} undocumented"

    walk(Config, "")


def test_example_defaults_match_code_defaults() -> None:
    data = tomllib.loads((ROOT / "config" / "edgeagent.toml").read_text())
    from_file = parse_config(data, environ={})
    from_code = parse_config({"device": {"id": "help-point-0001"}}, environ={})
    assert from_file == from_code


def test_bench_config_loads() -> None:
    cfg = load_config(ROOT / "config" / "bench.toml", environ={})
    assert cfg.security.commands == "open"
    assert cfg.leds.mock is True


def test_every_error_reported_at_once_with_dotted_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
[device]
id = "Bad_ID"
[mqtt]
port = 70000
protcol = "5"
[mqtt.tls]
enabled = "maybe"
[storage]
durability = "sometimes"
[nosuchsection]
x = 1
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad, environ={})
    errors = info.value.errors
    joined = "\n".join(errors)
    assert "device.id:" in joined
    assert "mqtt.port:" in joined
    assert "mqtt.protcol: unknown key; did you mean 'protocol'?" in joined
    assert "mqtt.tls.enabled:" in joined
    assert "storage.durability:" in joined
    assert "nosuchsection: unknown key" in joined
    assert len(errors) == 6
    assert str(bad) in str(info.value)


def test_missing_device_id_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, environ={})
    assert info.value.errors == ["device: required key is missing"]


def test_env_overrides_nested_and_typed() -> None:
    env = {
        "EDGEAGENT__MQTT__PORT": "2883",
        "EDGEAGENT__MQTT__TLS__ENABLED": "true",
        "EDGEAGENT__ICE__HOST_ADDRESSES": '["127.0.0.1"]',
        "EDGEAGENT__DEVICE__ID": "dev-2",
        "EDGEAGENT__MQTT__HOST": "broker.local",
        "OTHER": "x",
    }
    assert env_overrides(env)["mqtt"]["tls"] == {"enabled": True}
    cfg = parse_config({"device": {"id": "dev-1"}}, environ=env)
    assert cfg.device.id == "dev-2"
    assert cfg.mqtt.port == 2883
    assert cfg.mqtt.host == "broker.local"
    assert cfg.mqtt.tls.enabled is True
    assert cfg.ice.host_addresses == ["127.0.0.1"]


def test_env_overrides_of_text_keys_are_taken_as_written() -> None:
    # A numeric password, a path that parses as a number, a device id of digits: TOML
    # would read them as numbers or dates, which the (strict) text keys refuse.
    env = {
        "EDGEAGENT__MQTT__PASSWORD": "12345",
        "EDGEAGENT__MQTT__USERNAME": "1979-05-27",
        "EDGEAGENT__DEVICE__ID": "42",
        "EDGEAGENT__STORAGE__STATE_DIR": "1.5",
        "EDGEAGENT__MQTT__KEEPALIVE_S": "20",
    }
    cfg = parse_config({"device": {"id": "dev-1"}}, environ=env)
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "12345"
    assert cfg.mqtt.username == "1979-05-27"
    assert cfg.device.id == "42"
    assert cfg.storage.state_dir == Path("1.5")
    assert cfg.mqtt.keepalive_s == 20  # numbers still parse as numbers


def test_env_override_errors_are_reported_like_file_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"device": {"id": "d"}}, environ={"EDGEAGENT__MQTT__PORTT": "1"})
    assert info.value.errors == ["mqtt.portt: unknown key; did you mean 'port'?"]


def test_secrets_never_in_repr_or_dump() -> None:
    cfg = parse_config(
        {
            "device": {"id": "d"},
            "mqtt": {"password": "hunter2-secret"},
            "ice": {"turn_password": "turn-secret"},
        },
        environ={},
    )
    for text in (repr(cfg), str(cfg), cfg.model_dump_json()):
        assert "hunter2-secret" not in text
        assert "turn-secret" not in text
    assert cfg.mqtt.password is not None
    assert cfg.mqtt.password.get_secret_value() == "hunter2-secret"


def test_config_is_frozen() -> None:
    cfg = parse_config({"device": {"id": "d"}}, environ={})
    with pytest.raises(Exception, match="frozen"):
        cfg.device.id = "x"  # type: ignore[misc]


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[device]\nid = "dev-1"\n')
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[device]\nid = "dev-1"\n[mqtt]\nport = "x"\nhots = "y"\n')
    assert main(["check-config", str(bad)]) == 78
    err = capsys.readouterr().err
    assert "2 error(s)" in err
    assert "mqtt.hots: unknown key; did you mean 'host'?" in err
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 78
    (tmp_path / "broken.toml").write_text("[device\n")
    assert main(["check-config", str(tmp_path / "broken.toml")]) == 78


def test_run_exits_78_on_bad_config_as_a_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[device]\nid = 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edgeagent", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78
    assert "device.id" in proc.stderr


@pytest.mark.parametrize(
    ("audio", "expect"),
    [
        ({"playout_target_ms": 150}, "audio.playout_target_ms:"),
        ({"playout_target_ms": 60, "playout_max_ms": 80}, "audio: playout_max_ms (80)"),
        ({"reopen_min_s": 5.0, "reopen_max_s": 2.0}, "audio: reopen_min_s (5.0) is above"),
    ],
)
def test_audio_bounds_a_call_could_not_use_are_config_errors(
    audio: dict[str, object], expect: str
) -> None:
    """Caught by check-config, not by every call failing when it builds its playout buffer."""
    with pytest.raises(ConfigError) as info:
        parse_config({"device": {"id": "dev-1"}, "audio": audio}, environ={})
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(expect), info.value.errors


def test_every_accepted_playout_setting_makes_a_playout_buffer() -> None:
    from edgeagent.audio.playout import PlayoutBuffer, PlayoutSettings

    for target in (20, 60, 120):
        cfg = parse_config(
            {
                "device": {"id": "d"},
                "audio": {"playout_target_ms": target, "playout_max_ms": target + 40},
            },
            environ={},
        )
        a = cfg.audio
        PlayoutBuffer(PlayoutSettings(target_ms=a.playout_target_ms, max_ms=a.playout_max_ms))


def test_keys_file_is_read_at_check_config(tmp_path: Path) -> None:
    _, public, _ = generate_keypair("op")
    good = tmp_path / "keys.json"
    good.write_text(json.dumps({"keys": [{"kid": "op", "public_key": public, "roles": ["read"]}]}))
    not_json = tmp_path / "text.json"
    not_json.write_text("kid = op")
    no_roles = tmp_path / "noroles.json"
    no_roles.write_text(json.dumps([{"kid": "op", "public_key": public}]))

    def errors(path: Path) -> list[str]:
        with pytest.raises(ConfigError) as info:
            parse_config({"device": {"id": "d"}, "security": {"keys_file": str(path)}}, environ={})
        return info.value.errors

    assert (
        parse_config(
            {"device": {"id": "d"}, "security": {"keys_file": str(good)}}, environ={}
        ).security.keys_file
        == good
    )
    for path, why in (
        (tmp_path / "missing.json", "cannot read"),
        (not_json, "is not JSON"),
        (no_roles, "keys[0]: give 'roles' and/or 'commands'"),
    ):
        (line,) = errors(path)
        assert line.startswith("security.keys_file: ") and why in line, line


def test_device_names_and_socket_paths_the_agent_could_not_use_are_config_errors(
    tmp_path: Path,
) -> None:
    plain = tmp_path / "not-a-socket"
    plain.write_text("")

    def errors(**sections: dict[str, object]) -> list[str]:
        with pytest.raises(ConfigError) as info:
            parse_config({"device": {"id": "d"}, **sections}, environ={})
        return info.value.errors

    (line,) = errors(audio={"capture_device": "hw:1\x00x"})
    assert line.startswith("audio.capture_device:")
    (line,) = errors(audio={"playback_device": ""})
    assert line.startswith("audio.playback_device:")
    (line,) = errors(security={"local_socket": str(plain)})
    assert line.startswith("security.local_socket:") and "is not a socket" in line
    ok = parse_config(
        {"device": {"id": "d"}, "security": {"local_socket": str(tmp_path / "run/ctl.sock")}},
        environ={},
    )
    assert ok.security.local_socket == tmp_path / "run/ctl.sock"
