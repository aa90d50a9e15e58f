"""The benches' microphone signal: espeak-ng speech with pauses, 48 kHz mono int16.

bench/perf.py feeds it to the agent's capture PCM and, as a stereo WAV, to the baresip
reference, so both code the same audio (Opus costs depend on what it codes: a pure
tone sweep costs baresip's libopus a third of what speech does).
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

RATE = 48000


def speech_signal(tmp: Path, seconds: float) -> np.ndarray:
    """Speech (espeak-ng) with pauses, repeated to `seconds`; noise bursts without espeak."""
    voice: np.ndarray
    if shutil.which("espeak-ng") and shutil.which("sox"):
        wav, raw = tmp / "speech.wav", tmp / "speech.raw"
        text = "This is the edge agent performance bench. One, two, three, four, five."
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
        subprocess.run(
            [
                "sox",
                str(wav),
                "-r",
                "48000",
                "-c",
                "1",
                "-b",
                "16",
                "-e",
                "signed-integer",
                str(raw),
            ],
            check=True,
            capture_output=True,
        )
        voice = np.frombuffer(raw.read_bytes(), dtype="<i2").astype(np.int16)
    else:
        rng = np.random.default_rng(1)
        voice = np.clip(rng.normal(0, 3000, RATE * 2), -32768, 32767).astype(np.int16)
    unit = np.concatenate([voice, np.zeros(RATE, dtype=np.int16)])
    reps = int(np.ceil(seconds * RATE / unit.size))
    return np.tile(unit, reps)[: int(seconds * RATE)]


def write_stereo_wav(path: Path, mono: np.ndarray) -> Path:
    """`mono` (int16) duplicated to two channels as a 48 kHz WAV."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.repeat(mono.astype("<i2")[:, None], 2, axis=1).tobytes())
    return path
