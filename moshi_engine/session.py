"""A conversation on a leased slot of the batched Moshi, driven from asyncio.

    async with engine.session(sampling) as session:
        await session.send_pcm(pcm)          # float32 mono 24 kHz, any length
        async for out in session:            # AudioOut (1920 samples) / TextOut, in order
            ...

Input is cut into 80 ms frames and queued on the slot; the stepping thread steps them with
the other rows' frames; outputs are queued (bounded: a reader that cannot keep up loses its
oldest audio, never memory). Closing, also on error or cancellation, frees the slot at once;
its row is reset before anyone's next frame is stepped on it.

Moshi answers what the visitor says now. Each frame has its place on the sender's clock
(`InputClock`): a sender that runs ahead of real time (a file sent as fast as the server takes
it) fills at most `MAX_WAITING_FRAMES` and then waits, and every frame is stepped; input that
falls more than `STALE_AFTER_S` behind real time (the backlog a network delivers at once
after an outage, or a model slower than real time) is dropped, oldest first, down to the
frame of the moment, so the lag is back to normal with the next step, whatever a step takes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from .audio import FRAME_SECONDS, FRAME_SIZE, check_pcm
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

MAX_WAITING_FRAMES = 25  # 2 s of input ahead of real time a sender may queue; then it waits
MAX_OUTPUT_FRAMES = 25  # 2 s of output waiting for its reader
# Frames handed to the model ahead of their step: with two, the next frame is there when a
# step ends (the hop back and forth costs no step), and at most two can no longer be dropped.
IN_FLIGHT_FRAMES = 2
# A frame further behind real time than this is stale. It bounds what a network hiccup may
# cost: a TCP retransmission after a lost packet holds the stream 0.2 to 0.3 s and then
# delivers it at once, which stays under the bound and loses nothing.
STALE_AFTER_S = 0.4
# Once input is stale, it is dropped down to the frames at most this far behind: back to the
# lag of a conversation that never fell behind.
CAUGHT_UP_S = FRAME_SECONDS
ANCHOR_WINDOW_S = 1.0  # how long input must flow at its new pace before the clock follows it
GAP_S = STALE_AFTER_S  # no input for this long: an outage, or a connection taken up again
PACE_FRAMES = 5  # ... after which these many frames at real-time pace set the clock (0.4 s)
PACE_SPREAD_S = 0.12  # real-time pace: their places in time this close, the jitter of a poor link included


class InputClock:
    """Where each input frame belongs in real time: frame i at `anchor + i * 80 ms`.

    The anchor is the first frame's arrival, and it only moves later, never earlier: to the
    earliest place any frame of the last ANCHOR_WINDOW_S had, once frames have flowed that
    long. So a sender ahead of real time (a file sent fast) is never behind; a stream that
    resumes after a gap in which its frames were lost (WebRTC drops what an outage holds) is
    on time again within a second; and a backlog that arrives at once (what TCP held during
    an outage) is as late as it is, since it arrives in less than the window.

    After a gap in arrivals (an outage, a resumed connection), PACE_FRAMES frames that arrive
    at real-time pace (their places within PACE_SPREAD_S of one another) are enough to follow
    the stream: a fresh one is on time again within half a second, while a backlog, whose frames
    come faster than real time, never looks steady until it is over.
    """

    def __init__(self, window_s: float = ANCHOR_WINDOW_S) -> None:
        self.window_s = window_s
        self.anchor: float | None = None
        self._recent: deque[tuple[float, float]] = deque()  # (arrival, arrival - index * frame)
        self._last_at: float | None = None
        self._since_gap: deque[float] | None = None  # the offsets of the frames since a gap, until steady

    def arrived(self, index: int, at: float) -> None:
        """Frame `index` of the stream arrived whole at `at` (time.perf_counter())."""
        offset = at - index * FRAME_SECONDS
        if self.anchor is None:
            self.anchor = offset
        recent = self._recent
        while recent and recent[0][0] < at - self.window_s:
            recent.popleft()
        recent.append((at, offset))
        if at - recent[0][0] >= self.window_s - FRAME_SECONDS:  # frames have flowed for the whole window
            self.anchor = max(self.anchor, min(offset for _, offset in recent))
        if self._last_at is not None and at - self._last_at > GAP_S:
            self._since_gap = deque(maxlen=PACE_FRAMES)
        self._last_at = at
        if self._since_gap is not None:
            self._since_gap.append(offset)
            if len(self._since_gap) == PACE_FRAMES and max(self._since_gap) - min(self._since_gap) <= PACE_SPREAD_S:
                self.anchor = max(self.anchor, min(self._since_gap))
                self._since_gap = None

    def due(self, index: int) -> float:
        """When frame `index` was due in real time (time.perf_counter())."""
        assert self.anchor is not None, "no frame has arrived"
        return self.anchor + index * FRAME_SECONDS

    def behind(self, index: int, now: float) -> float:
        """Seconds frame `index` is behind real time at `now` (negative: ahead)."""
        return now - self.due(index) if self.anchor is not None else 0.0


class MoshiSession(OutputIteration):
    """One conversation bound to one slot until `close()`. Leases at construction
    (BusyError when every slot is taken); call it from the event loop."""

    def __init__(
        self,
        model: BatchedMoshi | ModelProcess,
        sampling: Sampling,
        max_waiting_frames: int = MAX_WAITING_FRAMES,
        max_output_frames: int = MAX_OUTPUT_FRAMES,
        on_release: Callable[[MoshiSession], None] | None = None,
    ) -> None:
        self.sampling = sampling
        self._on_release = on_release
        self._model = model
        self._max_waiting = max_waiting_frames
        self._waiting: deque[tuple[int, np.ndarray, float]] = deque()  # (index, frame, arrival), not handed on
        self._in_flight: deque[int] = deque()  # indices of the frames handed to the model, not stepped yet
        self._room = asyncio.Event()
        self._outbox = OutputQueue(max_output_frames)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._clock = InputClock()
        self._closed = False
        self._failure: SessionError | None = None  # why the model ended it, if it did
        self.frames_received = 0  # whole input frames, stepped or not
        self.frames_in = 0  # input frames stepped
        self.frames_out = 0
        self.stale_frames = 0  # input frames dropped as too far behind real time
        self._catching_up = False  # input fell STALE_AFTER_S behind: dropping down to CAUGHT_UP_S
        # Told how many input frames were just dropped as stale (a metric's counter).
        self.on_stale: Callable[[int], None] | None = None
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
        """Queue pcm (float32 mono 24 kHz, any length). Waits while a sender ahead of real time
        has MAX_WAITING_FRAMES queued; input behind real time is dropped instead (see above)."""
        check_pcm(pcm)
        self._buffer = np.concatenate([self._buffer, pcm])
        while self._buffer.size >= FRAME_SIZE:
            if self._closed:
                # a sender learns why as its reader does: the model's error, if that ended it
                raise self._failure or SessionClosed("session is closed")
            frame, self._buffer = self._buffer[:FRAME_SIZE].copy(), self._buffer[FRAME_SIZE:]
            arrived = time.perf_counter()
            index = self.frames_received
            self.frames_received += 1
            self._clock.arrived(index, arrived)
            self._waiting.append((index, frame, arrived))
            self._hand_on()
            while len(self._waiting) >= self._max_waiting and not self._closed:
                self._room.clear()
                await self._room.wait()

    def _hand_on(self) -> None:
        """Drop what is stale, then hand the model what it may step next."""
        waiting = self._waiting
        now = time.perf_counter()
        if waiting and not self._catching_up and self._clock.behind(waiting[0][0], now) > STALE_AFTER_S:
            self._catching_up = True  # until a frame handed on is at most CAUGHT_UP_S behind
        if self._catching_up:
            # A backlog arrives a frame at a time: each drops those before it, down to the newest.
            dropped = 0
            while len(waiting) > 1 and self._clock.behind(waiting[0][0], now) > CAUGHT_UP_S:
                waiting.popleft()
                dropped += 1
            if dropped:
                self.stale_frames += dropped
                if self.on_stale is not None:
                    self.on_stale(dropped)
        # While catching up, one frame at a time: the next waits here, where it can still be dropped.
        while waiting and len(self._in_flight) < (1 if self._catching_up else IN_FLIGHT_FRAMES):
            index, frame, arrived = waiting.popleft()
            if self._clock.behind(index, now) <= CAUGHT_UP_S:
                self._catching_up = False  # what Moshi hears next is of the moment again
            self._model.submit(self._lease, frame, arrived)
            self._in_flight.append(index)
        if len(waiting) < self._max_waiting:
            self._room.set()

    def clear_outputs(self) -> int:
        """Drop every output not read yet (audio for a connection that could not take it);
        returns how many audio frames went."""
        return self._outbox.clear()

    async def receive(self) -> Output:
        """The next output; raises SessionClosed once closed, SessionError if the model failed."""
        return await self._outbox.get()

    def _deliver(self, out: StepOutput | BaseException) -> None:
        """One stepped frame's output (on the event loop, from the stepping thread)."""
        if self._closed:
            return
        if isinstance(out, BaseException):
            # also with nothing in flight: a model process that stops ends every conversation on it
            with conversation_context(self.conversation_id):
                log.error("the step of slot %d failed: %r", self.slot, out)
            self._failure = SessionError(f"model error: {out}")
            self._outbox.end(self._failure)
            self.release()
            return
        index = self._in_flight.popleft()
        self._hand_on()
        self.frames_in += 1
        if out.pcm is not None:
            self.frames_out += 1
            self._outbox.put(AudioOut(out.pcm, self._clock.due(index)))
        if out.text:
            self._outbox.put(TextOut(out.text))

    def release(self) -> None:
        """Close at once, without awaiting (see `close`)."""
        if not self._closed:
            self._closed = True
            self._model.release(self._lease)
            self._waiting.clear()
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
