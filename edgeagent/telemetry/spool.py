"""The durable spool: spooled MQTT messages on disk until the broker acknowledges them.

One SQLite file in WAL mode. Each `put` assigns the next per-device `seq` and
stores the message in one transaction; messages are deleted only by `ack`
(after the broker's PUBACK) or by a cap (count, bytes, age, free-disk
headroom), oldest first. Every cap drop is recorded as a seq range in the same
transaction as the delete, so the caller can report what was lost, even after a
restart. Modelled on memfaultd's atomic commit and oldest-first cleanup.

`seq` never goes backwards: it lives in the database and a reserved ceiling
lives in a small sidecar file (`<name>.seq`, replaced atomically), so that a
database corrupt beyond SQLite's own recovery can be moved aside and a fresh
one started above every seq ever handed out.

With `durability="normal"` (SQLite `synchronous=NORMAL`) a commit survives a
process crash but may roll back in a power loss: a message could be sent with a
seq the database then forgets, and the seq would be handed out again. So the
sidecar also records the boot it was written in and, on a clean `close`, the
exact next seq. A store opened after a stop that was not clean, in a different
boot, continues at the ceiling instead, and the skipped range is reported as a
drop with reason `unclean_reboot` (an upper bound, like `corrupt`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# A wall-clock jump this large against the monotonic clock is a step (NTP, an operator),
# not drift: stored timestamps follow it (`_follow_clock_steps`).
CLOCK_STEP_S = 60.0
# Seqs reserved in the sidecar per write: one fsync'd file write per this many puts.
_SEQ_BLOCK = 10_000
# SQLite primary result codes meaning "this file is damaged".
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26
# Reported drop rows kept for diagnosis; older ones are pruned.
_KEEP_REPORTED_DROPS = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    created_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS drops (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1), ('dropped_total', 0);
"""


class DropReason(StrEnum):
    """Why spooled messages were dropped before delivery."""

    COUNT = "count"
    BYTES = "bytes"
    AGE = "age"
    DISK = "disk"
    # The database was unreadable and moved aside; the range is an upper bound.
    CORRUPT = "corrupt"
    # Opened after a reboot that did not close it (power loss): commits since the last
    # sync may be gone, so seq skips to the ceiling; the range is an upper bound.
    UNCLEAN_REBOOT = "unclean_reboot"


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One stored message, as `pending` returns it."""

    seq: int
    topic: str
    payload: bytes
    retain: bool
    created_ts: float


@dataclass(frozen=True, slots=True)
class DropReport:
    """A contiguous range of seqs dropped for one reason."""

    first_seq: int
    last_seq: int
    count: int
    reason: DropReason


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Counters for metrics: what waits, what was lost, what comes next."""

    pending: int
    pending_bytes: int
    dropped_total: int
    next_seq: int


class SpoolFull(Exception):
    """The store's filesystem is full even after dropping the oldest messages: the message
    was not stored and got no seq."""


