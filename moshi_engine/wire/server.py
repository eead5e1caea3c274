"""The FastAPI app: `/status`, and the Opus websockets `/ws` (QuiLLMan's) and `/api/chat` (moshi's).

Each connection leases one conversation slot and runs three tasks over it, as
QuiLLMan does: receive (bytes -> Opus decode -> session), inference (the
session's worker thread) and send (frames -> Opus encode -> websocket; text ->
websocket), plus a watchdog for the session and idle limits. They wait on
queues and events, never poll. Whatever ends a connection, its slot is
released (and reset) before the close frame goes out, and nothing else notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..conversation import AudioOut, BusyError, ServerRestarting, SessionError, SessionLimits
from ..door.access import TokenGate
from ..door.line import LinePosition
from ..engine import MoshiEngine, Voices
from ..model.voices import UnknownVoice
from ..session import MoshiSession
from ..timings import OPUS_DECODE, OPUS_ENCODE, StageTimings
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
    parse_sampling_query,
    text_message,
    time_limit_reason,
)

log = logging.getLogger(__name__)


RESTART_REASON = "the server is restarting; connect again in a minute"


class _ClientGone(Exception):
    """The client disconnected; nothing is left to tell it."""


class MoshiServer:
    """The state behind the routes: the voices (None while they load), the live connections
    and counters."""

    def __init__(self, voices: Voices | MoshiEngine | None, limits: SessionLimits) -> None:
        self.voices = Voices.of(voices) if voices is not None else None
        self.limits = limits
        self.connections_served = 0
        self.restarting: str | None = None  # why new conversations are refused, once draining
        self._dropped_in_closed_sessions = 0
        self._live: dict[MoshiSession, _Connection] = {}
        self._waiting: set[asyncio.Task] = set()

    @property
    def engine(self) -> MoshiEngine | None:
        """The default voice's engine (None while loading)."""
        return self.voices.default if self.voices is not None else None

    @engine.setter
    def engine(self, engine: Voices | MoshiEngine | None) -> None:
        self.voices = Voices.of(engine) if engine is not None else None

    @property
    def dropped_audio_frames(self) -> int:
        """Outgoing audio frames dropped because a client could not keep up."""
        return self._dropped_in_closed_sessions + sum(s.dropped_frames for s in self._live)

    def status(self) -> tuple[int, dict]:
        if self.voices is None:
            return 503, {"status": "loading"}
        engine = self.voices.status()
        return 503 if engine["unavailable"] else 200, {
            "status": "restarting" if self.restarting else "unavailable" if engine["unavailable"] else "ready",
            **engine,
            "dropped_audio_frames": self.dropped_audio_frames,
            "connections_served": self.connections_served,
            "limits": {"max_session_s": self.limits.max_session_s, "idle_s": self.limits.idle_s},
        }

    def drain(self, reason: str = RESTART_REASON) -> None:
        """Stop admitting and end every live and waiting conversation, telling each `reason`
        (close 1012). Each connection's slot is released as it ends."""
        self.restarting = reason
        for engine in self.voices or ():
            engine.line.close(ServerRestarting(reason))  # nobody gets a slot any more
        for connection in list(self._live.values()):
            connection.end(CloseCode.SERVICE_RESTART, reason)
        for waiting in list(self._waiting):
            waiting.cancel(reason)

    @property
    def connections(self) -> int:
        """Websocket conversations open or waiting."""
        return len(self._live) + len(self._waiting)

    async def serve(self, ws: WebSocket, protocol: Protocol) -> None:
        """One websocket conversation, from accept to close: in line while every slot is taken."""
        await ws.accept()
        try:
            voice, engine = self._voice(ws)
            session, carried = await self._wait_for_slot(ws, protocol, engine)
        except _ClientGone:
            log.info("a %s client left the line", protocol.path)
            return
        except ConnectionClose as close:
            log.info("refused %s connection: %s", protocol.path, close.reason)
            await _close(ws, close.code, close.reason)
            return
        self.connections_served += 1
        connection = _Connection(ws, protocol, session, self.limits, engine.timings, carried)
        self._live[session] = connection
        code, reason = CloseCode.GOING_AWAY, "the server is shutting down"  # if cancelled
        try:
            code, reason = await connection.run()
        finally:
            await session.close()
            self._live.pop(session, None)
            self._dropped_in_closed_sessions += session.dropped_frames
            log.info("%s session on %sslot %d ended (%s, %s) after %d frames", protocol.path,
                     f"voice {voice}'s " if len(self.voices) > 1 else "", session.slot, code, reason,
                     session.frames_in)
            if code is not None:
                await _close(ws, code, reason)

    def _voice(self, ws: WebSocket) -> tuple[str, MoshiEngine]:
        """The voice that `?voice=NAME` asks for (none: the default); 1008 naming the voices for
        one this server does not offer."""
        if self.voices is None:
            raise ConnectionClose(CloseCode.TRY_AGAIN_LATER, "Moshi is still loading, try again in a minute")
        try:
            return self.voices.pick(ws.query_params.get("voice"))
        except UnknownVoice as error:
            raise ProtocolError(CloseCode.POLICY_VIOLATION, str(error)) from None

    async def _wait_for_slot(self, ws: WebSocket, protocol: Protocol,
                             engine: MoshiEngine) -> tuple[MoshiSession, list[bytes]]:
        """A slot for this connection, waiting in line while every slot is taken, and the audio
        the client sent after the slot came, before the wait stopped reading. Meanwhile the
        client's audio is read and dropped (so its conversation starts fresh), and with `?queue=1`
        its place is sent as `KIND_METADATA` JSON whenever the line moves."""
        if self.restarting:
            raise ConnectionClose(CloseCode.SERVICE_RESTART, self.restarting)
        query = dict(ws.query_params)
        announce = query.pop("queue", "0") == "1"
        query.pop("token", None)  # the access token rides on the URL too; it is no sampling parameter
        query.pop("voice", None)
        try:
            sampling = engine.default_sampling.updated(**parse_sampling_query(query))
        except ValueError as error:
            raise ProtocolError(CloseCode.POLICY_VIOLATION, str(error)) from None
        if not engine.line.waiting:  # a free slot and nobody ahead: no waiting, nothing dropped
            try:
                return engine.open_session(sampling), []
            except BusyError:
                pass
        waiting = _Waiting(ws, protocol, announce)
        self._waiting.add(waiting)
        try:
            return await waiting.run(lambda on_position: engine.acquire(sampling, on_position)), waiting.carried
        except BusyError as error:
            raise ConnectionClose(CloseCode.TRY_AGAIN_LATER, str(error)) from None
        finally:
            self._waiting.discard(waiting)


