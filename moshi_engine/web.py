"""The one ASGI app factory, served alike by `python app.py`, Spaces and Modal.

    create_app(engine)                              # API (/status, /ws, /api/chat) + page at /
    create_app(remote="wss://worker/api/chat")      # the page alone, each session on that server
"""

from __future__ import annotations

import logging

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from .client import websocket_url
from .conversation import SessionLimits
from .engine import MoshiEngine
from .server import create_api
from .ui import mount_ui

log = logging.getLogger(__name__)


def create_app(
    engine: MoshiEngine | None = None,
    *,
    remote: str | None = None,
    limits: SessionLimits = SessionLimits(),
    host: str = "127.0.0.1",
    remote_capacity: int = 1,
    poll_remote_status: bool = True,
    connect_timeout_s: float = 10.0,
) -> FastAPI:
    """The app for a local `engine`, or the page alone bound to a `remote` Moshi server.

    `host` is the address the page is reached on (it picks the WebRTC ICE
    servers). In remote mode the page holds at most `remote_capacity` sessions
    on the server at once; `poll_remote_status=False` keeps the page from
    polling the server's /status (on Modal that would wake a GPU worker), and
    `connect_timeout_s` bounds how long a session may wait for the server (a cold
    GPU worker takes minutes).
    """
    if (engine is None) == (remote is None):
        raise ValueError("give either a local engine or the URL of a remote Moshi server")
    if engine is not None:
        app = create_api(engine, limits)
        mount_ui(app, engine, limits=limits, host=host)
        return app

    remote = websocket_url(remote)
    status_url = _status_url(remote)
    app = FastAPI(title="Moshi (page only)", docs_url=None, redoc_url=None)

    async def remote_status() -> dict | None:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.get(status_url)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    @app.get("/status")
    async def status() -> JSONResponse:
        body = {"status": "ready", "mode": "remote", "remote": remote}
        if poll_remote_status:
            body["remote_status"] = await remote_status()
        return JSONResponse(body)

    mount_ui(
        app,
        remote=remote,
        capacity=remote_capacity,
        status=remote_status if poll_remote_status else None,
        limits=limits,
        host=host,
        connect_timeout_s=connect_timeout_s,
    )
    return app


def _status_url(ws_url: str) -> str:
    """http(s)://host/status for a ws(s)://host/... URL of one of our servers."""
    scheme, rest = ws_url.split("://", 1)
    return {"ws": "http", "wss": "https"}[scheme] + "://" + rest.split("/", 1)[0] + "/status"
