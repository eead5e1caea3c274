"""What every conversation looks like to a transport, whatever runs the model.

A `MoshiSession` (a slot of the local engine) and a `RemoteSession` (a Moshi server over
a websocket) both satisfy `Conversation`, so the FastRTC handler and the
websocket loops are thin adapters that never know which one they drive. This
module is light on purpose: no torch, no model.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Protocol

import numpy as np

# A conversation whose connection brought nothing for this long is interrupted (an outage, a
# handover): its grace runs, and a resume token may take it up on a new connection. Every
# client streams its microphone without pause, so a working connection is never this quiet.
INTERRUPTED_AFTER_S = 1.5


@dataclass(frozen=True)
class SessionLimits:
    """How long one conversation may last, how long it may go without audio, and how long its
    slot is kept for it once its connection is interrupted (`reconnect_grace_s`, counted from
    the interruption: an outage or a handover up to that long ends nothing); the websocket
    server and the WebRTC page both end conversations by these."""

    max_session_s: float = 600.0
    idle_s: float = 30.0
    reconnect_grace_s: float = 15.0


class BusyError(RuntimeError):
    """Every conversation slot is taken; try again when one ends."""


@dataclass(frozen=True)
class Sampling:
    """How a session samples; LMGen's defaults unless the checkpoint or the user says otherwise.

    `seed` makes a session reproducible: the same seed and the same input give the
    same output, whatever ran before on its slot and whoever shares its steps (each
    slot samples with its own generator; see `model.rowsampling`). `text_seed` and
    `audio_seed` (moshi's web client sends both) seed the text and the audio tokens'
    draws each with a generator of its own instead; one left unset is random. A session
    gives `seed` or those two, not both.
    """

    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25
    seed: int | None = None
    text_seed: int | None = None
    audio_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temp", "temp_text"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 10.0):
                raise ValueError(f"{name} must be a number in [0, 10], got {value!r}")
        for name in ("top_k", "top_k_text"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("seed", "text_seed", "audio_seed"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < 2**63):
                raise ValueError(f"{name} must be an integer in [0, 2**63) or None, got {value!r}")
        if self.seed is not None and self.split_seeds:
            raise ValueError("give seed, or text_seed / audio_seed, not both")

    @property
    def split_seeds(self) -> bool:
        """Whether the text and the audio tokens draw from generators of their own."""
        return self.text_seed is not None or self.audio_seed is not None

    @classmethod
    def from_config(cls, lm_gen_config: dict) -> Sampling:
        """The sampling keys of a checkpoint's `lm_gen_config` over LMGen's defaults."""
        names = {field.name for field in fields(cls)} - {"seed", "text_seed", "audio_seed"}
        return cls(**{key: value for key, value in lm_gen_config.items() if key in names})

    def updated(self, **changes: object) -> Sampling:
        """A copy with the given fields changed (None values are ignored)."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


@dataclass(frozen=True)
class AudioOut:
    """A FRAME_SIZE pcm frame of Moshi's voice. `due`: when the visitor's frame it answers was
    due on the visitor's clock (time.perf_counter(); a local session sets it), so that how late
    the answer leaves is now - due, whatever input was dropped on the way."""

    pcm: np.ndarray
    due: float | None = None


@dataclass(frozen=True)
class TextOut:
    """A detokenised text piece of what Moshi says (leading space marks a word start)."""

    text: str


Output = AudioOut | TextOut


class Conversation(Protocol):
    """A started conversation: pcm in (float32 mono 24 kHz, any length), outputs out in order."""

    async def start(self) -> None: ...

    async def send_pcm(self, pcm: np.ndarray) -> None: ...

    async def receive(self) -> Output: ...

    async def close(self) -> None: ...


class SessionClosed(Exception):
    """The session ended; no more outputs will come."""


class OutputIteration:
    """`async for out in conversation:` takes outputs until the conversation closes."""

    async def receive(self) -> Output:
        raise NotImplementedError

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        try:
            return await self.receive()
        except SessionClosed:
            raise StopAsyncIteration from None


class ServerRestarting(SessionClosed):
    """The server is restarting (a redeploy, a scale-down, Ctrl+C): connect again in a minute."""


class ModelRestarting(ServerRestarting):
    """The model's process died and another is starting: connect again in a minute."""


class SessionError(RuntimeError):
    """The model failed during this session (its slot was released and is reset)."""


class OutputQueue:
    """Ordered outputs, at most `max_frames` of each kind: past that the oldest output of
    the same kind is dropped, so a reader that falls behind costs frames, never memory."""

    def __init__(self, max_frames: int) -> None:
        self._items: deque[Output] = deque()
        self._counts = {AudioOut: 0, TextOut: 0}
        self._max = max_frames
        self._ready = asyncio.Event()
        self._end: BaseException | None = None
        self.dropped = 0  # audio frames
        self.dropped_texts = 0

    def put(self, item: Output) -> None:
        kind = type(item)
        if self._counts[kind] >= self._max:
            del self._items[next(i for i, queued in enumerate(self._items) if type(queued) is kind)]
            self._counts[kind] -= 1
            if kind is AudioOut:
                self.dropped += 1
            else:
                self.dropped_texts += 1
        self._counts[kind] += 1
        self._items.append(item)
        self._ready.set()

    def clear(self) -> int:
        """Drop every output queued (counted as dropped); returns how many audio frames went."""
        audio = self._counts[AudioOut]
        self.dropped += audio
        self.dropped_texts += self._counts[TextOut]
        self._items.clear()
        self._counts = {AudioOut: 0, TextOut: 0}
        return audio

    def end(self, reason: BaseException) -> None:
        if self._end is None:
            self._end = reason
        self._ready.set()

    async def get(self) -> Output:
        while not self._items:
            if self._end is not None:
                raise self._end
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self._counts[type(item)] -= 1
        return item
