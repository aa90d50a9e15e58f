"""Reading the device's health: sysfs/procfs under a configurable root, and psutil.

Blocking (file reads, one short vcgencmd subprocess at most): call `sample()`
from a worker thread, e.g. `await asyncio.to_thread(reader.sample)`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

import psutil

from edgeagent.clock import Clock, SystemClock
from edgeagent.health.system import (
    UNKNOWN_MODEL,
    NetInterface,
    SystemSample,
    Throttled,
    WifiSignal,
    cpu_percent_between,
    decode_throttled,
    parse_board_model,
    parse_thermal_temp,
    parse_throttled_text,
    parse_wireless,
)
from edgeagent.hw import command
from edgeagent.hw.modem import ModemReader, ModemStatus

logger = logging.getLogger(__name__)

MIB = 1024.0 * 1024.0
THERMAL_DIR = "sys/class/thermal"
THROTTLED_FILE = "sys/devices/platform/soc/soc:firmware/get_throttled"
MODEL_FILE = "proc/device-tree/model"
WIRELESS_FILE = "proc/net/wireless"
NET_DIR = "sys/class/net"
MAX_NET_INTERFACES = 64
_IFF_UP = 0x1
_ARPHRD_LOOPBACK = 772
BOOT_ID_FILE = "proc/sys/kernel/random/boot_id"

VCGENCMD_TIMEOUT_S = 1.0
# vcgencmd failures are nearly always permanent (not in the video group, no
# firmware mailbox); stop paying for the subprocess after this many in a row.
VCGENCMD_MAX_FAILURES = 3
MAX_SYSFS_BYTES = 4096  # a sysfs attribute is one page at most
MAX_ZONE_NAME = 64
_BOOT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)

_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)

# psutil's /proc parsers raise these, not psutil.Error, on text they do not expect
# (a truncated meminfo, a /proc/stat without btime or with a short cpu line, an lxcfs bug).
_PSUTIL_ERRORS = (psutil.Error, OSError, ValueError, LookupError, TypeError, RuntimeError)


def read_attribute(path: Path) -> bytes:
    """At most 4 KiB of a sysfs/procfs file, never blocking (a FIFO or a wedged driver
    there must not stall the caller). OSError if unreadable, ValueError for a path
    with a NUL byte."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, MAX_SYSFS_BYTES)
    finally:
        os.close(fd)