class _Waiting:
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
            ogg = await _receive_ogg(self.ws, self.protocol)  # checked, then dropped while waiting
            if self._task is not None and self._task.done():
                self.carried.append(ogg)

    async def _send_positions(self) -> None:
        while True:
            position = await self._positions.get()
            await _send(self.ws, metadata_message({"queue": position.as_dict()}))


class _Connection:
    """The receive / send / watchdog tasks of one websocket over one session."""

    def __init__(self, ws: WebSocket, protocol: Protocol, session: MoshiSession,
                 limits: SessionLimits, timings: StageTimings, carried: list[bytes] | None = None) -> None:
        self.ws = ws
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
        (code None when the client is already gone)."""
        tasks: list[asyncio.Task] = []
        try:
            await self.session.start()
            if self.protocol is Protocol.MOSHI:
                await self._send(HANDSHAKE)
            self.started = self.last_audio = time.monotonic()
            tasks = [asyncio.create_task(coro) for coro in (self._receive(), self._send_outputs(), self._watch(),
                                                             self._until_ended())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            raise next(iter(done)).exception() or ConnectionClose(CloseCode.NORMAL, "conversation ended")
        except _ClientGone:
            return None, "client disconnected"
        except ConnectionClose as close:
            return close.code, close.reason
        except SessionError as error:
            return CloseCode.INTERNAL_ERROR, str(error)
        except Exception:
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
            await self._take(await _receive_ogg(self.ws, self.protocol))

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
                raise ConnectionClose(CloseCode.NORMAL, time_limit_reason(limits.max_session_s))
            if now - self.last_audio >= limits.idle_s:
                raise ConnectionClose(CloseCode.POLICY_VIOLATION, idle_reason(limits.idle_s))
            await asyncio.sleep(min(self.started + limits.max_session_s, self.last_audio + limits.idle_s) - now)

    async def _send(self, data: bytes) -> None:
        await _send(self.ws, data)


async def _receive_ogg(ws: WebSocket, protocol: Protocol) -> bytes:
    """The Ogg Opus bytes of the client's next message (possibly empty); _ClientGone when it has
    hung up, ProtocolError when the message breaks the protocol."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise _ClientGone
    if message.get("text") is not None:
        raise ProtocolError(CloseCode.UNSUPPORTED_DATA, "text frames are not part of the protocol; send Opus")
    return client_audio(protocol, message.get("bytes") or b"")


async def _send(ws: WebSocket, data: bytes) -> None:
    try:
        await ws.send_bytes(data)
    except (WebSocketDisconnect, OSError):
        raise _ClientGone from None
    except RuntimeError:
        if ws.application_state == WebSocketState.DISCONNECTED:
            raise _ClientGone from None
        raise


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    if ws.application_state == WebSocketState.DISCONNECTED:
        return
    try:
        # a close reason must fit in 123 bytes of UTF-8
        await ws.close(code=int(code), reason=reason.encode()[:120].decode(errors="ignore"))
    except (RuntimeError, OSError):
        pass  # the client went away first


@contextlib.asynccontextmanager
async def _remember_loop(app: FastAPI):
    """Keep the serving event loop, for an exit hook on another thread (`web.drain_from_thread`)."""
    app.state.loop = asyncio.get_running_loop()
    yield


def create_api(engine: Voices | MoshiEngine | None = None, limits: SessionLimits = SessionLimits(),
               token: str | None = None) -> FastAPI:
    """The app serving `/status`, `/ws` and `/api/chat` over `engine`: one voice, or several
    (`engine.Voices`, each route's `?voice=NAME` picks one; the first without it).

    With `engine=None` the app answers 503 / 1013 until `app.state.moshi.engine`
    is set, so a server can listen while the model loads. With a `token`, every route
    but `/status` (and any mounted later, such as the page) asks for it.
    """
    app = FastAPI(title="Moshi", docs_url=None, redoc_url=None, lifespan=_remember_loop)
    if token:
        app.add_middleware(TokenGate, token=token)
    server = MoshiServer(engine, limits)
    app.state.moshi = server

    @app.get("/status")
    async def status() -> JSONResponse:
        code, body = server.status()
        return JSONResponse(body, status_code=code)

    @app.websocket(Protocol.QUILLMAN.path)
    async def quillman(ws: WebSocket) -> None:
        await server.serve(ws, Protocol.QUILLMAN)

    @app.websocket(Protocol.MOSHI.path)
    async def moshi_chat(ws: WebSocket) -> None:
        await server.serve(ws, Protocol.MOSHI)

    return app
