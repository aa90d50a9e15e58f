"""Hostile device inputs for the health watchers: what a broken driver, firmware tool or
OS hands the sampler must cost one figure (None, or the documented fallback), never the
sample, the event loop, or a process left behind.

Real files and real executables throughout: sysfs/procfs trees in tmp_path, shell
scripts standing in for `vcgencmd`, `mmcli` and `timedatectl`, real notify sockets.
Every process a test starts carries a marker in its environment, so a fake command's
own children, orphaned by a kill and re-parented to init, are still found as leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from test_system import write

from edgeagent.health.system import parse_wireless
from edgeagent.hw import net, systemd
from edgeagent.hw.modem import ModemReader
from edgeagent.hw.system import SystemReader, boot_id

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

THERMAL = "sys/class/thermal"
THROTTLED = "sys/devices/platform/soc/soc:firmware/get_throttled"
MODEL = "proc/device-tree/model"
WIRELESS = "proc/net/wireless"
BOOT_ID = "proc/sys/kernel/random/boot_id"
MODEM_PATH = "/org/freedesktop/ModemManager1/Modem/0"
GOOD_BOOT_ID = "0c6a7d3e-1b2f-4c7e-9d55-3f0a6b1e2d44"

# A sample that only reads files takes milliseconds; these bounds are far above that
# (the machine is shared with CPU-heavy tests) and far below "hangs".
FILE_BOUND_S = 5.0
CMD_TIMEOUT_S = 0.3  # the fake commands' timeout where the reader lets a test set it
CMD_BOUND_S = 5.0  # a sample with one timed-out command
IS_ROOT = os.geteuid() == 0


# -- leftovers: every process a test starts is gone when it ends --------------------------

MARK = "EDGEAGENT_HOSTILE_TEST"


def marked_processes(mark: str) -> list[psutil.Process]:
    """Living processes started under this test (they inherit its environment marker),
    wherever they were re-parented to after their parent died."""
    out = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARK) == mark:
                out.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return out


def status_or_none(proc: psutil.Process) -> str | None:
    with contextlib.suppress(psutil.Error):
        return str(proc.status())
    return None  # gone between the listing and the read


def name_or_none(proc: psutil.Process) -> str | None:
    with contextlib.suppress(psutil.Error):
        return str(proc.name())
    return None  # gone between the listing and the read


@pytest.fixture(autouse=True)
def no_leftover_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Fails a test that leaves a process running (a fake command, or a child of one),
    or a child of ours unreaped (a zombie)."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    yield mark
    living = marked_processes(mark)
    zombies = [
        p.pid
        for p in me.children()
        if p.pid not in before and status_or_none(p) == psutil.STATUS_ZOMBIE
    ]
    described = []
    for proc in living:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} {proc.cmdline()}")
            proc.kill()  # started by this test: clean up before failing it
    assert described == [], "processes left running"
    assert zombies == [], "children left unreaped"


# -- helpers ---------------------------------------------------------------------------


def zone(root: Path, index: int, milli: str | bytes, kind: str | bytes | None = None) -> Path:
    path = write(root, f"{THERMAL}/thermal_zone{index}/temp", milli)
    if kind is not None:
        write(root, f"{THERMAL}/thermal_zone{index}/type", kind)
    return path


def script(tmp_path: Path, name: str, body: str) -> Path:
    """A real executable `name` running `body` under /bin/sh."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def within(seconds: float, fn: Callable[[], T], unblock: Callable[[], None] | None = None) -> T:
    """`fn()` on a daemon thread: its result (or exception) if it finishes in `seconds`.

    A call stuck in the kernel cannot be cancelled; `unblock` releases it (e.g. opens
    a FIFO's other end) so the stuck thread does not outlive the test.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            unblock()
            thread.join(seconds)
        pytest.fail(f"{fn} still running after {seconds} s (blocked)")
    box["elapsed"] = time.monotonic() - start
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def release_fifo(path: Path) -> Callable[[], None]:
    """Open and close the write end of a FIFO: a reader blocked in open() gets EOF."""

    def go() -> None:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    return go


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def reader(tmp_path: Path, root: Path, **kw: Any) -> SystemReader:
    kw.setdefault("vcgencmd", None)
    return SystemReader(sysfs_root=root, disk_path=tmp_path, **kw)


def assert_rest_sane(s: Any) -> None:
    """The psutil half of a sample: still read while the device half was hostile."""
    assert s.rss_mb is not None and s.rss_mb > 0
    assert s.mem_total_mb is not None and s.mem_total_mb > 0
    assert s.disk_free_mb is not None
    assert s.num_fds is not None and s.threads is not None


# -- thermal zones ------------------------------------------------------------------------


def _chmod0(path: Path) -> None:
    path.chmod(0)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _gone(path: Path) -> None:
    path.unlink()  # listed (the zone directory is there), then the attribute vanished


def _loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path)


def _dangling_zone(path: Path) -> None:
    # sysfs zones are symlinks into /sys/devices; a zone removed (module unloaded)
    # between listing and reading leaves a link to nowhere.
    zdir = path.parent
    shutil.rmtree(zdir)
    zdir.symlink_to(zdir.parent / "removed-device")


def _case(
    id_: str,
    content: str | bytes,
    hostile: Callable[[Path], None] | None,
    expected: float | None,
    **kw: Any,
) -> Any:
    return pytest.param(content, hostile, expected, id=id_, **kw)


SILENT = (_gone, _dangling_zone)  # gone is not an error: zones come and go with modules

THERMAL_CASES = [
    _case("empty", "", None, None),
    _case("newline-only", "\n", None, None),
    _case("letters", "abc\n", None, None),
    _case("negative", "-5250\n", None, -5.25),
    _case("below-absolute-zero", "-300000\n", None, None),
    _case("absurdly-large", str(10**30) + "\n", None, None),
    _case("just-too-hot", "1000001\n", None, None),
    _case("float-text", "48.3\n", None, None),
    _case("hex", "0xbc8c\n", None, None),
    _case("nan", "nan\n", None, None),
    _case("digit-group-underscore", "48_300\n", None, None),
    _case("plus-sign", "+48300\n", None, None),
    _case("arabic-indic-digits", "\u0664\u0668\u0663\u0660\u0660\n", None, None),
    _case("fullwidth-digits", "\uff14\uff18\uff13\uff10\uff10\n", None, None),
    _case("nul-terminated", b"48300\x00", None, None),
    _case("binary", b"\xff\xfe\x00\x01", None, None),
    _case("megabyte-of-digits", "1" * 1_000_000, None, None),
    _case("directory", "0", _dir, None),
    _case("fifo-without-writer", "0", _fifo, None),
    _case("symlink-loop", "0", _loop, None),
    _case("vanished-attribute", "0", _gone, None),
    _case("vanished-zone", "0", _dangling_zone, None),
    _case("mode-000", "51000\n", _chmod0, None,
          marks=pytest.mark.skipif(IS_ROOT, reason="root reads mode-000 files")),
]  # fmt: skip


@pytest.mark.parametrize(("content", "hostile", "expected"), THERMAL_CASES)
def test_a_hostile_thermal_zone_costs_only_itself(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: str | bytes,
    hostile: Callable[[Path], None] | None,
    expected: float | None,
) -> None:
    root = tmp_path / "root"
    zone(root, 0, "47000\n", "cpu-thermal\n")
    bad = zone(root, 1, content, "gpu-thermal\n")
    if hostile is not None:
        hostile(bad)
    caplog.set_level(logging.DEBUG, logger="edgeagent.hw.system")
    r = reader(tmp_path, root)
    s = within(FILE_BOUND_S, r.sample, release_fifo(bad))
    assert_rest_sane(s)
    if expected is None:
        assert s.thermal_zones == {"cpu-thermal": 47.0}
        assert s.temp_c == 47.0
        said = warnings(caplog)
        if hostile in SILENT:
            assert said == []
        else:  # what (the zone, bad value or unreadable) and where (its path)
            assert len(said) == 1, said
            assert "thermal_zone1" in said[0] and str(root) in said[0], said
            assert len(said[0]) < 300
    else:
        assert s.thermal_zones == {"cpu-thermal": 47.0, "gpu-thermal": pytest.approx(expected)}
        assert s.temp_c == 47.0
        assert warnings(caplog) == []
    # Warned once: the next sample is quiet at WARNING.
    caplog.clear()
    within(FILE_BOUND_S, r.sample, release_fifo(bad))
    assert warnings(caplog) == []


def test_hundreds_of_zones_half_of_them_broken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    for i in range(0, 600, 2):
        zone(root, i, f"{30000 + i}\n", f"sensor{i}\n")
        zone(root, i + 1, "garbage\n", f"sensor{i + 1}\n")
    r = reader(tmp_path, root)
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.system")
    s = within(FILE_BOUND_S, r.sample)
    assert len(s.thermal_zones) == 300
    assert s.temp_c == pytest.approx((30000 + 598) / 1000)
    assert s.thermal_zones["sensor0"] == 30.0
    assert_rest_sane(s)
    assert len(warnings(caplog)) == 300  # one per broken zone, each naming it
    assert all(re.search(r"thermal_zone\d*[13579]\b", m) for m in warnings(caplog))


@pytest.mark.parametrize(
    ("kind", "expected_name"),
    [
        (b"\xff\xfe\n", "\ufffd\ufffd"),
        ("cpu\nthermal\n", "cpu"),  # a type is one line
        ("x" * 4000 + "\n", "x" * 64),
    ],
    ids=["binary", "two-lines", "4000-chars"],
)
def test_a_hostile_zone_type_gives_a_short_one_line_name(
    tmp_path: Path, kind: str | bytes, expected_name: str
) -> None:
    root = tmp_path / "root"
    zone(root, 0, "47000\n", kind)
    s = within(FILE_BOUND_S, reader(tmp_path, root).sample)
    assert s.thermal_zones == {expected_name: 47.0}


# -- the throttled word: sysfs attribute --------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("50005\n", 0x50005),
        ("0x50005\n", 0x50005),
        ("", None),
        ("zz\n", None),
        ("throttled=0xZZ\n", None),
        ("-1\n", None),  # would decode as every flag set
        ("-50005\n", None),
        ("1_0005\n", None),
        ("1ffffffff\n", None),  # wider than the firmware's 32-bit word
        (b"\x00\xff\xfe", None),
        ("50005 garbage\n", None),
        ("50005\n" + " " * 1_000_000, 0x50005),  # read a page only
    ],
    ids=["bare-hex", "0x", "empty", "letters", "0xZZ", "minus-one", "negative",
         "underscore", "33-bit", "binary", "trailing-garbage", "megabyte-padding"],
)  # fmt: skip
def test_a_hostile_sysfs_throttled_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes, expected: int | None
) -> None:
    root = tmp_path / "root"
    zone(root, 0, "47000\n", "cpu-thermal\n")
    write(root, THROTTLED, content)
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.system")
    s = within(FILE_BOUND_S, reader(tmp_path, root).sample)
    assert s.thermal_zones == {"cpu-thermal": 47.0}
    assert_rest_sane(s)
    if expected is None:
        assert s.throttled is None
        if content.strip():
            assert any("throttled" in m for m in warnings(caplog)), warnings(caplog)
    else:
        assert s.throttled is not None and s.throttled.raw == expected


@pytest.mark.parametrize("hostile", [_dir, _fifo, _loop], ids=["directory", "fifo", "loop"])
def test_an_unreadable_sysfs_throttled_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, hostile: Callable[[Path], None]
) -> None:
    root = tmp_path / "root"
    path = write(root, THROTTLED, "0")
    hostile(path)
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.system")
    s = within(FILE_BOUND_S, reader(tmp_path, root).sample, release_fifo(path))
    assert s.throttled is None
    assert_rest_sane(s)
    if hostile is not _fifo:
        assert any("get_throttled" in m and str(root) in m for m in warnings(caplog))


# -- the throttled word: vcgencmd -----------------------------------------------------------

# (id, script body, expected raw word or None, a phrase the warning must contain or None)
VCGENCMD_CASES = [
    ("good", "echo throttled=0x50005", 0x50005, None),
    ("wrong-format", "echo throttled=0xZZ", None, "unrecognised throttled value"),
    ("other-key", "echo 'temp=48.3'\"'\"'C'", None, "unrecognised throttled value"),
    ("empty", "exit 0", None, None),
    ("minus-one", "echo throttled=-1", None, "unrecognised throttled value"),
    ("binary", r"printf 'throttled=0x\377\376\n'", None, "unrecognised throttled value"),
    ("binary-only", r"printf '\377\376\375'", None, "unrecognised throttled value"),
    ("exit-nonzero", "echo 'VCHI initialization failed' >&2; exit 255",
     None, "exit 255: VCHI initialization failed"),
    ("killed-by-signal", "kill -9 $$", None, "vcgencmd get_throttled failed"),
    ("megabytes", "head -c 5000000 /dev/zero | tr '\\000' x", None, "output"),
    ("endless", "exec yes throttled=0x0", None, "output"),
    ("endless-stderr", "exec yes >&2", None, "output"),
    ("hangs-exec", "exec sleep 1000", None, "0.3 s"),
    ("hangs-in-child", "sleep 1000\necho throttled=0x0", None, "0.3 s"),
    ("ignores-sigterm", "trap '' TERM\nsleep 1000", None, "0.3 s"),
    ("answers-then-leaves-child", "sleep 1000 &\necho throttled=0x50005", 0x50005, None),
    ("answers-then-hangs", "echo throttled=0x50005\nexec sleep 1000", None, "0.3 s"),
    ("closes-stdout-then-hangs", "echo throttled=0x50005\nexec >&- 2>&-\nsleep 1000",
     None, "0.3 s"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "expected", "phrase"),
    [c[1:] for c in VCGENCMD_CASES],
    ids=[c[0] for c in VCGENCMD_CASES],
)
def test_a_hostile_vcgencmd(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    body: str,
    expected: int | None,
    phrase: str | None,
) -> None:
    root = tmp_path / "root"
    zone(root, 0, "55150\n", "cpu-thermal\n")  # a Pi 5: no sysfs word, vcgencmd is the source
    vc = script(tmp_path, "vcgencmd", body)
    r = reader(tmp_path, root, vcgencmd=str(vc), vcgencmd_timeout_s=CMD_TIMEOUT_S)
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.system")
    s = within(CMD_BOUND_S, r.sample)
    assert s.thermal_zones == {"cpu-thermal": pytest.approx(55.15)}
    assert_rest_sane(s)
    if expected is None:
        assert s.throttled is None
    else:
        assert s.throttled is not None and s.throttled.raw == expected
    if phrase is not None:
        assert any(phrase in m for m in warnings(caplog)), warnings(caplog)
    for m in warnings(caplog):
        assert len(m) < 400  # megabytes of output are not logged


def test_a_hanging_vcgencmd_is_given_up_after_three_timeouts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    log = tmp_path / "calls"
    vc = script(tmp_path, "vcgencmd", f"echo x >> {log}\nexec sleep 1000")
    r = reader(tmp_path, root, vcgencmd=str(vc), vcgencmd_timeout_s=0.1)
    for _ in range(5):
        assert within(CMD_BOUND_S, r.sample).throttled is None
    assert log.read_text().count("x") == 3


async def test_hanging_commands_neither_block_the_loop_nor_pile_up(
    tmp_path: Path, no_leftover_processes: str
) -> None:
    """The agent's way: `await asyncio.to_thread(reader.sample)`, snapshots with
    `sample(quick=True)` on the loop. With vcgencmd and mmcli both hanging the loop keeps
    ticking, each sample ends within the commands' timeouts, and at most one fake
    command runs at any moment."""
    root = tmp_path / "root"
    zone(root, 0, "55150\n", "cpu-thermal\n")
    running = tmp_path / "running"
    running.mkdir()
    hang = f"touch {running}/$$\nsleep 1000"
    vc = script(tmp_path, "vcgencmd", hang)
    mm = script(tmp_path, "mmcli", hang)
    r = SystemReader(
        sysfs_root=root,
        disk_path=tmp_path,
        vcgencmd=str(vc),
        vcgencmd_timeout_s=CMD_TIMEOUT_S,
        mmcli=str(mm),
    )
    mark = no_leftover_processes
    most_children = 0
    seen: list[str] = []
    worst_gap = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst_gap, most_children, seen
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst_gap = max(worst_gap, now - last)
            last = now
            named = ((p.pid, name_or_none(p)) for p in marked_processes(mark))
            kids = [f"{pid}:{name}" for pid, name in named if name is not None]
            if len(kids) > most_children:
                most_children, seen = len(kids), kids

    tick = asyncio.create_task(ticker())
    try:
        for _ in range(2):
            async with asyncio.timeout(CMD_TIMEOUT_S + 3.0 + 5.0):  # vcgencmd + mmcli -L
                s = await asyncio.to_thread(r.sample)
            assert s.throttled is None
            assert s.thermal_zones == {"cpu-thermal": pytest.approx(55.15)}
            quick = r.sample(quick=True)  # on the loop
            assert quick.thermal_zones == s.thermal_zones
    finally:
        stop.set()
        await tick
    assert len(list(running.iterdir())) == 4  # each command ran once per sample
    assert most_children <= 2, seen  # the one command running (sh, and its sleep)
    assert worst_gap < 1.0  # slow machine allowance; a blocked loop would show seconds


# -- the modem: mmcli ---------------------------------------------------------------------

MODEM_DOC = (
    '{"modem": {"generic": {"state": "connected", "access-technologies": ["lte"],'
    ' "signal-quality": {"value": "14"}, "ports": ["wwan0 (net)"]},'
    ' "3gpp": {"operator-name": "OPERATOR", "registration-state": "home"}}}'
)


def mmcli_script(tmp_path: Path, *, listing: str, modem: str = MODEM_DOC) -> Path:
    """A fake mmcli: `listing` is the shell for `-L -J`, `modem` the JSON for `-m ...`."""
    (tmp_path / "modem.json").write_text(modem)
    return script(
        tmp_path,
        "mmcli",
        f"""case "$1" in
  -L) {listing} ;;
  -m) [ "$3" = --signal-get ] && exit 1; cat {tmp_path / "modem.json"} ;;
  *) exit 2 ;;
