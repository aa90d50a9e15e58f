"""Device health values: pure parsers for sysfs/procfs text, the sample type, RSS trend."""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeagent.hw.modem import ModemStatus

# Raspberry Pi firmware throttled bits (vcgencmd get_throttled); the same four
# names repeat 16 bits higher as "has occurred since boot".
THROTTLED_BITS: tuple[str, ...] = ("under_voltage", "freq_capped", "throttled", "soft_temp_limit")
_SINCE_BOOT_SHIFT = 16
_MASK32 = 0xFFFFFFFF

UNKNOWN_MODEL = "unknown"

# What the kernel prints: ASCII digits only. Python's int() also takes "+", "_" and
# any Unicode digit, which a broken driver's garbage must not pass for a reading.
_DECIMAL = re.compile(r"-?[0-9]+")
_UNSIGNED = re.compile(r"[0-9]+")
_HEX = re.compile(r"(?:0[xX])?[0-9a-fA-F]+")


@dataclass(frozen=True)
class Throttled:
    """Decoded firmware throttling state: flag names active now and since boot."""

    now: tuple[str, ...]
    since_boot: tuple[str, ...]
    raw: int


@dataclass(frozen=True)
class WifiSignal:
    """One line of /proc/net/wireless; noise is None where the driver does not report it."""

    link_quality: float
    level_dbm: float
    noise_dbm: float | None


@dataclass(frozen=True)
class NetInterface:
    """One network interface as sampled."""

    up: bool
    addresses: tuple[str, ...]
    rx_bytes: int | None
    tx_bytes: int | None
    wifi: WifiSignal | None = None
    modem: ModemStatus | None = None  # the cellular modem whose net port this is

    def to_fields(self) -> dict[str, Any]:
        """The metrics `net.<ifname>` object."""
        out: dict[str, Any] = {
            "up": self.up,
            "addresses": list(self.addresses),
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
        }
        if self.wifi is not None:
            wifi: dict[str, Any] = {
                "quality": self.wifi.link_quality,
                "level_dbm": self.wifi.level_dbm,
            }
            if self.wifi.noise_dbm is not None:
                wifi["noise_dbm"] = self.wifi.noise_dbm
            out["wifi"] = wifi
        if self.modem is not None:
            out["modem"] = self.modem.to_fields()
        return out


@dataclass(frozen=True)
class SystemSample:
    """One health reading of the device; a field is None where its source was unreadable."""

    ts: float
    uptime_s: float | None
    cpu_pct: float | None
    load_1m: float | None
    mem_available_mb: float | None
    mem_total_mb: float | None
    rss_mb: float | None
    temp_c: float | None
    thermal_zones: Mapping[str, float]
    throttled: Throttled | None
    disk_free_mb: float | None
    net: Mapping[str, NetInterface]
    board_model: str
    num_fds: int | None
    threads: int | None

    def to_metrics_fields(self) -> dict[str, Any]:
        """The health part of the `metrics` payload (protocol section 2), plus extras."""
        throttled: dict[str, Any] | None = None
        if self.throttled is not None:
            throttled = {
                "now": list(self.throttled.now),
                "since_boot": list(self.throttled.since_boot),
                "raw": self.throttled.raw,
            }
        return {
            "uptime_s": _round(self.uptime_s, 1),
            "cpu_pct": _round(self.cpu_pct, 1),
            "load_1m": _round(self.load_1m, 2),
            "mem_available_mb": _round(self.mem_available_mb, 1),
            "rss_mb": _round(self.rss_mb, 1),
            "temp_c": _round(self.temp_c, 1),
            "throttled": throttled,
            "disk_free_mb": _round(self.disk_free_mb, 1),
            "net": {name: nic.to_fields() for name, nic in sorted(self.net.items())},
            # Extras (the protocol allows added fields).
            "mem_total_mb": _round(self.mem_total_mb, 1),
            "thermal_zones": {name: round(c, 1) for name, c in sorted(self.thermal_zones.items())},
            "num_fds": self.num_fds,
            "threads": self.threads,
            "board_model": self.board_model,
        }


def _round(value: float | None, ndigits: int) -> float | None:
    return None if value is None else round(value, ndigits)


def parse_thermal_temp(text: str) -> float | None:
    """`thermal_zone*/temp` content (millidegrees Celsius) -> °C; None if not a number
    or not a temperature (a driver returning garbage must not raise, e.g. an int too
    large for a float)."""
    value = text.strip()
    # Beyond +-99999 °C in millidegrees is not a reading (and int() of a long string is slow).
    if len(value) > 9 or not _DECIMAL.fullmatch(value):
        return None
    celsius = int(value) / 1000.0
    return celsius if -273.0 <= celsius <= 1000.0 else None


def decode_throttled(value: int) -> Throttled:
    """Split the firmware throttled word into flag names (bits 0..3 now, 16..19 since boot)."""
    value &= _MASK32
    now = tuple(name for bit, name in enumerate(THROTTLED_BITS) if value & (1 << bit))
    since = tuple(
        name for bit, name in enumerate(THROTTLED_BITS) if value & (1 << (bit + _SINCE_BOOT_SHIFT))
    )
    return Throttled(now=now, since_boot=since, raw=value)