class _CorruptStore(Exception):
    """The database failed its integrity check."""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return False
    return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _is_full(exc: BaseException) -> bool:
    """SQLite's "database or disk is full", or ENOSPC writing the seq sidecar."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == _SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in an ascending list."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] + 1 == s:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


class Spool:
    """Durable FIFO of spooled messages with a persisted, never-reused seq."""

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 7 * 86400,
        min_free_mb: float = 64.0,
        durability: Literal["normal", "full"] = "normal",
        clock: Callable[[], float] = time.time,
        disk_free_mb: Callable[[], float] | None = None,
        boot_id: str = "",
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        """`boot_id`: the kernel's boot id (edgeagent.hw.system.boot_id); with it, a store
        left open by a power loss is told apart from a process crash (see the module doc)."""
        if durability not in ("normal", "full"):
            raise ValueError(f"durability must be 'normal' or 'full', not {durability!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.min_free_mb = min_free_mb
        self._synchronous = "FULL" if durability == "full" else "NORMAL"
        self._clock = clock
        # With `monotonic`, stored timestamps follow wall-clock steps (`_follow_clock_steps`).
        self._monotonic = monotonic
        self._wall_offset = clock() - monotonic() if monotonic else 0.0
        self._disk_free_mb = disk_free_mb or self._real_disk_free_mb
        self._sidecar = self.path.with_name(self.path.name + ".seq")
        self._boot_id = boot_id
        self._warned: set[DropReason] = set()
        self._count = 0
        self._bytes = 0
        self._next_seq = 1
        self._dropped_total = 0
        self._ceiling = 0
        self._low_seq_hint = 1  # the sidecar's `low`: oldest seq pending at the last write
        self._conn: sqlite3.Connection | None = None
        # False only while every recorded drop is known to be reported (the drain asks often).
        self._unreported = True
        # True once the state above was read from a healthy store (then next_seq is exact).
        self._loaded = False
        try:
            self._open()
            self._guard(self._after_open)
        except (sqlite3.DatabaseError, _CorruptStore) as exc:
            if isinstance(exc, sqlite3.DatabaseError) and not _is_corruption(exc):
                raise
            self._recover(exc)
        self.enforce_caps()

    # -- public API ---------------------------------------------------------

    def put(self, topic: str, build: Callable[[int], bytes], *, retain: bool = False) -> int:
        """Store one message built for the next seq, durably; return that seq.

        On a full filesystem the oldest quarter is dropped (reason `disk`) and the put
        tried once more; SpoolFull if it still does not fit."""
        self._guard(self._follow_clock_steps)  # before this message's stamp is stored
        try:
            seq = self._guard(lambda: self._put(topic, build, retain))
        except (sqlite3.OperationalError, OSError) as exc:
            if not _is_full(exc):
                raise
            self._make_room()
            try:
                seq = self._guard(lambda: self._put(topic, build, retain))
            except (sqlite3.OperationalError, OSError) as again:
                if not _is_full(again):
                    raise
                raise SpoolFull(f"spool {self.path}: filesystem full ({again})") from again
        self.enforce_caps()
        return seq

    def _make_room(self) -> None:
        logger.error("spool %s: filesystem full; dropping the oldest messages", self.path)
        if not self._count:
            return
        try:
            self._guard(
                lambda: self._drop(self._oldest(max(16, self._count // 4)), DropReason.DISK)
            )
            self._guard(self._release_space)
        except (sqlite3.OperationalError, OSError) as exc:
            if not _is_full(exc):
                raise

    def pending(self, limit: int = 100, after: int | None = None) -> list[SpoolEntry]:
        """Up to `limit` stored messages with seq > `after`, oldest first."""
        lo = -1 if after is None else after
        rows = self._guard(
            lambda: self._db.execute(
                "SELECT seq, topic, payload, retain, created_ts FROM messages"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (lo, limit),
            ).fetchall()
        )
        return [SpoolEntry(r[0], r[1], bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def ack(self, seq: int) -> None:
        """Delete a message the broker acknowledged; acking twice is harmless."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Delete several acknowledged messages in one transaction."""
        wanted = list(seqs)
        if wanted:
            self._guard(lambda: self._ack_many(wanted))

    def take_drop_reports(self) -> list[DropReport]:
        """Return the drop ranges not reported yet, and mark them reported."""
        if not self._unreported:
            return []
        reports = self._guard(self._take_drop_reports)
        self._unreported = False
        return reports

    def stats(self) -> SpoolStats:
        """Pending count and bytes, persisted drop total, the next seq to assign."""
        return SpoolStats(self._count, self._bytes, self._dropped_total, self._next_seq)

    def enforce_caps(self) -> None:
        """Drop oldest messages until every cap holds; `put` calls this after each commit."""
        self._guard(self._enforce_caps)

    def close(self) -> None:
        """Close the database (checkpointing the WAL) and mark the stop clean; further
        calls fail."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            if self._loaded:
                try:
                    self._write_sidecar(self._ceiling, self._low_seq_hint, clean=self._next_seq)
                except OSError as exc:
                    logger.warning("spool %s: cannot mark a clean close: %s", self.path, exc)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- opening and recovery ------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"spool {self.path}: closed")
        return self._conn

    def _open(self) -> None:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn = conn
        if fresh:
            # Must precede the first table; lets a disk-cap cleanup give pages back.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"spool {self.path}: cannot use WAL (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA journal_size_limit=4194304")
        check = conn.execute("PRAGMA quick_check(1)").fetchall()
        if check != [("ok",)]:
            raise _CorruptStore(f"quick_check: {check[0][0] if check else 'no result'}")
        conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        self._load_state()
        self._ceiling = self._read_sidecar()[0]
        self._loaded = True

    def _load_state(self) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        top = self._db.execute("SELECT max(seq) FROM messages").fetchone()[0]
        # A stored message vouches for its own seq; meta vouches for deleted ones.
        self._next_seq = max(int(meta["next_seq"]), (top or 0) + 1)
        self._dropped_total = int(meta["dropped_total"])
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages"
        ).fetchone()
        self._count, self._bytes = int(count), int(size)

    def _guard(self, op: Callable[[], _T]) -> _T:
        """Run `op`; if the database turns out corrupt, start a fresh one and retry once."""
        try:
            return op()
        except sqlite3.DatabaseError as exc:
            self._rollback()
            if not _is_corruption(exc):
                raise
            self._recover(exc)
            return op()

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.rollback()
            except sqlite3.Error:
                logger.debug("spool %s: rollback failed", self.path, exc_info=True)

    def _recover(self, exc: BaseException) -> None:
        """Move the damaged file aside and open a fresh store whose seqs continue above."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                logger.debug("spool %s: close of damaged store failed", self.path)
            self._conn = None
        ceiling, low = self._read_sidecar()
        salvaged_next, salvaged_low = self._peek_damaged()
        # Damaged while open, the seq in memory is exact; otherwise take the safe ceiling.
        start = self._next_seq if self._loaded else max(ceiling, salvaged_next or 0, self._next_seq)
        self._loaded = False
        lows = [x for x in (salvaged_low, low) if x is not None]
        first = min(lows) if lows else None
        aside = self._move_aside()
        logger.error(
            "spool %s: database unreadable (%s); moved to %s, starting fresh at seq %d",
            self.path,
            exc,
            aside,
            start,
        )
        dropped_before = self._dropped_total
        self._next_seq = 1
        self._open()
        self._next_seq = start
        lost: tuple[int, int] | None = None
        if first is not None and start - 1 >= first:
            lost = (first, start - 1)
        self._dropped_total = dropped_before + (lost[1] - lost[0] + 1 if lost else 0)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._persist_next_seq()
            self._db.execute(
                "UPDATE meta SET value=? WHERE key='dropped_total'", (self._dropped_total,)
            )
            if lost is not None:
                self._record_drops([lost], DropReason.CORRUPT)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        if lost is not None:
            logger.error(
                "spool %s: seqs %d..%d may be lost with the damaged store",
                self.path,
                lost[0],
                lost[1],
            )
        elif start == 1:
            logger.error("spool %s: no seq record survived; seq restarts at 1", self.path)

    def _peek_damaged(self) -> tuple[int | None, int | None]:
        """Best effort: next_seq and lowest pending seq from the damaged file."""
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error:
            return None, None
        next_seq: int | None = None
        low: int | None = None
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            next_seq = int(row[0]) if row else None
            lo, hi = conn.execute("SELECT min(seq), max(seq) FROM messages").fetchone()
            low = int(lo) if lo is not None else None
            if hi is not None:
                next_seq = max(next_seq or 0, int(hi) + 1)
        except (sqlite3.Error, ValueError, TypeError):
            logger.debug("spool %s: damaged store unreadable", self.path)
        finally:
            conn.close()
        return next_seq, low

    def _move_aside(self) -> Path:
        stamp = int(self._clock())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        return aside

    # -- the seq ceiling sidecar -------------------------------------------

    def _read_sidecar(self) -> tuple[int, int | None]:
        """(ceiling, lowest seq that was pending when it was written); (0, None) if unknown."""
        data = self._sidecar_data()
        ceiling, low = data.get("ceiling"), data.get("low")
        if isinstance(ceiling, int) and isinstance(low, int):
            return ceiling, low
        if data:
            logger.warning("spool %s: seq sidecar without ceiling/low: %s", self.path, data)
        return 0, None

    def _sidecar_data(self) -> dict[str, object]:
        try:
            data = json.loads(self._sidecar.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            logger.warning("spool %s: unreadable seq sidecar %s", self.path, self._sidecar)
            return {}
        return data

    def _reserve(self, seq: int) -> None:
        """Durably raise the ceiling above `seq` before any seq at or above it is committed."""
        ceiling = seq + _SEQ_BLOCK
        row = self._db.execute("SELECT min(seq) FROM messages").fetchone()
        self._low_seq_hint = int(row[0]) if row[0] is not None else seq
        self._write_sidecar(ceiling, self._low_seq_hint)
        self._ceiling = ceiling

    def _write_sidecar(self, ceiling: int, low: int, *, clean: int | None = None) -> None:
        """Replace the sidecar durably; `clean` (the exact next seq) only on a clean close."""
        data: dict[str, object] = {"ceiling": ceiling, "low": low, "boot": self._boot_id}
        if clean is not None:
            data["clean"] = clean
        tmp = self._sidecar.with_name(self._sidecar.name + ".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._sidecar)
        dir_fd = os.open(self._sidecar.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _after_open(self) -> None:
        """Continue above every seq that may have been handed out before an unclean reboot,
        then mark the store open (a clean close marks it again)."""
        data = self._sidecar_data()
        if not data:
            return  # a new store (or one from before the sidecar): its seqs are all it has
        ceiling, low = self._read_sidecar()
        self._low_seq_hint = low if low is not None else self._next_seq
        clean = data.get("clean")
        if isinstance(clean, int) and clean > self._next_seq:
            self._skip_to(clean, DropReason.UNCLEAN_REBOOT)  # commits lost after a clean close?
        elif (
            clean is None
            and self._synchronous == "NORMAL"
            and data.get("boot") != self._boot_id
            and ceiling > self._next_seq
        ):
            # Not closed, and the machine rebooted since: commits since the last sync may
            # be gone with their seqs already sent. A crash in the same boot loses none.
            self._skip_to(ceiling, DropReason.UNCLEAN_REBOOT)
        if clean is not None or data.get("boot") != self._boot_id:
            self._write_sidecar(self._ceiling, self._low_seq_hint)

    def _skip_to(self, start: int, reason: DropReason) -> None:
        lost = (self._next_seq, start - 1)
        logger.error(
            "spool %s: opened after an unclean reboot; seq continues at %d (%d..%d may have "
            "been sent and lost)",
            self.path,
            start,
            *lost,
        )
        self._next_seq = start
        self._dropped_total += lost[1] - lost[0] + 1
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._persist_next_seq()
            self._db.execute(
                "UPDATE meta SET value=? WHERE key='dropped_total'", (self._dropped_total,)
            )
            self._record_drops([lost], reason)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    # -- operations -----------------------------------------------------------

    def _put(self, topic: str, build: Callable[[int], bytes], retain: bool) -> int:
        seq = self._next_seq
        if seq >= self._ceiling:
            self._reserve(seq)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            payload = build(seq)
            if not isinstance(payload, bytes):
                raise TypeError(f"build must return bytes, not {type(payload).__name__}")
            db.execute(
                "INSERT INTO messages (seq, topic, payload, retain, created_ts)"
                " VALUES (?, ?, ?, ?, ?)",
                (seq, topic, payload, int(retain), self._clock()),
            )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._next_seq = seq + 1
        self._count += 1
        self._bytes += len(payload)
        return seq

    def _ack_many(self, seqs: list[int]) -> None:
        db = self._db
        freed = removed = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            self._persist_next_seq()
            for seq in seqs:
                for (size,) in db.execute(
                    "DELETE FROM messages WHERE seq=? RETURNING length(payload)", (seq,)
                ).fetchall():
                    removed += 1
                    freed += int(size)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._count -= removed
        self._bytes -= freed

    def _take_drop_reports(self) -> list[DropReport]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(
                "SELECT id, first_seq, last_seq, count, reason FROM drops"
                " WHERE reported=0 ORDER BY id"
            ).fetchall()
            if rows:
                db.execute("UPDATE drops SET reported=1 WHERE id <= ?", (rows[-1][0],))
                db.execute(
                    "DELETE FROM drops WHERE reported=1 AND id <= ?",
                    (rows[-1][0] - _KEEP_REPORTED_DROPS,),
                )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return [DropReport(r[1], r[2], r[3], DropReason(r[4])) for r in rows]

    # -- caps ---------------------------------------------------------------

    def _follow_clock_steps(self) -> None:
        """Shift stored timestamps by a wall-clock step, so ages stay true.

        A Pi without a real-time clock starts from the time it last shut down and NTP
        steps it forward later, by days after a long power-off: messages spooled before
        the step would look that much older and the age cap would drop them at once."""
        if self._monotonic is None:
            return
        offset = self._clock() - self._monotonic()
        step = offset - self._wall_offset
        if abs(step) < CLOCK_STEP_S:
            return
        self._wall_offset = offset
        if not self._count:
            return
        logger.info("spool %s: wall clock stepped %+.0f s; message ages kept", self.path, step)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("UPDATE messages SET created_ts = created_ts + ?", (step,))
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _enforce_caps(self) -> None:
        self._follow_clock_steps()
        if self._count > self.max_messages:
            self._drop(self._oldest(self._count - self.max_messages), DropReason.COUNT)
        if self._bytes > self.max_bytes:
            self._drop(self._oldest_over_bytes(), DropReason.BYTES)
        if self._count:
            self._drop(self._oldest_expired(), DropReason.AGE)
        while self._count and self._disk_free_mb() < self.min_free_mb:
            self._drop(self._oldest(max(16, self._count // 4)), DropReason.DISK)
            self._release_space()

    def _oldest(self, n: int) -> list[tuple[int, int]]:
        rows = self._db.execute(
            "SELECT seq, length(payload) FROM messages ORDER BY seq LIMIT ?", (n,)
        ).fetchall()
        return [(int(s), int(b)) for s, b in rows]

    def _oldest_over_bytes(self) -> list[tuple[int, int]]:
        excess = self._bytes - self.max_bytes
        out: list[tuple[int, int]] = []
        cur = self._db.execute("SELECT seq, length(payload) FROM messages ORDER BY seq")
        for seq, size in cur:
            out.append((int(seq), int(size)))
            excess -= int(size)
            if excess <= 0:
                break
        cur.close()
        return out

    def _oldest_expired(self) -> list[tuple[int, int]]:
        cutoff = self._clock() - self.max_age_s
        first = self._db.execute("SELECT created_ts FROM messages ORDER BY seq LIMIT 1").fetchone()
        if first is None or first[0] >= cutoff:
            return []
        out: list[tuple[int, int]] = []
        # Oldest-first prefix: a message stamped after a backwards clock step ends it.
        cur = self._db.execute("SELECT seq, length(payload), created_ts FROM messages ORDER BY seq")
        for seq, size, ts in cur:
            if ts >= cutoff:
                break
            out.append((int(seq), int(size)))
        cur.close()
        return out

    def _drop(self, rows: list[tuple[int, int]], reason: DropReason) -> None:
        """Delete an oldest-first prefix of the store and record its seq ranges."""
        if not rows:
            return
        last = rows[-1][0]
        freed = sum(size for _, size in rows)
        ranges = _runs([seq for seq, _ in rows])
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._persist_next_seq()
            db.execute("DELETE FROM messages WHERE seq <= ?", (last,))
            self._record_drops(ranges, reason)
            db.execute("UPDATE meta SET value = value + ? WHERE key='dropped_total'", (len(rows),))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._count -= len(rows)
        self._bytes -= freed
        self._dropped_total += len(rows)
        log = logger.debug if reason in self._warned else logger.warning
        self._warned.add(reason)
        log(
            "spool %s: dropped %d oldest messages (seq %d..%d) for cap %s",
            self.path,
            len(rows),
            rows[0][0],
            last,
            reason.value,
        )

    def _persist_next_seq(self) -> None:
        """Record next_seq in meta; every transaction that deletes messages calls this.

        `put` does not write meta (one page less per commit): the highest stored
        message already proves its seq was used, and a delete writes meta first.
        """
        self._db.execute(
            "UPDATE meta SET value=? WHERE key='next_seq' AND value<>?",
            (self._next_seq, self._next_seq),
        )

    def _record_drops(self, ranges: list[tuple[int, int]], reason: DropReason) -> None:
        """Insert drop ranges, extending the newest unreported one when they touch."""
        self._unreported = True
        db = self._db
        for first, last in ranges:
            tail = db.execute(
                "SELECT id, last_seq, reason FROM drops WHERE reported=0 ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if tail is not None and tail[2] == reason.value and tail[1] + 1 == first:
                db.execute(
                    "UPDATE drops SET last_seq=?, count=count+? WHERE id=?",
                    (last, last - first + 1, tail[0]),
                )
            else:
                db.execute(
                    "INSERT INTO drops (first_seq, last_seq, count, reason) VALUES (?, ?, ?, ?)",
                    (first, last, last - first + 1, reason.value),
                )

    def _release_space(self) -> None:
        """Give freed pages back to the filesystem (only worth it when the disk is short)."""
        self._db.execute("PRAGMA incremental_vacuum").fetchall()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _real_disk_free_mb(self) -> float:
        """Free space where the store lives; infinite (no disk cap) if it cannot be read,
        e.g. the state directory was removed under a running agent."""
        try:
            return shutil.disk_usage(self.path.parent).free / (1024 * 1024)
        except OSError as exc:
            if DropReason.DISK not in self._warned:
                logger.warning("spool %s: free space unknown (%s)", self.path, exc)
            return float("inf")
