"""The open call's record on disk: a call the agent did not live to end still gets a summary.

While a call runs, `open_call.json` in the state dir holds the summary it would get if
the agent died now (result `failed`, end_reason `agent_lost`): written when the call
begins and when it connects (fsynced, so a power cut keeps it), and refreshed with each
quality sample (not fsynced: a crash keeps the page cache; after a power cut the last
fsynced version is what is left). Once the real summary is in the spool the file goes.

At the next start a file still there is a call that a crash, a kill (the watchdog, the
OOM killer) or a power cut ended: `CallManager.recover_open_call` spools its summary
then, naming the crash report the same start wrote, so "every call ends with one
summary" holds across the agent's own death (docs/calls.md, "Calls the agent did not
live to end").
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgeagent.health.crashguard import fsync_dir

logger = logging.getLogger(__name__)

OPEN_CALL = "open_call.json"
MAX_BYTES = 64 * 1024
"""A summary is ~1-2 KiB; anything much bigger is not ours and is not read."""


class OpenCallLedger:
    """One file, replaced atomically off the loop; errors are logged once per kind and
    never raised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.call_id: str | None = None  # whose record the file holds (or will, once written)
        self._warned: set[str] = set()
        # Writes run in order on one thread: an fsync on an SD card can take tens of ms,
        # which the event loop (and a call being set up) must not wait for. The removal
        # runs on the caller's thread, right after the summary is committed, so no kill
        # can fall between the two; the lock keeps a queued write from bringing it back.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-call")
        self._lock = threading.Lock()

    def write(self, call_id: str, doc: bytes, *, durable: bool) -> None:
        """Replace the record with call `call_id`'s `doc`; `durable` fsyncs it and the dir."""
        self.call_id = call_id
        self._submit(self._write, call_id, doc, durable)

    def clear(self, call_id: str) -> None:
        """Call `call_id`'s summary is spooled: its open record goes now (another call's
        stays). Waits for a write in progress (at most one small write and its fsync)."""
        if call_id != self.call_id:
            return
        with self._lock:
            self.call_id = None
            self._remove()

    def flush(self) -> None:
        """Wait until every write and removal asked for so far is done."""
        with contextlib.suppress(RuntimeError):  # closed: nothing is pending
            self._io.submit(lambda: None).result()

    def close(self) -> None:
        """Finish what is pending (a stopping agent's last summary removes its record)."""
        self._io.shutdown(wait=True)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._io.submit(fn, *args)
        except RuntimeError:  # closed (the agent is stopping): do it here
            fn(*args)

    def _write(self, call_id: str, doc: bytes, durable: bool) -> None:
        with self._lock:
            if call_id == self.call_id:  # not cleared, nor another call begun, meanwhile
                self._write_file(doc, durable)

    def _write_file(self, doc: bytes, durable: bool) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(doc)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            if durable:
                fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._warn("write", f"cannot record the open call in {self.path}: {exc}")

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._warn("clear", f"cannot remove {self.path}: {exc}")

    def take(self) -> bytes | None:
        """The record a previous run left (removed as it is read), or None. Call it at
        start, before any call writes its own."""
        try:
            with self.path.open("rb") as f:
                doc = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn("read", f"cannot read {self.path}: {exc}")
            return None
        self._remove()
        if len(doc) > MAX_BYTES:
            self._warn("size", f"{self.path} is over {MAX_BYTES} bytes: not a call record")
            return None
        return doc

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("calls: %s", message)
