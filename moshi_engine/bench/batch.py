"""The batched model itself: what a step costs against the batch size, and what the stepping
policy adds to a frame's latency at 1, N/2 and N conversations.

- **step time**: an engine with B slots steps all B rows (Mimi encode, LM step, Mimi
  decode, per-row sampling) on its own thread, over and over, with speech-like input;
  the median and p95 of a step. The batch shape is fixed, so a step costs the same
  whether 1 or B rows have a frame in it; the same engine stepping one row shows it.
- **policy**: an engine with N slots (`batch_slots`) and k = 1, N/2, N real-time
  conversations in this process (Opus on both sides, as the server does), each at its
  own phase of the 80 ms frame. For each stepping policy (`gather_ms`: 0 steps as soon
  as any frame is ready; > 0 waits that long for the other rows' frames), the wait a
  frame spends between arriving whole and its step starting, the whole frame's latency,
  how many rows a step carries, and the CPU the process used.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np

from ..audio import FRAME_SIZE
from ..timings import STEP, STEP_WAIT
from .resources import Bench, staggered_streams
from .stats import summarize
from .streams import SPEECH_DIR, SPEECH_FILES, stream_session

log = logging.getLogger(__name__)

STEP_BATCHES = (1, 2, 4, 8, 16, 32)
STEPS_TIMED = 40
POLICIES_MS = (0.0, 40.0)


def _time_steps(model, frames: list[np.ndarray], stepped: list[int]) -> list[float]:
    """ms per step of `model` stepping the rows `stepped`, STEPS_TIMED times (on its thread)."""
    durations = []
    for _ in range(STEPS_TIMED):
        started = time.perf_counter()
        model._step([(row, frames[row], started) for row in stepped])
        durations.append((time.perf_counter() - started) * 1000.0)
    return durations


def step_times(bench: Bench) -> dict:
    """Step time of a B-slot engine stepping all its rows, and one row, for each B."""
    from ..audio import read_wav

    config = bench.config
    speech = np.concatenate([read_wav(SPEECH_DIR / name) for name in SPEECH_FILES])
    rows = []
    for batch in (b for b in STEP_BATCHES if b <= config.max_sessions):
        try:
            engine = bench.load_engine(batch)
        except Exception as error:  # a batch that does not fit ends the series, with the reason
            rows.append({"batch": batch, "error": f"{type(error).__name__}: {str(error).splitlines()[-1]}"})
            break
        try:
            frames = [speech[(i * FRAME_SIZE) % (speech.size - FRAME_SIZE):][:FRAME_SIZE] for i in range(batch)]
            every_row = engine.model.run(_time_steps, frames, list(range(batch)))
            one_row = engine.model.run(_time_steps, frames, [0])
        finally:
            engine.close()
        rows.append({"batch": batch, "all_rows": summarize(every_row), "one_row": summarize(one_row)})
        log.info("step at batch %d: p50 %.1f ms (one row: %.1f ms)", batch, rows[-1]["all_rows"]["p50_ms"],
                 rows[-1]["one_row"]["p50_ms"])
    return {"steps_timed": STEPS_TIMED, "batches": rows}


def policy(bench: Bench) -> dict:
    """k = 1, N/2, N real-time conversations on an N-slot engine, for each stepping policy."""
    config = bench.config
    slots = config.batch_slots
    levels = sorted({1, max(1, slots // 2), slots})
    results = []
    for gather_ms in POLICIES_MS:
        engine = bench.load_engine(slots, gather_ms=gather_ms)
        try:
            for conversations in levels:
                results.append({"gather_ms": gather_ms, "conversations": conversations,
                                **_policy_level(engine, bench.pages, conversations, config.tail_s)})
                level = results[-1]
                log.info("policy gather %g ms, %d conversation(s): wait p50 %.1f / p95 %.1f ms, frame p95 %.1f ms",
                         gather_ms, conversations, level["wait"]["p50_ms"], level["wait"]["p95_ms"],
                         level["latency"]["p95_ms"])
        finally:
            engine.close()
    return {"slots": slots, "levels": results}


def _policy_level(engine, pages: list[bytes], conversations: int, tail_s: float) -> dict:
    engine.timings.clear()
    engine.model.rows_per_step.clear()
    runs, usage = staggered_streams(functools.partial(stream_session, engine, pages, True, tail_s=tail_s),
                                    conversations)
    latencies = np.concatenate([run.latencies_ms() for run in runs])
    rows = np.asarray(engine.model.rows_per_step, dtype=np.float64)
    return {
        "wait": summarize(engine.timings.samples_ms(STEP_WAIT)),
        "step": summarize(engine.timings.samples_ms(STEP)),
        "latency": summarize(latencies),
        "answered": sum(len(run.answered_at) for run in runs),
        "expected": sum(run.expected_answers for run in runs),
        "rows_per_step": round(float(rows.mean()), 2) if rows.size else 0.0,
        "cpu_percent": usage["cpu_percent"],
    }


def batch(bench: Bench) -> dict:
    return {"step_time": step_times(bench), "policy": policy(bench)}
