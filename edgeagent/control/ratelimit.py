"""Token-bucket rate limits per key (a kid or a command class), optionally persisted.

Persisted limiters (for heavy commands: a restart must not refill the bucket that stops a
restart loop) take wall-clock time and rewrite a small JSON file atomically on every change.
A clock that steps backwards refills nothing; one that steps forwards refills up to `burst`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RateLimiter", "TokenBucket"]

logger = logging.getLogger(__name__)


class TokenBucket:
    """`burst` tokens, refilled at `rate_per_s`; each acquisition takes `cost` tokens."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        clock: Callable[[], float],
        *,
        tokens: float | None = None,
        updated: float | None = None,
    ) -> None:
        if rate_per_s < 0 or burst <= 0:
            raise ValueError("rate_per_s must be >= 0 and burst > 0")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = burst if tokens is None else max(0.0, min(burst, tokens))
        self._updated = clock() if updated is None else updated

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
        self._updated = now  # also after a backwards step: refill from the new "now"

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    @property
    def updated(self) -> float:
        return self._updated

    @property
    def full(self) -> bool:
        return self.tokens >= self.burst

    def try_acquire(self, cost: float = 1.0) -> bool:
        """Take `cost` tokens if there are that many; never blocks."""
        self._refill()
        if self._tokens + 1e-9 >= cost:
            self._tokens = max(0.0, self._tokens - cost)
            return True
        return False

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens are available (inf if the bucket never refills)."""
        missing = cost - self.tokens
        if missing <= 0:
            return 0.0
        return math.inf if self.rate_per_s == 0 else missing / self.rate_per_s


class RateLimiter:
    """One bucket per key, all with the same rate and burst; persisted when `path` is given.

    Buckets that are full are dropped from memory and disk: a new one is identical.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        clock: Callable[[], float],
        *,
        path: Path | None = None,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._path = path
        self._buckets: dict[str, TokenBucket] = {}
        if path is not None:
            self._load(path)

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst, self._clock)
        return bucket

    def try_acquire(self, key: str, cost: float = 1.0) -> bool:
        """Take from `key`'s bucket; False means rate limited (answer 429)."""
        ok = self._bucket(key).try_acquire(cost)
        if self._path is not None:
            if ok:
                self._save(self._path)
        elif len(self._buckets) > 1024:
            self._prune()
        return ok

    def retry_after(self, key: str, cost: float = 1.0) -> float:
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.retry_after(cost)

    def tokens(self, key: str) -> float:
        bucket = self._buckets.get(key)
        return self.burst if bucket is None else bucket.tokens

    def _load(self, path: Path) -> None:
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("rate limits %s: unreadable (%s); starting with full buckets", path, exc)
            return
        buckets = data.get("buckets") if isinstance(data, dict) else None
        if not isinstance(buckets, dict):
            logger.warning("rate limits %s: no 'buckets' object; starting with full buckets", path)
            return
        for key, state in buckets.items():
            try:
                tokens, updated = float(state["tokens"]), float(state["updated"])
            except (TypeError, KeyError, ValueError):
                logger.warning("rate limits %s: bad entry %r ignored", path, key)
                continue
            if math.isfinite(tokens) and math.isfinite(updated):
                self._buckets[str(key)] = TokenBucket(
                    self.rate_per_s, self.burst, self._clock, tokens=tokens, updated=updated
                )

    def _prune(self) -> None:
        self._buckets = {k: b for k, b in self._buckets.items() if not b.full}

    def _save(self, path: Path) -> None:
        self._prune()
        state = {
            "v": 1,
            "buckets": {
                k: {"tokens": round(b.tokens, 6), "updated": b.updated}
                for k, b in sorted(self._buckets.items())
            },
        }
        _write_atomic(path, json.dumps(state, indent=1).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
