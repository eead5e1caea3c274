"""The engine: a loaded checkpoint with N conversation slots that sessions lease.

    engine = load_engine("tiny", sessions=16)       # or a HF repo id, or a directory
    async with engine.session(Sampling(seed=1)) as session:
        ...

One copy of the weights serves every conversation: a slot is a row of one
batched Mimi + LMGen (`model.batched.BatchedMoshi`). A session leases one slot
exclusively; when none is free, leasing fails at once with BusyError, so a
transport can tell the user right away.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from .conversation import BusyError, ModelRestarting, Sampling
from .door.line import QUEUE_PLACES, QUEUE_TIMEOUT_S, LinePosition, WaitingLine
from .model.batched import BatchedMoshi
from .model.checkpoint import DEFAULT_MODEL
from .model.loading import WARMUP_FRAMES, EngineInfo, Weights, freeze_garbage_collector, load_slots
from .model.process import ModelProcess
from .model.sizing import AUTO
from .session import MAX_OUTPUT_FRAMES, MAX_PENDING_FRAMES, MoshiSession
from .timings import STEP, STEP_WAIT

log = logging.getLogger(__name__)


class MoshiEngine:
    """One loaded Moshi with N conversation slots (batch rows), leased one per session."""

    def __init__(self, info: EngineInfo, model: BatchedMoshi | ModelProcess, default_sampling: Sampling,
                 queue: int = QUEUE_PLACES, queue_timeout_s: float = QUEUE_TIMEOUT_S) -> None:
        self.info = info
        self.model = model
        self.default_sampling = default_sampling
        self.timings = model.timings
        self.started_at = time.time()
        self.line: WaitingLine[MoshiSession] = WaitingLine(queue, queue_timeout_s, model.capacity,
                                                           give_back=MoshiSession.release)
        if isinstance(model, ModelProcess):
            model.on_stop = self._model_stopped
            model.on_restart = self._model_restarted
            model.on_lost = self._model_lost
        self._stopped_reason: BusyError | ModelRestarting | None = None
        self.lost: str | None = None  # why the model is gone for good, once it is
        # Told (from another thread) why, once the model is gone for good: no replacement of a
        # model process that died would start. Whoever serves the engine decides what then
        # (`web.serve` stops the server; on Modal the container stops taking inputs).
        self.on_model_lost: Callable[[str], None] | None = None

    def _model_stopped(self, reason: str, restarting: bool) -> None:
        """The model process died (nobody is admitted until another is ready), or was closed."""
        self._stopped_reason = ModelRestarting(reason) if restarting else BusyError(reason)
        self.line.close(self._stopped_reason)

    def _model_restarted(self) -> None:
        if self._stopped_reason is not None:
            self.line.reopen(self._stopped_reason)

    def _model_lost(self, reason: str) -> None:
        self.lost = reason
        if self.on_model_lost is not None:
            self.on_model_lost(reason)

    @property
    def capacity(self) -> int:
        return self.model.capacity

    @property
    def active(self) -> int:
        return self.model.active

    @property
    def stopped(self) -> str | None:
        """Why no conversation can start now (the model process died and another is warming
        up), else None."""
        return self.model.stopped

    def open_session(
        self,
        sampling: Sampling | None = None,
        max_pending_frames: int = MAX_PENDING_FRAMES,
        max_output_frames: int = MAX_OUTPUT_FRAMES,
    ) -> MoshiSession:
        """Lease a free slot (BusyError if none) for a session; call it from the event loop."""
        session = MoshiSession(self.model, sampling or self.default_sampling, max_pending_frames, max_output_frames,
                               on_release=self.line.freed)
        self.line.started(session)
        return session

    async def acquire(self, sampling: Sampling | None = None,
                      on_position: Callable[[LinePosition], None] | None = None, **limits) -> MoshiSession:
        """A session on a free slot, waiting in line (first come, first served) while every slot is
        taken; `on_position` hears where it stands as the line moves. LineFull at once when the line
        is full, LineTimeout after the line's timeout (both BusyError); cancelling leaves the line."""
        return await self.line.wait(functools.partial(self.open_session, sampling, **limits), on_position)

    @contextlib.asynccontextmanager
    async def session(self, sampling: Sampling | None = None, **limits):
        """`async with engine.session(...) as s:` leases (waiting in line if need be), starts, and
        always closes."""
        session = await self.acquire(sampling, **limits)
        try:
            await session.start()
            yield session
        finally:
            await session.close()

    def status(self) -> dict:
        timings = self.timings
        rows = np.array(self.model.rows_per_step, dtype=np.float64)
        return {
            "model": self.info.model,
            "device": self.info.device,
            "dtype": self.info.dtype,
            "weights": self.info.weights,  # the weights' precision: int8 for a quantized checkpoint
            "context": self.info.context,  # the LM's attention window, in 80 ms steps
            "parameters": self.info.parameters,
            "sessions": {"active": self.active, "capacity": self.capacity},
            "queue": {"waiting": self.line.waiting, "places": self.line.places},
            "batch": {
                "step": timings.percentiles(STEP),
                "wait": timings.percentiles(STEP_WAIT),
                "rows_per_step_mean": round(float(rows.mean()), 2) if rows.size else 0.0,
                "fill": round(float(rows.mean()) / self.capacity, 3) if rows.size else 0.0,
            },
            "timings": timings.summary(),
            "unavailable": self.stopped,  # why nobody is admitted now (None: they are)
            "model_restarts": self.model.restarts,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def close(self) -> None:
        self.model.close()



def load_engine(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    sessions: int | str = AUTO,
    warmup_frames: int = WARMUP_FRAMES,
    gather_ms: float = 0.0,
    queue: int = QUEUE_PLACES,
    queue_timeout_s: float = QUEUE_TIMEOUT_S,
    weights: Weights | None = None,
    model_process: bool = True,
    context: int | None = None,
) -> MoshiEngine:
    """A warm engine with `sessions` conversation slots (or "auto", see `model.loading.choose_sessions`) over
    `weights`, or over the checkpoint `model` loaded on `device` (see `model.loading.load_weights`).

    One copy of the weights: the slots are the batch rows of one Mimi and one LMGen, all
    warmed up (and on CUDA graphed) before this returns. With `model_process` (the default on
    POSIX, unless `weights` are given: those live in this process) they are loaded and stepped
    in a process of their own (`model.process`), else by a thread of this one. `gather_ms` is the
    stepping policy (`model.batched.BatchedMoshi`); `queue` places wait at most `queue_timeout_s`
    each for a slot (`door.line.WaitingLine`). `context` is the LM's attention window in steps
    (default the checkpoint's; see `model.loading.load_weights`).
    """
    if model_process and weights is None and os.name == "posix":  # the child's pipe is an inherited fd
        slots = ModelProcess.start(model, device, sessions, warmup_frames, gather_ms, context)
        info, default_sampling = slots.info, slots.default_sampling
    else:
        slots, info, default_sampling = load_slots(model, device, sessions, warmup_frames, gather_ms, weights,
                                                   context=context)
    freeze_garbage_collector()
    return MoshiEngine(info, slots, default_sampling, queue, queue_timeout_s)
