"""Device health: parsers on real-format text, SystemReader on fixture trees and this host."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
from pathlib import Path
from typing import TypeVar

import pytest

from edgeagent.health.system import (
    THROTTLED_BITS,
    RssTracker,
    Throttled,
    Trend,
    WifiSignal,
    cpu_percent_between,
    decode_throttled,
    leak_suspected,
    parse_board_model,
    parse_thermal_temp,
    parse_throttled_text,
    parse_wireless,
    rss_trend,
)
from edgeagent.hw.system import SystemReader, boot_id

T = TypeVar("T")

FIXTURES = Path(__file__).parent / "fixtures" / "system"
WIRELESS_TEXT = (FIXTURES / "proc_net_wireless.txt").read_text()

THERMAL = "sys/class/thermal"
THROTTLED = "sys/devices/platform/soc/soc:firmware/get_throttled"
MODEL = "proc/device-tree/model"


# -- fixture trees -------------------------------------------------------------


def write(root: Path, rel: str, content: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def zone(root: Path, index: int, kind: str | None, milli: str) -> None:
    write(root, f"{THERMAL}/thermal_zone{index}/temp", milli)
    if kind is not None:
        write(root, f"{THERMAL}/thermal_zone{index}/type", kind + "\n")


def pi4_tree(root: Path) -> Path:
    """Raspberry Pi 4 as seen by the kernel: two zones, sysfs throttled word (bare hex)."""
    zone(root, 0, "cpu-thermal", "48300\n")
    zone(root, 1, "rp1-adc", "61000\n")
    # Cooling devices live in the same directory and must be ignored.
    write(root, f"{THERMAL}/cooling_device0/cur_state", "0\n")
    write(root, THROTTLED, "50005\n")
    write(root, MODEL, b"Raspberry Pi 4 Model B Rev 1.4\x00")
    write(root, "proc/net/wireless", WIRELESS_TEXT)
    write(root, "proc/sys/kernel/random/boot_id", "0c6a7d3e-1b2f-4c7e-9d55-3f0a6b1e2d44\n")
    return root


def pi5_tree(root: Path) -> Path:
    """Pi 5-like: one zone, no sysfs throttled attribute (vcgencmd is the source)."""
    zone(root, 0, "cpu-thermal", "55150\n")
    write(root, MODEL, b"Raspberry Pi 5 Model B Rev 1.0\x00")
    return root


def fake_vcgencmd(tmp_path: Path, output: str, *, exit_code: int = 0, delay_s: float = 0) -> Path:
    """A real executable standing in for vcgencmd; it logs each call's argv."""
    log = tmp_path / "vcgencmd.calls"
    script = tmp_path / "bin" / "vcgencmd"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        + (f"sleep {delay_s}\n" if delay_s else "")
        + f"printf '%s\\n' '{output}'\n"
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def wireless_line(name: str, *, link: int, level: int) -> str:
    """One /proc/net/wireless row as cfg80211 prints it (wext-proc.c format string)."""
    counters = "".join(f"{0:6d} " for _ in range(5))
    return f"{name:>6}: {0:04x}  {link:3d}.  {level:3d}.  {-256:3d}   {counters}  {0:6d}\n"


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "vcgencmd.calls"
    return log.read_text().splitlines() if log.exists() else []


# -- pure parsers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("48300\n", 48.3), ("61000", 61.0), ("-5250\n", -5.25), ("0", 0.0), (" 47774 \n", 47.774)],
)
def test_parse_thermal_temp(text: str, expected: float) -> None:
    assert parse_thermal_temp(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "\n", "n/a", "48.3", "0x1000", "1" + "0" * 400, "9999999", "-300000"]
)
def test_parse_thermal_temp_rejects_garbage(text: str) -> None:
    assert parse_thermal_temp(text) is None


def test_decode_throttled_pi_example() -> None:
    t = decode_throttled(0x50005)
    assert t == Throttled(
        now=("under_voltage", "throttled"),
        since_boot=("under_voltage", "throttled"),
        raw=0x50005,
    )


