"""Numbers from samples: percentiles, the per-frame budget, and when a load keeps real time.

Everything here is pure numpy over millisecond samples, so the method can be
read (and tested) apart from the machinery that collects them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..timings import LM_STEP, MIMI_DECODE, MIMI_ENCODE, STAGES
from .streams import StreamRun

MODEL_STAGES = (MIMI_ENCODE, LM_STEP, MIMI_DECODE)
OTHER = "other"  # everything outside the five stages: queues, threads, framing, websocket
CLOCK_SLACK_MS = 0.05  # a stage may end this much "after" its frame's answer through timer granularity


def summarize(ms: np.ndarray | list[float]) -> dict[str, float | int]:
    """p50, p95, mean and max (ms, rounded to µs) and the sample count; zeros when empty."""
    ms = np.asarray(ms, dtype=np.float64)
    if ms.size == 0:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "mean_ms": 0.0, "max_ms": 0.0, "n": 0}
    p50, p95 = np.percentile(ms, [50, 95])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
            "mean_ms": round(float(ms.mean()), 3), "max_ms": round(float(ms.max()), 3), "n": int(ms.size)}


def frame_budget(run: StreamRun, stages_ms: dict[str, np.ndarray]) -> dict:
    """Where each answered frame's end-to-end time went, frame by frame.

    `stages_ms` holds the durations recorded during `run` alone (one session, timings
    cleared before it), oldest first, as StageTimings keeps them: one Opus decode and
    one Mimi encode and LM step per input frame, one Mimi decode and Opus encode per
    answer frame. The last answer belongs to the last input frame, so every series
    is aligned from its end, which also survives StageTimings dropping its oldest
    samples past its window. For frame i,

        other_i = e2e_i - (opus_decode_i + mimi_encode_i + lm_step_i + mimi_decode_i + opus_encode_i)

    `outside_model` is e2e minus Mimi and the LM, frame by frame: the Opus work
    plus everything else, what this app adds around the model.
    Each stage runs strictly inside its frame's end-to-end interval, one after the
    other, so other_i >= 0 whenever the alignment is right; `misaligned_frames`
    counts the frames where it is not (beyond timer slack), as a check on the method.
    Stages with no samples (a transport that has no Opus) are left out.
    """
    if not run.complete:
        raise ValueError(f"the run answered {len(run.answered_at)} of {run.expected_answers} frames; "
                         "a per-frame budget needs every answer")
    e2e = run.latencies_ms()
    series = {stage: np.asarray(stages_ms.get(stage, ()), dtype=np.float64) for stage in STAGES}
    series = {stage: ms for stage, ms in series.items() if ms.size}
    n = min([e2e.size] + [ms.size for ms in series.values()])
    e2e = e2e[e2e.size - n :]
    aligned = {stage: ms[ms.size - n :] for stage, ms in series.items()}
    inside = np.sum(list(aligned.values()), axis=0) if aligned else np.zeros(n)
    other = e2e - inside
    model = np.sum([aligned[s] for s in MODEL_STAGES if s in aligned] or [np.zeros(n)], axis=0)
    return {
        "frames": int(n),
        "stages": {stage: summarize(ms) for stage, ms in aligned.items()},
        OTHER: summarize(other),
        "model": summarize(model),
        "outside_model": summarize(e2e - model),  # Opus and everything else
        "e2e": summarize(e2e),
        "misaligned_frames": int(np.sum(other < -CLOCK_SLACK_MS)),
    }


@dataclass(frozen=True)
class RealTimeCriterion:
    """When k concurrent real-time clients are kept in real time.

    A level passes when, over all its clients' answered frames:
    - every input frame but the first was answered, at the latest `tail_s` (2 s by
      default) after the client sent its last frame (nothing lost, nobody cut off);
    - the p95 latency (input frame leaving -> first byte of its answer) is at most
      `p95_bound_ms`: by default one frame, i.e. an answer arrives before the next
      frame is due;
    - latency does not grow over the run: the median of the last third of the
      frames exceeds the median of the first third by at most `drift_bound_ms`.
      A server that falls behind real time queues frames, and its latency then
      grows by (step time - 80 ms) every frame, which this catches even when the
      run is too short for the p95 to cross its bound.
    """

    p95_bound_ms: float = 80.0
    drift_bound_ms: float = 20.0

    def judge(self, runs: list[StreamRun]) -> dict:
        """The level's numbers and verdict (`keeps_real_time`), with the reasons it failed."""
        latencies = [run.latencies_ms() for run in runs]
        pooled = np.concatenate(latencies) if latencies else np.zeros(0)
        thirds = [np.array_split(ms, 3) for ms in latencies if ms.size >= 3]
        early = np.concatenate([parts[0] for parts in thirds]) if thirds else np.zeros(0)
        late = np.concatenate([parts[2] for parts in thirds]) if thirds else np.zeros(0)
        drift = float(np.median(late) - np.median(early)) if early.size and late.size else 0.0
        answered = sum(len(run.answered_at) for run in runs)
        expected = sum(run.expected_answers for run in runs)
        latency = summarize(pooled)
        failures = []
        if answered < expected:
            failures.append(f"{expected - answered} of {expected} frames unanswered")
        if latency["p95_ms"] > self.p95_bound_ms:
            failures.append(f"p95 {latency['p95_ms']:.1f} ms > {self.p95_bound_ms:g} ms")
        if drift > self.drift_bound_ms:
            failures.append(f"latency grew by {drift:.1f} ms > {self.drift_bound_ms:g} ms")
        return {
            "sessions": len(runs),
            "latency": latency,
            "drift_ms": round(drift, 3),
            "answered": answered,
            "expected": expected,
            "throughput_fps": round(sum(run.throughput_fps() for run in runs), 2),
            "keeps_real_time": not failures,
            "failures": failures,
        }

    def describe(self) -> dict:
        return asdict(self)
