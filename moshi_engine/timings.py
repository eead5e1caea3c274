"""Per-frame timings of each stage an 80 ms frame goes through, for /status and the benchmark."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np

OPUS_DECODE = "opus_decode"
MIMI_ENCODE = "mimi_encode"
LM_STEP = "lm_step"
MIMI_DECODE = "mimi_decode"
OPUS_ENCODE = "opus_encode"
STAGES = (OPUS_DECODE, MIMI_ENCODE, LM_STEP, MIMI_DECODE, OPUS_ENCODE)
# The batched model's own series: a whole step (Mimi encode + LM step + Mimi decode of
# every row in it), and how long a frame waited, from arriving whole to its step starting.
STEP = "step"
STEP_WAIT = "step_wait"
SERIES = (*STAGES, STEP, STEP_WAIT)


class Observers:
    """The callbacks told of one kind of event, from whatever thread it happens on. `add`
    returns what removes that registration (and only it, whatever else was added since)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: tuple[tuple[object, Callable], ...] = ()

    def add(self, callback: Callable) -> Callable[[], None]:
        token = object()
        with self._lock:
            self._entries = (*self._entries, (token, callback))

        def remove() -> None:
            with self._lock:
                self._entries = tuple(entry for entry in self._entries if entry[0] is not token)

        return remove

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, *args) -> None:
        for _, callback in self._entries:  # a snapshot: adding or removing meanwhile is safe
            callback(*args)


class StageTimings:
    """The most recent `window` durations of each series; written from worker threads."""

    def __init__(self, window: int = 500) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, deque[float]] = {name: deque(maxlen=window) for name in SERIES}
        self._journal: list[tuple[str, float]] | None = None
        self._observers: dict[str, Observers] = {name: Observers() for name in SERIES}

    def record(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._samples[stage].append(seconds)
            if self._journal is not None:
                self._journal.append((stage, seconds))
        self._observers[stage](seconds)

    def observe(self, stage: str, observer: Callable[[float], None]) -> Callable[[], None]:
        """Also hand every duration of `stage` to `observer` as it is recorded (a Prometheus
        histogram's `observe`), from whatever thread records it; returns what stops that."""
        return self._observers[stage].add(observer)

    def take_journal(self) -> list[tuple[str, float]]:
        """Every (stage, seconds) recorded since the last call (the first call starts the
        journal), for another process's copy of these timings."""
        with self._lock:
            journal, self._journal = self._journal or [], []
        return journal

    def samples_ms(self, stage: str) -> np.ndarray:
        with self._lock:
            return np.array(self._samples[stage], dtype=np.float64) * 1000.0

    def percentiles(self, stage: str) -> dict[str, float | int]:
        """{"p50_ms", "p95_ms", "count"} over the recent window (zeros when empty)."""
        ms = self.samples_ms(stage)
        p50, p95 = np.percentile(ms, [50, 95]) if ms.size else (0.0, 0.0)
        return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3), "count": int(ms.size)}

    def summary(self) -> dict[str, dict[str, float | int]]:
        """{stage: percentiles} for each stage of a frame's way through."""
        return {stage: self.percentiles(stage) for stage in STAGES}

    def clear(self) -> None:
        with self._lock:
            for samples in self._samples.values():
                samples.clear()
