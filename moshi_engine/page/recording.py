"""Both sides of a WebRTC conversation on one timeline, for the downloadable stereo WAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..audio import pcm_to_int16, write_wav


class Recording:
    """Both sides of a conversation on one timeline, as the person heard it: their
    microphone on the left channel, Moshi on the right, int16 at SAMPLE_RATE.

    The microphone is the clock: its samples arrive in real time and are appended,
    and the recording lasts exactly as long as the microphone was live. A Moshi frame
    starts where the microphone is when the frame is handed to WebRTC, or right after
    Moshi's previous frame if that one is still playing (WebRTC plays Moshi's frames
    back to back, in real time), so a reply sits just after the speech it answers, up
    to network latency. Moshi audio that would have played after the end was never
    heard, and is left out.
    """

    def __init__(self) -> None:
        self._person: list[np.ndarray] = []
        self._moshi: list[tuple[int, np.ndarray]] = []
        self.person_samples = 0
        self.moshi_end = 0
        self._person_energy = 0.0

    def add_person(self, pcm: np.ndarray) -> None:
        self._person.append(pcm_to_int16(pcm))
        self.person_samples += pcm.size
        self._person_energy += float(np.square(pcm, dtype=np.float64).sum())

    def add_moshi(self, pcm: np.ndarray) -> int:
        """Place a frame of Moshi's pcm; returns the sample where it starts."""
        start = max(self.person_samples, self.moshi_end)
        self._moshi.append((start, pcm_to_int16(pcm)))
        self.moshi_end = start + pcm.size
        return start

    @property
    def moshi_frames(self) -> int:
        return len(self._moshi)

    @property
    def samples(self) -> int:
        """Length of the recording in samples per channel: the microphone's."""
        return self.person_samples

    @property
    def person_rms(self) -> float:
        """RMS of the microphone audio heard so far (0.0 before any)."""
        return float(np.sqrt(self._person_energy / self.person_samples)) if self.person_samples else 0.0

    def stereo(self) -> np.ndarray:
        """int16 samples [samples, 2]: the person left, Moshi right, silence where nobody spoke."""
        out = np.zeros((self.samples, 2), dtype=np.int16)
        if self._person:
            out[:, 0] = np.concatenate(self._person)
        for start, frame in self._moshi:
            heard = frame[: max(0, self.samples - start)]
            out[start : start + heard.size, 1] = heard
        return out

    def write_wav(self, path: str | Path) -> None:
        """Write the stereo recording as a 16-bit WAV at SAMPLE_RATE."""
        write_wav(path, self.stereo())