class _WarnOnce:
    """WARNING the first time a reading fails, DEBUG after that."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, msg: str, *args: object) -> None:
        level = logging.DEBUG if key in self._seen else logging.WARNING
        self._seen.add(key)
        logger.log(level, msg, *args)


class SystemReader:
    """Takes `SystemSample`s of this device; never raises from `sample()`."""

    def __init__(
        self,
        *,
        sysfs_root: Path = Path("/"),
        disk_path: Path,
        vcgencmd: str | None = "vcgencmd",
        vcgencmd_timeout_s: float = VCGENCMD_TIMEOUT_S,
        mmcli: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`mmcli`: ModemManager's CLI, to read a cellular modem (None: not read)."""
        self._root = sysfs_root
        self._modem_reader = ModemReader(mmcli)
        self._last_modem: ModemStatus | None = None
        self._disk_path = disk_path
        self._clock: Clock = clock or SystemClock()
        self._warn = _WarnOnce()
        self._vcgencmd = shutil.which(vcgencmd) if vcgencmd else None
        self._vcgencmd_timeout_s = vcgencmd_timeout_s
        self._last_throttled: Throttled | None = None
        self._vcgencmd_failures = 0
        self._board_model: str | None = None
        self._proc: psutil.Process | None = None
        try:
            self._proc = psutil.Process()
        except _PSUTIL_ERRORS as exc:
            self._warn("process", "health: own process unreadable: %s", exc)
        # Our own cpu_times baseline: psutil.cpu_percent(interval=None) keeps its
        # baseline per calling thread, and sample() runs on whichever worker
        # thread asyncio.to_thread picks.
        self._cpu_prev = self._cpu_times()

    # -- the sample ------------------------------------------------------

    def sample(self, *, quick: bool = False) -> SystemSample:
        """Read everything once; unreadable parts come back as None / empty.

        `quick`: for callers on the event loop (snapshots): files only, no `vcgencmd`
        subprocess; the throttled word is then the last one read if sysfs has none."""
        zones = self._thermal_zones()
        wifi = self._wireless()
        if not quick:  # mmcli is a subprocess (D-Bus): not on the loop
            self._last_modem = self._modem_reader.read()
        mem_available, mem_total = self._memory()
        rss, fds, threads = self._process()
        return SystemSample(
            ts=self._clock.time(),
            uptime_s=self._uptime(),
            cpu_pct=self._cpu_pct(),
            load_1m=self._load_1m(),
            mem_available_mb=mem_available,
            mem_total_mb=mem_total,
            rss_mb=rss,
            temp_c=max(zones.values()) if zones else None,
            thermal_zones=zones,
            throttled=self._throttled(quick),
            disk_free_mb=self._disk_free(),
            net=self._net(wifi, self._last_modem),
            board_model=self.board_model(),
            num_fds=fds,
            threads=threads,
        )

    # -- files under the root ------------------------------------------------

    def _read_text(self, rel: str, key: str) -> str | None:
        """`read_attribute` of a file under the root, decoded; None if missing or unreadable."""
        path = self._root / rel
        try:
            data = read_attribute(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._warn(key, "health: cannot read %s: %s", path, exc)
            return None
        return data.decode("utf-8", errors="replace")

    def _thermal_zones(self) -> dict[str, float]:
        base = self._root / THERMAL_DIR
        try:
            dirs = sorted(p for p in base.glob("thermal_zone*") if p.is_dir())
        except (OSError, ValueError) as exc:
            self._warn("thermal", "health: cannot list %s: %s", base, exc)
            return {}
        zones: dict[str, float] = {}
        for zone in dirs:
            rel = f"{THERMAL_DIR}/{zone.name}"
            text = self._read_text(f"{rel}/temp", f"thermal:{zone.name}")
            if text is None:
                continue
            temp = parse_thermal_temp(text)
            if temp is None:
                self._warn(
                    f"thermal:{zone.name}", "health: bad temperature %r in %s", text[:40], zone
                )
                continue
            kind = self._read_text(f"{rel}/type", f"thermal-type:{zone.name}") or ""
            # One line, short: it becomes a key of every metrics payload.
            lines = kind.strip().splitlines()
            name = (lines[0].strip()[:MAX_ZONE_NAME] if lines else "") or zone.name
            if name in zones:  # two zones of one type: keep both, tell them apart
                name = f"{name}@{zone.name}"
            zones[name] = temp
        return zones

    def _throttled(self, quick: bool = False) -> Throttled | None:
        text = self._read_text(THROTTLED_FILE, "throttled")
        if text is None:
            if quick:
                return self._last_throttled
            text = self._run_vcgencmd()
        if text is None:
            return None
        value = parse_throttled_text(text)
        if value is None:
            self._warn("throttled-parse", "health: unrecognised throttled value %r", text[:40])
            return None
        self._last_throttled = decode_throttled(value)
        return self._last_throttled

    def _run_vcgencmd(self) -> str | None:
        if self._vcgencmd is None or self._vcgencmd_failures >= VCGENCMD_MAX_FAILURES:
            return None
        try:
            done = command.run(
                [self._vcgencmd, "get_throttled"],
                timeout_s=self._vcgencmd_timeout_s,
                max_bytes=MAX_SYSFS_BYTES,
            )
        except command.CommandError as exc:
            self._vcgencmd_failed("%s", exc)
            return None
        if done.returncode != 0:
            self._vcgencmd_failed("exit %d: %s", done.returncode, done.stderr.strip()[:200])
            return None
        self._vcgencmd_failures = 0
        return done.stdout

    def _vcgencmd_failed(self, msg: str, *args: object) -> None:
        self._vcgencmd_failures += 1
        self._warn("vcgencmd", "health: vcgencmd get_throttled failed: " + msg, *args)
        if self._vcgencmd_failures == VCGENCMD_MAX_FAILURES:
            logger.warning(
                "health: vcgencmd failed %d times in a row; throttled bits unavailable",
                VCGENCMD_MAX_FAILURES,
            )

    def board_model(self) -> str:
        """The device-tree model string, or "unknown"; cached once read."""
        if self._board_model is not None:
            return self._board_model
        path = self._root / MODEL_FILE
        try:  # sample(quick=True) runs on the event loop: never a blocking read
            model = parse_board_model(read_attribute(path))
        except FileNotFoundError:
            return UNKNOWN_MODEL
        except (OSError, ValueError) as exc:
            self._warn("model", "health: cannot read %s: %s", path, exc)
            return UNKNOWN_MODEL
        self._board_model = model
        return model

    def _wireless(self) -> dict[str, WifiSignal]:
        text = self._read_text(WIRELESS_FILE, "wireless")
        return parse_wireless(text) if text is not None else {}

    # -- psutil ------------------------------------------------------------

    def _cpu_times(self) -> dict[str, float] | None:
        try:
            return dict(psutil.cpu_times()._asdict())
        except _PSUTIL_ERRORS as exc:
            self._warn("cpu", "health: cpu times unreadable: %s", exc)
            return None

    def _cpu_pct(self) -> float | None:
        now = self._cpu_times()
        if now is None:
            return None
        prev = self._cpu_prev
        pct = cpu_percent_between(prev, now) if prev is not None else None
        if pct is None:
            # No clock tick since the baseline (samples < 10 ms apart): report the
            # since-boot average and keep the baseline for the next sample.
            self._cpu_prev = prev or now
            return cpu_percent_between({}, now)
        self._cpu_prev = now
        return pct

    def _uptime(self) -> float | None:
        try:
            return time.clock_gettime(time.CLOCK_BOOTTIME)
        except (AttributeError, OSError):
            pass
        try:
            return max(0.0, time.time() - psutil.boot_time())
        except _PSUTIL_ERRORS as exc:
            self._warn("uptime", "health: uptime unreadable: %s", exc)
            return None

    def _load_1m(self) -> float | None:
        try:
            return float(psutil.getloadavg()[0])
        except _PSUTIL_ERRORS as exc:
            self._warn("load", "health: load average unreadable: %s", exc)
            return None

    def _memory(self) -> tuple[float | None, float | None]:
        try:
            vm = psutil.virtual_memory()
        except _PSUTIL_ERRORS as exc:
            self._warn("memory", "health: memory unreadable: %s", exc)
            return None, None
        return vm.available / MIB, vm.total / MIB

    def _process(self) -> tuple[float | None, int | None, int | None]:
        if self._proc is None:
            return None, None, None
        try:
            with self._proc.oneshot():
                return (
                    self._proc.memory_info().rss / MIB,
                    self._proc.num_fds(),
                    self._proc.num_threads(),
                )
        except _PSUTIL_ERRORS as exc:
            self._warn("process", "health: own process unreadable: %s", exc)
            return None, None, None

    def _disk_free(self) -> float | None:
        try:
            return psutil.disk_usage(str(self._disk_path)).free / MIB
        except _PSUTIL_ERRORS as exc:  # ValueError too: a NUL in the path
            self._warn("disk", "health: disk usage of %s unreadable: %s", self._disk_path, exc)
            return None

    def _net(
        self, wifi: dict[str, WifiSignal], modem: ModemStatus | None = None
    ) -> dict[str, NetInterface]:
        try:
            stats = psutil.net_if_stats()
            addrs = psutil.net_if_addrs()
            io = psutil.net_io_counters(pernic=True)
        except UnicodeError as exc:
            # psutil cannot list any interface once one is named in bytes that are not
            # UTF-8 (legal for the kernel; psutil has no per-name call): sysfs still can.
            self._warn("net", "health: psutil cannot list interfaces (%s); reading sysfs", exc)
            return self._with_modem(self._net_from_sysfs(wifi, modem), modem)
        except _PSUTIL_ERRORS as exc:
            self._warn("net", "health: network interfaces unreadable: %s", exc)
            return {}
        out: dict[str, NetInterface] = {}
        for name in sorted(set(stats) | set(addrs)):
            st = stats.get(name)
            if name == "lo" or (st is not None and "loopback" in st.flags.split(",")):
                continue
            counters = io.get(name)
            out[name] = NetInterface(
                up=bool(st.isup) if st is not None else False,
                addresses=tuple(a.address for a in addrs.get(name, ()) if a.family in _IP_FAMILIES),
                rx_bytes=counters.bytes_recv if counters is not None else None,
                tx_bytes=counters.bytes_sent if counters is not None else None,
                wifi=wifi.get(name),
                modem=modem if modem is not None and modem.interface == name else None,
            )
        return self._with_modem(out, modem)

    @staticmethod
    def _with_modem(
        out: dict[str, NetInterface], modem: ModemStatus | None
    ) -> dict[str, NetInterface]:
        if modem is not None and (modem.interface or "modem") not in out:
            # The modem's net port is down or unnamed: the modem still reports (searching,
            # denied registration, no signal), and that is what explains it.
            out[modem.interface or "modem"] = NetInterface(False, (), None, None, modem=modem)
        return out

    def _net_from_sysfs(
        self, wifi: dict[str, WifiSignal], modem: ModemStatus | None
    ) -> dict[str, NetInterface]:
        """Interfaces from `sys/class/net`: up (IFF_UP) and byte counters, no addresses
        (those need netlink); names with the bytes that are not UTF-8 escaped (`v\\xffx`)."""
        base = os.fsencode(self._root / NET_DIR)
        try:
            names = sorted(os.listdir(base))[:MAX_NET_INTERFACES]
        except (OSError, ValueError) as exc:
            self._warn("net-sysfs", "health: %s unreadable: %s", os.fsdecode(base), exc)
            return {}
        out: dict[str, NetInterface] = {}
        for raw in names:
            d = Path(os.fsdecode(base + b"/" + raw))
            if self._int_attr(d / "type", 10) == _ARPHRD_LOOPBACK:
                continue
            name = raw.decode("utf-8", errors="backslashreplace")
            flags = self._int_attr(d / "flags", 16)
            out[name] = NetInterface(
                up=flags is not None and bool(flags & _IFF_UP),
                addresses=(),
                rx_bytes=self._int_attr(d / "statistics" / "rx_bytes", 10),
                tx_bytes=self._int_attr(d / "statistics" / "tx_bytes", 10),
                wifi=wifi.get(name),
                modem=modem if modem is not None and modem.interface == name else None,
            )
        return out

    @staticmethod
    def _int_attr(path: Path, base: int) -> int | None:
        try:
            return int(read_attribute(path).strip(), base)
        except (OSError, ValueError):
            return None


def boot_id(root: Path = Path("/")) -> str:
    """The kernel's boot id (a UUID); if unreadable or not a UUID, a string derived
    from the boot time."""
    path = root / BOOT_ID_FILE
    try:
        text = read_attribute(path).decode("ascii", errors="replace").strip()
    except (OSError, ValueError) as exc:
        logger.debug("health: %s unreadable (%s); deriving boot id from boot time", path, exc)
        text = ""
    if _BOOT_ID.fullmatch(text):
        return text
    if text:
        logger.warning("health: %s holds %r, not a boot id; deriving one", path, text[:40])
    try:
        return f"boottime-{int(psutil.boot_time())}"
    except _PSUTIL_ERRORS as exc:
        logger.warning("health: boot time unreadable: %s", exc)
        return "boottime-unknown"
