"""bench/cpusplit.py: perf samples of a real process, grouped by library."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import cpusplit

BUSY = """
import sys, numpy as np
a = np.random.default_rng(0).standard_normal((300, 300))
print("ready", flush=True)
sys.stdin.readline()  # sampling has started
for _ in range(40):
    for _ in range(100000):
        pass          # interpreter
    a @ a             # numpy's BLAS
"""


def test_group_of_uses_the_mapped_path() -> None:
    paths = {"_binding.abi3.so": "/v/lib/python3.11/site-packages/pylibsrtp/_binding.abi3.so"}
    assert cpusplit.group_of("_binding.abi3.so", paths) == "SRTP (pylibsrtp, libsrtp)"
    assert cpusplit.group_of("libopus-114e2b1a.so.0.11.1", {}) == "libopus"
    assert cpusplit.group_of("[kernel.kallsyms]", {}) == "kernel"
    assert cpusplit.group_of("libfoo.so", {}) == "other"


@pytest.mark.skipif(not cpusplit.available(), reason="Linux perf cannot sample here")
def test_a_busy_process_splits_into_interpreter_and_numpy(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", BUSY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        rec = cpusplit.Recording(proc.pid, tmp_path / "busy.data", "busy")
        rec.enable()
        t0 = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0  # a fixed amount of work, then it exits
        wall = time.monotonic() - t0
        rec.stop()
        split = rec.split(wall)
    finally:
        proc.kill()
        proc.wait()
    names = [g for g, _ in split.groups]
    assert "Python interpreter (all Python code)" in names
    assert "numpy / scipy" in names
    # A busy process uses most of a core; the samples add up to it.
    assert split.total_ms > 300, split
    assert split.samples > 0
