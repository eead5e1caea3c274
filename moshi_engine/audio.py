"""PCM facts and helpers shared by every part of the engine.

`pcm` everywhere in this package means float32 mono samples in [-1, 1] at
`SAMPLE_RATE` (Mimi's rate); a frame is `FRAME_SIZE` samples (80 ms), the unit
Moshi consumes and produces per step. This module imports nothing of ours.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
FRAME_SIZE = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples
FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE  # 0.08 s


def check_pcm(pcm: object) -> np.ndarray:
    """Return `pcm` if it is a non-empty, finite, 1-d float32 array; else raise ValueError.

    The message says what was wrong and how to fix it, since this is the first
    thing a caller feeding its own audio gets wrong.
    """
    if not isinstance(pcm, np.ndarray):
        raise ValueError(f"pcm must be a numpy array of float32 samples, got {type(pcm).__name__}")
    if pcm.dtype != np.float32:
        hint = " (int16 audio: pcm.astype(np.float32) / 32768)" if pcm.dtype == np.int16 else ""
        raise ValueError(f"pcm must be float32 mono at {SAMPLE_RATE} Hz, got dtype {pcm.dtype}{hint}")
    if pcm.ndim != 1:
        raise ValueError(f"pcm must be 1-d (mono samples), got shape {pcm.shape}")
    if pcm.size == 0:
        raise ValueError("pcm is empty: send at least one sample")
    if not np.isfinite(pcm).all():
        raise ValueError("pcm contains NaN or inf samples")
    return pcm


def int16_to_pcm(samples: np.ndarray) -> np.ndarray:
    """int16 samples of any shape -> flat float32 pcm in [-1, 1)."""
    return (np.asarray(samples, dtype=np.int16).reshape(-1).astype(np.float32)) / 32768.0


def pcm_to_int16(pcm: np.ndarray) -> np.ndarray:
    """float32 pcm -> int16 samples, clipped."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


def resample(pcm: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample float32 mono pcm with a polyphase filter; the length scales exactly."""
    if from_rate == to_rate:
        return pcm
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(from_rate, to_rate)
    return resample_poly(pcm, to_rate // g, from_rate // g).astype(np.float32)


def read_wav(path: str | Path) -> np.ndarray:
    """Read a 16-bit PCM WAV as pcm at SAMPLE_RATE (channels averaged, resampled if needed)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        channels, rate = wav.getnchannels(), wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    pcm = samples.reshape(-1, channels).astype(np.float32).mean(axis=1) / 32768.0
    return resample(pcm.astype(np.float32), rate)


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write pcm (or int16 samples, as they are) as 16-bit WAV: a 1-d array is mono,
    a [n, channels] array interleaved."""
    samples = pcm if pcm.dtype == np.int16 else pcm_to_int16(pcm)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(samples.astype("<i2").tobytes())


def rms(pcm: np.ndarray) -> float:
    """Root mean square of pcm (0.0 for an empty array)."""
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if pcm.size else 0.0
