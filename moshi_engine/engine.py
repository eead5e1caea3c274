"""The engine: a loaded checkpoint with N conversation slots that sessions lease, and the
voices of one server, each such an engine.

    engine = load_engine("tiny", sessions=16)       # or a HF repo id, or a directory
    async with engine.session(Sampling(seed=1)) as session:
        ...
    voices = load_voices("kyutai/moshiko-pytorch-bf16,kyutai/moshika-pytorch-bf16")
    name, engine = voices.pick("moshika")           # None: the first, the default

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
from collections.abc import Callable, Iterator

import numpy as np

from .conversation import BusyError, ModelRestarting, Sampling
from .door.line import QUEUE_PLACES, QUEUE_TIMEOUT_S, LinePosition, WaitingLine
from .model.batched import BatchedMoshi
from .model.checkpoint import DEFAULT_MODEL, weights_bytes
from .model.loading import WARMUP_FRAMES, EngineInfo, Weights, freeze_garbage_collector, load_slots, pick_device
from .model.process import ModelProcess
from .model.sizing import AUTO, AutoShare
from .model.voices import UnknownVoice, parse_voices, short_name
from .session import MAX_OUTPUT_FRAMES, MAX_WAITING_FRAMES, MoshiSession
from .timings import STEP, STEP_WAIT, Observers
from .watch.logs import current_conversation

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
        self._sessions: set[MoshiSession] = set()  # live ones
        self._dropped_in_closed_sessions = 0
        # Told how long each conversation waited for its slot, in seconds (0: one was free).
        self._queue_waits = Observers()  # told how long each conversation that got a slot waited
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
        max_waiting_frames: int = MAX_WAITING_FRAMES,
        max_output_frames: int = MAX_OUTPUT_FRAMES,
    ) -> MoshiSession:
        """Lease a free slot (BusyError if none) for a session; call it from the event loop."""
        session = MoshiSession(self.model, sampling or self.default_sampling, max_waiting_frames, max_output_frames,
                               on_release=self._released)
        self._sessions.add(session)
        self.line.started(session)
        return session

    def _released(self, session: MoshiSession) -> None:
        self._sessions.discard(session)
        self._dropped_in_closed_sessions += session.dropped_frames
        self.line.freed(session)

    @property
    def dropped_audio_frames(self) -> int:
        """Answer frames of this voice's conversations dropped because a reader fell behind."""
        return self._dropped_in_closed_sessions + sum(session.dropped_frames for session in list(self._sessions))

    def observe_queue_wait(self, observer: Callable[[float], None]) -> Callable[[], None]:
        """Tell `observer` how long each conversation that got a slot waited for it (0: at
        once); returns what stops that."""
        return self._queue_waits.add(observer)

    def waited(self, seconds: float) -> None:
        """A conversation got its slot after `seconds` in line (0: at once)."""
        self._queue_waits(seconds)

    async def acquire(self, sampling: Sampling | None = None,
                      on_position: Callable[[LinePosition], None] | None = None, **limits) -> MoshiSession:
        """A session on a free slot, waiting in line (first come, first served) while every slot is
        taken; `on_position` hears where it stands as the line moves. LineFull at once when the line
        is full, LineTimeout after the line's timeout (both BusyError); cancelling leaves the line."""
        joined, conversation = time.monotonic(), current_conversation()
        session = await self.line.wait(functools.partial(self.open_session, sampling, **limits), on_position)
        session.conversation_id = conversation  # a slot freed by another conversation was leased in its context
        self.waited(time.monotonic() - joined)
        return session

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
            # every conversation's on this voice, whatever carried it: the counter moshi_dropped_audio_frames
            "dropped_audio_frames": self.dropped_audio_frames,
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


