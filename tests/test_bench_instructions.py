"""bench/instructions.py --time: the audio stages timed alone, as bench/perf.py reads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import instructions  # noqa: E402


def test_time_mode_prints_one_parseable_line_per_stage() -> None:
    stages = ["checks", "plcdecode"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "instructions.py"), "--time", "--frames", "20"]
        + ["--paced-s", "0.5"]
        + [a for s in stages for a in ("--stage", s)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    times = instructions.parse_times(out)  # what bench/perf.py's audio_work_alone() reads
    assert list(times) == stages
    for _, us, ms in instructions.TIME_LINE.findall(out):
        assert float(us) > 0.0
        assert abs(float(ms) - float(us) * 50 / 1000) < 0.01  # 50 frames a second
    # Then both stages together at the call's cadence: one PACED line, the pair's cost.
    paced = instructions.parse_paced(out)
    assert paced is not None and paced > 0.0
    assert instructions.PACED_LINE.findall(out)[0][0] == "checks+plcdecode"
