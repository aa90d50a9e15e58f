"""The service's stop path: `edgeagent run` exits even when a worker thread is stuck."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (Here for want of a tests/test_cli.py; `edgeagent run` goes through cli.run_async.)

STUCK_WORKER = """
import asyncio, logging, sys, threading
from edgeagent.cli import exit_if_workers_stuck, run_async
logging.basicConfig(level=logging.INFO)
never = threading.Event()

async def main() -> int:
    asyncio.get_running_loop().run_in_executor(None, never.wait)  # e.g. a DNS lookup that hangs
    await asyncio.sleep(0.05)
    return 7

if sys.argv[1] == "asyncio.run":
    sys.exit(asyncio.run(main()))
code = run_async(main(), grace_s=0.2)
exit_if_workers_stuck(code)
sys.exit(code)
"""


def run_stuck_worker(runner: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [sys.executable, "-c", STUCK_WORKER, runner],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=3,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.slow
def test_stopped_agent_exits_despite_a_stuck_worker_thread() -> None:
    # The failure being fixed: asyncio.run, then interpreter exit, wait for the worker.
    assert run_stuck_worker("asyncio.run") is None
    done = run_stuck_worker("run_async")
    assert done is not None, "run_async waited for the stuck worker"
    assert done.returncode == 7  # the agent's own exit code survives
    assert "1 worker thread(s) still busy" in done.stderr
    assert "thread edgeagent-worker_0" in done.stderr
    assert 'threading.py", line' in done.stderr and "in wait" in done.stderr  # where it is stuck


def test_run_async_cancels_leftover_tasks_and_returns_the_result() -> None:
    from edgeagent.cli import busy_workers, run_async

    cancelled: list[str] = []

    async def leftover() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.append("leftover")

    async def main() -> int:
        asyncio.get_running_loop().create_task(leftover())
        await asyncio.to_thread(lambda: None)  # a worker that finishes
        await asyncio.sleep(0)
        return 3

    assert run_async(main(), grace_s=1.0) == 3
    assert cancelled == ["leftover"]
    assert busy_workers() == []