@pytest.mark.parametrize("bit", range(32))
def test_decode_throttled_every_bit(bit: int) -> None:
    t = decode_throttled(1 << bit)
    assert t.raw == 1 << bit
    if bit < 4:
        assert t.now == (THROTTLED_BITS[bit],)
        assert t.since_boot == ()
    elif 16 <= bit < 20:
        assert t.now == ()
        assert t.since_boot == (THROTTLED_BITS[bit - 16],)
    else:  # undefined bits decode to nothing but stay in raw
        assert t.now == ()
        assert t.since_boot == ()


def test_decode_throttled_all_and_none() -> None:
    assert decode_throttled(0) == Throttled((), (), 0)
    everything = decode_throttled(0xF000F)
    assert everything.now == ("under_voltage", "freq_capped", "throttled", "soft_temp_limit")
    assert everything.since_boot == everything.now
    assert decode_throttled(0xE0000).since_boot == ("freq_capped", "throttled", "soft_temp_limit")
    assert decode_throttled(0xE0000).now == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("throttled=0x50005\n", 0x50005),  # vcgencmd get_throttled
        ("throttled=0x0\n", 0),
        ("throttled=0xe0000", 0xE0000),
        ("throttled=0X80008", 0x80008),
        ("throttled=327685", 327685),  # decimal after "throttled=" without 0x
        ("50005\n", 0x50005),  # sysfs get_throttled: the kernel prints "%x\n"
        ("0\n", 0),
        ("e0000\n", 0xE0000),
        ("0x50005", 0x50005),
    ],
)
def test_parse_throttled_text(text: str, expected: int) -> None:
    assert parse_throttled_text(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "\n", "VCHI initialization failed", "error=1 error_msg=\"Command not registered\"",
     "throttled=", "throttled=zz", "temp=48.3'C"],
)  # fmt: skip
def test_parse_throttled_text_rejects(text: str) -> None:
    assert parse_throttled_text(text) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"Raspberry Pi 4 Model B Rev 1.4\x00", "Raspberry Pi 4 Model B Rev 1.4"),
        (b"Raspberry Pi 5 Model B Rev 1.0\x00", "Raspberry Pi 5 Model B Rev 1.0"),
        (
            b"Raspberry Pi Compute Module 4 Rev 1.1\x00\x00junk",
            "Raspberry Pi Compute Module 4 Rev 1.1",
        ),
        (b"no terminator\n", "no terminator"),
        (b"", "unknown"),
        (b"\x00", "unknown"),
        (b"bad \xff byte\x00", "bad \ufffd byte"),
    ],
)
def test_parse_board_model(raw: bytes, expected: str) -> None:
    assert parse_board_model(raw) == expected


def test_parse_wireless_real_format() -> None:
    # Generated with the kernel's own format string (net/wireless/wext-proc.c):
    # wlan0 associated (cfg80211: quality 0..70, level in dBm, noise -256 = none);
    # wlan1 without a link (all zeros).
    assert parse_wireless(WIRELESS_TEXT) == {
        "wlan0": WifiSignal(link_quality=58.0, level_dbm=-52.0, noise_dbm=None)
    }


def test_parse_wireless_noise_and_unsigned_levels() -> None:
    text = (
        "Inter-| sta-|   Quality        |   Discarded packets               | Missed | WE\n"
        " face | tus | link level noise |  nwid  crypt   frag  retry   misc | beacon | 22\n"
        "  wlp2s0: 0000   70.  -38.  -95.       0      0      0      0      0        0\n"
        "   wlan9: 0000   40    200   161        0      0      0      0      0        0\n"
    )
    assert parse_wireless(text) == {
        "wlp2s0": WifiSignal(70.0, -38.0, -95.0),
        "wlan9": WifiSignal(40.0, -56.0, 161.0),
    }
    assert parse_wireless("") == {}
    assert parse_wireless("garbage\nwlan0: x y\n") == {}


def test_cpu_percent_between() -> None:
    before = {"user": 10.0, "nice": 0.0, "system": 5.0, "idle": 80.0, "iowait": 5.0, "guest": 1.0}
    after = {"user": 13.0, "nice": 0.0, "system": 6.0, "idle": 85.0, "iowait": 6.0, "guest": 3.0}
    # busy 4 of total 10 (guest is already inside user, iowait counts as idle)
    assert cpu_percent_between(before, after) == pytest.approx(40.0)
    assert cpu_percent_between(after, after) is None


# -- RSS trend --------------------------------------------------------------------