esac""",
    )


LIST_OK = f'echo \'{{"modem-list": ["{MODEM_PATH}"]}}\''

# (id, `-L -J` shell, modem JSON, operator expected (None: no modem), warning phrase)
MMCLI_CASES = [
    ("good", LIST_OK, MODEM_DOC, "OPERATOR", None),
    ("invalid-json", "echo '{\"modem-list\": ['", MODEM_DOC, None, "not JSON"),
    ("empty-output", "exit 0", MODEM_DOC, None, "not JSON"),
    ("list-not-object", "echo '[1, 2]'", MODEM_DOC, None, None),
    ("list-of-numbers", "echo '{\"modem-list\": [1]}'", MODEM_DOC, None, None),
    ("list-is-string", "echo '{\"modem-list\": \"x\"}'", MODEM_DOC, None, None),
    ("path-is-an-option", "echo '{\"modem-list\": [\"--help\"]}'", MODEM_DOC, None, None),
    ("path-with-nul", "echo '{\"modem-list\": [\"/a\\\\u0000b\"]}'", MODEM_DOC, None, None),
    ("modem-not-object", LIST_OK, '{"modem": [1]}', None, None),
    ("modem-wrong-types", LIST_OK,
     '{"modem": {"generic": {"state": 5, "access-technologies": "lte", "signal-quality": 7,'
     ' "ports": {"a": 1}}, "3gpp": []}}', "", None),
    ("lone-surrogate", LIST_OK, MODEM_DOC.replace("OPERATOR", "OP\\udcffX"), "OP?X", None),
    ("deep-nesting", "head -c 200000 /dev/zero | tr '\\000' '['", MODEM_DOC, None, "mmcli -L"),
    ("binary", r"printf '\377\376{'", MODEM_DOC, None, "mmcli -L"),
    ("huge", "head -c 20000000 /dev/zero | tr '\\000' ' '; " + LIST_OK, MODEM_DOC, None,
     "output"),
    ("endless", "exec yes '[1,'", MODEM_DOC, None, "output"),
    ("exit-nonzero", "echo 'error: no ModemManager' >&2; exit 1", MODEM_DOC, None,
     "mmcli -L: exit 1: error: no ModemManager"),
    ("hangs", "exec sleep 1000", MODEM_DOC, None, "0.3 s"),
    ("hangs-in-child", "sleep 1000", MODEM_DOC, None, "0.3 s"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("listing", "modem", "operator", "phrase"),
    [c[1:] for c in MMCLI_CASES],
    ids=[c[0] for c in MMCLI_CASES],
)
def test_a_hostile_mmcli(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    listing: str,
    modem: str,
    operator: str | None,
    phrase: str | None,
) -> None:
    mm = mmcli_script(tmp_path, listing=listing, modem=modem)
    r = ModemReader(str(mm), timeout_s=CMD_TIMEOUT_S)
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.modem")
    got = within(CMD_BOUND_S, r.read)
    if operator is None:
        assert got is None
    else:
        assert got is not None
        assert got.operator == (operator or None)
        if operator == "OPERATOR":
            assert (got.state, got.signal_pct, got.interface) == ("connected", 14, "wwan0")
        # Whatever it holds can be published (msgspec refuses lone surrogates).
        for value in got.to_fields().values():
            if isinstance(value, str):
                value.encode("utf-8")
    if phrase is not None:
        assert any(phrase in m for m in warnings(caplog)), warnings(caplog)
    for m in warnings(caplog):
        assert len(m) < 400


def test_mmcli_missing_from_path_is_no_modem(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    r = ModemReader("mmcli")
    assert not r.available
    assert within(FILE_BOUND_S, r.read) is None


def test_mmcli_removed_after_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mm = mmcli_script(tmp_path, listing=LIST_OK)
    r = ModemReader(str(mm), timeout_s=CMD_TIMEOUT_S)
    mm.unlink()
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.modem")
    assert within(FILE_BOUND_S, r.read) is None
    assert any("mmcli -L" in m and str(mm) in m for m in warnings(caplog)), warnings(caplog)


@pytest.mark.parametrize(
    "listing",
    [r"printf '\377\376{'", "head -c 200000 /dev/zero | tr '\\000' '['", "exec sleep 1000"],
    ids=["binary", "deep-nesting", "hangs"],
)
def test_a_hostile_mmcli_costs_the_sampler_only_the_modem(tmp_path: Path, listing: str) -> None:
    root = tmp_path / "root"
    zone(root, 0, "47000\n", "cpu-thermal\n")
    write(root, THROTTLED, "50005\n")
    mm = mmcli_script(tmp_path, listing=listing)
    r = SystemReader(sysfs_root=root, disk_path=tmp_path, vcgencmd=None, mmcli=str(mm))
    s = within(3.0 + CMD_BOUND_S, r.sample)  # mmcli's own timeout is 3 s
    assert s.thermal_zones == {"cpu-thermal": 47.0}
    assert s.throttled is not None and s.throttled.raw == 0x50005
    assert all(nic.modem is None for nic in s.net.values())
    assert_rest_sane(s)


# -- files under the root: model, wireless, boot id, the root itself ------------------------


@pytest.mark.parametrize(
    ("content", "hostile", "expected"),
    [
        (b"Raspberry Pi 5 Model B Rev 1.0\x00", None, "Raspberry Pi 5 Model B Rev 1.0"),
        (b"", None, "unknown"),
        (b"\xff\xfe\x00", None, "\ufffd\ufffd"),
        (b"M" * 5_000_000, None, "M" * 4096),
        (b"x", _fifo, "unknown"),
        (b"x", _dir, "unknown"),
        (b"x", _loop, "unknown"),
    ],
    ids=["good", "empty", "binary", "5-MB", "fifo", "directory", "loop"],
)
def test_a_hostile_board_model(
    tmp_path: Path, content: bytes, hostile: Callable[[Path], None] | None, expected: str
) -> None:
    """A snapshot samples on the event loop (quick=True): a FIFO there would freeze it."""
    root = tmp_path / "root"
    zone(root, 0, "47000\n", "cpu-thermal\n")
    path = write(root, MODEL, content)
    if hostile is not None:
        hostile(path)
    r = reader(tmp_path, root)
    s = within(FILE_BOUND_S, lambda: r.sample(quick=True), release_fifo(path))
    assert s.board_model == expected
    assert s.thermal_zones == {"cpu-thermal": 47.0}
    assert_rest_sane(s)


@pytest.mark.parametrize(
    ("content", "hostile"),
    [
        (b"\xff\xfe\x00garbage:::\n|||", None),
        (b"wlan0: 0000 nan nan nan 0 0 0 0 0 0\n", None),
        (b"x: " * 2_000_000, None),
        (b"x", _fifo),
        (b"x", _dir),
    ],
    ids=["binary", "nan", "6-MB", "fifo", "directory"],
)
def test_a_hostile_proc_net_wireless(
    tmp_path: Path, content: bytes, hostile: Callable[[Path], None] | None
) -> None:
    root = tmp_path / "root"
    zone(root, 0, "47000\n", "cpu-thermal\n")
    path = write(root, WIRELESS, content)
    if hostile is not None:
        hostile(path)
    s = within(FILE_BOUND_S, reader(tmp_path, root).sample, release_fifo(path))
    assert s.thermal_zones == {"cpu-thermal": 47.0}
    assert all(nic.wifi is None for nic in s.net.values())
    assert_rest_sane(s)


@pytest.mark.parametrize(
    "line",
    [
        "wlan0: 0000   nan.  -52.  -256   0 0 0 0 0 0\n",
        "wlan0: 0000   58.   nan.  -256   0 0 0 0 0 0\n",
        "wlan0: 0000   58.   -inf  -256   0 0 0 0 0 0\n",
        "wlan0: 0000   58.   -52.   1e999 0 0 0 0 0 0\n",
    ],
    ids=["nan-quality", "nan-level", "inf-level", "inf-noise"],
)
def test_wireless_numbers_that_are_not_numbers_are_no_reading(line: str) -> None:
    # msgspec would publish NaN/inf as null inside an otherwise valid-looking reading.
    got = parse_wireless(line)
    for signal in got.values():
        for value in (signal.link_quality, signal.level_dbm, signal.noise_dbm):
            assert value is None or abs(value) < 1e6


@pytest.mark.parametrize(
    ("content", "hostile", "good"),
    [
        (GOOD_BOOT_ID + "\n", None, True),
        (GOOD_BOOT_ID.upper() + "\n", None, True),
        ("", None, False),
        ("\n", None, False),
        (b"\x00" * 37, None, False),
        (b"\xff\xfe\xfd", None, False),
        ("not-a-uuid\n", None, False),
        (GOOD_BOOT_ID * 100_000, None, False),
        ("x", _fifo, False),
        ("x", _dir, False),
        ("x", _loop, False),
    ],
    ids=["uuid", "uppercase", "empty", "newline", "nuls", "binary", "words", "3.6-MB",
         "fifo", "directory", "loop"],
)  # fmt: skip
def test_a_hostile_boot_id(
    tmp_path: Path, content: str | bytes, hostile: Callable[[Path], None] | None, good: bool
) -> None:
    """Read once at start-up, on the loop's thread; it names the boot in crash reports."""
    root = tmp_path / "root"
    path = write(root, BOOT_ID, content)
    if hostile is not None:
        hostile(path)
    got = within(FILE_BOUND_S, lambda: boot_id(root), release_fifo(path))
    if good:
        assert got.lower() == GOOD_BOOT_ID
    else:
        assert re.fullmatch(r"boottime-\d+", got), got[:80]
        assert got == boot_id(tmp_path / "nothing")  # the documented, stable fallback


