"""How many conversation slots a GPU holds: plain arithmetic, shared by the engine (which
measures a slot's memory at load) and by app.py (which sizes Modal's concurrency at deploy
time, on a machine that may have no torch). Imports nothing heavy.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

AUTO = "auto"
# `sessions="auto"` on CPU: a small model (the tiny checkpoint) keeps this many
# conversations in real time on two cores (docs/BENCHMARKS.md); a full-size one is not
# real time on a CPU even alone, so it gets one.
AUTO_CPU_SESSIONS = 8
# On CUDA, auto leaves this much GPU memory free for activations, CUDA graphs and the
# allocator's slack, and stops at a batch whose step still fits the 80 ms frame (Moshiko's
# tick at batch 32 is reported at about 70 ms; at batch 64 it would not keep real time).
GPU_HEADROOM_BYTES = 2 * 1024**3
GPU_HEADROOM_FRACTION = 0.05
MAX_AUTO_SESSIONS = 32
GIB = 1024**3


class CapacityError(RuntimeError):
    """The conversation slots asked for do not fit in the device's memory."""


def explicit_sessions(requested: int | str) -> int:
    """A slot count given as a number (or its string); ValueError otherwise."""
    try:
        sessions = int(requested)
    except ValueError:
        sessions = 0
    if sessions < 1:
        raise ValueError(f"sessions must be a number >= 1 or {AUTO!r}, got {requested!r}")
    return sessions


def fit_sessions(requested: int | str, free: int, total: int, per_slot: int) -> int:
    """Slots for `free` bytes of a `total`-byte GPU, `per_slot` bytes each, keeping
    GPU_HEADROOM_BYTES + GPU_HEADROOM_FRACTION of the GPU free: "auto" takes the most that
    fit (at most MAX_AUTO_SESSIONS); a number that does not fit raises CapacityError naming
    the number that would."""
    headroom = GPU_HEADROOM_BYTES + GPU_HEADROOM_FRACTION * total
    fits = max(0, int((free - headroom) // max(per_slot, 1)))
    log.info("GPU memory: %.1f GiB free of %.1f GiB; a conversation slot takes %.2f GiB; %d slot(s) fit",
             free / GIB, total / GIB, per_slot / GIB, fits)
    if fits < 1:
        raise CapacityError(f"not even one conversation slot ({per_slot / GIB:.2f} GiB) fits in the "
                            f"{free / GIB:.1f} GiB of free GPU memory, headroom kept")
    if requested == AUTO:
        sessions = min(fits, MAX_AUTO_SESSIONS)
        log.info("sessions auto: %d conversation slot(s)", sessions)
        return sessions
    sessions = explicit_sessions(requested)
    if sessions > fits:
        raise CapacityError(
            f"{sessions} conversation slots do not fit in GPU memory ({free / GIB:.1f} GiB free, "
            f"{per_slot / GIB:.2f} GiB per slot, headroom kept): use --sessions {fits} or auto"
        )
    return sessions
