"""Token buckets with an injected clock, and persisted limiters for heavy commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edgeagent.clock import FakeClock
from edgeagent.control.ratelimit import RateLimiter, TokenBucket


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_bucket_spends_burst_then_refills_at_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=0.5, burst=3, clock=clock.time)
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(2.0)
    await clock.advance(1.0)
    assert bucket.try_acquire() is False  # half a token
    await clock.advance(1.0)
    assert bucket.try_acquire() is True
    assert bucket.try_acquire() is False
    await clock.advance(3600)
    assert bucket.tokens == 3  # capped at burst
    assert bucket.full


def test_backwards_clock_refills_nothing() -> None:
    now = [1000.0]
    bucket = TokenBucket(rate_per_s=1, burst=2, clock=lambda: now[0])
    assert bucket.try_acquire(2)
    now[0] = 500.0  # e.g. an RTC that steps back
    assert bucket.try_acquire() is False
    now[0] = 501.0  # refills from the new "now", not from 1000
    assert bucket.try_acquire() is True


def test_zero_rate_never_refills(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=0, burst=1, clock=clock.time)
    assert bucket.try_acquire()
    assert bucket.retry_after() == math.inf


def test_bad_parameters_rejected(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate_per_s=1, burst=0, clock=clock.time)


async def test_limiter_keeps_a_bucket_per_key(clock: FakeClock) -> None:
    limiter = RateLimiter(rate_per_s=1 / 60, burst=2, clock=clock.time)
    assert limiter.try_acquire("kid-a")
    assert limiter.try_acquire("kid-a")
    assert not limiter.try_acquire("kid-a")
    assert limiter.try_acquire("kid-b")  # an independent bucket
    assert limiter.retry_after("kid-a") == pytest.approx(60)
    await clock.advance(60)
    assert limiter.try_acquire("kid-a")
    assert not limiter.try_acquire("kid-a")


async def test_persisted_state_survives_restart(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state" / "ratelimit.json"
    limiter = RateLimiter(rate_per_s=1 / 600, burst=2, clock=clock.time, path=path)
    assert limiter.try_acquire("restart")
    assert limiter.try_acquire("restart")
    assert not limiter.try_acquire("restart")
    saved = json.loads(path.read_text())
    assert saved["v"] == 1
    assert saved["buckets"]["restart"]["tokens"] == pytest.approx(0)

    # the process restarts: the bucket is still empty
    again = RateLimiter(rate_per_s=1 / 600, burst=2, clock=clock.time, path=path)
    assert not again.try_acquire("restart")
    assert again.try_acquire("profile")  # other keys start full
    # time that passed while down still refills
    await clock.advance(600)
    later = RateLimiter(rate_per_s=1 / 600, burst=2, clock=clock.time, path=path)
    assert later.try_acquire("restart")
    assert not later.try_acquire("restart")
    assert not list(path.parent.glob(".ratelimit.json.*"))  # no temp files left behind


async def test_full_buckets_are_not_stored(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "ratelimit.json"
    limiter = RateLimiter(rate_per_s=1, burst=5, clock=clock.time, path=path)
    assert limiter.try_acquire("a")
    await clock.advance(10)
    assert limiter.try_acquire("b")
    assert set(json.loads(path.read_text())["buckets"]) == {"b"}


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[]", b'{"buckets": 3}', b'{"buckets": {"x": {"tokens": "a"}}}'],
)
def test_unreadable_state_starts_fresh(
    tmp_path: Path, clock: FakeClock, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ratelimit.json"
    path.write_bytes(content)
    limiter = RateLimiter(rate_per_s=1, burst=1, clock=clock.time, path=path)
    assert limiter.tokens("x") == 1
    assert limiter.try_acquire("x")
    assert "rate limits" in caplog.text
    assert json.loads(path.read_text())["buckets"]["x"]["tokens"] == 0


def test_stored_tokens_are_clamped_to_burst(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "ratelimit.json"
    state = {"v": 1, "buckets": {"x": {"tokens": 50, "updated": clock.time()}}}
    path.write_text(json.dumps(state))
    limiter = RateLimiter(rate_per_s=0.001, burst=2, clock=clock.time, path=path)
    assert [limiter.try_acquire("x") for _ in range(3)] == [True, True, False]