@pytest.mark.parametrize(
    "root", ["bad\x00root", "/" + "r" * 5000], ids=["nul-in-path", "path-too-long"]
)
def test_a_hostile_sysfs_root_setting(tmp_path: Path, root: str) -> None:
    r = SystemReader(sysfs_root=Path(root), disk_path=tmp_path, vcgencmd=None)
    s = within(FILE_BOUND_S, r.sample)
    assert s.thermal_zones == {} and s.throttled is None and s.board_model == "unknown"
    assert_rest_sane(s)
    assert within(FILE_BOUND_S, lambda: boot_id(Path(root))).startswith("boottime-")


@pytest.mark.parametrize(
    "disk", ["no/such/dir", "bad\x00path", "r" * 5000], ids=["missing", "nul", "too-long"]
)
def test_a_hostile_disk_path(tmp_path: Path, caplog: pytest.LogCaptureFixture, disk: str) -> None:
    root = tmp_path / "root"
    zone(root, 0, "47000\n", "cpu-thermal\n")
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.system")
    r = SystemReader(sysfs_root=root, disk_path=tmp_path / disk, vcgencmd=None)
    s = within(FILE_BOUND_S, r.sample)
    assert s.disk_free_mb is None
    assert s.thermal_zones == {"cpu-thermal": 47.0}
    assert s.rss_mb is not None
    assert any("disk usage" in m for m in warnings(caplog)), warnings(caplog)


