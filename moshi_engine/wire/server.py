"""The FastAPI app: `/status`, `/metrics`, and the Opus websockets `/ws` (QuiLLMan's) and
`/api/chat` (moshi's).

Each connection leases one conversation slot (waiting in its voice's line while every slot is
taken) and runs three tasks over it, as QuiLLMan does (`connection`): receive (bytes -> Opus
decode -> session), inference (the session's worker thread) and send (frames -> Opus encode ->
websocket; text -> websocket), plus a watchdog for the session and idle limits. They wait on
queues and events, never poll. Whatever ends a connection, its slot is released (and reset)
before the close frame goes out, and nothing else notices; its end is counted and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..conversation import BusyError, ServerRestarting, SessionLimits
from ..door.access import TokenGate, presented_token
from ..door.resume import RESUMED, ResumeRefused, ResumeTokens
from ..engine import MoshiEngine, Voices
from ..model.voices import UnknownVoice
from ..session import MoshiSession
from ..watch.logs import conversation_context, log_fields, new_conversation_id
from ..watch.metrics import CLIENT_GONE, REFUSED, RESTART, ConversationClock, Metrics
from ..watch.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .connection import RESTART_REASON, ClientGone, Connection, Waiting, close_websocket
from .protocol import (
    CloseCode,
    ConnectionClose,
    Protocol,
    ProtocolError,
    parse_sampling_query,
)

log = logging.getLogger(__name__)


class MoshiServer:
    """The state behind the routes: the voices (None while they load), the live connections
    and counters."""

    def __init__(self, voices: Voices | MoshiEngine | None, limits: SessionLimits,
                 metrics: Metrics | None = None, watching: bool = True) -> None:
        self.metrics = metrics or Metrics()
        self.watching = watching  # False: nothing observed as it happens (the bench's baseline)
        self.voices = None
        self._unwatch: list[Callable[[], None]] = []  # what stops the metrics watching its engines
        self.engine = voices
        self.limits = limits
        self.connections_served = 0
        self.restarting: str | None = None  # why new conversations are refused, once draining
        self._live: dict[MoshiSession, Connection] = {}
        self._waiting: set[asyncio.Task] = set()
        self.tokens: ResumeTokens[Connection] = ResumeTokens()  # resume each live conversation

    @property
    def engine(self) -> MoshiEngine | None:
        """The default voice's engine (None while loading)."""
        return self.voices.default if self.voices is not None else None

    @engine.setter
    def engine(self, engine: Voices | MoshiEngine | None) -> None:
        for unwatch in self._unwatch:  # the engines it replaces are watched no more
            unwatch()
        self.voices = Voices.of(engine) if engine is not None else None
        self._unwatch = [self.metrics.watch(name, voice, as_it_happens=self.watching)
                         for name, voice in (self.voices.engines.items() if self.voices else ())]

    def status(self) -> tuple[int, dict]:
        if self.voices is None:
            return 503, {"status": "loading"}
        engine = self.voices.status()
        return 503 if engine["unavailable"] else 200, {
            "status": "restarting" if self.restarting else "unavailable" if engine["unavailable"] else "ready",
            **engine,  # dropped_audio_frames among them: every transport's, WebRTC's included
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
        Everything logged about it carries its id, and its end is counted and logged once. With
        `?resume=TOKEN` the websocket takes up the conversation that token resumes instead."""
        token = ws.query_params.get("resume")
        if token is not None:
            await self._resume(ws, protocol, token)
            return
        conversation_id = new_conversation_id()
        with conversation_context(conversation_id):
            await self._serve(ws, protocol, conversation_id)

    async def _resume(self, ws: WebSocket, protocol: Protocol, token: str) -> None:
        """A client whose connection broke takes its conversation up again on `ws`: same slot,
        Moshi's state kept. A wrong, used or expired token, or one whose conversation is fine,
        closes `ws` with 1008 and a reason; nothing else changes."""
        await ws.accept()
        if self.restarting:
            await close_websocket(ws, CloseCode.SERVICE_RESTART, self.restarting)
            return
        try:
            connection, next_token = self.tokens.claim(token)
        except ResumeRefused as refused:
            self.metrics.resumes.labels(ws.query_params.get("voice") or "", protocol.value, refused.outcome).inc()
            log.info("resume refused: %s", refused.reason, extra=log_fields(transport=protocol.value,
                                                                              outcome=refused.outcome))
            await close_websocket(ws, CloseCode.POLICY_VIOLATION, refused.reason)
            return
        with conversation_context(connection.clock.id):
            connection.clock.resume_attempt(RESUMED)
            log.info("conversation resumed", extra=log_fields(transport=protocol.value))
            await connection.take_over(ws, protocol, next_token)

    async def _serve(self, ws: WebSocket, protocol: Protocol, conversation_id: str) -> None:
        await ws.accept()
        clock = ConversationClock(self.metrics if self.watching else None, "", protocol.value, conversation_id)
        announce = ws.query_params.get("queue") == "1"  # a client that reads our metadata
        try:
            clock.voice, engine = self._voice(ws)
            session, carried = await self._wait_for_slot(ws, protocol, engine, announce)
        except ClientGone:
            clock.end(CLIENT_GONE, "left the line")
            return
        except ConnectionClose as close:
            clock.end(RESTART if close.code == CloseCode.SERVICE_RESTART else REFUSED, close.reason,
                      code=int(close.code))
            await close_websocket(ws, close.code, close.reason)
            return
        self.connections_served += 1
        clock.talking()
        log.info("conversation started", extra=log_fields(transport=protocol.value, voice=clock.voice,
                                                          slot=session.slot))
        connection = Connection(ws, protocol, session, self.limits, engine.timings, clock, announce, carried)
        if announce:  # a client that reads our metadata learns the token that resumes it
            connection.resume_token = self.tokens.issue(connection)
        session.on_stale = clock.stale
        self._live[session] = connection
        code, reason = CloseCode.GOING_AWAY, "the server is shutting down"  # if cancelled
        try:
            code, reason = await connection.run()
        finally:
            self.tokens.retire(connection)
            await session.close()
            self._live.pop(session, None)
            clock.end(connection.ending or RESTART, reason, code=int(code) if code is not None else None,
                      slot=session.slot, frames_in=session.frames_in, dropped_frames=session.dropped_frames)
            await connection.release_last(code, reason)

    def _voice(self, ws: WebSocket) -> tuple[str, MoshiEngine]:
        """The voice that `?voice=NAME` asks for (none: the default); 1008 naming the voices for
        one this server does not offer."""
        if self.voices is None:
            raise ConnectionClose(CloseCode.TRY_AGAIN_LATER, "Moshi is still loading, try again in a minute")
        try:
            return self.voices.pick(ws.query_params.get("voice"))
        except UnknownVoice as error:
            raise ProtocolError(CloseCode.POLICY_VIOLATION, str(error)) from None

    async def _wait_for_slot(self, ws: WebSocket, protocol: Protocol, engine: MoshiEngine,
                             announce: bool) -> tuple[MoshiSession, list[bytes]]:
        """A slot for this connection, waiting in line while every slot is taken, and the audio
        the client sent after the slot came, before the wait stopped reading. Meanwhile the
        client's audio is read and dropped (so its conversation starts fresh), and if `announce`
        (`?queue=1`) its place is sent as `KIND_METADATA` JSON whenever the line moves."""
        if self.restarting:
            raise ConnectionClose(CloseCode.SERVICE_RESTART, self.restarting)
        query = dict(ws.query_params)
        query.pop("queue", None)  # `announce`, no sampling parameter
        query.pop("token", None)  # the access token rides on the URL too; it is no sampling parameter
        query.pop("voice", None)
        query.pop("resume", None)
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
        waiting = Waiting(ws, protocol, announce)
        self._waiting.add(waiting)
        try:
            return await waiting.run(lambda on_position: engine.acquire(sampling, on_position)), waiting.carried
        except BusyError as error:
            raise ConnectionClose(CloseCode.TRY_AGAIN_LATER, str(error)) from None
        finally:
            self._waiting.discard(waiting)


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
        # in a thread: gathering workers' figures (the scale-out page) reads a store over the network
        return Response(await asyncio.to_thread(metrics.exposition), media_type=METRICS_CONTENT_TYPE)


def create_api(engine: Voices | MoshiEngine | None = None, limits: SessionLimits = SessionLimits(),
               token: str | None = None, metrics_token: str | None = None, watching: bool = True) -> FastAPI:
    """The app serving `/status`, `/metrics`, `/ws` and `/api/chat` over `engine`: one voice, or
    several (`engine.Voices`, each route's `?voice=NAME` picks one; the first without it).

    With `engine=None` the app answers 503 / 1013 until `app.state.moshi.engine`
    is set, so a server can listen while the model loads. With a `token`, every route
    but `/status` and `/metrics` (and any mounted later, such as the page) asks for it;
    `metrics_token` puts `/metrics` behind a token of its own (`add_metrics_route`).
    `watching=False` observes nothing as it happens (no step, wait or frame-lag histograms, no
    conversation counts; `/metrics` has the live figures only): what the bench compares
    watching against.
    """
    app = FastAPI(title="Moshi", docs_url=None, redoc_url=None, lifespan=_remember_loop)
    if token:
        app.add_middleware(TokenGate, token=token)
    server = MoshiServer(engine, limits, watching=watching)
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
