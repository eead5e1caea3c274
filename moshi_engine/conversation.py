"""What every conversation looks like to a transport, whatever runs the model.

A `MoshiSession` (a local instance) and a `RemoteSession` (a Moshi server over
a websocket) both satisfy `Conversation`, so the FastRTC handler and the
websocket loops are thin adapters that never know which one they drive. This
module is light on purpose: no torch, no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class BusyError(RuntimeError):
    """Every Moshi instance is in a conversation; try again when one ends."""


@dataclass(frozen=True)
class AudioOut:
    """A FRAME_SIZE pcm frame of Moshi's voice."""

    pcm: np.ndarray


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


class SessionError(RuntimeError):
    """The model failed during this session (the instance was reset and released)."""