@pytest.fixture
def fake_procfs(tmp_path: Path) -> Iterator[Path]:
    """A copy of the /proc files psutil parses, with psutil pointed at it.

    meminfo, stat and the rest are read by psutil from its PROCFS_PATH, not under
    health.sysfs_root; PROCFS_PATH is psutil's own documented seam for that (a global:
    restored before the leftover check, which needs the real /proc). Our process and
    /proc/net stay the real ones, by symlink.
    """
    proc = tmp_path / "proc"
    proc.mkdir()
    for name in ("meminfo", "stat", "uptime", "loadavg"):
        (proc / name).write_bytes(Path("/proc", name).read_bytes())
    (proc / str(os.getpid())).symlink_to(f"/proc/{os.getpid()}")
    (proc / "self").symlink_to(f"/proc/{os.getpid()}")
    (proc / "net").symlink_to(f"/proc/{os.getpid()}/net")
    real = psutil.PROCFS_PATH
    psutil.PROCFS_PATH = str(proc)
    try:
        yield proc
    finally:
        psutil.PROCFS_PATH = real


@pytest.mark.parametrize(
    ("name", "content", "lost"),
    [
        ("meminfo", b"", "mem_total_mb"),
        ("meminfo", b"MemTotal: abc kB\n", "mem_total_mb"),
        ("meminfo", b"MemTotal:\n", "mem_total_mb"),
        ("meminfo", b"\xff\xfe", "mem_total_mb"),
        ("stat", b"", "cpu_pct"),
        ("stat", b"cpu abc\n", "cpu_pct"),
        ("stat", b"cpu  1 2 3\n", "cpu_pct"),
        ("stat", b"\xff", "cpu_pct"),
    ],
    ids=["meminfo-empty", "meminfo-letters", "meminfo-no-value", "meminfo-binary",
         "stat-empty", "stat-letters", "stat-short-cpu-line", "stat-binary"],
)  # fmt: skip
def test_hostile_procfs_text_costs_only_its_figure(
    tmp_path: Path,
    fake_procfs: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    content: bytes,
    lost: str,
) -> None:
    root = tmp_path / "root"
    zone(root, 0, "47000\n", "cpu-thermal\n")
    (fake_procfs / name).write_bytes(content)
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.system")
    r = within(FILE_BOUND_S, lambda: reader(tmp_path, root))  # start-up reads /proc/stat too
    s = within(FILE_BOUND_S, r.sample)
    assert getattr(s, lost) is None
    assert s.thermal_zones == {"cpu-thermal": 47.0}
    assert s.rss_mb is not None and s.disk_free_mb is not None
    if lost == "cpu_pct":
        assert s.mem_total_mb is not None and s.mem_total_mb > 0
    else:
        assert s.mem_available_mb is None
        assert s.cpu_pct is not None
    word = {"cpu_pct": "cpu", "mem_total_mb": "memory"}[lost]
    assert any(word in m and "unreadable" in m for m in warnings(caplog)), warnings(caplog)


