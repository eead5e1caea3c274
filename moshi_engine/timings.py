"""Per-frame timings of each stage an 80 ms frame goes through, for /status and the benchmark."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

OPUS_DECODE = "opus_decode"
MIMI_ENCODE = "mimi_encode"
LM_STEP = "lm_step"
MIMI_DECODE = "mimi_decode"
OPUS_ENCODE = "opus_encode"
STAGES = (OPUS_DECODE, MIMI_ENCODE, LM_STEP, MIMI_DECODE, OPUS_ENCODE)


class StageTimings:
    """The most recent `window` durations of each stage; written from worker threads."""

    def __init__(self, window: int = 500) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, deque[float]] = {stage: deque(maxlen=window) for stage in STAGES}

    def record(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._samples[stage].append(seconds)

    def samples_ms(self, stage: str) -> np.ndarray:
        with self._lock:
            return np.array(self._samples[stage], dtype=np.float64) * 1000.0

    def summary(self) -> dict[str, dict[str, float | int]]:
        """{stage: {"p50_ms", "p95_ms", "count"}} over the recent window (zeros when empty)."""
        result = {}
        for stage in STAGES:
            ms = self.samples_ms(stage)
            p50, p95 = np.percentile(ms, [50, 95]) if ms.size else (0.0, 0.0)
            result[stage] = {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3), "count": int(ms.size)}
        return result

    def clear(self) -> None:
        with self._lock:
            for samples in self._samples.values():
                samples.clear()
