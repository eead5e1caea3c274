"""One websocket conversation's loops, as QuiLLMan runs them: while it waits in line (`Waiting`:
its audio read and dropped, its place told), then over its slot (`Connection`: receive, send and
a watchdog for the session and idle limits and the reconnect grace, over one websocket after
another when the client resumes it with its token), and how it ends (a close code, a reason,
and which of `watch.metrics.ENDINGS`). `server.MoshiServer` admits each connection and runs these."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..conversation import INTERRUPTED_AFTER_S, AudioOut, ServerRestarting, SessionError, SessionLimits
from ..door.line import LinePosition
from ..session import MoshiSession
from ..timings import OPUS_DECODE, OPUS_ENCODE, StageTimings
from ..watch.metrics import (
    CLIENT_GONE,
    ERROR,
    IDLE,
    LIMIT,
    NORMAL,
    RECOVERED,
    RESTART,
    RESUMED,
    ConversationClock,
)
from .codec import OpusDecoder, OpusEncoder, OpusError
from .protocol import (
    HANDSHAKE,
    RESUMED_ELSEWHERE,
    CloseCode,
    ConnectionClose,
    Protocol,
    ProtocolError,
    audio_message,
    client_audio,
    idle_reason,
    lost_reason,
    metadata_message,
    text_message,
    time_limit_reason,
)

log = logging.getLogger(__name__)

RESTART_REASON = "the server is restarting; connect again in a minute"
CLOSE_READ_S = 0.5  # how long a connection whose send failed waits to read why the client left


class ClientGone(Exception):
    """The client disconnected; nothing is left to tell it."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(code)
        self.code = code  # the close code it sent (1000, 1001: it hung up cleanly), None if it dropped

    @property
    def cleanly(self) -> bool:
        return self.code in (CloseCode.NORMAL, CloseCode.GOING_AWAY)