# -- network interfaces (a loopback-only network namespace of our own) ---------------------


def _isolated_netns() -> str | None:
    """Why interfaces cannot be created here, or None when it is safe and possible."""
    if not IS_ROOT or shutil.which("ip") is None:
        return "needs root and iproute2"
    names = {name for _, name in socket.if_nameindex()}
    if names != {"lo"}:
        return f"not a loopback-only network namespace ({sorted(names)}); run under unshare -n"
    return None


@pytest.fixture
def veth_pair() -> Iterator[Callable[[bytes, bytes], None]]:
    why = _isolated_netns()
    if why is not None:
        pytest.skip(why)
    made: list[bytes] = []

    def add(a: bytes, b: bytes) -> None:
        done = subprocess.run(
            [b"ip", b"link", b"add", b"name", a, b"type", b"veth", b"peer", b"name", b],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {done.stderr.decode(errors='replace')}")
        made.append(a)

    yield add
    for name in made:
        subprocess.run([b"ip", b"link", b"del", name], capture_output=True, check=False)


@pytest.mark.parametrize(
    ("bad", "good"),
    [
        (b"v\xffx", "v\u00fc"),  # not UTF-8: psutil cannot encode/decode it
        (b"a.b-c_d", "e\u00e9"),
        (b"0123456789abcde", "x"),  # the 15-byte maximum
    ],
    ids=["not-utf8", "punctuation", "longest"],
)
def test_odd_interface_names(
    veth_pair: Callable[[bytes, bytes], None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    bad: bytes,
    good: str,
) -> None:
    veth_pair(bad, good.encode())
    root = tmp_path / "root"
    zone(root, 0, "47000\n", "cpu-thermal\n")

    def iface(name: bytes, flags: str, rx: str, tx: str, kind: str = "1") -> None:
        # What the kernel shows under sys/class/net (the test namespace's /sys still
        # shows the host's interfaces, so the tree is written here).
        d = os.fsencode(root / "sys" / "class" / "net") + b"/" + name
        os.makedirs(d + b"/statistics")
        for rel, text in (
            (b"flags", flags),
            (b"type", kind),
            (b"statistics/rx_bytes", rx),
            (b"statistics/tx_bytes", tx),
        ):
            with open(d + b"/" + rel, "w") as f:
                f.write(text + "\n")

    iface(bad, "0x1003", "1234", "5678")  # up
    iface(good.encode(), "0x1002", "0", "0")  # down
    iface(b"lo", "0x9", "99", "99", kind="772")  # loopback: left out
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.system")
    s = within(FILE_BOUND_S, reader(tmp_path, root).sample)
    assert s.thermal_zones == {"cpu-thermal": 47.0}
    assert_rest_sane(s)
    for name in s.net:  # every name can be published
        name.encode("utf-8")
    if bad.decode("utf-8", errors="replace") == bad.decode("utf-8", errors="ignore"):
        assert set(s.net) == {bad.decode(), good}
        assert s.net[good].up is False and s.net[good].rx_bytes == 0
    else:
        # psutil cannot list any interface now; sysfs can: state and counters, no
        # addresses, the name's bytes that are not UTF-8 escaped.
        escaped = bad.decode("utf-8", errors="backslashreplace")
        assert escaped == "v\\xffx"
        assert set(s.net) == {escaped, good}, s.net
        assert (s.net[escaped].up, s.net[escaped].rx_bytes, s.net[escaped].tx_bytes) == (
            True,
            1234,
            5678,
        )
        assert (s.net[good].up, s.net[good].rx_bytes) == (False, 0)
        assert s.net[escaped].addresses == s.net[good].addresses == ()
        assert any("psutil cannot list interfaces" in m for m in warnings(caplog))


# -- systemd's notify socket ----------------------------------------------------------------


def _bound(tmp_path: Path, kind: int) -> tuple[str, socket.socket]:
    # tmp_path is inside a short directory the `held` fixture removes (AF_UNIX paths are
    # at most 107 bytes; pytest's tmp_path can be longer).
    path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return str(path), sock


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ea-notify-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    "where",
    ["missing", "regular-file", "directory", "abstract-nobody", "stream-socket", "relative",
     "too-long", "lone-at", "vsock"],
)  # fmt: skip
def test_notify_to_a_hostile_socket_is_false_and_said_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    held: list[socket.socket],
    short_dir: Path,
    where: str,
) -> None:
    target = {
        "missing": str(tmp_path / "no" / "such" / "notify"),
        "regular-file": str(write(tmp_path, "notify", "x")),
        "directory": str(tmp_path),
        "abstract-nobody": f"@edgeagent-test-nobody-{os.getpid()}-{time.monotonic_ns()}",
        "relative": "run/notify",
        "too-long": "/" + "n" * 300,
        "lone-at": "@",
        "vsock": "vsock:2:9999",
    }.get(where)
    if where == "stream-socket":
        target, sock = _bound(short_dir, socket.SOCK_STREAM)
        held.append(sock)
    assert target is not None
    monkeypatch.setenv("NOTIFY_SOCKET", target)
    monkeypatch.setattr(systemd, "_notify_failed", False)
    caplog.set_level(logging.DEBUG, logger="edgeagent.hw.systemd")
    assert within(FILE_BOUND_S, lambda: systemd.notify("READY=1")) is False
    assert within(FILE_BOUND_S, lambda: systemd.notify("WATCHDOG=1")) is False
    said = warnings(caplog)
    assert len(said) == 1, said
    assert target[:60] in said[0]


