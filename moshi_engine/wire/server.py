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
import hmac
import logging
import time

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..conversation import AudioOut, BusyError, ServerRestarting, SessionError, SessionLimits
from ..door.access import TokenGate, presented_token
from ..door.line import LinePosition
from ..engine import MoshiEngine, Voices
from ..model.voices import UnknownVoice
from ..session import MoshiSession
from ..timings import OPUS_DECODE, OPUS_ENCODE, StageTimings
from ..watch.logs import conversation_context, log_fields, new_conversation_id
from ..watch.metrics import CLIENT_GONE, ERROR, IDLE, LIMIT, NORMAL, REFUSED, RESTART, ConversationClock, Metrics
from ..watch.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
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
CLOSE_READ_S = 0.5  # how long a connection whose send failed waits to read why the client left


class _ClientGone(Exception):
    """The client disconnected; nothing is left to tell it."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(code)
        self.code = code  # the close code it sent (1000, 1001: it hung up cleanly), None if it dropped

    @property
    def cleanly(self) -> bool:
        return self.code in (CloseCode.NORMAL, CloseCode.GOING_AWAY)


class MoshiServer:
    """The state behind the routes: the voices (None while they load), the live connections
    and counters."""

    def __init__(self, voices: Voices | MoshiEngine | None, limits: SessionLimits,
                 metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.voices = None
        self.engine = voices
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
        for name, voice in (self.voices.engines.items() if self.voices else ()):
            self.metrics.watch(name, voice)

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
        """One websocket conversation, from accept to close: in line while every slot is taken.
        Everything logged about it carries its id, and its end is counted and logged once."""
        conversation_id = new_conversation_id()
        with conversation_context(conversation_id):
            await self._serve(ws, protocol, conversation_id)

    async def _serve(self, ws: WebSocket, protocol: Protocol, conversation_id: str) -> None:
        await ws.accept()
        clock = self.metrics.conversation(None, protocol.value, conversation_id)
        try:
            clock.voice, engine = self._voice(ws)
            session, carried = await self._wait_for_slot(ws, protocol, engine)
        except _ClientGone:
            clock.end(CLIENT_GONE, "left the line")
            return
        except ConnectionClose as close:
            clock.end(RESTART if close.code == CloseCode.SERVICE_RESTART else REFUSED, close.reason,
                      code=int(close.code))
            await _close(ws, close.code, close.reason)
            return
        self.connections_served += 1
        clock.talking()
        log.info("conversation started", extra=log_fields(transport=protocol.value, voice=clock.voice,
                                                          slot=session.slot))
        connection = _Connection(ws, protocol, session, self.limits, engine.timings, carried, clock)
        self._live[session] = connection
        code, reason = CloseCode.GOING_AWAY, "the server is shutting down"  # if cancelled
        try:
            code, reason = await connection.run()
        finally:
            await session.close()
            self._live.pop(session, None)
            self._dropped_in_closed_sessions += session.dropped_frames
            clock.end(connection.ending or RESTART, reason, code=int(code) if code is not None else None,
                      slot=session.slot, frames_in=session.frames_in, dropped_frames=session.dropped_frames)
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
                session = engine.open_session(sampling)
            except BusyError:
                pass
            else:
                engine.waited(0.0)
                return session, []
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


class _Limit(ConnectionClose):
    """The session limit or the idle limit ended the conversation (`ending` says which)."""

    def __init__(self, ending: str, code: CloseCode, reason: str) -> None:
        super().__init__(code, reason)
        self.ending = ending


class _Connection:
    """The receive / send / watchdog tasks of one websocket over one session."""

    def __init__(self, ws: WebSocket, protocol: Protocol, session: MoshiSession,
                 limits: SessionLimits, timings: StageTimings, carried: list[bytes] | None = None,
                 clock: ConversationClock | None = None) -> None:
        self.ws = ws
        self.clock = clock or ConversationClock(None, "", protocol.value, "")
        self.announce = ws.query_params.get("queue") == "1"  # it reads metadata
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
            if isinstance(error, _ClientGone) and error.code is None and not receiving.done():
                # A send found the client gone: its close frame, if it sent one, is the receiver's to read.
                await asyncio.wait({receiving}, timeout=CLOSE_READ_S)
                if receiving.done() and isinstance(receiving.exception(), _ClientGone):
                    error = receiving.exception()
            raise error or ConnectionClose(CloseCode.NORMAL, "conversation ended")
        except _ClientGone as gone:
            self.ending = NORMAL if gone.cleanly else CLIENT_GONE
            return None, "client disconnected" if gone.cleanly else "connection lost"
        except _Limit as limit:
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
                raise _Limit(LIMIT, CloseCode.NORMAL, time_limit_reason(limits.max_session_s))
            if now - self.last_audio >= limits.idle_s:
                raise _Limit(IDLE, CloseCode.POLICY_VIOLATION, idle_reason(limits.idle_s))
            await asyncio.sleep(min(self.started + limits.max_session_s, self.last_audio + limits.idle_s) - now)

    async def _send(self, data: bytes) -> None:
        await _send(self.ws, data)


async def _receive_ogg(ws: WebSocket, protocol: Protocol) -> bytes:
    """The Ogg Opus bytes of the client's next message (possibly empty); _ClientGone when it has
    hung up, ProtocolError when the message breaks the protocol."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise _ClientGone(message.get("code"))
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


def add_metrics_route(app: FastAPI, metrics: Metrics, metrics_token: str | None = None) -> None:
    """`GET /metrics`: `metrics` in Prometheus' text format. Open like `/status` (counts and
    timings, nothing about anybody), unless `metrics_token` is set: then only a request that
    carries it (`Authorization: Bearer ...`, as Prometheus' `authorization` sends it, or
    `?token=...`) gets them; 401 without a token, 403 with another."""
    expected = metrics_token.encode() if metrics_token else None

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        if expected is not None:
            presented, where = presented_token(request.scope)
            if presented is None or where == "cookie":
                return PlainTextResponse("these metrics ask for a token: Authorization: Bearer ...", 401,
                                         headers={"www-authenticate": 'Bearer realm="moshi metrics"'})
            if not hmac.compare_digest(presented.encode(), expected):
                return PlainTextResponse("that is not the metrics' token", 403)
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


def create_api(engine: Voices | MoshiEngine | None = None, limits: SessionLimits = SessionLimits(),
               token: str | None = None, metrics_token: str | None = None) -> FastAPI:
    """The app serving `/status`, `/metrics`, `/ws` and `/api/chat` over `engine`: one voice, or
    several (`engine.Voices`, each route's `?voice=NAME` picks one; the first without it).

    With `engine=None` the app answers 503 / 1013 until `app.state.moshi.engine`
    is set, so a server can listen while the model loads. With a `token`, every route
    but `/status` and `/metrics` (and any mounted later, such as the page) asks for it;
    `metrics_token` puts `/metrics` behind a token of its own (`add_metrics_route`).
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

    add_metrics_route(app, server.metrics, metrics_token)

    @app.websocket(Protocol.QUILLMAN.path)
    async def quillman(ws: WebSocket) -> None:
        await server.serve(ws, Protocol.QUILLMAN)

    @app.websocket(Protocol.MOSHI.path)
    async def moshi_chat(ws: WebSocket) -> None:
        await server.serve(ws, Protocol.MOSHI)

    return app
