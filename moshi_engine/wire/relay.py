"""A page in front of a Moshi elsewhere (`--remote`, Modal's scale-out) carries its websocket
conversations there, so that its page can fall back from WebRTC to `/api/chat` too.

    app.add_api_websocket_route("/api/chat", functools.partial(relay, remote="wss://worker/api/chat"))

Messages pass through byte for byte both ways, so the remote server's handshake, waiting
line, audio, text and close code (with its reason) reach the browser as if it had
connected there itself. The browser's query (sampling, `queue=1`) rides along; the page's
own access token does not (the remote URL carries the remote's, if it has one).
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlencode

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .protocol import CloseCode
from .remote import with_query

log = logging.getLogger(__name__)


async def relay(ws: WebSocket, remote: str, open_timeout_s: float = 10.0) -> None:
    """Carry one websocket conversation between the browser on `ws` and the server at `remote`."""
    await ws.accept()
    query = urlencode([(key, value) for key, value in ws.query_params.multi_items() if key != "token"])
    try:
        upstream = await connect(with_query(remote, "?" + query if query else ""), open_timeout=open_timeout_s,
                                 max_size=None, compression=None)
    except (OSError, TimeoutError, InvalidHandshake) as error:
        log.warning("cannot reach the Moshi server at %s: %r", remote, error)
        await _close(ws, CloseCode.TRY_AGAIN_LATER, "Moshi's server cannot be reached right now; try again later")
        return

    async def down() -> None:  # the server's messages to the browser, then its close
        try:
            async for message in upstream:
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_text(message)
        except ConnectionClosed:
            pass
        await _close(ws, upstream.close_code or CloseCode.NORMAL, upstream.close_reason or "")

    async def up() -> None:  # the browser's messages to the server, then its hang-up
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await upstream.send(message["bytes"] if message.get("bytes") is not None else message["text"])
        except (WebSocketDisconnect, ConnectionClosed):
            pass
        await upstream.close()

    tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    if ws.application_state == WebSocketState.DISCONNECTED or ws.client_state == WebSocketState.DISCONNECTED:
        return
    try:
        await ws.close(code=int(code), reason=reason.encode()[:120].decode(errors="ignore"))
    except (RuntimeError, OSError):
        pass  # the browser went away first