class Waiting:
    """A connection in the waiting line: acquiring a slot while dropping what the client sends,
    and telling it where it stands."""

    def __init__(self, ws: WebSocket, protocol: Protocol, announce: bool) -> None:
        self.ws = ws
        self.protocol = protocol
        self.announce = announce
        self._positions: asyncio.Queue[LinePosition] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._cancelled: str | None = None
        # What the client sent after its slot came and before this stopped reading: its
        # conversation's first audio, not audio of its wait.
        self.carried: list[bytes] = []

    async def run(self, acquire) -> MoshiSession:
        acquiring = asyncio.ensure_future(acquire(self._positions.put_nowait if self.announce else None))
        others = [asyncio.create_task(self._drop_input())]
        if self.announce:
            others.append(asyncio.create_task(self._send_positions()))
        self._task = acquiring
        try:
            await asyncio.wait({acquiring, *others}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        if not acquiring.done():  # the client left, or broke the protocol, while waiting
            acquiring.cancel()
            await asyncio.gather(acquiring, return_exceptions=True)
            raise next(task.exception() for task in others if task.done() and task.exception())
        if acquiring.cancelled():
            raise ConnectionClose(CloseCode.SERVICE_RESTART, self._cancelled or RESTART_REASON)
        if isinstance(acquiring.exception(), ServerRestarting):
            raise ConnectionClose(CloseCode.SERVICE_RESTART, str(acquiring.exception()))
        return acquiring.result()

    def cancel(self, reason: str) -> None:
        self._cancelled = reason
        if self._task is not None:
            self._task.cancel()

    async def _drop_input(self) -> None:
        while True:
            ogg = await receive_ogg(self.ws, self.protocol)  # checked, then dropped while waiting
            if self._task is not None and self._task.done():
                self.carried.append(ogg)

    async def _send_positions(self) -> None:
        while True:
            position = await self._positions.get()
            await send_websocket(self.ws, metadata_message({"queue": position.as_dict()}))


class Limit(ConnectionClose):
    """The session limit, the idle limit or the reconnect grace ended the conversation (`ending`
    says which)."""

    def __init__(self, ending: str, code: CloseCode, reason: str) -> None:
        super().__init__(code, reason)
        self.ending = ending


class Leg:
    """One websocket of a conversation (the one that opened it, or one that resumed it), with
    its own Ogg streams both ways: a client that reconnects starts new ones."""

    def __init__(self, ws: WebSocket, protocol: Protocol, carried: list[bytes] | None = None) -> None:
        self.ws = ws
        self.protocol = protocol  # a client may resume over either path
        self.carried = carried or []  # the client's first audio, read while its wait was ending
        self.decoder = OpusDecoder()
        self.encoder = OpusEncoder()
        self.last_input = time.monotonic()
        self.broken = False  # it dropped without a close frame: the client may come back
        self.released = asyncio.Event()  # the conversation is done with it (and has closed it)
        self.closing: asyncio.Future | None = None  # its close, while it is sent


class Connection:
    """One websocket conversation over one session: receive / send tasks over its current leg,
    a watchdog for the session limit, the idle limit and the reconnect grace, and the legs that
    take it up with a resume token when its connection breaks (`take_over`). It is
    `door.resume.Resumable`: a token resumes it while its connection is interrupted."""

    def __init__(self, ws: WebSocket, protocol: Protocol, session: MoshiSession, limits: SessionLimits,
                 timings: StageTimings, clock: ConversationClock, announce: bool = False,
                 carried: list[bytes] | None = None, resume_token: str | None = None) -> None:
        self.leg = Leg(ws, protocol, carried)
        self.clock = clock  # its times, counted and logged at its end
        self.announce = announce  # it reads our metadata: tell it its conversation's id (and resume token)
        self.resume_token = resume_token  # the first leg's; each resume brings the next
        self.ending: str | None = None  # how it ended (`metrics.ENDINGS`), once it has
        self.protocol = protocol
        self.session = session
        self.limits = limits
        self.timings = timings
        self.started = self.last_audio = time.monotonic()
        self.finished = False
        self._ended: asyncio.Future[ConnectionClose] = asyncio.get_running_loop().create_future()
        self._arrivals: asyncio.Queue[tuple[Leg, str | None]] = asyncio.Queue()

    @property
    def ws(self) -> WebSocket:
        return self.leg.ws

    def end(self, code: CloseCode, reason: str) -> None:
        """End the conversation from outside (the server is restarting) with this close."""
        if not self._ended.done():
            self._ended.set_result(ConnectionClose(code, reason))

    def refusal(self) -> str | None:
        """Why a resume token cannot take this conversation up now, else None. It can until the
        conversation ends, also while its connection still seems to work: only its client holds
        the token, and a client that comes back on a new connection has given the old one up,
        which may yet deliver what it held (a socket closed during an outage sends its backlog
        once the link returns). The old connection is then closed as RESUMED_ELSEWHERE."""
        if self.finished:
            return "that conversation has ended; start a new one"
        return None

    async def take_over(self, ws: WebSocket, protocol: Protocol, next_token: str | None) -> None:
        """Carry the conversation on `ws` (speaking `protocol`) from now on: a client that resumed
        it, whose next resume token is `next_token`. Returns once the conversation is done with
        `ws`, which it has closed by then."""
        leg = Leg(ws, protocol)
        if self.finished:
            await close_websocket(ws, CloseCode.POLICY_VIOLATION, "that conversation has ended; start a new one")
            return
        await self._arrivals.put((leg, next_token))
        await leg.released.wait()

    async def run(self) -> tuple[CloseCode | None, str]:
        """Run until something ends the conversation; returns the close code and reason
        (code None when the client is already gone), and sets how it ended (`ending`). The
        legs it let go of on the way are closed and released; the last one is the caller's."""
        watchers: list[asyncio.Task] = []
        leg_task: asyncio.Task | None = None
        self.ending = None  # stays None if cancelled: the server is going away
        try:
            await self.session.start()
            await self._greet(self.leg, self.resume_token)
            self.started = self.last_audio = self.leg.last_input = time.monotonic()
            watchers = [asyncio.create_task(self._watch()), asyncio.create_task(self._until_ended())]
            while True:
                leg = self.leg
                leg_task = asyncio.create_task(self._run_leg(leg))
                arrival = asyncio.create_task(self._arrivals.get())
                await asyncio.wait({leg_task, arrival, *watchers}, return_when=asyncio.FIRST_COMPLETED)
                if not arrival.done() and leg_task.done() and _dropped(leg_task) and self.resume_token is not None:
                    # the connection broke, and its client holds a resume token: its grace runs until
                    # a resume comes (or a watcher ends it). One without a token cannot come back.
                    leg.broken = True
                    self.clock.interrupted()
                    self._let_go(leg, None, "connection lost")
                    await asyncio.wait({arrival, *watchers}, return_when=asyncio.FIRST_COMPLETED)
                if arrival.done():
                    leg_task.cancel()
                    await asyncio.gather(leg_task, return_exceptions=True)
                    if leg is self.leg and not leg.released.is_set():
                        self._let_go(leg, CloseCode.NORMAL, RESUMED_ELSEWHERE)
                    await self._switch_to(*arrival.result())
                    continue
                arrival.cancel()
                # a watcher's ending first (after a dropped leg, the grace's), else the leg's failure
                done = next(task for task in (*watchers, leg_task) if task.done())
                raise done.exception() or ConnectionClose(CloseCode.NORMAL, "conversation ended")
        except ClientGone as gone:
            self.ending = NORMAL if gone.cleanly else CLIENT_GONE
            return None, "client disconnected" if gone.cleanly else "connection lost"
        except Limit as limit:
            self.ending = limit.ending
            return limit.code, limit.reason
        except ConnectionClose as close:  # the server restarting, or the client broke the protocol
            self.ending = {CloseCode.SERVICE_RESTART: RESTART, CloseCode.NORMAL: NORMAL}.get(close.code, ERROR)
            return close.code, close.reason
        except SessionError as error:
            self.ending = ERROR
            return CloseCode.INTERNAL_ERROR, str(error)
        except Exception:
            self.ending = ERROR
            log.exception("connection failed")
            return CloseCode.INTERNAL_ERROR, "internal error"
        finally:
            self.finished = True
            for task in [*watchers, *([leg_task] if leg_task else [])]:
                task.cancel()
            await asyncio.gather(*watchers, *([leg_task] if leg_task else []), return_exceptions=True)
            while not self._arrivals.empty():  # resumes that came too late
                late, _ = self._arrivals.get_nowait()
                self._let_go(late, CloseCode.POLICY_VIOLATION, "that conversation has ended; start a new one")

    async def release_last(self, code: CloseCode | None, reason: str) -> None:
        """Close and release the conversation's last leg (the caller of `run` does, at the end)."""
        await self._let_go(self.leg, code, reason)

    def _let_go(self, leg: Leg, code: CloseCode | None, reason: str) -> asyncio.Future:
        """Close `leg`'s websocket with `code` (None: the client is gone) and release it."""

        async def close() -> None:
            try:
                if code is not None:
                    await close_websocket(leg.ws, code, reason)
            finally:
                leg.released.set()

        if leg.closing is None:
            leg.closing = asyncio.ensure_future(close())
        return leg.closing

    async def _greet(self, leg: Leg, token: str | None) -> None:
        """What a websocket hears first: the handshake (moshi's protocol), and, for a client that
        reads metadata, the conversation's id and the token that resumes it."""
        if leg.protocol is Protocol.MOSHI:
            await send_websocket(leg.ws, HANDSHAKE)
        if self.announce:
            about = {"id": self.clock.id, "voice": self.clock.voice}
            if token is not None:
                about["resume"] = token
            await send_websocket(leg.ws, metadata_message({"conversation": about}))

    async def _switch_to(self, leg: Leg, token: str | None) -> None:
        """A resume took the conversation up on `leg`: what was queued for the old connection is
        dropped (it is stale), the new one is greeted, and the conversation goes on there."""
        self.leg = leg
        self.session.clear_outputs()
        leg.last_input = time.monotonic()
        self.clock.reconnected(RESUMED)
        try:
            await self._greet(leg, token)
        except ClientGone:
            leg.broken = True  # the run loop finds it gone at once

    async def _run_leg(self, leg: Leg) -> None:
        """Receive and send over `leg` until one of them fails (the first failure is raised)."""
        tasks = [asyncio.create_task(self._receive(leg)), asyncio.create_task(self._send_outputs(leg))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            error = next(iter(done)).exception()
            receiving = tasks[0]
            if isinstance(error, ClientGone) and error.code is None and not receiving.done():
                # A send found the client gone: its close frame, if it sent one, is the receiver's to read.
                await asyncio.wait({receiving}, timeout=CLOSE_READ_S)
                if receiving.done() and isinstance(receiving.exception(), ClientGone):
                    error = receiving.exception()
            raise error or ConnectionClose(CloseCode.NORMAL, "conversation ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, leg: Leg) -> None:
        for ogg in leg.carried:
            await self._take(leg, ogg)
        while True:
            await self._take(leg, await receive_ogg(leg.ws, leg.protocol))

    async def _take(self, leg: Leg, ogg: bytes) -> None:
        """One message's Ogg Opus into the session."""
        leg.last_input = time.monotonic()
        if self.clock.interrupted_at is not None and leg is self.leg:
            self.clock.reconnected(RECOVERED)  # the same connection came back by itself
        if ogg:
            started = time.perf_counter()
            try:
                pcm = leg.decoder.decode(ogg)
            except OpusError as error:
                raise ProtocolError(CloseCode.INVALID_PAYLOAD, str(error)) from None
            self.timings.record(OPUS_DECODE, time.perf_counter() - started)
            if pcm.size:
                self.last_audio = time.monotonic()
                self.clock.heard()
                await self.session.send_pcm(pcm)

    async def _send_outputs(self, leg: Leg) -> None:
        while True:
            out = await self.session.receive()
            if isinstance(out, AudioOut):
                started = time.perf_counter()
                ogg = leg.encoder.encode(out.pcm)
                self.timings.record(OPUS_ENCODE, time.perf_counter() - started)
                if ogg:
                    await send_websocket(leg.ws, audio_message(ogg))
                self.clock.answered(out.due)
            else:
                await send_websocket(leg.ws, text_message(out.text))

    async def _until_ended(self) -> None:
        raise await self._ended

    async def _watch(self) -> None:
        """Sleeps until the next deadline (session length, idle, the connection going quiet, the
        end of its grace), then checks it."""
        limits = self.limits
        clock = self.clock
        while True:
            now = time.monotonic()
            if now - self.started >= limits.max_session_s:
                raise Limit(LIMIT, CloseCode.NORMAL, time_limit_reason(limits.max_session_s))
            if now - self.last_audio >= limits.idle_s:
                raise Limit(IDLE, CloseCode.POLICY_VIOLATION, idle_reason(limits.idle_s))
            quiet_since = self.leg.last_input
            if clock.interrupted_at is None and (self.leg.broken or now - quiet_since >= INTERRUPTED_AFTER_S):
                clock.interrupted()
            if clock.interrupted_at is not None and now - clock.interrupted_at >= limits.reconnect_grace_s:
                raise Limit(CLIENT_GONE, CloseCode.POLICY_VIOLATION, lost_reason(limits.reconnect_grace_s))
            deadlines = [self.started + limits.max_session_s, self.last_audio + limits.idle_s]
            if clock.interrupted_at is None:
                deadlines.append(quiet_since + INTERRUPTED_AFTER_S)
            else:  # and look again soon: the connection may come back, and then go quiet again
                deadlines += [clock.interrupted_at + limits.reconnect_grace_s, now + INTERRUPTED_AFTER_S]
            await asyncio.sleep(max(0.0, min(deadlines) - now) + 0.001)


def _dropped(task: asyncio.Task) -> bool:
    """Whether a leg's task ended with its connection dropped (no close frame): resumable."""
    error = None if task.cancelled() else task.exception()
    return isinstance(error, ClientGone) and not error.cleanly


async def receive_ogg(ws: WebSocket, protocol: Protocol) -> bytes:
    """The Ogg Opus bytes of the client's next message (possibly empty); ClientGone when it has
    hung up, ProtocolError when the message breaks the protocol."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise ClientGone(message.get("code"))
    if message.get("text") is not None:
        raise ProtocolError(CloseCode.UNSUPPORTED_DATA, "text frames are not part of the protocol; send Opus")
    return client_audio(protocol, message.get("bytes") or b"")


async def send_websocket(ws: WebSocket, data: bytes) -> None:
    try:
        await ws.send_bytes(data)
    except (WebSocketDisconnect, OSError):
        raise ClientGone from None
    except RuntimeError:
        if ws.application_state == WebSocketState.DISCONNECTED:
            raise ClientGone from None
        raise


async def close_websocket(ws: WebSocket, code: int, reason: str) -> None:
    if ws.application_state == WebSocketState.DISCONNECTED:
        return
    try:
        # a close reason must fit in 123 bytes of UTF-8
        await ws.close(code=int(code), reason=reason.encode()[:120].decode(errors="ignore"))
    except (RuntimeError, OSError):
        pass  # the client went away first