def series(slope_mib_per_h: float, noise_mib: float, *, hours: float = 2.0, step_s: float = 30.0,
           seed: int = 7) -> list[tuple[float, float]]:  # fmt: skip
    rng = random.Random(seed)
    n = int(hours * 3600 / step_s)
    return [
        (1000.0 + i * step_s, 80.0 + slope_mib_per_h * i * step_s / 3600 + rng.gauss(0, noise_mib))
        for i in range(n + 1)
    ]


LEAK = {"min_span_s": 3600.0, "min_slope_mib_per_h": 5.0, "min_r2": 0.6}


def test_rss_trend_flat() -> None:
    trend = rss_trend(series(0.0, 0.0))
    assert trend == Trend(slope_mib_per_h=0.0, r2=0.0, span_s=7200.0, n=241)
    assert not leak_suspected(trend, **LEAK)


def test_rss_trend_noisy_flat() -> None:
    trend = rss_trend(series(0.0, 3.0))
    assert abs(trend.slope_mib_per_h) < 2.0
    assert trend.r2 < 0.1
    assert trend.span_s == 7200.0
    assert not leak_suspected(trend, **LEAK)


def test_rss_trend_leaking_with_noise() -> None:
    trend = rss_trend(series(20.0, 2.0))
    assert trend.slope_mib_per_h == pytest.approx(20.0, abs=1.5)
    assert trend.r2 > 0.9
    assert leak_suspected(trend, **LEAK)


def test_rss_trend_exact_line() -> None:
    trend = rss_trend([(0.0, 50.0), (1800.0, 55.0), (3600.0, 60.0)])
    assert trend.slope_mib_per_h == pytest.approx(10.0)
    assert trend.r2 == pytest.approx(1.0)


def test_leak_suspected_needs_span_slope_and_fit() -> None:
    assert not leak_suspected(rss_trend(series(20.0, 2.0, hours=0.5)), **LEAK)  # too short
    assert not leak_suspected(rss_trend(series(3.0, 0.2)), **LEAK)  # too slow
    assert not leak_suspected(rss_trend(series(-20.0, 2.0)), **LEAK)  # shrinking
    noisy = rss_trend(series(6.0, 8.0))  # slope right but mostly noise
    assert noisy.r2 < 0.6
    assert not leak_suspected(noisy, **LEAK)


def test_rss_trend_degenerate_inputs() -> None:
    assert rss_trend([]) == Trend(0.0, 0.0, 0.0, 0)
    assert rss_trend([(5.0, 100.0)]) == Trend(0.0, 0.0, 0.0, 1)
    assert rss_trend([(5.0, 100.0), (5.0, 120.0)]) == Trend(0.0, 0.0, 0.0, 2)


def test_rss_tracker_window_and_leak() -> None:
    tracker = RssTracker(window_s=3600.0, max_samples=500)
    spans = []
    for ts, rss in series(20.0, 1.0, hours=3.0):
        tracker.add(ts, rss)
        spans.append(tracker.trend().span_s)
    # The window grows to one hour and stays there.
    assert spans[0] == 0.0
    assert max(spans) == 3600.0
    assert spans[-1] == 3600.0
    assert len(tracker.samples()) == 121
    assert tracker.trend().slope_mib_per_h == pytest.approx(20.0, abs=2.0)
    assert tracker.leak_suspected(**LEAK)

    # A step back in time invalidates the series.
    tracker.add(0.0, 80.0)
    assert tracker.samples() == ((0.0, 80.0),)
    assert not tracker.leak_suspected(**LEAK)


def test_rss_tracker_bounded_by_count() -> None:
    tracker = RssTracker(window_s=1e9, max_samples=10)
    for i in range(100):
        tracker.add(float(i), 1.0)
    assert [ts for ts, _ in tracker.samples()] == [float(i) for i in range(90, 100)]
    with pytest.raises(ValueError):
        RssTracker(window_s=0)


# -- SystemReader on fixture trees ------------------------------------------------


