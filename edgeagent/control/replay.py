"""The replay cache: every accepted request id (jti), remembered on disk until it expires.

SQLite (WAL, synchronous=FULL) so an accepted jti survives a crash or power cut the moment
`check_and_add` returns. The cache is bounded; when it is full of unexpired ids it refuses
new ones (`ReplayCacheFull`, answered 429) rather than forgetting ids that could be replayed.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

__all__ = ["ReplayCache", "ReplayCacheFull"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (jti TEXT PRIMARY KEY, exp REAL NOT NULL);
CREATE INDEX IF NOT EXISTS seen_exp ON seen (exp);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v REAL NOT NULL);
"""


class ReplayCacheFull(Exception):
    """Too many unexpired ids to remember one more; the request must be refused (429)."""


class ReplayCache:
    """Remembers each jti until `exp + skew_s` (wall-clock epoch seconds from `clock`).

    If the database is unreadable it is moved aside and a new one started; since the ids it
    held are lost, tokens issued up to that moment (iat <= then + skew) are refused as replays.
    """

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float],
        *,
        skew_s: float = 30.0,
        max_entries: int = 10_000,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._path = path
        self._clock = clock
        self._skew_s = skew_s
        self._max = max_entries
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            aside = path.with_name(path.name + ".corrupt")
            logger.warning(
                "replay cache %s: unreadable (%s); moved to %s, refusing older tokens",
                path,
                exc,
                aside,
            )
            path.replace(aside)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            self._db = self._open(path)
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('lost_at', ?)", (self._clock(),)
                )
        row = self._db.execute("SELECT v FROM meta WHERE k = 'lost_at'").fetchone()
        self.lost_at: float | None = None if row is None else float(row[0])

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM seen").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def check_and_add(self, jti: str, exp: float, *, iat: float | None = None) -> bool:
        """Record `jti`; False if it was already seen (a replay). Raises ReplayCacheFull."""
        now = self._clock()
        if self.lost_at is not None and iat is not None and iat <= self.lost_at + self._skew_s:
            return False
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM seen WHERE exp <= ?", (now - self._skew_s,))
            if self._db.execute("SELECT 1 FROM seen WHERE jti = ?", (jti,)).fetchone():
                return False
            (count,) = self._db.execute("SELECT count(*) FROM seen").fetchone()
            if count >= self._max:
                raise ReplayCacheFull(f"{count} unexpired request ids remembered")
            self._db.execute("INSERT INTO seen VALUES (?, ?)", (jti, float(exp)))
        return True

    def __contains__(self, jti: object) -> bool:
        now = self._clock()
        row = self._db.execute("SELECT exp FROM seen WHERE jti = ?", (jti,)).fetchone()
        return row is not None and float(row[0]) > now - self._skew_s

    def __len__(self) -> int:
        now = self._clock()
        (count,) = self._db.execute(
            "SELECT count(*) FROM seen WHERE exp > ?", (now - self._skew_s,)
        ).fetchone()
        return int(count)

    def close(self) -> None:
        self._db.close()
