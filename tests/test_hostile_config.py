"""Hostile config files through `edgeagent check-config` and `edgeagent run`: exit 78, one
line naming the dotted key and the problem, never a traceback, and `run` starts nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeagent.cli import main
from edgeagent.config import EXIT_CONFIG
from edgeagent.control.keys import generate_keypair

ROOT = Path(__file__).resolve().parent.parent
GOOD = '[device]\nid = "dev-1"\n'


@dataclass(frozen=True)
class Case:
    id: str
    content: str | bytes | Callable[[Path], str | bytes]
    """The file's text or bytes, or a function of tmp_path returning them (to name files)."""
    expect: tuple[str, ...]
    """Substrings of one error line each: the dotted key and the problem."""


def dev(extra: str) -> str:
    return GOOD + extra


def in_tmp(make: Callable[[Path], str]) -> Callable[[Path], str]:
    return make


def _keys(tmp: Path, body: str | bytes, name: str = "keys.json") -> Path:
    f = tmp / name
    f.write_bytes(body if isinstance(body, bytes) else body.encode())
    return f


def _private_jwk(tmp: Path) -> Path:
    private, _, _ = generate_keypair("dev-1-call")
    f = tmp / "call.jwk.json"
    f.write_text(private)
    return f


NESTED = 3000
BAD_ENTRIES = json.dumps([{"kid": 5, "public_key": "!"}])
SECTIONS = "device mqtt storage telemetry logging health ice audio call leds button"
SECTIONS += " security alerts tracing"
PEM = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
CASES = [
    # --- the file itself
    Case("empty", "", ("device: required key is missing",)),
    Case("not-toml", "this is = not [toml", ("not valid TOML",)),
    Case("binary", bytes(range(256)) * 4, ("not UTF-8: byte 0x80 on line 2",)),
    Case("latin1", GOOD.encode() + b'[mqtt]\nhost = "caf\xe9"\n', ("not UTF-8", "line 4")),
    Case("nul-in-text", dev('[mqtt]\nhost = "a\x00b"\n'), ("not valid TOML",)),
    Case("duplicate-key", dev('id = "dev-2"\n'), ("not valid TOML", "line 3")),
    Case("duplicate-table", dev('[device]\nid = "x"\n'), ("not valid TOML",)),
    Case("deep-arrays", "x = " + "[" * NESTED + "]" * NESTED + "\n", ("nested too deeply",)),
    Case("deep-inline", "x = " + "{a = " * NESTED + "1" + "}" * NESTED, ("nested too deeply",)),
    Case("deep-tables", dev("[" + ".".join(["a"] * NESTED) + "]\n"), ("a: unknown key",)),
    Case(
        "deep-value-in-a-key",
        dev("[mqtt]\nhost = " + "[" * 100 + "]" * 100 + "\n"),
        ("mqtt.host: Input should be a valid string",),
    ),
    Case("huge-file", lambda _t: "#" * (50 << 20) + "\n" + GOOD, ("larger than 1 MiB",)),
    Case(
        "huge-value-quoted-short",
        dev('[mqtt]\nport = "' + "9" * 500_000 + '"\n'),
        ("mqtt.port: Input should be a valid integer",),
    ),
    # --- sections and keys
    Case(
        "every-section-a-scalar",
        "\n".join(f"{s} = 1" for s in SECTIONS.split()),
        ("device: Input should be a valid dictionary", "tracing: Input should be"),
    ),
    Case("section-a-list", "mqtt = [1, 2]\n" + GOOD, ("mqtt: Input should be a valid dict",)),
    Case("unknown-section", dev("[mqqt]\nhost = 'x'\n"), ("mqqt: unknown key",)),
    Case("unknown-key", dev("[mqtt]\nhots = 'x'\n"), ("mqtt.hots: unknown key; did you mean",)),
    Case("unknown-nested", dev("[mqtt.tls]\nenable = true\n"), ("mqtt.tls.enable: unknown",)),
    Case("device-id-number", "[device]\nid = 5\n", ("device.id: Input should be a valid str",)),
    # --- wrong types
    Case("string-for-int", dev('[mqtt]\nport = "1883"\n'), ("mqtt.port: Input should be",)),
    Case("string-for-float", dev('[telemetry]\nheartbeat_s = "10"\n'), ("telemetry.heartb",)),
    Case("number-for-bool", dev("[leds]\nmock = 1\n"), ("leds.mock: Input should be a valid b",)),
    Case("string-for-bool", dev('[call]\nopus_fec = "yes"\n'), ("call.opus_fec: Input",)),
    Case("bool-for-int", dev("[mqtt]\nport = true\n"), ("mqtt.port: Input should be a valid i",)),
    Case("bool-for-float", dev("[storage]\nspool_min_free_mb = false\n"), ("storage.spool_min",)),
    Case("float-for-int", dev("[mqtt]\nmax_inflight = 1.5\n"), ("mqtt.max_inflight:",)),
    Case("list-for-table", dev("[mqtt]\ntls = [1]\n"), ("mqtt.tls: Input should be a valid d",)),
    Case("table-for-list", dev("[leds]\npins = {a = 1}\n"), ("leds.pins: Input should be a val",)),
    Case("table-for-string", dev("[mqtt]\nhost = {a = 1}\n"), ("mqtt.host: Input should be",)),
    Case("date-for-float", dev("[call]\nring_timeout_s = 1979-05-27\n"), ("call.ring_timeout_s",)),
    Case("bad-enum", dev('[call]\nanswer = "always"\n'), ("call.answer: Input should be",)),
    Case("bad-union", dev('[call]\nopus_loss_hint_percent = "x"\n'), ("call.opus_loss_hint",)),
    Case(
        "secret-wrong-type-not-echoed",
        dev("[mqtt]\npassword = 31415926\n"),
        ("mqtt.password: Input should be a valid string (got a secret, not shown)",),
    ),
    # --- numbers
    Case("nan-duration", dev("[mqtt]\nconnect_timeout_s = nan\n"), ("mqtt.connect_timeout_s:",)),
    Case("inf-duration", dev("[call]\nring_timeout_s = inf\n"), ("call.ring_timeout_s: Input",)),
    Case("neg-duration", dev("[call]\nmax_duration_s = -1.0\n"), ("call.max_duration_s: Input",)),
    Case("zero-duration", dev("[audio]\nreopen_min_s = 0.0\n"), ("audio.reopen_min_s: Input",)),
    Case("nan-port", dev("[mqtt]\nport = nan\n"), ("mqtt.port: Input should be",)),
    Case("zero-port", dev("[mqtt]\nport = 0\n"), ("mqtt.port: Input should be greater",)),
    Case("huge-port", dev("[mqtt]\nport = 99999999999999999999\n"), ("mqtt.port: Input should",)),
    Case("neg-rate", dev("[telemetry]\nevents_rate_per_s = -5.0\n"), ("telemetry.events_rate",)),
    Case("inf-rate", dev("[telemetry]\nevents_rate_per_s = inf\n"), ("telemetry.events_rate",)),
    Case("zero-bitrate", dev("[call]\nopus_bitrate_kbps = 0\n"), ("call.opus_bitrate_kbps:",)),
    Case("huge-bitrate", dev("[call]\nopus_bitrate_kbps = 100000\n"), ("call.opus_bitrate",)),
    Case("neg-buffer", dev("[audio]\nplayout_target_ms = -60\n"), ("audio.playout_target_ms:",)),
    Case("huge-buffer", dev("[audio]\nplayout_max_ms = 1e400\n"), ("audio.playout_max_ms:",)),
    Case("zero-spool", dev("[storage]\nspool_max_messages = 0\n"), ("storage.spool_max_messa",)),
    Case("nan-ratio", dev("[tracing]\nsample_ratio = nan\n"), ("tracing.sample_ratio:",)),
    # --- pins
    Case("pin-out-of-range", dev("[leds]\npins = [17, 27, 99]\n"), ("leds.pins.2: Input should",)),
    Case("pin-negative", dev("[button]\npin = -1\n"), ("button.pin: Input should be greater",)),
    Case("pin-too-few", dev("[leds]\npins = [17]\n"), ("leds.pins: List should have at least",)),
    Case("pins-duplicate", dev("[leds]\npins = [17, 17, 22]\n"), ("leds.pins: Value error, each",)),
    Case(
        "button-on-an-led-pin",
        dev("[button]\nenabled = true\npin = 27\n"),
        ("button.pin: 27 is also an LED pin",),
    ),
    # --- paths
    Case(
        "state-dir-is-a-file",
        in_tmp(lambda t: dev(f'[storage]\nstate_dir = "{_keys(t, "", "plain")}/state"\n')),
        ("storage.state_dir: Value error,", "is not a directory"),
    ),
    Case("state-dir-nul", dev('[storage]\nstate_dir = "/tmp/a\\u0000b"\n'), ("storage.state_dir",)),
    Case("sysfs-root-nul", dev('[health]\nsysfs_root = "\\u0000"\n'), ("health.sysfs_root: Va",)),
    Case(
        "socket-path-is-a-dir",
        in_tmp(lambda t: dev(f'[security]\nlocal_socket = "{t}"\n')),
        ("security.local_socket: Value error,", "is not a socket"),
    ),
    Case(
        "keys-file-missing",
        in_tmp(lambda t: dev(f'[security]\nkeys_file = "{t}/nope.json"\n')),
        ("security.keys_file: Value error, cannot read", "No such file"),
    ),
    Case(
        "keys-file-is-a-dir",
        in_tmp(lambda t: dev(f'[security]\nkeys_file = "{t}"\n')),
        ("security.keys_file: Value error, cannot read", "Is a directory"),
    ),
    Case(
        "keys-file-garbage-json",
        in_tmp(lambda t: dev(f'[security]\nkeys_file = "{_keys(t, "{[}")}"\n')),
        ("security.keys_file: Value error,", "is not JSON"),
    ),
    Case(
        "keys-file-pem",
        in_tmp(lambda t: dev(f'[security]\nkeys_file = "{_keys(t, PEM)}"\n')),
        ("security.keys_file: Value error,", "is not JSON"),
    ),
    Case(
        "keys-file-not-utf8",
        in_tmp(lambda t: dev(f'[security]\nkeys_file = "{_keys(t, bytes([0xFF, 0xFE]) * 9)}"\n')),
        ("security.keys_file: Value error,", "is not UTF-8 text"),
    ),
    Case(
        "keys-file-wrong-shape",
        in_tmp(lambda t: dev(f'[security]\nkeys_file = "{_keys(t, json.dumps({"keys": 5}))}"\n')),
        ("security.keys_file: Value error,", "expected a list of key entries"),
    ),
    Case(
        "keys-file-bad-entries",
        in_tmp(lambda t: dev(f'[security]\nkeys_file = "{_keys(t, BAD_ENTRIES)}"\n')),
        ("security.keys_file: Value error,", "keys[0].kid", "keys[0].public_key: not base64url"),
    ),
    Case(
        "call-key-garbage",
        in_tmp(lambda t: dev(f'[security]\ncall_key_file = "{_keys(t, "garbage", "k")}"\n')),
        ("security.call_key_file: Value error,", "is not JSON"),
    ),
    Case(
        "call-key-not-utf8",
        in_tmp(
            lambda t: dev(f'[security]\ncall_key_file = "{_keys(t, bytes([0xFF]) * 40, "k")}"\n')
        ),
        ("security.call_key_file: Value error,", "is not UTF-8 text"),
    ),
    Case(
        "call-key-is-public",
        in_tmp(
            lambda t: dev(
                "[security]\ncall_key_file = "
                f'"{_keys(t, json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "A" * 43}), "k")}"\n'
            )
        ),
        ("security.call_key_file: Value error,", "cannot sign"),
    ),
    Case(
        "call-key-bad-kid",
        in_tmp(
            lambda t: dev(f'[security]\ncall_key_file = "{_private_jwk(t)}"\ncall_key_id = "a b"\n')
        ),
        ("security.call_key_id: String should match pattern",),
    ),
    # --- ICE urls
    Case("stun-no-host", dev('[ice]\nstun_urls = ["stun:"]\n'), ("ice.stun_urls:", "no host")),
    Case("turn-no-host", dev('[ice]\nturn_urls = ["turn::3478"]\n'), ("ice.turn_urls:", "no host")),
    Case("turn-bad-port", dev('[ice]\nturn_urls = ["turn:h:99999"]\n'), ("ice.turn_urls:", "port")),
    Case("turn-port-text", dev('[ice]\nturn_urls = ["turn:h:x"]\n'), ("ice.turn_urls:", "port")),
    Case("stun-http", dev('[ice]\nstun_urls = ["http://h"]\n'), ("ice.stun_urls:", "STUN/TURN")),
    Case("turn-in-stun", dev('[ice]\nstun_urls = ["turn:h"]\n'), ("ice.stun_urls:", "stun: or")),
    Case("stun-transport", dev('[ice]\nstun_urls = ["stun:h?transport=udp"]\n'), ("ice.stun_u",)),
    Case("turn-bad-transport", dev('[ice]\nturn_urls = ["turn:h?transport=x"]\n'), ("ice.turn",)),
    Case("url-not-string", dev("[ice]\nturn_urls = [5]\n"), ("ice.turn_urls.0: Input should",)),
    Case("relay-without-turn", dev("[ice]\nrelay_only = true\n"), ("ice: relay_only = true",)),
]


