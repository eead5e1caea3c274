"""A conversation on a leased Moshi instance, driven from asyncio.

    async with engine.session(sampling) as session:
        await session.send_pcm(pcm)          # float32 mono 24 kHz, any length
        async for out in session:            # AudioOut (1920 samples) / TextOut, in order
            ...

Input is cut into 80 ms frames and queued (bounded: a sender that outpaces the
model waits); the instance's worker thread steps them; outputs are queued
(bounded: a reader that cannot keep up loses its oldest audio, never memory).
Closing, also on error or cancellation, resets the instance and returns it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from .audio import FRAME_SIZE, check_pcm
from .conversation import AudioOut, Output, OutputIteration, OutputQueue, Sampling, SessionClosed, SessionError, TextOut
from .model import MoshiInstance

log = logging.getLogger(__name__)

MAX_PENDING_FRAMES = 25  # 2 s of input waiting for the model
MAX_OUTPUT_FRAMES = 25  # 2 s of output waiting for its reader


class MoshiSession(OutputIteration):
    """One conversation bound to one instance until `close()`."""

    def __init__(
        self,
        instance: MoshiInstance,
        sampling: Sampling,
        release: Callable[[MoshiInstance], None],
        max_pending_frames: int = MAX_PENDING_FRAMES,
        max_output_frames: int = MAX_OUTPUT_FRAMES,
    ) -> None:
        self.instance = instance
        self.sampling = sampling
        self._release = release
        self._inbox: asyncio.Queue[np.ndarray] = asyncio.Queue(max_pending_frames)
        self._outbox = OutputQueue(max_output_frames)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._task: asyncio.Task | None = None
        self._closed: asyncio.Future | None = None
        self.frames_in = 0
        self.frames_out = 0

    @property
    def dropped_frames(self) -> int:
        """Output audio frames dropped because the reader fell behind."""
        return self._outbox.dropped

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def start(self) -> None:
        """Reset the instance for this conversation and start stepping queued frames."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.instance.executor, self.instance.begin, self.sampling)
        self._task = asyncio.create_task(self._infer(), name=f"moshi-infer-{self.instance.index}")

    async def send_pcm(self, pcm: np.ndarray) -> None:
        """Queue pcm (float32 mono 24 kHz, any length); waits while the model is behind."""
        check_pcm(pcm)
        self._buffer = np.concatenate([self._buffer, pcm])
        while self._buffer.size >= FRAME_SIZE:
            if self.closed:
                raise SessionClosed("session is closed")
            frame, self._buffer = self._buffer[:FRAME_SIZE].copy(), self._buffer[FRAME_SIZE:]
            await self._inbox.put(frame)

    async def receive(self) -> Output:
        """The next output; raises SessionClosed once closed, SessionError if the model failed."""
        return await self._outbox.get()

    async def _infer(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self._inbox.get()
                out = await loop.run_in_executor(self.instance.executor, self.instance.step, frame)
                self.frames_in += 1
                if out.pcm is not None:
                    self.frames_out += 1
                    self._outbox.put(AudioOut(out.pcm))
                if out.text:
                    self._outbox.put(TextOut(out.text))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("instance %d failed", self.instance.index)
            self._outbox.end(SessionError(f"model error: {error}"))

    async def close(self) -> None:
        """End the conversation; reset the instance and return it to the pool. Idempotent.

        The instance goes back to the pool at once, before any await, so it is never
        lost to a cancelled close and a client reconnecting right away is served. That
        is safe because its worker thread runs work in order: the reset queued here
        follows any step still running, and a next session's work follows the reset.
        """
        if self._closed is None:
            self._outbox.end(SessionClosed("session closed"))
            if self._task is not None:
                self._task.cancel()
            while not self._inbox.empty():  # wakes a sender waiting for room
                self._inbox.get_nowait()
            self._closed = asyncio.wrap_future(self.instance.executor.submit(self.instance.reset))
            self._release(self.instance)
        task, self._task = self._task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        try:
            await asyncio.shield(self._closed)
        except Exception:
            log.exception("resetting instance %d failed", self.instance.index)

    async def __aenter__(self) -> MoshiSession:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