def test_pi4_tree(tmp_path: Path) -> None:
    root = pi4_tree(tmp_path / "root")
    vc = fake_vcgencmd(tmp_path, "throttled=0x0")
    reader = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=str(vc))
    s = reader.sample()
    assert s.thermal_zones == {"cpu-thermal": pytest.approx(48.3), "rp1-adc": pytest.approx(61.0)}
    assert s.temp_c == pytest.approx(61.0)
    assert s.throttled == Throttled(
        now=("under_voltage", "throttled"), since_boot=("under_voltage", "throttled"), raw=0x50005
    )
    assert s.board_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert calls(tmp_path) == []  # the sysfs attribute wins; no subprocess
    assert boot_id(root) == "0c6a7d3e-1b2f-4c7e-9d55-3f0a6b1e2d44"

    fields = s.to_metrics_fields()
    assert fields["temp_c"] == 61.0
    assert fields["throttled"] == {
        "now": ["under_voltage", "throttled"],
        "since_boot": ["under_voltage", "throttled"],
        "raw": 0x50005,
    }
    assert fields["thermal_zones"] == {"cpu-thermal": 48.3, "rp1-adc": 61.0}
    assert fields["board_model"] == "Raspberry Pi 4 Model B Rev 1.4"


def test_pi4_tree_follows_changes(tmp_path: Path) -> None:
    root = pi4_tree(tmp_path / "root")
    reader = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=None)
    first = reader.sample()
    zone(root, 1, "rp1-adc", "82500\n")
    write(root, THROTTLED, "e0008\n")
    second = reader.sample()
    assert first.temp_c == pytest.approx(61.0)
    assert second.temp_c == pytest.approx(82.5)
    assert second.throttled is not None
    assert second.throttled.now == ("soft_temp_limit",)
    assert second.throttled.since_boot == ("freq_capped", "throttled", "soft_temp_limit")


def test_pi5_tree_uses_vcgencmd_once_per_sample(tmp_path: Path) -> None:
    root = pi5_tree(tmp_path / "root")
    vc = fake_vcgencmd(tmp_path, "throttled=0x50000")
    reader = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=str(vc))
    s1 = reader.sample()
    s2 = reader.sample()
    assert calls(tmp_path) == ["get_throttled", "get_throttled"]
    for s in (s1, s2):
        assert s.thermal_zones == {"cpu-thermal": pytest.approx(55.15)}
        assert s.temp_c == pytest.approx(55.15)
        assert s.throttled == Throttled(
            now=(), since_boot=("under_voltage", "throttled"), raw=0x50000
        )
        assert s.board_model == "Raspberry Pi 5 Model B Rev 1.0"
        assert s.net.get("wlan0") is None or s.net["wlan0"].wifi is None


def test_empty_tree_like_this_machine(tmp_path: Path) -> None:
    reader = SystemReader(
        sysfs_root=tmp_path / "empty", disk_path=tmp_path, vcgencmd=str(tmp_path / "nope")
    )
    s = reader.sample()
    assert s.thermal_zones == {}
    assert s.temp_c is None
    assert s.throttled is None
    assert s.board_model == "unknown"
    assert all(nic.wifi is None for nic in s.net.values())
    fields = s.to_metrics_fields()
    assert fields["temp_c"] is None
    assert fields["throttled"] is None
    assert fields["thermal_zones"] == {}


def test_zone_without_type_and_duplicate_types(tmp_path: Path) -> None:
    root = tmp_path / "root"
    zone(root, 0, "cpu-thermal", "40000")
    zone(root, 1, "cpu-thermal", "41000")
    zone(root, 2, None, "42000")
    s = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=None).sample()
    assert s.thermal_zones == {
        "cpu-thermal": 40.0,
        "cpu-thermal@thermal_zone1": 41.0,
        "thermal_zone2": 42.0,
    }
    assert s.temp_c == 42.0


def test_wireless_joins_net_interfaces(tmp_path: Path) -> None:
    root = tmp_path / "root"
    # Put a wireless line on an interface psutil really lists here, if any.
    reader = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=None)
    names = list(reader.sample().net)
    if not names:
        pytest.skip("no non-loopback interface in this network namespace")
    line = wireless_line(names[0], link=61, level=-49)
    write(root, "proc/net/wireless", WIRELESS_TEXT.split("\n", 2)[0] + "\n" + line)
    nic = reader.sample().net[names[0]]
    assert nic.wifi == WifiSignal(61.0, -49.0, None)
    assert nic.to_fields()["wifi"] == {"quality": 61.0, "level_dbm": -49.0}


