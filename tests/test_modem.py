"""The cellular modem in metrics: ModemManager's JSON parsed, and `mmcli` run for real.

No modem exists here, so `mmcli` is a script on PATH that answers as ModemManager
1.20's mmcli does for an LTE modem (the JSON shapes of `mmcli -L -J`, `mmcli -m X -J`
and `mmcli -m X --signal-get -J`), then fails, then answers again.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from edgeagent.health.alerts import system_metrics
from edgeagent.health.system import NetInterface, SystemSample
from edgeagent.hw.modem import ModemReader, parse_modem
from edgeagent.hw.system import SystemReader

PATH = "/org/freedesktop/ModemManager1/Modem/0"

MODEM = {
    "modem": {
        "3gpp": {
            "enabled-locks": ["fixed-dialing"],
            "imei": "867962040000000",
            "operator-code": "26201",
            "operator-name": "Telekom.de",
            "registration-state": "home",
        },
        "dbus-path": PATH,
        "generic": {
            "access-technologies": ["lte"],
            "model": "EC25",
            "manufacturer": "QUALCOMM INCORPORATED",
            "ports": ["cdc-wdm0 (qmi)", "ttyUSB2 (at)", "wwan0 (net)"],
            "power-state": "on",
            "signal-quality": {"recent": "yes", "value": "14"},
            "state": "connected",
            "state-failed-reason": "--",
        },
    }
}
SIGNAL = {
    "modem": {
        "signal": {
            "5g": {"rsrp": "--", "rsrq": "--", "snr": "--"},
            "gsm": {"rssi": "--"},
            "lte": {"rsrp": "-112.00", "rsrq": "-15.00", "rssi": "-81.00", "snr": "-1.40"},
            "refresh": {"rate": "30"},
            "umts": {"ecio": "--", "rscp": "--", "rssi": "--"},
        }
    }
}


def test_an_lte_modem_with_extended_signal() -> None:
    m = parse_modem(MODEM, SIGNAL)
    assert m is not None
    assert (m.state, m.access_tech, m.signal_pct) == ("connected", "lte", 14)
    assert (m.operator, m.registration, m.interface) == ("Telekom.de", "home", "wwan0")
    assert (m.rsrp_dbm, m.rsrq_db, m.snr_db, m.rssi_dbm) == (-112.0, -15.0, -1.4, -81.0)


def test_a_searching_modem_without_signal_polling_or_net_port() -> None:
    doc = json.loads(json.dumps(MODEM))
    generic = doc["modem"]["generic"]
    generic.update(state="searching", ports=["ttyUSB2 (at)"], **{"access-technologies": []})
    generic["signal-quality"]["value"] = "0"
    doc["modem"]["3gpp"].update(**{"operator-name": "--", "registration-state": "searching"})
    off = {"modem": {"signal": {"lte": {"rsrp": "--", "rsrq": "--"}, "refresh": {"rate": "0"}}}}
    m = parse_modem(doc, off)
    assert m is not None
    assert (m.state, m.access_tech, m.signal_pct, m.operator) == ("searching", None, 0, None)
    assert m.interface is None and m.rsrp_dbm is None


@pytest.mark.parametrize(
    "doc",
    [None, [], {"modem": "x"}, {"modem": {"generic": {"signal-quality": {"value": "lots"}}}}],
)
def test_what_is_not_a_modem_document_gives_nothing_or_nulls(doc: Any) -> None:
    m = parse_modem(doc)
    assert m is None or (m.state, m.signal_pct) == (None, None)


def _fake_mmcli(directory: Path, mode_file: Path) -> Path:
    """An `mmcli` that answers per the word in `mode_file`: ok, none (no modem), fail."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "modem.json").write_text(json.dumps(MODEM))
    (directory / "signal.json").write_text(json.dumps(SIGNAL))
    script = directory / "mmcli"
    script.write_text(
        f"""#!/bin/sh
mode=$(cat {mode_file})
[ "$mode" = fail ] && {{ echo "error: couldn't find the ModemManager process" >&2; exit 1; }}
case "$*" in
  "-L -J") [ "$mode" = none ] && echo '{{"modem-list": []}}' \\
           || echo '{{"modem-list": ["{PATH}"]}}' ;;
  "-m {PATH} -J") cat {directory / "modem.json"} ;;
  "-m {PATH} --signal-get -J") cat {directory / "signal.json"} ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_mmcli_is_run_and_a_failing_one_is_logged_once_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mode = tmp_path / "mode"
    mode.write_text("ok")
    reader = ModemReader(str(_fake_mmcli(tmp_path / "bin", mode)))
    first = reader.read()
    assert first is not None and first.signal_pct == 14 and first.rsrp_dbm == -112.0
    mode.write_text("none")
    assert reader.read() is None  # ModemManager runs, nothing plugged in
    mode.write_text("fail")
    with caplog.at_level(logging.INFO, logger="edgeagent.hw.modem"):
        assert reader.read() is None and reader.read() is None
        mode.write_text("ok")
        assert reader.read() == first
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "couldn't find the ModemManager process" in m]) == 1
    assert "health: mmcli answers again" in said
    assert ModemReader("no-such-mmcli-here").read() is None


def test_the_modem_is_in_metrics_under_its_net_port_and_feeds_the_alert(tmp_path: Path) -> None:
    mode = tmp_path / "mode"
    mode.write_text("ok")
    reader = SystemReader(
        sysfs_root=tmp_path / "root",
        disk_path=tmp_path,
        vcgencmd=None,
        mmcli=str(_fake_mmcli(tmp_path / "bin", mode)),
    )
    sample = reader.sample()
    # No wwan0 on this machine: the modem still reports, under its port, as down.
    wwan = sample.net["wwan0"].to_fields()
    assert wwan["up"] is False
    assert wwan["modem"] == {
        "state": "connected",
        "access_tech": "lte",
        "signal_pct": 14,
        "operator": "Telekom.de",
        "registration": "home",
        "rsrp_dbm": -112.0,
        "rsrq_db": -15.0,
        "snr_db": -1.4,
        "rssi_dbm": -81.0,
    }
    assert system_metrics(sample)["modem_signal_pct"] == 14
    # A snapshot on the event loop (quick) does not run mmcli: the last reading stays.
    mode.write_text("fail")
    assert reader.sample(quick=True).net["wwan0"].modem == sample.net["wwan0"].modem


def test_a_modem_not_in_use_does_not_feed_the_signal_alert(tmp_path: Path) -> None:
    """A disabled modem reports 0 %: on a device that uses Wi-Fi that is no alert."""
    doc = json.loads(json.dumps(MODEM))
    doc["modem"]["generic"].update(state="disabled", **{"signal-quality": {"value": "0"}})
    off = parse_modem(doc, {"modem": None})  # mmcli's "modem": null does not raise either
    assert off is not None and off.signal_pct == 0 and not off.in_use
    on = parse_modem(MODEM, SIGNAL)
    assert on is not None and on.in_use
    net = {"wwan0": NetInterface(False, (), None, None, modem=off)}
    sample = SystemSample(0.0, None, None, None, None, None, None, None, {}, None, None, net,
                          "x", None, None)  # fmt: skip
    assert system_metrics(sample)["modem_signal_pct"] is None
    net["wwan0"] = NetInterface(False, (), None, None, modem=on)
    assert system_metrics(sample)["modem_signal_pct"] == 14
