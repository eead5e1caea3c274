"""The waiting line: first come, first served places for conversations that find every slot taken.

    line = WaitingLine(places=8, timeout_s=120, capacity=slots, give_back=release)
    session = await line.wait(open_now, on_position)   # LineFull / LineTimeout (BusyError)

`open_now()` leases a slot or raises BusyError; `give_back(session)` releases one
that was handed to a waiter in the very moment it gave up. The owner of the slots calls
`line.freed()` each time one is released, before anything else can lease it, so
a freed slot goes to whoever waits longest and a newcomer never jumps the line.
Positions and an estimated wait are handed to each waiter's `on_position` when
the line moves. This module knows nothing of models or transports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..conversation import BusyError

log = logging.getLogger(__name__)

T = TypeVar("T")
QUEUE_PLACES = 8  # conversations that may wait for a slot, by default
QUEUE_TIMEOUT_S = 120.0  # how long each may wait, by default
DEFAULT_CONVERSATION_S = 120.0  # assumed length of a conversation before any has ended
RECENT_CONVERSATIONS = 20


class LineFull(BusyError):
    """Every slot is taken and every place in the line too."""


class LineTimeout(BusyError):
    """No slot freed up while this conversation waited as long as it may (`timeout_s`)."""

    def __init__(self, message: str, timeout_s: float) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s


@dataclass(frozen=True)
class LinePosition:
    """Where a waiting conversation stands: 1 is next; `eta_s` is a rough estimate."""

    position: int
    waiting: int
    eta_s: float

    def as_dict(self) -> dict:
        return {"position": self.position, "waiting": self.waiting, "eta_s": round(self.eta_s)}


@dataclass(eq=False)
class _Waiter(Generic[T]):
    open_now: Callable[[], T]
    on_position: Callable[[LinePosition], None] | None
    future: asyncio.Future
    joined: float


class WaitingLine(Generic[T]):
    """At most `places` conversations wait, each at most `timeout_s`, for one of `capacity` slots."""

    def __init__(self, places: int, timeout_s: float, capacity: int, give_back: Callable[[T], None]) -> None:
        if places < 0 or timeout_s <= 0:
            raise ValueError(f"places must be >= 0 and timeout_s > 0, got {places} and {timeout_s}")
        self.give_back = give_back
        self.places = places
        self.timeout_s = timeout_s
        self.capacity = capacity
        self._waiters: deque[_Waiter[T]] = deque()
        self._started: dict[int, float] = {}  # id of a running conversation -> when it started
        self._durations: deque[float] = deque(maxlen=RECENT_CONVERSATIONS)
        self._closed_reason: Exception | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def status(self) -> dict:
        return {"waiting": self.waiting, "places": self.places, "timeout_s": self.timeout_s}

    # ## Joining

    async def wait(self, open_now: Callable[[], T], on_position: Callable[[LinePosition], None] | None = None) -> T:
        """A slot from `open_now()`: at once if one is free and nobody waits, else after
        waiting in line. Raises LineFull at once when the line is full, LineTimeout after
        `timeout_s`; cancelling leaves the line."""
        if self._closed_reason is not None:
            raise self._closed_reason
        if not self._waiters:
            try:
                return open_now()
            except BusyError:
                pass
        if len(self._waiters) >= self.places:
            raise LineFull(f"all {self.capacity} conversation slots are taken and the waiting line is full "
                           f"({self.places} waiting); try again later")
        waiter = _Waiter(open_now, on_position, asyncio.get_running_loop().create_future(), time.monotonic())
        self._waiters.append(waiter)
        self._announce()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(waiter.future)
        except BaseException as error:
            # Timed out or cancelled (the person left the line), perhaps in the very moment
            # a slot was handed over: then nobody will use that slot, so it goes back.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.give_back(waiter.future.result())
            if isinstance(error, TimeoutError):
                raise LineTimeout(f"no conversation slot freed up in {self.timeout_s:g} s of waiting; "
                                  "try again later", self.timeout_s) from None
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._announce()
            waiter.future.cancel()

    # ## The slots' side

    def started(self, conversation: object) -> None:
        """A conversation got a slot (for the estimate of how long conversations last)."""
        self._started[id(conversation)] = time.monotonic()

    def freed(self, conversation: object) -> None:
        """`conversation` released its slot: hand the slot to whoever waits longest."""
        began = self._started.pop(id(conversation), None)
        if began is not None:
            self._durations.append(time.monotonic() - began)
        while self._waiters and self._closed_reason is None:
            waiter = self._waiters[0]
            if waiter.future.done():  # timed out or cancelled, not yet out of the line
                self._waiters.popleft()
                continue
            try:
                result = waiter.open_now()
            except BusyError:
                return  # not free after all (someone else's slot was released)
            self._waiters.popleft()
            waiter.future.set_result(result)
            self._announce()
            return

    def close(self, reason: Exception) -> None:
        """Stop admitting: every waiter and every later caller gets `reason` raised. Callable
        from any thread (the model's process may die while its server's loop is busy)."""
        self._closed_reason = reason
        for waiter in list(self._waiters):
            waiter.future.get_loop().call_soon_threadsafe(_fail, waiter.future, reason)

    def reopen(self, reason: Exception) -> None:
        """Admit again after `close(reason)` (the model is back); a line closed since for
        another reason (the server is restarting) stays closed. Callable from any thread."""
        if self._closed_reason is reason:
            self._closed_reason = None

    # ## Telling waiters where they stand

    def _announce(self) -> None:
        for index, waiter in enumerate(self._waiters):
            if waiter.on_position is not None and not waiter.future.done():
                try:
                    waiter.on_position(self.position(index + 1))
                except Exception:
                    log.exception("telling a waiter its place failed")

    def position(self, position: int) -> LinePosition:
        """Place `position` (1 is next) and its estimated wait: the slots free up as the running
        conversations end, each expected to last as long as recent ones did."""
        typical = sum(self._durations) / len(self._durations) if self._durations else DEFAULT_CONVERSATION_S
        now = time.monotonic()
        remaining = sorted(max(typical - (now - began), typical * 0.1) for began in self._started.values())
        rounds, index = divmod(position - 1, max(self.capacity, 1))
        first_free = remaining[index] if index < len(remaining) else 0.0
        return LinePosition(position, len(self._waiters), first_free + rounds * typical)


def _fail(future: asyncio.Future, reason: Exception) -> None:
    if not future.done():
        future.set_exception(reason)