def test_notify_with_an_empty_socket_setting_is_just_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    monkeypatch.setattr(systemd, "_notify_failed", False)
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.systemd")
    assert systemd.notify("READY=1") is False
    assert warnings(caplog) == []


def test_notify_to_a_socket_nobody_reads_never_blocks(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    held: list[socket.socket],
    short_dir: Path,
) -> None:
    """A bound datagram socket whose owner stopped reading: its queue fills, and a
    blocking send would freeze the event loop (the watchdog pings from it)."""
    target, sock = _bound(short_dir, socket.SOCK_DGRAM)
    held.append(sock)
    monkeypatch.setenv("NOTIFY_SOCKET", target)
    monkeypatch.setattr(systemd, "_notify_failed", False)
    caplog.set_level(logging.WARNING, logger="edgeagent.hw.systemd")

    def flood() -> list[bool]:
        results = []
        for _ in range(3000):  # until the queue is full, then a few more
            results.append(systemd.notify("WATCHDOG=1"))
            if results[-5:] == [False] * 5:
                break
        return results

    results = within(FILE_BOUND_S, flood)
    assert results[0] is True  # delivered while there was room
    assert results[-1] is False  # then refused (after two 5 ms retries), not blocked
    assert len(warnings(caplog)) == 1
    assert target in warnings(caplog)[0]
    sock.setblocking(False)
    assert sock.recv(64) == b"WATCHDOG=1"


def test_notify_reaches_an_abstract_socket(
    monkeypatch: pytest.MonkeyPatch, held: list[socket.socket]
) -> None:
    name = f"edgeagent-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    held.append(sock)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert systemd.notify("STATUS=ok") is True
    sock.settimeout(2.0)
    assert sock.recv(64) == b"STATUS=ok"


# -- timedatectl (the clock-sync probe) ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("echo NTPSynchronized=yes", True),
        ("echo NTPSynchronized=no", False),
        (r"printf 'NTPSynchronized=\377\376\n'", "fallback"),
        ("exec yes NTPSynchronized=yes", "fallback"),
        ("exec sleep 1000", "fallback"),
        ("sleep 1000", "fallback"),
        ("exit 1", "fallback"),
    ],
    ids=["yes", "no", "binary", "endless", "hangs", "hangs-in-child", "exit-1"],
)
def test_a_hostile_timedatectl(tmp_path: Path, body: str, expected: bool | str) -> None:
    exe = script(tmp_path, "timedatectl", body)
    got = within(2.0 + CMD_BOUND_S, lambda: net.clock_synchronized(str(exe)))
    if expected == "fallback":
        assert got == net.clock_synchronized(None)  # the kernel's adjtimex answer
    else:
        assert got is expected
