"""The one ASGI app factory, served alike by `python app.py`, Spaces and Modal.

    create_app(engine)                              # API (/status, /ws, /api/chat) + page at /
    create_app(load_voices("tiny,tiny-q8"))         # two voices: ?voice=tiny-q8, a picker on the page
    create_app(remote="wss://worker/api/chat")      # the page alone, each session on that server
    create_app(engine, token="...")                 # private: nothing but /status without the token
    serve(app, "0.0.0.0", 7860, tls=self_signed_certificate("0.0.0.0").files)   # https
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import MutableMapping
from pathlib import Path

import httpx
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse

from .conversation import SessionLimits
from .door.access import TokenGate
from .engine import MoshiEngine, Voices
from .model.loading import freeze_garbage_collector
from .page.endings import remote_http_warning
from .page.ui import mount_ui
from .watch.metrics import Metrics
from .wire.protocol import Protocol
from .wire.relay import relay
from .wire.remote import websocket_url
from .wire.server import RESTART_REASON, MoshiServer, add_metrics_route, create_api
from .wire.tls import Certificate, browser_addresses, is_loopback

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 3.0


def create_app(
    engine: Voices | MoshiEngine | None = None,
    *,
    remote: str | None = None,
    remote_voices: list[str] | None = None,
    limits: SessionLimits = SessionLimits(),
    host: str = "127.0.0.1",
    remote_capacity: int = 1,
    poll_remote_status: bool = True,
    connect_timeout_s: float = 10.0,
    token: str | None = None,
    metrics_token: str | None = None,
    worker_metrics: MutableMapping | None = None,
) -> FastAPI:
    """The app for a local `engine` (one voice, or several: `engine.Voices`), or the page alone
    bound to a `remote` Moshi server (offering `remote_voices`, by name, if it has several).

    `host` is the address the page is reached on (it picks the WebRTC ICE
    servers). In remote mode the page holds at most `remote_capacity` sessions
    on the server at once; `poll_remote_status=False` keeps the page from
    polling the server's /status (on Modal that would wake a GPU worker), and
    `connect_timeout_s` bounds how long a session may wait for the server (a cold
    GPU worker takes minutes). With a `token`, every route but `/status` and `/metrics` asks
    for it (`door.access.TokenGate`); `/metrics` (Prometheus) asks for `metrics_token` if set.
    A page-only app's `/metrics` counts the page's conversations; its server has its own, which
    it serves too, with a `worker` label, from `worker_metrics`, the store each worker publishes
    its figures into (`watch.workers`; a scrape of the page then wakes no worker).
    """
    if (engine is None) == (remote is None):
        raise ValueError("give either a local engine or the URL of a remote Moshi server")
    if engine is not None:
        app = create_api(engine, limits, token=token, metrics_token=metrics_token)
        app.state.page = mount_ui(app, engine, limits=limits, host=host)
        freeze_garbage_collector()  # Gradio's objects too
        return app

    remote = websocket_url(remote)
    status_url = _status_url(remote)
    app = FastAPI(title="Moshi (page only)", docs_url=None, redoc_url=None)
    if token:
        app.add_middleware(TokenGate, token=token)
    metrics = Metrics()
    if worker_metrics is not None:
        metrics.gather(worker_metrics)
    add_metrics_route(app, metrics, metrics_token)

    async def remote_status() -> dict | None:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.get(status_url)
            body = response.json()
            # 503 with a reason: the remote's model process is being replaced (the page says why)
            return body if response.status_code == 200 or (isinstance(body, dict) and body.get("unavailable")) else None
        except (httpx.HTTPError, ValueError):
            return None

    @app.get("/status")
    async def status() -> JSONResponse:
        body = {"status": "ready", "mode": "remote", "remote": remote}
        if poll_remote_status:
            body["remote_status"] = await remote_status()
        return JSONResponse(body)

    if Protocol.from_url(remote) is Protocol.MOSHI:

        @app.websocket(Protocol.MOSHI.path)
        async def chat(ws: WebSocket) -> None:
            """The page's websocket path (its fallback from WebRTC), carried to the remote server."""
            await relay(ws, remote, connect_timeout_s)

    app.state.page = mount_ui(
        app,
        remote=remote,
        remote_voices=remote_voices,
        capacity=remote_capacity,
        status=remote_status if poll_remote_status else None,
        limits=limits,
        host=host,
        connect_timeout_s=connect_timeout_s,
        metrics=metrics,
    )
    return app