def parse_throttled_text(text: str) -> int | None:
    """vcgencmd `throttled=0x50005` or sysfs `get_throttled` text -> the integer word.

    Hex with `0x` is read as hex everywhere. The kernel prints the sysfs attribute
    as bare hex (`"%x\\n"`, so `50005` means 0x50005), hence bare digits alone are
    hex; after `throttled=` (vcgencmd prints `0x`) bare digits are decimal.
    None for anything else, including a sign or a value wider than the 32-bit word.
    """
    s = text.strip()
    if not s:
        return None
    from_vcgencmd = False
    if "=" in s:
        key, _, s = s.partition("=")
        if key.strip() != "throttled":
            return None
        s = s.strip()
        from_vcgencmd = True
    if len(s) > 12:  # "0x" and 8 hex digits, give or take leading zeros
        return None
    # vcgencmd always prints 0x...; a bare number after "throttled=" is decimal.
    decimal = from_vcgencmd and not s.lower().startswith("0x")
    if not (_UNSIGNED if decimal else _HEX).fullmatch(s):
        return None
    value = int(s, 10 if decimal else 16)
    return value if value <= _MASK32 else None


def parse_board_model(raw: bytes) -> str:
    """/proc/device-tree/model bytes (NUL-terminated) -> the model string, or "unknown"."""
    text = raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace").strip()
    return text or UNKNOWN_MODEL


def _wireless_number(token: str) -> float | None:
    # The kernel appends "." to a value updated since the last read, " " otherwise.
    try:
        value = float(token.rstrip(".*"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # "nan", "inf", "1e999" are no reading


def parse_wireless(text: str) -> dict[str, WifiSignal]:
    """/proc/net/wireless -> interface name -> link quality, level dBm, noise dBm.

    Interfaces without a signal reading (not associated) are left out.
    """
    out: dict[str, WifiSignal] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep or "|" in line:
            continue  # header lines contain "|"
        fields = rest.split()
        if len(fields) < 4:
            continue
        link = _wireless_number(fields[1])
        level = _wireless_number(fields[2])
        noise = _wireless_number(fields[3])
        # An interface without a link prints all zeros (the kernel's "nullstats").
        if link is None or level is None or level == 0:
            continue
        # Drivers without dBm reporting print unsigned 0..255 levels.
        if level >= 128:
            level -= 256.0
        # -256 is what cfg80211 prints for "no noise reading" (0 with the dBm flag).
        if noise is not None and (noise <= -256 or noise == 0):
            noise = None
        out[name.strip()] = WifiSignal(link_quality=link, level_dbm=level, noise_dbm=noise)
    return out


def cpu_percent_between(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """System CPU busy % between two cumulative cpu_times snapshots (field name -> seconds).

    Same arithmetic as psutil: guest time is already inside user/nice, idle
    includes iowait. None when no time passed.
    """
    deltas = {k: max(0.0, after[k] - before.get(k, 0.0)) for k in after}
    total = sum(v for k, v in deltas.items() if k not in ("guest", "guest_nice"))
    if total <= 0:
        return None
    idle = deltas.get("idle", 0.0) + deltas.get("iowait", 0.0)
    return max(0.0, min(100.0, (total - idle) / total * 100.0))


@dataclass(frozen=True)
class Trend:
    """Least-squares line through (time, RSS) samples."""

    slope_mib_per_h: float
    r2: float
    span_s: float
    n: int


def rss_trend(samples: Sequence[tuple[float, float]]) -> Trend:
    """Slope of RSS MiB over time (MiB/hour), r² of the fit and the time span covered."""
    n = len(samples)
    if n < 2:
        return Trend(0.0, 0.0, 0.0, n)
    ts = [t for t, _ in samples]
    span = max(ts) - min(ts)
    mean_t = math.fsum(ts) / n
    mean_y = math.fsum(y for _, y in samples) / n
    sxx = math.fsum((t - mean_t) ** 2 for t in ts)
    syy = math.fsum((y - mean_y) ** 2 for _, y in samples)
    sxy = math.fsum((t - mean_t) * (y - mean_y) for t, y in samples)
    if sxx <= 0:
        return Trend(0.0, 0.0, span, n)
    slope = sxy / sxx
    # A perfectly flat series has nothing to explain: r² 0, so it never looks like a leak.
    r2 = 0.0 if syy <= 0 else min(1.0, (sxy * sxy) / (sxx * syy))
    return Trend(slope_mib_per_h=slope * 3600.0, r2=r2, span_s=span, n=n)


def leak_suspected(
    trend: Trend, *, min_span_s: float, min_slope_mib_per_h: float, min_r2: float
) -> bool:
    """True when RSS grew steadily: long enough window, steep enough, and a good linear fit."""
    return (
        trend.span_s >= min_span_s
        and trend.slope_mib_per_h >= min_slope_mib_per_h
        and trend.r2 >= min_r2
    )


@dataclass
class RssTracker:
    """A bounded window of (monotonic ts, RSS MiB) samples answering trend and leak questions.

    Feed it monotonic time: a wall clock that jumps (a Pi without RTC syncing NTP)
    would bend the slope. A step back in time clears the window.
    """

    window_s: float
    max_samples: int = 1024
    _samples: deque[tuple[float, float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.max_samples < 2:
            raise ValueError("RssTracker needs window_s > 0 and max_samples >= 2")
        self._samples = deque(maxlen=self.max_samples)

    def add(self, ts: float, rss_mb: float) -> None:
        """Record one reading and drop those older than the window."""
        if self._samples and ts < self._samples[-1][0]:
            self._samples.clear()
        self._samples.append((ts, rss_mb))
        horizon = ts - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def samples(self) -> tuple[tuple[float, float], ...]:
        return tuple(self._samples)

    def trend(self) -> Trend:
        return rss_trend(self._samples)

    def leak_suspected(
        self, *, min_span_s: float, min_slope_mib_per_h: float, min_r2: float
    ) -> bool:
        return leak_suspected(
            self.trend(),
            min_span_s=min_span_s,
            min_slope_mib_per_h=min_slope_mib_per_h,
            min_r2=min_r2,
        )
