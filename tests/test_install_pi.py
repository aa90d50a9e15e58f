"""scripts/install-pi: the dry-run plan and a real install into a root under tmp_path;
and the installed service's stop path (no stuck worker thread keeps it alive)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-pi"


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )


def planned(out: str) -> list[str]:
    """The commands the script printed (one `+ cmd` line each)."""
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def index_of(commands: list[str], *needles: str) -> int:
    hits = [i for i, c in enumerate(commands) if all(n in c for n in needles)]
    assert hits, f"no command with {needles} in:\n" + "\n".join(commands)
    return hits[0]


def test_dry_run_prints_every_step_in_order_and_changes_nothing(tmp_path: Path) -> None:
    result = install("--dry-run", "--device-id", "hp-0042")
    assert result.returncode == 0, result.stderr
    commands = planned(result.stdout)
    steps = [
        index_of(commands, "apt-get", "update"),
        index_of(commands, "apt-get install", "python3-venv", "libasound2-dev", "alsa-utils"),
        index_of(commands, "usermod -a -G", "audio", "gpio", "edgeagent"),
        index_of(commands, "-m venv /opt/edgeagent/venv"),
        index_of(commands, "pip install", str(ROOT)),
        index_of(
            commands, "install -m 0640", "config/edgeagent.toml", "/etc/edgeagent/edgeagent.toml"
        ),
        index_of(commands, "sed -i", "hp-0042", "/etc/edgeagent/edgeagent.toml"),
        index_of(commands, "install -d -m 0750 /var/lib/edgeagent"),
        index_of(commands, "chown edgeagent:edgeagent /var/lib/edgeagent"),
        index_of(commands, "systemd/edgeagent.service", "/etc/systemd/system/edgeagent.service"),
        index_of(commands, "systemctl daemon-reload"),
        index_of(commands, "systemctl enable edgeagent.service"),
    ]
    assert steps == sorted(steps)
    if subprocess.run(["getent", "passwd", "edgeagent"], capture_output=True).returncode:
        index_of(commands, "useradd --system", "--shell /usr/sbin/nologin", "edgeagent")
    assert "dry run" in result.stderr

    # With a prefix too, a dry run creates nothing, not even the root.
    target = tmp_path / "root"
    result = install("--dry-run", "--prefix", str(target), "--device-id", "hp-0042")
    assert result.returncode == 0, result.stderr
    assert not target.exists()
    assert any(f"{target}/etc/edgeagent/edgeagent.toml" in c for c in planned(result.stdout))


def test_prefix_install_builds_the_tree_with_a_config_check_config_accepts(tmp_path: Path) -> None:
    target = tmp_path / "root"
    result = install(
        "--prefix", str(target), "--no-pip", "--python", sys.executable, "--device-id", "hp-0042"
    )
    assert result.returncode == 0, result.stderr
    # Root-only steps are skipped, each with a note saying so.
    notes = [
        n for n in result.stderr.splitlines() if n.startswith("install-pi: --prefix: skipping:")
    ]
    for skipped in ("apt-get install", "useradd", "usermod", "chown"):
        assert any(skipped in n for n in notes), skipped
    assert not any("systemctl" in c for c in planned(result.stdout))

    config = target / "etc/edgeagent/edgeagent.toml"
    unit = target / "etc/systemd/system/edgeagent.service"
    wants = target / "etc/systemd/system/multi-user.target.wants/edgeagent.service"
    state = target / "var/lib/edgeagent"
    assert (target / "opt/edgeagent/venv/bin/python").exists()
    assert (target / "opt/edgeagent/README.md").is_file()
    assert unit.read_bytes() == (ROOT / "systemd/edgeagent.service").read_bytes()
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/edgeagent.service"
    assert stat.S_IMODE(state.stat().st_mode) == 0o750
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert (config.with_name("edgeagent.toml.example")).read_text() == (
        ROOT / "config/edgeagent.toml"
    ).read_text()
    assert 'id = "hp-0042"' in config.read_text()

    check = subprocess.run(
        [sys.executable, "-m", "edgeagent", "check-config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "device hp-0042" in check.stdout


def test_second_run_keeps_an_edited_config(tmp_path: Path) -> None:
    target = tmp_path / "root"
    args = ("--prefix", str(target), "--no-pip", "--python", sys.executable, "--device-id", "a-1")
    assert install(*args).returncode == 0
    config = target / "etc/edgeagent/edgeagent.toml"
    edited = config.read_text().replace('host = "127.0.0.1"', 'host = "broker.example"', 1)
    assert edited != config.read_text()
    config.write_text(edited)

    again = install(*args[:-1], "b-2")
    assert again.returncode == 0, again.stderr
    assert config.read_text() == edited  # neither the edit nor the device id is touched
    assert f"keeping the existing {config}" in again.stderr
    assert not any(f"{config} " in c + " " and "sed -i" in c for c in planned(again.stdout))


def test_bad_arguments_are_refused_before_any_change(tmp_path: Path) -> None:
    target = tmp_path / "root"
    bad_id = install("--prefix", str(target), "--device-id", "Not_Valid")
    assert bad_id.returncode == 2 and "must match" in bad_id.stderr
    unknown = install("--prefix", str(target), "--frobnicate")
    assert unknown.returncode == 2 and "unknown argument: --frobnicate" in unknown.stderr
    assert not target.exists()