# -- degradation: missing, unreadable, broken ----------------------------------------


def test_unreadable_entries_degrade_and_warn_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    zone(root, 0, "cpu-thermal", "47000")
    # Directories where files should be: reading raises IsADirectoryError (an OSError),
    # the same path a permission error or a sensor's EIO takes.
    (root / THERMAL / "thermal_zone1" / "temp").mkdir(parents=True)
    (root / THROTTLED).mkdir(parents=True)
    (root / MODEL).mkdir(parents=True)
    (root / "proc/net/wireless").mkdir(parents=True)
    zone(root, 2, "bad", "not a number\n")
    reader = SystemReader(
        sysfs_root=root, disk_path=tmp_path / "no" / "such" / "dir", vcgencmd=None
    )

    caplog.set_level(logging.DEBUG, logger="edgeagent.hw.system")
    s1 = reader.sample()
    first = [(r.levelno, r.getMessage()) for r in caplog.records]
    caplog.clear()
    s2 = reader.sample()
    second = [(r.levelno, r.getMessage()) for r in caplog.records]

    for s in (s1, s2):
        assert s.thermal_zones == {"cpu-thermal": 47.0}
        assert s.temp_c == 47.0
        assert s.throttled is None
        assert s.board_model == "unknown"
        assert s.disk_free_mb is None
        assert s.rss_mb is not None  # the rest still works
    warned = [m for lvl, m in first if lvl == logging.WARNING]
    assert any("thermal_zone1" in m for m in warned)
    assert any("thermal_zone2" in m and "bad temperature" in m for m in warned)
    assert any("get_throttled" in m for m in warned)
    assert any("model" in m for m in warned)
    assert any("wireless" in m for m in warned)
    assert any("disk usage" in m for m in warned)
    # Second time round: the same problems, at DEBUG only.
    assert second
    assert all(lvl == logging.DEBUG for lvl, _ in second)


def test_permission_denied_degrades(tmp_path: Path) -> None:
    probe = write(tmp_path, "probe", "x")
    probe.chmod(0)
    if os.access(probe, os.R_OK):
        pytest.skip("this user reads mode-000 files (root with CAP_DAC_OVERRIDE)")
    root = pi4_tree(tmp_path / "root")
    for rel in (THROTTLED, MODEL, f"{THERMAL}/thermal_zone1/temp"):
        (root / rel).chmod(0)
    s = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=None).sample()
    assert s.thermal_zones == {"cpu-thermal": pytest.approx(48.3)}
    assert s.throttled is None
    assert s.board_model == "unknown"


def test_vcgencmd_failures_degrade_and_stop_being_called(tmp_path: Path) -> None:
    root = pi5_tree(tmp_path / "root")
    vc = fake_vcgencmd(tmp_path, "VCHI initialization failed", exit_code=255)
    reader = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=str(vc))
    samples = [reader.sample() for _ in range(5)]
    assert all(s.throttled is None for s in samples)
    assert all(s.temp_c == pytest.approx(55.15) for s in samples)
    assert len(calls(tmp_path)) == 3  # gave up after three failures in a row


def test_vcgencmd_garbage_output(tmp_path: Path) -> None:
    vc = fake_vcgencmd(tmp_path, 'error=1 error_msg="Command not registered"')
    reader = SystemReader(sysfs_root=pi5_tree(tmp_path / "root"), disk_path=tmp_path,
                          vcgencmd=str(vc))  # fmt: skip
    assert reader.sample().throttled is None


def test_vcgencmd_timeout(tmp_path: Path) -> None:
    vc = fake_vcgencmd(tmp_path, "throttled=0x0", delay_s=5)
    reader = SystemReader(
        sysfs_root=pi5_tree(tmp_path / "root"),
        disk_path=tmp_path,
        vcgencmd=str(vc),
        vcgencmd_timeout_s=0.2,
    )
    s = reader.sample()
    assert s.throttled is None
    assert s.temp_c == pytest.approx(55.15)


def test_boot_id_fallback_is_stable(tmp_path: Path) -> None:
    a = boot_id(tmp_path)
    assert a.startswith("boottime-")
    assert boot_id(tmp_path) == a
    assert boot_id(Path("/")) == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


# -- this machine ---------------------------------------------------------------------


