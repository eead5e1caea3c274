"""One websocket conversation's loops, as QuiLLMan runs them: while it waits in line (`Waiting`:
its audio read and dropped, its place told), then over its slot (`Connection`: receive, send and
a watchdog for the session and idle limits), and how it ends (a close code, a reason, and which
of `watch.metrics.ENDINGS`). `server.MoshiServer` admits each connection and runs these."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..conversation import AudioOut, ServerRestarting, SessionError, SessionLimits
from ..door.line import LinePosition
from ..session import MoshiSession
from ..timings import OPUS_DECODE, OPUS_ENCODE, StageTimings
from ..watch.metrics import CLIENT_GONE, ERROR, IDLE, LIMIT, NORMAL, RESTART, ConversationClock
from .codec import OpusDecoder, OpusEncoder, OpusError
from .protocol import (
    HANDSHAKE,
    CloseCode,
    ConnectionClose,
    Protocol,
    ProtocolError,
    audio_message,
    client_audio,
    idle_reason,
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
    """The session limit or the idle limit ended the conversation (`ending` says which)."""

    def __init__(self, ending: str, code: CloseCode, reason: str) -> None:
        super().__init__(code, reason)
        self.ending = ending


class Connection:
    """The receive / send / watchdog tasks of one websocket over one session."""

    def __init__(self, ws: WebSocket, protocol: Protocol, session: MoshiSession, limits: SessionLimits,
                 timings: StageTimings, clock: ConversationClock, announce: bool = False,
                 carried: list[bytes] | None = None) -> None:
        self.ws = ws
        self.clock = clock  # its times, counted and logged at its end
        self.announce = announce  # it reads our metadata: tell it its conversation's id
        self.ending: str | None = None  # how it ended (`metrics.ENDINGS`), once it has
        self.carried = carried or []  # the client's first audio, read while its wait was ending
        self.protocol = protocol
        self.session = session
        self.limits = limits
        self.timings = timings
        self.decoder = OpusDecoder()
        self.encoder = OpusEncoder()
        self.started = self.last_audio = time.monotonic()
        self._ended: asyncio.Future[ConnectionClose] = asyncio.get_running_loop().create_future()

    def end(self, code: CloseCode, reason: str) -> None:
        """End the conversation from outside (the server is restarting) with this close."""
        if not self._ended.done():
            self._ended.set_result(ConnectionClose(code, reason))

    async def run(self) -> tuple[CloseCode | None, str]:
        """Run until something ends the conversation; returns the close code and reason
        (code None when the client is already gone), and sets how it ended (`ending`)."""
        tasks: list[asyncio.Task] = []
        self.ending = None  # stays None if cancelled: the server is going away
        try:
            await self.session.start()
            if self.protocol is Protocol.MOSHI:
                await self._send(HANDSHAKE)
            if self.announce:  # a client that reads metadata learns the conversation's id
                await self._send(metadata_message({"conversation": {"id": self.clock.id, "voice": self.clock.voice}}))
            self.started = self.last_audio = time.monotonic()
            tasks = [asyncio.create_task(coro) for coro in (self._receive(), self._send_outputs(), self._watch(),
                                                             self._until_ended())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            error = next(iter(done)).exception()
            receiving = tasks[0]
            if isinstance(error, ClientGone) and error.code is None and not receiving.done():
                # A send found the client gone: its close frame, if it sent one, is the receiver's to read.
                await asyncio.wait({receiving}, timeout=CLOSE_READ_S)
                if receiving.done() and isinstance(receiving.exception(), ClientGone):
                    error = receiving.exception()
            raise error or ConnectionClose(CloseCode.NORMAL, "conversation ended")
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
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self) -> None:
        for ogg in self.carried:
            await self._take(ogg)
        while True:
            await self._take(await receive_ogg(self.ws, self.protocol))

    async def _take(self, ogg: bytes) -> None:
        """One message's Ogg Opus into the session."""
        if ogg:
            started = time.perf_counter()
            try:
                pcm = self.decoder.decode(ogg)
            except OpusError as error:
                raise ProtocolError(CloseCode.INVALID_PAYLOAD, str(error)) from None
            self.timings.record(OPUS_DECODE, time.perf_counter() - started)
            if pcm.size:
                self.last_audio = time.monotonic()
                self.clock.heard()
                await self.session.send_pcm(pcm)

    async def _send_outputs(self) -> None:
        while True:
            out = await self.session.receive()
            if isinstance(out, AudioOut):
                started = time.perf_counter()
                ogg = self.encoder.encode(out.pcm)
                self.timings.record(OPUS_ENCODE, time.perf_counter() - started)
                if ogg:
                    await self._send(audio_message(ogg))
                self.clock.answered()
            else:
                await self._send(text_message(out.text))

    async def _until_ended(self) -> None:
        raise await self._ended

    async def _watch(self) -> None:
        """Sleeps until the next deadline (session length or idle), then checks it."""
        limits = self.limits
        while True:
            now = time.monotonic()
            if now - self.started >= limits.max_session_s:
                raise Limit(LIMIT, CloseCode.NORMAL, time_limit_reason(limits.max_session_s))
            if now - self.last_audio >= limits.idle_s:
                raise Limit(IDLE, CloseCode.POLICY_VIOLATION, idle_reason(limits.idle_s))
            await asyncio.sleep(min(self.started + limits.max_session_s, self.last_audio + limits.idle_s) - now)

    async def _send(self, data: bytes) -> None:
        await send_websocket(self.ws, data)


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


