"""The replay cache: remembers ids until expiry, survives reopening, refuses when full."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgeagent.clock import FakeClock
from edgeagent.control.replay import ReplayCache, ReplayCacheFull


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_second_sighting_is_a_replay(tmp_path: Path, clock: FakeClock) -> None:
    cache = ReplayCache(tmp_path / "replay.db", clock.time)
    exp = clock.time() + 60
    assert cache.check_and_add("a", exp) is True
    assert cache.check_and_add("a", exp) is False
    assert cache.check_and_add("b", exp) is True
    assert "a" in cache
    assert "zzz" not in cache
    assert len(cache) == 2


def test_survives_reopen(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state" / "replay.db"
    cache = ReplayCache(path, clock.time)
    assert cache.check_and_add("req-1", clock.time() + 120)
    cache.close()

    reopened = ReplayCache(path, clock.time)
    assert reopened.check_and_add("req-1", clock.time() + 120) is False
    assert reopened.check_and_add("req-2", clock.time() + 120) is True
    reopened.close()


def test_survives_reopen_without_close(tmp_path: Path, clock: FakeClock) -> None:
    """A crash does not close the database: the id must already be on disk."""
    path = tmp_path / "replay.db"
    cache = ReplayCache(path, clock.time)
    assert cache.check_and_add("req-1", clock.time() + 120)
    other = ReplayCache(path, clock.time)  # a second connection sees only committed data
    assert other.check_and_add("req-1", clock.time() + 120) is False


async def test_forgets_after_expiry_plus_skew(tmp_path: Path, clock: FakeClock) -> None:
    cache = ReplayCache(tmp_path / "replay.db", clock.time, skew_s=30)
    exp = clock.time() + 10
    assert cache.check_and_add("a", exp)
    await clock.advance(39)  # exp + skew not yet passed
    assert cache.check_and_add("a", exp) is False
    assert "a" in cache
    await clock.advance(2)
    assert "a" not in cache
    assert len(cache) == 0
    assert cache.check_and_add("a", exp) is True


async def test_full_of_live_ids_refuses_rather_than_forgets(
    tmp_path: Path, clock: FakeClock
) -> None:
    cache = ReplayCache(tmp_path / "replay.db", clock.time, skew_s=0, max_entries=3)
    now = clock.time()
    assert cache.check_and_add("a", now + 10)
    assert cache.check_and_add("b", now + 100)
    assert cache.check_and_add("c", now + 100)
    with pytest.raises(ReplayCacheFull):
        cache.check_and_add("d", now + 100)
    # a refused id was not recorded, and the old ones are still remembered
    assert "d" not in cache
    assert cache.check_and_add("a", now + 10) is False
    # once one expires, there is room again (expired ones are evicted first)
    await clock.advance(11)
    assert cache.check_and_add("d", now + 100) is True
    assert cache.check_and_add("b", now + 100) is False
    assert len(cache) == 3


def test_corrupt_file_is_moved_aside_and_older_tokens_refused(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "replay.db"
    path.write_bytes(b"this is not a database" * 100)
    cache = ReplayCache(path, clock.time, skew_s=30)
    now = clock.time()
    assert (tmp_path / "replay.db.corrupt").exists()
    assert cache.lost_at == now
    # a token issued before the loss may have been seen: refused
    assert cache.check_and_add("old", now + 60, iat=now - 5) is False
    # one issued after the loss (beyond skew) is fine
    assert cache.check_and_add("new", now + 120, iat=now + 31) is True
    cache.close()
    # the loss is remembered across a restart too
    assert ReplayCache(path, clock.time, skew_s=30).lost_at == now
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT jti FROM seen").fetchall() == [("new",)]
    finally:
        db.close()


def test_rejects_nonsense_bound(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ReplayCache(tmp_path / "r.db", clock.time, max_entries=0)