def val(x: T | None) -> T:
    assert x is not None
    return x


def test_sample_on_this_machine_is_sane(tmp_path: Path) -> None:
    reader = SystemReader(disk_path=tmp_path)
    s = reader.sample()
    assert 5 < val(s.rss_mb) < 4096
    assert val(s.disk_free_mb) > 0
    assert 0 < val(s.mem_available_mb) <= val(s.mem_total_mb)
    assert 0.0 <= val(s.cpu_pct) <= 100.0
    assert val(s.load_1m) >= 0
    assert val(s.uptime_s) > 0
    assert val(s.num_fds) > 0
    assert val(s.threads) >= 1
    assert "lo" not in s.net
    for nic in s.net.values():
        assert nic.rx_bytes is None or nic.rx_bytes >= 0
        assert all(isinstance(a, str) and a for a in nic.addresses)

    # A second sample has a real interval for CPU and counters that never go back.
    sum(i * i for i in range(200_000))
    s2 = reader.sample()
    assert 0.0 <= val(s2.cpu_pct) <= 100.0
    assert s2.ts >= s.ts
    assert val(s2.uptime_s) >= val(s.uptime_s)
    for name, nic in s2.net.items():
        before = s.net[name].rx_bytes if name in s.net else None
        if nic.rx_bytes is not None and before is not None:
            assert nic.rx_bytes >= before


def test_metrics_fields_match_protocol(tmp_path: Path) -> None:
    root = pi4_tree(tmp_path / "root")
    s = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=None).sample()
    fields = s.to_metrics_fields()
    protocol = {"uptime_s", "cpu_pct", "load_1m", "mem_available_mb", "rss_mb", "temp_c",
                "throttled", "disk_free_mb", "net"}  # fmt: skip
    assert protocol <= fields.keys()
    assert {"thermal_zones", "mem_total_mb", "num_fds", "board_model"} <= fields.keys()
    for key in ("uptime_s", "cpu_pct", "load_1m", "mem_available_mb", "rss_mb", "temp_c",
                "disk_free_mb", "mem_total_mb"):  # fmt: skip
        assert isinstance(fields[key], float), key
    assert isinstance(fields["num_fds"], int)
    assert set(fields["throttled"]) >= {"now", "since_boot"}
    assert all(isinstance(x, str) for x in fields["throttled"]["now"])
    assert isinstance(fields["net"], dict)
    for nic in fields["net"].values():
        assert set(nic) >= {"up", "addresses", "rx_bytes", "tx_bytes"}
        assert isinstance(nic["up"], bool)
        assert isinstance(nic["addresses"], list)
        assert isinstance(nic["rx_bytes"], int)
    # The payload builder serialises it as JSON as is.
    assert json.loads(json.dumps(fields)) == fields


def test_a_fifo_or_an_endless_file_in_the_tree_neither_blocks_nor_floods(tmp_path: Path) -> None:
    """A sysfs attribute is a page at most: a FIFO (a wedged driver's stand-in) must not
    block the sampler, and a huge file is read only so far."""
    root = tmp_path / "root"
    zone(root, 0, "cpu-thermal", "47000")
    fifo = root / THERMAL / "thermal_zone1" / "temp"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    write(root, THROTTLED, "50005\n" + " " * 1_000_000)
    reader = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=None)
    s = reader.sample()  # returns: the FIFO has no writer and is read without blocking
    assert s.thermal_zones == {"cpu-thermal": 47.0}
    assert s.throttled is not None and s.throttled.raw == 0x50005


def test_a_quick_sample_runs_no_vcgencmd_and_reuses_the_last_throttled_word(
    tmp_path: Path,
) -> None:
    """Snapshots sample on the event loop: no subprocess there (vcgencmd may take its
    whole timeout), the throttled word comes from the last full sample."""
    root = pi5_tree(tmp_path / "root")
    vc = fake_vcgencmd(tmp_path, "throttled=0x50000")
    reader = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=str(vc))
    assert reader.sample(quick=True).throttled is None  # nothing read yet
    assert calls(tmp_path) == []
    full = reader.sample()
    assert full.throttled is not None and full.throttled.raw == 0x50000
    quick = reader.sample(quick=True)
    assert quick.throttled == full.throttled
    assert calls(tmp_path) == ["get_throttled"]
