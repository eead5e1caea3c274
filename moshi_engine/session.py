"""A conversation on a leased slot of the batched Moshi, driven from asyncio.

    async with engine.session(sampling) as session:
        await session.send_pcm(pcm)          # float32 mono 24 kHz, any length
        async for out in session:            # AudioOut (1920 samples) / TextOut, in order
            ...

Input is cut into 80 ms frames and queued on the slot (bounded: a sender that
outpaces the model waits); the stepping thread steps them with the other rows'
frames; outputs are queued (bounded: a reader that cannot keep up loses its
oldest audio, never memory). Closing, also on error or cancellation, frees the
slot at once; its row is reset before anyone's next frame is stepped on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from .audio import FRAME_SIZE, check_pcm
from .conversation import (
    AudioOut,
    Output,
    OutputIteration,
    OutputQueue,
    Sampling,
    SessionClosed,
    SessionError,
    TextOut,
)
from .model.batched import BatchedMoshi, StepOutput
from .model.process import ModelProcess
from .watch.logs import conversation_context, current_conversation

log = logging.getLogger(__name__)

MAX_PENDING_FRAMES = 25  # 2 s of input waiting for the model
MAX_OUTPUT_FRAMES = 25  # 2 s of output waiting for its reader


class MoshiSession(OutputIteration):
    """One conversation bound to one slot until `close()`. Leases at construction
    (BusyError when every slot is taken); call it from the event loop."""

    def __init__(
        self,
        model: BatchedMoshi | ModelProcess,
        sampling: Sampling,
        max_pending_frames: int = MAX_PENDING_FRAMES,
        max_output_frames: int = MAX_OUTPUT_FRAMES,
        on_release: Callable[[MoshiSession], None] | None = None,
    ) -> None:
        self.sampling = sampling
        self._on_release = on_release
        self._model = model
        self._max_pending = max_pending_frames
        self._pending = 0  # frames submitted and not stepped yet
        self._room = asyncio.Event()
        self._outbox = OutputQueue(max_output_frames)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._closed = False
        self._failure: SessionError | None = None  # why the model ended it, if it did
        self.frames_in = 0
        self.frames_out = 0
        # The conversation it serves, for the log lines of what happens to it off its own tasks
        # (a step's outputs arrive from the model's thread); set by whoever leases it.
        self.conversation_id: str | None = current_conversation()
        self._lease = model.lease(sampling, self._deliver)

    @property
    def slot(self) -> int:
        """The batch row this conversation owns."""
        return self._lease.slot

    @property
    def dropped_frames(self) -> int:
        """Output audio frames dropped because the reader fell behind."""
        return self._outbox.dropped

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self) -> None:
        """Nothing to wait for: the slot's row is reset before its first frame is stepped."""
        if self._closed:
            raise SessionClosed("session is closed")

    async def send_pcm(self, pcm: np.ndarray) -> None:
        """Queue pcm (float32 mono 24 kHz, any length); waits while the model is behind."""
        check_pcm(pcm)
        self._buffer = np.concatenate([self._buffer, pcm])
        while self._buffer.size >= FRAME_SIZE:
            while self._pending >= self._max_pending and not self._closed:
                self._room.clear()
                await self._room.wait()
            if self._closed:
                # a sender learns why as its reader does: the model's error, if that ended it
                raise self._failure or SessionClosed("session is closed")
            frame, self._buffer = self._buffer[:FRAME_SIZE].copy(), self._buffer[FRAME_SIZE:]
            self._model.submit(self._lease, frame)
            self._pending += 1

    async def receive(self) -> Output:
        """The next output; raises SessionClosed once closed, SessionError if the model failed."""
        return await self._outbox.get()

    def _deliver(self, out: StepOutput | BaseException) -> None:
        """One stepped frame's output (on the event loop, from the stepping thread)."""
        if self._closed:
            return
        self._pending -= 1
        self._room.set()
        if isinstance(out, BaseException):
            with conversation_context(self.conversation_id):
                log.error("the step of slot %d failed: %r", self.slot, out)
            self._failure = SessionError(f"model error: {out}")
            self._outbox.end(self._failure)
            self.release()
            return
        self.frames_in += 1
        if out.pcm is not None:
            self.frames_out += 1
            self._outbox.put(AudioOut(out.pcm))
        if out.text:
            self._outbox.put(TextOut(out.text))

    def release(self) -> None:
        """Close at once, without awaiting (see `close`)."""
        if not self._closed:
            self._closed = True
            self._model.release(self._lease)
            self._outbox.end(SessionClosed("session closed"))
            self._room.set()  # wakes a sender waiting for room
            if self._on_release is not None:
                self._on_release(self)  # e.g. hands the slot to whoever waits for one

    async def close(self) -> None:
        """End the conversation and free the slot at once. Idempotent.

        The slot is free before this returns, so a client reconnecting right away is
        served; its row is reset before any next conversation's frame is stepped.
        """
        self.release()

    async def __aenter__(self) -> MoshiSession:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