def _write(case: Case, tmp_path: Path) -> Path:
    content = case.content(tmp_path) if callable(case.content) else case.content
    path = tmp_path / f"{case.id}.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _assert_named(err: str, path: Path, expect: tuple[str, ...]) -> None:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith(f"{path}: ") and "error(s)" in lines[0], err[:2000]
    for want in expect:
        assert any(want in line for line in lines[1:]), (want, err[:2000])
    # Quoted values stay short: no line carries a megabyte of input.
    assert all(len(line) < 2000 for line in lines), max(map(len, lines))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_check_config_names_the_problem(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(case, tmp_path)
    assert main(["check-config", str(path)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    _assert_named(err, path, case.expect)


def test_a_bom_is_skipped_like_a_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Windows editors write a UTF-8 BOM; the file means the same without it."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert main(["check-config", str(path)]) == 0
    assert "ok (device dev-1" in capsys.readouterr().out


def test_the_documented_files_still_pass(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("edgeagent.toml", "bench.toml"):
        assert main(["check-config", str(ROOT / "config" / name)]) == 0


def _special_paths(tmp_path: Path) -> list[tuple[str, Path, str]]:
    loop_a, loop_b = tmp_path / "loop-a", tmp_path / "loop-b"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    dangling = tmp_path / "dangling.toml"
    dangling.symlink_to(tmp_path / "gone.toml")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opening it would block until a writer came: never opened
    return [
        ("missing", tmp_path / "missing.toml", "No such file"),
        ("directory", tmp_path, "Is a directory"),
        ("symlink-loop", loop_a, "Too many levels of symbolic links"),
        ("dangling-symlink", dangling, "No such file"),
        ("fifo", fifo, "not a regular file"),
        ("endless-device", Path("/dev/zero"), "not a regular file"),
        ("under-a-file", Path(__file__) / "x.toml", "Not a directory"),
    ]


def test_check_config_paths_that_are_not_config_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, path, why in _special_paths(tmp_path):
        assert main(["check-config", str(path)]) == EXIT_CONFIG, name
        err = capsys.readouterr().err
        assert f"{path}: cannot read: {why}" in err, (name, err)


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT")}
    env["EDGEAGENT_UVLOOP"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


# A representative subset, as separate processes: the real exit code, nothing on stdout
# that looks like a crash, and for `run`, nothing created (the state dir, its spool).
PROCESS_CASES = [
    c
    for c in CASES
    if c.id
    in {
        "binary",
        "deep-arrays",
        "huge-file",
        "every-section-a-scalar",
        "bool-for-int",
        "pins-duplicate",
        "state-dir-nul",
        "keys-file-garbage-json",
        "turn-no-host",
        "relay-without-turn",
    }
]


def _argv(command: str, path: Path) -> tuple[str, ...]:
    return ("check-config", str(path)) if command == "check-config" else ("run", "-c", str(path))


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_as_a_process_exit_78_and_start_nothing(command: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for case in PROCESS_CASES:
        path = _write(case, tmp_path)
        text = path.read_bytes()
        if text.startswith(b"[device]\n") and b"[storage]" not in text:
            # A state dir `run` would create first thing (then its spool, session, ...).
            path.write_bytes(f'[storage]\nstate_dir = "{state}"\n'.encode() + text)
        proc = _cli(*_argv(command, path), cwd=tmp_path)
        assert proc.returncode == EXIT_CONFIG, (case.id, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr + proc.stdout, (case.id, proc.stderr[-3000:])
        for want in case.expect:
            assert want in proc.stderr, (case.id, want, proc.stderr[-3000:])
        assert not state.exists(), case.id
    special = tmp_path / "special"
    special.mkdir()
    for name, path, why in _special_paths(special):
        proc = _cli(*_argv(command, path), cwd=tmp_path)
        assert proc.returncode == EXIT_CONFIG, (name, proc.stderr[-3000:])
        assert why in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
    assert not list(tmp_path.rglob("*.sqlite3"))