async def drain(app: FastAPI, reason: str = RESTART_REASON, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """The server is restarting (SIGTERM, Ctrl+C, a redeploy): admit nobody, tell every live and
    waiting conversation why (websockets close 1012 with `reason`; the page says to press the
    button again in a minute), and wait, at most `timeout_s`, until every one has ended and
    every slot is released."""
    server: MoshiServer | None = getattr(app.state, "moshi", None)
    page = getattr(app.state, "page", None)
    if server is not None:
        server.drain(reason)
    ending = [page.conversations.drain(reason)] if page is not None else []

    async def all_ended() -> None:
        await asyncio.gather(*ending)
        # Websockets end on their own tasks; this runs once, at exit, for a few loop turns.
        while server is not None and (server.connections or (server.voices and server.voices.active)):
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(all_ended(), timeout_s)
    except TimeoutError:
        log.warning("some conversations had not ended %.0f s after the restart began", timeout_s)


def drain_from_thread(app: FastAPI, reason: str = RESTART_REASON, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """`drain` run on the app's event loop from another thread (an exit hook), if it still runs."""
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if loop is None or not loop.is_running():
        return
    try:
        asyncio.run_coroutine_threadsafe(drain(app, reason, timeout_s), loop).result(timeout_s + 1)
    except Exception:
        log.warning("draining the app before exit failed", exc_info=True)


def announce(host: str, port: int, tls: Certificate | tuple[Path, Path] | None = None, *, share: bool = False,
             private: bool = False, behind_https: bool = False) -> list[tuple[int, str]]:
    """What the log says at start, as (level, message): the address to open, what a self-signed
    certificate means for a browser, and, when browsers on other machines would reach the page
    over plain http (`host` not a loopback address, no TLS, no share link, and no proxy in front
    that serves https, as on Spaces and Modal), that they get no microphone and what to do."""
    suffix = "/?token=..." if private else "/"
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if isinstance(tls, Certificate):
        addresses = [address.rstrip("/") + suffix for address in browser_addresses(tls, port)]
        if not is_loopback(host) and host not in ("0.0.0.0", "::", ""):
            addresses.insert(0, f"https://{host}:{port}{suffix}")
            addresses = list(dict.fromkeys(addresses))
        where = "kept" if not tls.made else "made now, kept"
        return [
            (logging.INFO, f"Moshi voice chat at {addresses[0]} (also {', '.join(addresses[1:])})"),
            (logging.INFO, f"the certificate is self-signed ({where} in {tls.certfile.parent}): each browser asks "
                           "once to accept it (Chromium: Advanced, then Proceed; Firefox: Advanced, then Accept the "
                           "Risk and Continue); --ssl-certfile / --ssl-keyfile take a real one"),
        ]
    scheme = "https" if tls else "http"
    messages = [(logging.INFO, f"Moshi voice chat at {scheme}://{local}:{port}{suffix}")]
    if not tls and not share and not behind_https and not is_loopback(host):
        messages.append((logging.WARNING, remote_http_warning(host, port)))
    return messages


def serve(app: FastAPI, host: str, port: int, tls: tuple[Path, Path] | None = None) -> None:
    """Serve `app` with uvicorn until SIGTERM or SIGINT, draining it first (`drain`): every
    conversation is told why it ends before the server stops. A second signal stops at once.
    If the app's model is lost for good (`MoshiEngine.on_model_lost`) the server stops the same
    way, so that whatever supervises it (a Space, systemd, docker) can start it afresh. With
    `tls` (a certificate and its key) it serves https, and its websockets are wss."""
    import uvicorn

    server: MoshiServer | None = getattr(app.state, "moshi", None)
    if server is not None and server.voices is not None:

        def stop_serving(reason: str) -> None:
            log.critical("stopping the server: %s", reason)
            os.kill(os.getpid(), signal.SIGTERM)

        for engine in server.voices:  # a voice lost for good: a fresh start brings every voice back
            engine.on_model_lost = stop_serving

    class DrainingServer(uvicorn.Server):
        draining = False

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.draining or not self.started:
                super().handle_exit(sig, frame)
                return
            self.draining = True
            log.info("stopping: telling every conversation that the server is restarting")

            async def drain_then_exit() -> None:
                try:
                    await drain(app)
                finally:
                    uvicorn.Server.handle_exit(self, sig, frame)

            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(drain_then_exit()))

    # uvicorn re-raises the signal it handled once it has stopped, for the handler it found:
    # for SIGTERM let that be one that returns, so that a drained server exits with status 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        certfile, keyfile = tls or (None, None)
        # log_config=None: uvicorn's own lines go through the root logger, in its format (text or JSON)
        DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                                      ssl_certfile=certfile, ssl_keyfile=keyfile)).run()
    except KeyboardInterrupt:
        pass  # the same for SIGINT, as uvicorn.run does
    finally:
        signal.signal(signal.SIGTERM, previous)


def _status_url(ws_url: str) -> str:
    """http(s)://host/status for a ws(s)://host/... URL of one of our servers."""
    scheme, rest = ws_url.split("://", 1)
    return {"ws": "http", "wss": "https"}[scheme] + "://" + rest.split("/", 1)[0] + "/status"
