"""Test helpers for the ALSA twin: file PCMs in a temp asoundrc, signals, numeric checks."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

RATE = 48000


@dataclass
class BenchAlsa:
    """An asoundrc with `file` PCMs: capture reads a raw infile, playback appends to a file."""

    conf: Path
    mics: dict[str, Path] = field(default_factory=dict)
    speakers: dict[str, Path] = field(default_factory=dict)

    def add_mic(self, name: str, infile: Path) -> str:
        self.mics[name] = infile
        self._write()
        return name

    def add_speaker(self, name: str, outfile: Path) -> str:
        self.speakers[name] = outfile
        self._write()
        return name

    def _write(self) -> None:
        lines = ["</usr/share/alsa/alsa.conf>"]
        for name, path in self.mics.items():
            lines.append(
                f'pcm.{name} {{ type file slave.pcm "null" infile "{path}" '
                f'file "/dev/null" format "raw" }}'
            )
        for name, path in self.speakers.items():
            lines.append(f'pcm.{name} {{ type file slave.pcm "null" file "{path}" format "raw" }}')
        self.conf.write_text("\n".join(lines) + "\n")


def bench_alsa(tmp_path: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> BenchAlsa:
    """A fresh asoundrc in tmp_path; with `monkeypatch`, ALSA_CONFIG_PATH points at it."""
    alsa = BenchAlsa(conf=tmp_path / "asoundrc")
    alsa._write()
    if monkeypatch is not None:
        monkeypatch.setenv("ALSA_CONFIG_PATH", str(alsa.conf))
    return alsa


def tone(freq: float, seconds: float, level_dbfs: float = -12.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    amp = 32768 * 10 ** (level_dbfs / 20) * np.sqrt(2)  # RMS of a sine is peak / sqrt(2)
    return np.rint(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def write_raw(path: Path, samples: np.ndarray) -> Path:
    path.write_bytes(samples.astype("<i2").tobytes())
    return path


def read_raw(path: Path) -> np.ndarray:
    if not path.exists():
        return np.zeros(0, dtype=np.int16)
    return np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.int16)


def speech_raw(path: Path, text: str) -> Path:
    """espeak-ng speech as 48 kHz mono s16 raw (skips the test if the tools are missing)."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed for speech")
    wav = path.with_suffix(".wav")
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    subprocess.run(
        ["sox", str(wav), "-r", "48000", "-c", "1", "-b", "16", "-e", "signed-integer", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def level_dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if x.size else 0.0
    return 20 * np.log10(max(rms, 1e-9) / 32768)


def hz_tolerance(freq: float) -> float:
    """How far a played tone's FFT peak may sit from `freq`: the playout buffer's drift
    correction drops or repeats up to `stretch_fraction` of each frame it corrects (a
    pitch shift of at most that much; under load it corrects often), plus 3 Hz."""
    from edgeagent.audio.playout import PlayoutSettings

    return freq * PlayoutSettings().stretch_fraction + 3.0


def peak_hz(x: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def active(x: np.ndarray, threshold_dbfs: float = -40.0, block: int = 960) -> np.ndarray:
    """The samples of `x` in 20 ms blocks louder than the threshold."""
    n = x.size // block
    blocks = x[: n * block].reshape(n, block)
    keep = [b for b in blocks if level_dbfs(b) > threshold_dbfs]
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int16)
