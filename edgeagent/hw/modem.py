"""The cellular modem's state and signal, from ModemManager's `mmcli` (JSON output).

Field devices on LTE drop calls when the signal does; `metrics.net.<wwan>.modem` and
the `modem_signal_low` alert let an operator see that without SSH. Blocking (up to
three short `mmcli` runs): call `read()` from a worker thread, as the system sampler
does. No ModemManager, no modem, or an mmcli that fails gives None, never an error;
a failure is logged once (and its end once); mmcli is tried again at the next sample.

Read: `mmcli -L -J` (the modems), `mmcli -m <path> -J` (state, access technology,
signal quality %, operator, registration, the net port) and `mmcli -m <path>
--signal-get -J` (RSRP/RSRQ/SNR: present only where extended signal polling was set
up with `mmcli --signal-setup`; "--" otherwise, reported as null).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from typing import Any

from edgeagent.hw import command

logger = logging.getLogger(__name__)

TIMEOUT_S = 3.0
MAX_OUTPUT_BYTES = 1 << 20  # a modem's JSON is a few KiB


ENABLED_STATES = frozenset({"searching", "registered", "connecting", "connected", "disconnecting"})
"""States of a modem in use (ModemManager's): its signal % means something. A disabled
or idle modem reports 0 %, which must not alert on a device that uses Wi-Fi instead."""


@dataclass(frozen=True)
class ModemStatus:
    state: str | None  # connected, registered, searching, disabled, failed, ...
    access_tech: str | None  # lte, umts, gsm, 5gnr, ... (joined with "+")
    signal_pct: int | None
    operator: str | None
    registration: str | None  # home, roaming, searching, denied, ...
    interface: str | None  # the net port (wwan0)
    rsrp_dbm: float | None = None
    rsrq_db: float | None = None
    snr_db: float | None = None
    rssi_dbm: float | None = None

    @property
    def in_use(self) -> bool:
        return self.state in ENABLED_STATES

    def to_fields(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "access_tech": self.access_tech,
            "signal_pct": self.signal_pct,
            "operator": self.operator,
            "registration": self.registration,
            "rsrp_dbm": self.rsrp_dbm,
            "rsrq_db": self.rsrq_db,
            "snr_db": self.snr_db,
            "rssi_dbm": self.rssi_dbm,
        }


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or value in ("", "--", "unknown"):
        return None
    # JSON may escape a lone surrogate ("\\udcff"), which no UTF-8 payload can carry.
    return value[:64].encode("utf-8", errors="replace").decode("utf-8")


def _number(value: Any) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if -1e6 < number < 1e6 else None


def _section(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def parse_modem(doc: Any, signal: Any = None) -> ModemStatus | None:
    """`mmcli -m X -J` (and `--signal-get -J`) output; None if it is not a modem's."""
    modem = doc.get("modem") if isinstance(doc, dict) else None
    if not isinstance(modem, dict):
        return None
    generic = _section(modem, "generic")
    gpp = _section(modem, "3gpp")
    techs = generic.get("access-technologies")
    tech = (
        "+".join(t for t in (_text(x) for x in techs) if t) or None
        if isinstance(techs, list)
        else None
    )
    quality = generic.get("signal-quality")
    pct = _number(quality.get("value")) if isinstance(quality, dict) else None
    interface = None
    ports = generic.get("ports")
    if isinstance(ports, list):
        for port in ports:
            if isinstance(port, str) and port.endswith("(net)"):
                interface = _text(port.removesuffix("(net)").strip())
                break
    status = ModemStatus(
        state=_text(generic.get("state")),
        access_tech=tech,
        signal_pct=None if pct is None else max(0, min(100, round(pct))),
        operator=_text(gpp.get("operator-name")),
        registration=_text(gpp.get("registration-state")),
        interface=interface,
    )
    sig = _section(signal, "modem").get("signal") if isinstance(signal, dict) else None
    if isinstance(sig, dict):
        # The newest technology that reports anything: 5G, then LTE, then UMTS/GSM.
        for tech_key in ("5g", "lte", "umts", "gsm"):
            values = sig.get(tech_key)
            if not isinstance(values, dict):
                continue
            rsrp, rsrq = _number(values.get("rsrp")), _number(values.get("rsrq"))
            snr, rssi = _number(values.get("snr")), _number(values.get("rssi"))
            if any(v is not None for v in (rsrp, rsrq, snr, rssi)):
                return ModemStatus(
                    status.state,
                    status.access_tech,
                    status.signal_pct,
                    status.operator,
                    status.registration,
                    status.interface,
                    rsrp,
                    rsrq,
                    snr,
                    rssi,
                )
    return status


class ModemReader:
    """The first modem ModemManager knows, read with `mmcli`."""

    def __init__(self, mmcli: str | None = "mmcli", *, timeout_s: float = TIMEOUT_S) -> None:
        self._mmcli = shutil.which(mmcli) if mmcli else None
        self._timeout_s = timeout_s
        self._failing = False
        self._bad_path = False

    @property
    def available(self) -> bool:
        return self._mmcli is not None

    def read(self) -> ModemStatus | None:
        if self._mmcli is None:
            return None
        listing = self._run("-L")
        if listing is None:
            return None
        modems = listing.get("modem-list") if isinstance(listing, dict) else None
        if not isinstance(modems, list) or not modems or not isinstance(modems[0], str):
            return None  # ModemManager runs, no modem plugged in
        path = modems[0]
        # A D-Bus object path: never an option to mmcli, never a megabyte in a log line.
        if not path.startswith("/") or "\0" in path or len(path) > 255:
            if not self._bad_path:
                self._bad_path = True
                logger.warning("health: mmcli -L: %r is not a modem path", path[:80])
            return None
        doc = self._run("-m", path)
        if doc is None:
            return None
        return parse_modem(doc, self._run("-m", path, "--signal-get", quiet=True))

    def _run(self, *args: str, quiet: bool = False) -> Any:
        assert self._mmcli is not None
        try:
            done = command.run(
                [self._mmcli, *args, "-J"], timeout_s=self._timeout_s, max_bytes=MAX_OUTPUT_BYTES
            )
        except command.CommandError as exc:
            return self._failed(f"mmcli {' '.join(args)}: {self._mmcli}: {exc}")
        if done.returncode != 0:
            if quiet:  # --signal-get on a modem without extended signal: not a fault
                return None
            return self._failed(f"mmcli {' '.join(args)}: exit {done.returncode}: "
                                f"{done.stderr.strip()[:200]}")  # fmt: skip
        try:
            doc = json.loads(done.stdout)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested deep
            return self._failed(f"mmcli {' '.join(args)}: not JSON: {exc}")
        if self._failing:
            self._failing = False
            logger.info("health: mmcli answers again")
        return doc

    def _failed(self, message: str) -> None:
        if not self._failing:
            self._failing = True
            logger.warning("health: %s", message)
