"""Test helpers for the ALSA twin: file PCMs in a temp asoundrc, signals, numeric checks."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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

    def remove_mic(self, name: str) -> None:
        """The card is unplugged: its PCM is no longer defined."""
        del self.mics[name]
        self._write()

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


def tone_then_speech(
    freq: float, seed: int, *, pause_s: float = 0.0, tone_s: float = 2.0, speech_s: float = 2.5
) -> tuple[np.ndarray, np.ndarray]:
    """A microphone signal: a -12 dBFS tone, `pause_s` of silence, then speech-like sound.

    Returns (signal, the speech part). Each seed gives a different, deterministic,
    non-periodic speech; the tone is for FFT peak and level checks, the speech for
    correlation with what the far end plays.
    """
    from edgeagent.audio.synth import speech_like

    speech = np.rint(speech_like(speech_s, seed, level_dbfs=-20.0)).astype(np.int16)
    pause = np.zeros(round(pause_s * RATE), dtype=np.int16)
    return np.concatenate([tone(freq, tone_s), pause, speech]), speech


def best_match(x: np.ndarray, template: np.ndarray) -> tuple[int, float]:
    """Where `template` fits best in `x`: (start index, normalised correlation there)."""
    x64, t64 = x.astype(np.float64), template.astype(np.float64)
    n = t64.size
    if x64.size < n:
        return 0, 0.0
    size = 1 << int(np.ceil(np.log2(x64.size + n)))
    corr = np.fft.irfft(np.fft.rfft(x64, size) * np.conj(np.fft.rfft(t64, size)), size)
    corr = corr[: x64.size - n + 1]
    energy = np.concatenate([[0.0], np.cumsum(x64 * x64)])
    norms = np.sqrt(np.maximum(energy[n:] - energy[:-n], 0.0)) * float(np.linalg.norm(t64))
    rho = np.where(norms > 1e-9, corr / np.maximum(norms, 1e-9), 0.0)
    k = int(np.argmax(rho))
    return k, float(rho[k])


# The median, over 0.5 s windows, of the normalised correlation peak between a far
# end's speech and what was played here must reach this. Measured on this synth
# (raw waveforms: no band limit or envelope needed when the talkers take turns):
# Opus at 32 kbit/s alone keeps 0.82-0.95 per window; a call between two agents,
# direct or through coturn, 0.85-0.92 (AEC3 and the playout buffer's drift
# correction on top); a different speech from the same synth 0.13-0.31. Under
# double talk AEC3 suppresses bands of the capture and drops single windows to
# 0.1-0.4, so the call tests let the endpoints take turns, as people do. 0.7 stays
# far above any other signal and leaves room for drift corrections on a busy machine.
SPEECH_MATCH = 0.7


def heard_speech(
    played: np.ndarray, speech: np.ndarray, window_s: float = 0.5
) -> tuple[int, float, list[float]]:
    """Where `speech` starts in `played`, the median correlation peak, and each window's.

    Each audible window of the source is matched on its own, so the playout
    buffer's drift correction (a few dropped or repeated samples between windows)
    does not smear one global match. The start is the median of the windows' starts.
    """
    n = int(window_s * RATE)
    starts, rhos = [], []
    for k in range(speech.size // n):
        window = speech[k * n : (k + 1) * n]
        if level_dbfs(window) < -40:  # a pause between "syllables": nothing to match
            continue
        at, rho = best_match(played, window)
        starts.append(at - k * n)
        rhos.append(rho)
    if not rhos:
        return 0, 0.0, []
    return int(np.median(starts)), float(np.median(rhos)), rhos


def assert_heard_each_other(
    tmp_path: Path, turns: tuple[tuple[str, int, np.ndarray], tuple[str, int, np.ndarray]]
) -> None:
    """Each of two endpoints (device, tone Hz, speech it sent) played the other's tone,
    then the other's speech, and not its own (`spk_<device>.raw` under `tmp_path`)."""
    (a, tone_a, speech_a), (b, tone_b, speech_b) = turns
    for device, freq, far, own in (
        (a, tone_b, speech_b, speech_a),
        (b, tone_a, speech_a, speech_b),
    ):
        played = read_raw(tmp_path / f"spk_{device}.raw")
        start, rho, rhos = heard_speech(played, far)
        assert rho >= SPEECH_MATCH, f"{device}: far end's speech correlates {rhos}"
        assert heard_speech(played, own)[1] < SPEECH_MATCH / 2
        heard_tone = active(played[:start])
        assert heard_tone.size >= 48000, f"{device} heard only {heard_tone.size} samples"
        assert abs(peak_hz(heard_tone) - freq) <= hz_tolerance(freq), (
            f"{device}: peak {peak_hz(heard_tone)}"
        )
        assert abs(level_dbfs(heard_tone) - (-12)) <= 3


class EchoPath:
    """A loudspeaker-to-microphone path between two file PCMs, driven by the test.

    A file PCM cannot read what another writes as it is written (past the end
    of its infile it returns junk, and a playback file PCM truncates its file on
    open), so this pump copies what the speaker PCM wrote, `erl_db` down, into
    the microphone's infile `lead_ms` ahead of where the capture reads, mixed
    with what is there. Everything played reaches the microphone in order and
    sample-continuous, as from a speaker next to it; the delay from playout to
    capture is the file PCM's write buffering plus the lead. `capture_pos`
    gives the samples the capture has read so far (None before it runs).
    """

    def __init__(
        self,
        speaker: Path,
        mic: Path,
        capture_pos: Callable[[], int | None],
        *,
        erl_db: float = 10.0,
        lead_ms: float = 60.0,
    ) -> None:
        self.speaker = speaker
        self.mic = mic
        self.capture_pos = capture_pos
        self.gain = 10 ** (-erl_db / 20)
        self.lead = round(lead_ms * RATE / 1000)
        self.cursor: int | None = None  # mic sample the next speaker sample lands on
        self.copied = 0  # speaker samples that reached the mic
        self._odd = b""

    def pump(self, spk: BinaryIO, mic: BinaryIO) -> None:
        """Move whatever the speaker wrote since the last call into the microphone."""
        data = self._odd + spk.read()
        cut = len(data) // 2 * 2
        data, self._odd = data[:cut], data[cut:]
        if not data:
            return
        if self.cursor is None:
            pos = self.capture_pos()
            if pos is None:
                return  # played before the capture runs: nobody would hear it
            self.cursor = pos + self.lead
        played = np.frombuffer(data, dtype="<i2").astype(np.float64)
        mic.seek(self.cursor * 2)
        near = np.frombuffer(mic.read(played.size * 2), dtype="<i2").astype(np.float64)
        near = np.pad(near, (0, played.size - near.size))
        mixed = np.clip(np.rint(near + self.gain * played), -32768, 32767).astype("<i2")
        mic.seek(self.cursor * 2)
        mic.write(mixed.tobytes())
        mic.flush()
        self.cursor += played.size
        self.copied += played.size

    async def run(self, period_s: float = 0.005) -> None:
        """Pump until cancelled: a few times per 20 ms frame, to keep well inside the lead."""
        while not self.speaker.exists():
            await asyncio.sleep(period_s)
        with self.speaker.open("rb") as spk, self.mic.open("r+b") as mic:
            while True:
                self.pump(spk, mic)
                await asyncio.sleep(period_s)
