"""The durable spool on real SQLite files: seq, acks, caps, drop reports, kills, corruption."""

from __future__ import annotations

import gc
import importlib.util
import itertools
import json
import logging
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeagent.telemetry import spool as spool_module
from edgeagent.telemetry.spool import (
    DropReason,
    DropReport,
    Spool,
    SpoolEntry,
    SpoolFull,
    SpoolStats,
)

CHILD = Path(__file__).with_name("spool_child.py")
_spec = importlib.util.spec_from_file_location("spool_child", CHILD)
assert _spec is not None
assert _spec.loader is not None
spool_child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(spool_child)
payload_for: Callable[[int], bytes] = spool_child.payload_for
acks_after: Callable[[int], list[list[int]]] = spool_child.acks_after

TOPIC = "edge/v1/dev-1/events"


def event(seq: int) -> bytes:
    return json.dumps({"seq": seq, "message": "x"}).encode()


def sized(n: int) -> Callable[[int], bytes]:
    return lambda seq: f"{seq:08d}".encode().ljust(n, b".")


class Now:
    """An injected wall clock the test moves by hand."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def all_pending(spool: Spool) -> list[SpoolEntry]:
    return spool.pending(limit=1_000_000)


def seqs(spool: Spool) -> list[int]:
    return [e.seq for e in all_pending(spool)]


def open_spool(path: Path, **kw: object) -> Spool:
    kw.setdefault("min_free_mb", 0.0)
    return Spool(path, **kw)  # type: ignore[arg-type]


# -- seq, order, acks --------------------------------------------------------


def test_put_assigns_contiguous_seq_and_builds_payload_with_it(tmp_path: Path) -> None:
    clock = Now()
    with open_spool(tmp_path / "s.db", clock=clock) as spool:
        got = [spool.put(TOPIC, event, retain=(i == 2)) for i in range(5)]
        assert got == [1, 2, 3, 4, 5]
        entries = all_pending(spool)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert [json.loads(e.payload)["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert [e.retain for e in entries] == [False, False, True, False, False]
    assert {e.topic for e in entries} == {TOPIC}
    assert {e.created_ts for e in entries} == {clock.t}
    assert all(isinstance(e.payload, bytes) for e in entries)


def test_seq_continues_across_reopen_and_is_never_reused_after_acks(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with open_spool(path) as spool:
        for _ in range(3):
            spool.put(TOPIC, event)
        spool.ack_many([1, 2, 3])
        assert spool.stats() == SpoolStats(pending=0, pending_bytes=0, dropped_total=0, next_seq=4)
    with open_spool(path) as spool:
        assert spool.stats().next_seq == 4
        assert spool.put(TOPIC, event) == 4
        assert spool.put(TOPIC, event) == 5
    with open_spool(path) as spool:
        assert seqs(spool) == [4, 5]
        assert spool.put(TOPIC, event) == 6


def test_pending_is_oldest_first_with_limit_and_after(tmp_path: Path) -> None:
    with open_spool(tmp_path / "s.db") as spool:
        for _ in range(10):
            spool.put(TOPIC, event)
        assert [e.seq for e in spool.pending(limit=3)] == [1, 2, 3]
        assert [e.seq for e in spool.pending(limit=3, after=3)] == [4, 5, 6]
        assert [e.seq for e in spool.pending(limit=100, after=8)] == [9, 10]
        assert spool.pending(after=10) == []


def test_ack_deletes_durably_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with open_spool(path) as spool:
        for _ in range(5):
            spool.put(TOPIC, sized(100))
        spool.ack(2)
        spool.ack(2)
        spool.ack(99)
        spool.ack_many([4, 4, 5, 1000])
        assert seqs(spool) == [1, 3]
        assert spool.stats().pending == 2
        assert spool.stats().pending_bytes == 200
    with open_spool(path) as spool:
        assert seqs(spool) == [1, 3]
        assert spool.stats().pending_bytes == 200
        spool.ack(1)
        assert seqs(spool) == [3]


def test_failed_build_consumes_no_seq(tmp_path: Path) -> None:
    def broken(seq: int) -> bytes:
        raise ValueError("payload does not serialise")

    with open_spool(tmp_path / "s.db") as spool:
        assert spool.put(TOPIC, event) == 1
        with pytest.raises(ValueError):
            spool.put(TOPIC, broken)
        with pytest.raises(TypeError):
            spool.put(TOPIC, lambda seq: f"{seq}")  # type: ignore[arg-type,return-value]
        assert spool.put(TOPIC, event) == 2
        assert seqs(spool) == [1, 2]


def test_full_durability_works_and_unknown_mode_is_refused(tmp_path: Path) -> None:
    with open_spool(tmp_path / "s.db", durability="full") as spool:
        assert spool.put(TOPIC, event) == 1
    with pytest.raises(ValueError):
        open_spool(tmp_path / "t.db", durability="paranoid")


def test_closed_spool_refuses_use(tmp_path: Path) -> None:
    with open_spool(tmp_path / "s.db") as spool:
        spool.put(TOPIC, event)
    with pytest.raises(RuntimeError):
        spool.pending()


# -- caps and drop reports ---------------------------------------------------


def test_count_cap_drops_oldest_and_reports_one_merged_range(tmp_path: Path) -> None:
    with open_spool(tmp_path / "s.db", max_messages=5) as spool:
        for _ in range(8):
            spool.put(TOPIC, event)
        assert seqs(spool) == [4, 5, 6, 7, 8]
        assert spool.take_drop_reports() == [DropReport(1, 3, 3, DropReason.COUNT)]
        assert spool.take_drop_reports() == []
        spool.put(TOPIC, event)
        assert spool.take_drop_reports() == [DropReport(4, 4, 1, DropReason.COUNT)]
        assert spool.stats().dropped_total == 4


def test_bytes_cap_drops_oldest_until_under_the_cap(tmp_path: Path) -> None:
    with open_spool(tmp_path / "s.db", max_bytes=1000) as spool:
        for _ in range(3):
            spool.put(TOPIC, sized(300))
        assert spool.take_drop_reports() == []
        spool.put(TOPIC, sized(300))  # 1200 bytes: seq 1 goes
        assert seqs(spool) == [2, 3, 4]
        spool.put(TOPIC, sized(700))  # 1600 bytes: seqs 2 and 3 go
        assert seqs(spool) == [4, 5]
        assert spool.stats().pending_bytes == 1000
        assert spool.take_drop_reports() == [DropReport(1, 3, 3, DropReason.BYTES)]


def test_age_cap_drops_messages_older_than_max_age(tmp_path: Path) -> None:
    clock = Now()
    with open_spool(tmp_path / "s.db", max_age_s=100.0, clock=clock) as spool:
        for _ in range(3):
            spool.put(TOPIC, event)
        clock.t += 10
        spool.put(TOPIC, event)
        spool.put(TOPIC, event)
        clock.t += 90  # seqs 1-3 are exactly 100 s old: not yet over the cap
        spool.enforce_caps()
        assert seqs(spool) == [1, 2, 3, 4, 5]
        clock.t += 1
        spool.put(TOPIC, event)
        assert seqs(spool) == [4, 5, 6]
        assert spool.take_drop_reports() == [DropReport(1, 3, 3, DropReason.AGE)]
        clock.t += 10
        spool.enforce_caps()  # no put needed for the age cap to act
        assert seqs(spool) == [6]
        assert spool.take_drop_reports() == [DropReport(4, 5, 2, DropReason.AGE)]


def test_disk_headroom_drops_oldest_until_free_space_returns(tmp_path: Path) -> None:
    holder: list[Spool] = []

    def disk_free_mb() -> float:
        # A 100 MB disk that this spool fills at 1 MB per stored message.
        return 100.0 - (holder[0].stats().pending if holder else 0)

    spool = Spool(tmp_path / "s.db", min_free_mb=64.0, disk_free_mb=disk_free_mb)
    holder.append(spool)
    with spool:
        for _ in range(50):
            spool.put(TOPIC, event)
            assert disk_free_mb() >= 64.0
        left = seqs(spool)
        assert left == list(range(left[0], 51))
        assert left[0] > 1
        assert spool.take_drop_reports() == [
            DropReport(1, left[0] - 1, left[0] - 1, DropReason.DISK)
        ]
        assert spool.stats().dropped_total == left[0] - 1


def test_full_disk_empties_the_store_and_reports_everything(tmp_path: Path) -> None:
    free = [1000.0]
    with Spool(tmp_path / "s.db", min_free_mb=64.0, disk_free_mb=lambda: free[0]) as spool:
        for _ in range(40):
            spool.put(TOPIC, event)
        free[0] = 10.0
        assert spool.put(TOPIC, event) == 41
        assert spool.pending() == []
        assert spool.take_drop_reports() == [DropReport(1, 41, 41, DropReason.DISK)]
        free[0] = 1000.0
        assert spool.put(TOPIC, event) == 42
        assert seqs(spool) == [42]


def test_drop_ranges_skip_acked_seqs(tmp_path: Path) -> None:
    with open_spool(tmp_path / "s.db", max_messages=6) as spool:
        for _ in range(6):
            spool.put(TOPIC, event)
        spool.ack_many([2, 3])
        for _ in range(5):
            spool.put(TOPIC, event)  # 9 stored after the 5th: 1, 4, 5 go
        assert seqs(spool) == [6, 7, 8, 9, 10, 11]
        assert spool.take_drop_reports() == [
            DropReport(1, 1, 1, DropReason.COUNT),
            DropReport(4, 5, 2, DropReason.COUNT),
        ]
        assert spool.stats().dropped_total == 3


def test_reasons_are_reported_separately_in_order(tmp_path: Path) -> None:
    clock = Now()
    with open_spool(tmp_path / "s.db", max_messages=3, max_age_s=50.0, clock=clock) as spool:
        for _ in range(4):
            spool.put(TOPIC, event)
        clock.t += 60
        spool.put(TOPIC, event)
        assert seqs(spool) == [5]
        assert spool.take_drop_reports() == [
            DropReport(1, 2, 2, DropReason.COUNT),
            DropReport(3, 4, 2, DropReason.AGE),
        ]


def test_drop_reports_survive_reopen_and_are_returned_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with open_spool(path, max_messages=2) as spool:
        for _ in range(5):
            spool.put(TOPIC, event)
    with open_spool(path, max_messages=2) as spool:
        assert spool.stats().dropped_total == 3
        assert spool.take_drop_reports() == [DropReport(1, 3, 3, DropReason.COUNT)]
    with open_spool(path, max_messages=2) as spool:
        assert spool.take_drop_reports() == []
        spool.put(TOPIC, event)
    with open_spool(path, max_messages=2) as spool:
        assert spool.take_drop_reports() == [DropReport(4, 4, 1, DropReason.COUNT)]
        assert spool.stats().dropped_total == 4


def test_drops_after_an_empty_report_are_still_reported(tmp_path: Path) -> None:
    # The drain asks for reports on every turn; an empty answer must not hide later drops.
    path = tmp_path / "spool.db"
    with Spool(path, max_messages=10) as spool:
        assert spool.take_drop_reports() == []
        assert spool.take_drop_reports() == []
        for _ in range(12):
            spool.put(TOPIC, event)
        assert spool.take_drop_reports() == [DropReport(1, 2, 2, DropReason.COUNT)]
        assert spool.take_drop_reports() == []
        spool.put(TOPIC, event)  # seq 13 drops seq 3 while the store is closed for reports
    with Spool(path, max_messages=10) as spool:
        assert spool.take_drop_reports() == [DropReport(3, 3, 1, DropReason.COUNT)]
        assert spool.take_drop_reports() == []


def test_lower_cap_applies_when_reopened(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with open_spool(path) as spool:
        for _ in range(10):
            spool.put(TOPIC, event)
    with open_spool(path, max_messages=4) as spool:
        assert seqs(spool) == [7, 8, 9, 10]
        assert spool.take_drop_reports() == [DropReport(1, 6, 6, DropReason.COUNT)]


# -- corruption --------------------------------------------------------------


def _fill_and_close(path: Path, n: int) -> None:
    with open_spool(path) as spool:
        for _ in range(n):
            spool.put(TOPIC, sized(400))
    assert not Path(f"{path}-wal").exists()  # everything is in the main file now


def _assert_recovered(path: Path, caplog: pytest.LogCaptureFixture, old_max: int) -> None:
    with caplog.at_level(logging.ERROR, logger="edgeagent.telemetry.spool"):
        spool = open_spool(path)
    with spool:
        assert any(r.levelno == logging.ERROR for r in caplog.records)
        aside = path.parent.glob(f"{path.name}.corrupt-*")
        assert len([p for p in aside if not p.name.endswith(("-wal", "-shm"))]) == 1
        assert spool.pending() == []
        seq = spool.put(TOPIC, event)
        assert seq > old_max
        assert seqs(spool) == [seq]
        reports = spool.take_drop_reports()
        assert [r.reason for r in reports] == [DropReason.CORRUPT]
        assert reports[0].first_seq <= 1
        assert old_max <= reports[0].last_seq < seq
        assert spool.stats().dropped_total >= old_max
        dropped_total = spool.stats().dropped_total
    with open_spool(path) as spool:
        assert spool.stats().dropped_total == dropped_total
        assert spool.stats().next_seq == seq + 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_garbage_file_is_moved_aside_and_seq_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    _fill_and_close(path, 30)
    size = path.stat().st_size
    path.write_bytes(random.Random(1).randbytes(size))
    _assert_recovered(path, caplog, old_max=30)


def test_damaged_pages_behind_a_good_header_are_detected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    _fill_and_close(path, 30)
    data = bytearray(path.read_bytes())
    data[4096:] = random.Random(2).randbytes(len(data) - 4096)
    path.write_bytes(bytes(data))
    _assert_recovered(path, caplog, old_max=30)


def test_recovery_is_reported_once_and_a_second_reopen_is_clean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    _fill_and_close(path, 5)
    path.write_bytes(b"not a database at all" * 300)
    with caplog.at_level(logging.ERROR, logger="edgeagent.telemetry.spool"):
        with open_spool(path) as spool:
            first = spool.put(TOPIC, event)
        caplog.clear()
        with open_spool(path) as spool:
            assert spool.put(TOPIC, event) == first + 1
            assert [r.reason for r in spool.take_drop_reports()] == [DropReason.CORRUPT]
            assert spool.take_drop_reports() == []
    assert caplog.records == []


def test_damage_found_while_open_starts_fresh_without_a_seq_jump(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    # ~9 MB, well past SQLite's 2 MB page cache, so reads go to the damaged file.
    with open_spool(path) as spool:
        for _ in range(3000):
            spool.put(TOPIC, sized(3000))
    spool = open_spool(path)
    with spool, path.open("r+b") as f:
        f.seek(4096 * 100)
        f.write(random.Random(3).randbytes(4096 * 1000))
        f.flush()
        with caplog.at_level(logging.ERROR, logger="edgeagent.telemetry.spool"):
            assert spool.pending(limit=10_000) == []
        assert any(r.levelno == logging.ERROR for r in caplog.records)
        assert spool.put(TOPIC, event) == 3001
        reports = spool.take_drop_reports()
        assert [(r.first_seq, r.last_seq, r.reason) for r in reports] == [
            (1, 3000, DropReason.CORRUPT)
        ]
        assert spool.stats().dropped_total == 3000
    with open_spool(path) as spool:
        assert seqs(spool) == [3001]
        assert spool.stats().dropped_total == 3000


# -- SIGKILL -----------------------------------------------------------------


@pytest.mark.slow
def test_store_survives_sigkill_at_random_moments(tmp_path: Path) -> None:
    """20 kills mid-stream: the store opens, nothing committed is lost or duplicated."""
    rng = random.Random(20_240_611)
    path = tmp_path / "spool.db"
    cap = 3000
    reported: set[int] = set()
    acked: set[int] = set()
    dropped: set[int] = set()
    unprinted: set[int] = set()
    next_seq = 1
    for round_ in range(20):
        durability = "full" if round_ % 4 == 3 else "normal"
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(path), durability, str(cap)],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        lines: list[bytes] = []
        try:
            assert proc.stdout.readline() == b"ready\n"
            # Keep the pipe drained so the child is never blocked on a full pipe when killed.
            reader = threading.Thread(target=lines.extend, args=(proc.stdout,))
            reader.start()
            time.sleep(rng.uniform(0.0, 0.35))  # the random kill moment is the point here
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            reader.join(10)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL

        puts: list[int] = []
        for line in lines:
            if not line.endswith(b"\n"):
                continue  # cut off by the kill: not a claim
            kind, seq = line.split()
            if kind == b"p":
                puts.append(int(seq))
            else:
                acked.add(int(seq))
        # The child continued exactly where the store left off: no reuse, no gap.
        assert puts == list(range(next_seq, next_seq + len(puts)))
        reported.update(puts)

        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with open_spool(path, max_messages=cap) as spool:
            entries = all_pending(spool)
            for report in spool.take_drop_reports():
                assert report.reason is DropReason.COUNT
                dropped.update(range(report.first_seq, report.last_seq + 1))
            stats = spool.stats()
        present = [e.seq for e in entries]
        assert all(a < b for a, b in itertools.pairwise(present))
        assert all(e.payload == payload_for(e.seq) for e in entries)
        # Killed after an ack committed but before it was printed: those may be gone too.
        if puts:
            unprinted.update(s for batch in acks_after(puts[-1]) for s in batch)
        missing = (reported - acked) - set(present) - dropped
        assert missing <= unprinted
        assert not set(present) & dropped
        assert reported == set() or stats.next_seq > max(reported)
        assert stats.pending == len(present) <= cap
        next_seq = stats.next_seq

    assert len(reported) > 2000, "the child hardly ran; the test proved little"
    assert dropped, "the count cap never acted during the kills"


# -- power loss: commits since the last sync may be gone after an unclean reboot ------


def _left_open(path: Path, n: int, **kw: object) -> None:
    """Put `n` messages and stop without `close` (the process died)."""
    spool = open_spool(path, **kw)
    for _ in range(n):
        spool.put(TOPIC, event)
    del spool
    gc.collect()


def test_after_an_unclean_reboot_seq_skips_to_the_ceiling_and_reports_the_range(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    _left_open(path, 3, boot_id="boot-1")
    with open_spool(path, boot_id="boot-2") as spool:
        ceiling = 1 + spool_module._SEQ_BLOCK  # reserved at the first put
        assert spool.stats().next_seq == ceiling
        assert spool.take_drop_reports() == [
            DropReport(4, ceiling - 1, ceiling - 4, DropReason.UNCLEAN_REBOOT)
        ]
        assert spool.put(TOPIC, event) == ceiling
        assert seqs(spool) == [1, 2, 3, ceiling]  # what the store kept is still sent
    with open_spool(path, boot_id="boot-2") as spool:  # closed cleanly: no second skip
        assert spool.stats().next_seq == ceiling + 1
        assert spool.take_drop_reports() == []


def test_a_crash_in_the_same_boot_or_a_clean_close_keeps_seq_exact(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _left_open(path, 3, boot_id="boot-1")
    with open_spool(path, boot_id="boot-1") as spool:  # process crash: WAL commits survive
        assert spool.stats().next_seq == 4
        spool.put(TOPIC, event)
    with open_spool(path, boot_id="boot-2") as spool:  # clean close, then a reboot
        assert spool.stats().next_seq == 5
        assert spool.take_drop_reports() == []


def test_full_durability_never_skips(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _left_open(path, 2, boot_id="boot-1", durability="full")
    with open_spool(path, boot_id="boot-2", durability="full") as spool:
        assert spool.stats().next_seq == 3
        assert spool.take_drop_reports() == []


# -- a full filesystem ------------------------------------------------------------------
# SQLite answers SQLITE_FULL ("database or disk is full") at max_page_count as it does on
# a full disk, so the cap stands in for one.


def _cap_pages(spool: Spool, extra: int) -> None:
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count = {pages + extra}")


def test_a_full_filesystem_drops_the_oldest_and_the_new_message_is_stored(
    tmp_path: Path,
) -> None:
    with open_spool(tmp_path / "s.db") as spool:
        for _ in range(8):
            spool.put(TOPIC, lambda seq: event(seq) + b" " * 3000)
        _cap_pages(spool, 2)
        got = [spool.put(TOPIC, lambda seq: event(seq) + b" " * 3000) for _ in range(6)]
        assert got == list(range(9, 15))  # every put stored, seq contiguous
        reports = spool.take_drop_reports()
        assert reports and {r.reason for r in reports} == {DropReason.DISK}
        assert reports[0].first_seq == 1


def test_a_message_that_cannot_fit_raises_spool_full_and_takes_no_seq(tmp_path: Path) -> None:
    with open_spool(tmp_path / "s.db") as spool:
        assert spool.put(TOPIC, event) == 1
        _cap_pages(spool, 1)
        with pytest.raises(SpoolFull, match="filesystem full"):
            spool.put(TOPIC, lambda seq: event(seq) + b" " * 200_000)
        spool._db.execute("PRAGMA max_page_count = 1073741823")
        assert spool.put(TOPIC, event) == 2  # no gap: the refused message had no seq


def test_a_wall_clock_step_keeps_message_ages_true(tmp_path: Path) -> None:
    """A Pi without an RTC boots at its last shutdown time and NTP steps it forward:
    what was spooled just before the step is not 8 days old."""
    wall, mono = Now(), Now()
    with open_spool(tmp_path / "s.db", max_age_s=7 * 86400.0, clock=wall, monotonic=mono) as spool:
        for _ in range(5):
            spool.put(TOPIC, event)
        wall.t += 60 + 8 * 86400  # NTP's step after a week and a day powered off
        mono.t += 60
        spool.put(TOPIC, event)
        assert seqs(spool) == [1, 2, 3, 4, 5, 6]
        assert spool.take_drop_reports() == []
        wall.t += 7 * 86400 + 1  # and real time passing still ages them out
        mono.t += 7 * 86400 + 1
        spool.enforce_caps()
        assert seqs(spool) == []
        assert spool.take_drop_reports() == [DropReport(1, 6, 6, DropReason.AGE)]