class Voices:
    """The voices one server offers, in order (the first is the default): each a `MoshiEngine`
    of its own, with its own weights, model process, slots and waiting line, on one device."""

    def __init__(self, engines: dict[str, MoshiEngine]) -> None:
        if not engines:
            raise ValueError("a server offers at least one voice")
        self.engines = dict(engines)

    @classmethod
    def of(cls, engine: MoshiEngine | Voices) -> Voices:
        """`engine` as the one voice of a server (named after its model), or the voices as given."""
        return engine if isinstance(engine, Voices) else cls({short_name(engine.info.model): engine})

    @property
    def names(self) -> list[str]:
        return list(self.engines)

    @property
    def default(self) -> MoshiEngine:
        return next(iter(self.engines.values()))

    def pick(self, name: str | None = None) -> tuple[str, MoshiEngine]:
        """The voice called `name` (None or empty: the default) and its engine; UnknownVoice
        (a ValueError naming the voices) for a name this server does not offer."""
        if not name:
            return next(iter(self.engines.items()))
        if name not in self.engines:
            raise UnknownVoice(name, self.names)
        return name, self.engines[name]

    def __iter__(self) -> Iterator[MoshiEngine]:
        return iter(self.engines.values())

    def __len__(self) -> int:
        return len(self.engines)

    @property
    def active(self) -> int:
        return sum(engine.active for engine in self)

    def status(self) -> dict:
        """One voice: its engine's status, exactly. Several: the first voice's, with `sessions`,
        `queue` and `model_restarts` summed over the voices (so that a client that knows one voice
        reads the whole server), `unavailable` only while no voice admits anybody, and `voices`:
        each voice's own status, with its `name`."""
        if len(self) == 1:
            return self.default.status()
        each = [{"name": name, **engine.status()} for name, engine in self.engines.items()]
        reasons = [voice["unavailable"] for voice in each]
        first = {key: value for key, value in each[0].items() if key != "name"}
        return {
            **first,
            "sessions": {key: sum(voice["sessions"][key] for voice in each) for key in ("active", "capacity")},
            "queue": {key: sum(voice["queue"][key] for voice in each) for key in ("waiting", "places")},
            "unavailable": "; ".join(f"{v['name']}: {r}" for v, r in zip(each, reasons, strict=True))
                            if all(reasons) else None,
            "model_restarts": sum(voice["model_restarts"] for voice in each),
            "dropped_audio_frames": sum(voice["dropped_audio_frames"] for voice in each),
            "voices": each,
        }

    def close(self) -> None:
        for engine in self:
            engine.close()



def load_engine(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    sessions: int | str | AutoShare = AUTO,
    warmup_frames: int = WARMUP_FRAMES,
    gather_ms: float = 0.0,
    queue: int = QUEUE_PLACES,
    queue_timeout_s: float = QUEUE_TIMEOUT_S,
    weights: Weights | None = None,
    model_process: bool = True,
    context: int | None = None,
    min_step_ms: float = 0.0,
) -> MoshiEngine:
    """A warm engine with `sessions` conversation slots (or "auto", see `model.loading.choose_sessions`) over
    `weights`, or over the checkpoint `model` loaded on `device` (see `model.loading.load_weights`).

    One copy of the weights: the slots are the batch rows of one Mimi and one LMGen, all
    warmed up (and on CUDA graphed) before this returns. With `model_process` (the default on
    POSIX, unless `weights` are given: those live in this process) they are loaded and stepped
    in a process of their own (`model.process`), else by a thread of this one. `gather_ms` is the
    stepping policy (`model.batched.BatchedMoshi`); `queue` places wait at most `queue_timeout_s`
    each for a slot (`door.line.WaitingLine`). `context` is the LM's attention window in steps
    (default the checkpoint's; see `model.loading.load_weights`). `min_step_ms` makes every step
    last at least that long (tests and the benchmark: the tiny model as slow as a real one).
    """
    if model_process and weights is None and os.name == "posix":  # the child's pipe is an inherited fd
        slots = ModelProcess.start(model, device, sessions, warmup_frames, gather_ms, context, min_step_ms)
        info, default_sampling = slots.info, slots.default_sampling
    else:
        slots, info, default_sampling = load_slots(model, device, sessions, warmup_frames, gather_ms, weights,
                                                   context=context, min_step_ms=min_step_ms)
    freeze_garbage_collector()
    return MoshiEngine(info, slots, default_sampling, queue, queue_timeout_s)


def load_voices(
    models: str | list[str] = DEFAULT_MODEL,
    device: str = "auto",
    sessions: int | str = AUTO,
    **engine_options,
) -> Voices:
    """The voices of a comma-separated model list (`model.voices.parse_voices`: `moshiko`,
    `moshika`, ...; `NAME=MODEL` names one), each loaded by `load_engine` on the one `device`
    with `sessions` slots of its own, in order. One model is one voice, loaded exactly as
    `load_engine` loads it.

    With `sessions="auto"` on CUDA the voices share the GPU's free memory: each, in turn, takes
    its equal part of what is left once the weights of those still to load are set aside
    (estimated from their files), in slots of what one of its own slots measures
    (`model.sizing.AutoShare`). If one voice fails to load, those already loaded are closed.
    """
    voices = parse_voices(models)
    share = sessions == AUTO and len(voices) > 1 and pick_device(device).type == "cuda"
    engines: dict[str, MoshiEngine] = {}
    try:
        for index, voice in enumerate(voices):
            slots: int | str | AutoShare = sessions
            if share:
                later = voices[index + 1 :]
                slots = AutoShare(voices=len(voices) - index, reserve_bytes=sum(weights_bytes(v.model) for v in later))
            if len(voices) > 1:
                log.info("voice %s: loading %s", voice.name, voice.model)
            engines[voice.name] = load_engine(voice.model, device, slots, **engine_options)
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return Voices(engines)
