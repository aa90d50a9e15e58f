"""Helper process for the crash tests: arms a CrashGuard, leaves a trail, then dies some way.

Usage: crash_child.py STATE_DIR BOOT_ID MODE [ARGS...]

Modes:
  task                 a bug raised inside a TaskGroup task escapes asyncio.run (sys.excepthook)
  callback             a bug in a loop callback; the loop handler reports it, exit 2
  thread               a bug in a thread (reported, process goes on), then a clean exit
  segv                 a real SIGSEGV (ctypes.string_at(0)) in segv_outer -> segv_inner
  abort                os.abort() (SIGABRT, what systemd's watchdog sends) in hang_forever
  hang                 print `ready` and block until killed
  clean                a clean stop, exit 0
  buggy DIR MSG [FN]   import `buggy_app.worker` from DIR and run FN (default `run`) in a task
  flood N              N fatal bugs recorded by record_exception, then exit 3

Every mode first logs `child: step N` lines and adds breadcrumbs `child.step`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from edgeagent.health.crashguard import CrashGuard, CrashSettings
from edgeagent.telemetry.breadcrumbs import Breadcrumbs, Crumb, CrumbLogHandler, LogRing

APP = ("edgeagent", "__main__", "crash_child", "buggy_app")


def snapshot() -> dict[str, Any]:
    return {"call_id": "call-42", "trace_id": "0af7651916cd43dd8448eb211c80319c", "health": "good"}


def build(state_dir: Path, boot: str) -> CrashGuard:
    crumbs, ring = Breadcrumbs(100), LogRing(100)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(ring)
    root.addHandler(CrumbLogHandler(crumbs))
    settings = CrashSettings(
        state_dir=state_dir,
        app_version="9.9.9-test",
        device_model="Test Pi",
        boot_id=boot,
        app_packages=APP,
        max_per_hour=int(os.environ.get("CRASH_MAX_PER_HOUR", "10")),
    )
    guard = CrashGuard(settings, crumbs=crumbs, logs=ring, snapshot=snapshot)
    guard.start()
    log = logging.getLogger("edgeagent.child")
    for i in range(3):
        log.info("child: step %d", i)
        crumbs.add(Crumb(ts=1.0 + i, level="info", category="child.step", message=f"step {i}"))
    guard.checkpoint()
    return guard


def segv_inner() -> None:
    ctypes.string_at(0)


def segv_outer() -> None:
    segv_inner()


def hang_forever() -> None:
    os.abort()


async def failing_task() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("bug inside a task")


async def task_mode() -> None:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(failing_task(), name="failing")
        tg.create_task(asyncio.sleep(30), name="sleeper")


def bad_callback() -> None:
    raise KeyError("bug inside a callback")


async def callback_mode(guard: CrashGuard) -> int:
    loop = asyncio.get_running_loop()
    crashed = asyncio.Event()
    guard.install_loop_handler(loop, on_crash=lambda _e: crashed.set())
    loop.call_soon(bad_callback)
    await crashed.wait()
    return 2


def thread_body() -> None:
    raise ValueError("bug inside a thread")


async def buggy_mode(directory: str, message: str, fn: str) -> None:
    sys.path.insert(0, directory)
    import buggy_app.worker as worker

    async with asyncio.TaskGroup() as tg:
        tg.create_task(getattr(worker, fn)(message))


def main() -> int:
    state_dir, boot, mode, *args = sys.argv[1:]
    guard = build(Path(state_dir), boot)
    if mode == "task":
        asyncio.run(task_mode())
    elif mode == "callback":
        return asyncio.run(callback_mode(guard))
    elif mode == "thread":
        t = threading.Thread(target=thread_body, name="worker-1")
        t.start()
        t.join()
        guard.stop("test done")
        return 0
    elif mode == "segv":
        segv_outer()
    elif mode == "abort":
        hang_forever()
    elif mode == "hang":
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.read()
    elif mode == "clean":
        guard.stop("test done")
        return 0
    elif mode == "buggy":
        asyncio.run(buggy_mode(args[0], args[1], args[2] if len(args) > 2 else "run"))
    elif mode == "flood":
        for i in range(int(args[0])):
            try:
                raise RuntimeError(f"flood {i}")
            except RuntimeError as exc:
                guard.record_exception(exc)
        return 3
    return 99


if __name__ == "__main__":
    sys.exit(main())
