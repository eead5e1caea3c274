"""The voice chat page: a Gradio Blocks around FastRTC's WebRTC component.

    app = create_api(engine)
    mount_ui(app, engine)                       # a local engine: one slot per browser session
    mount_ui(app, voices)                       # several voices (engine.Voices): the visitor picks one
    mount_ui(app, remote="ws://host/api/chat")  # or every session on a Moshi server elsewhere

The page: what Moshi is, a voice picker (with two voices or more), the WebRTC audio
component (press, talk, hear Moshi),
the live transcript, sampling controls applied when a conversation starts, a
status line (model, device, free slots, frame time), a live readout of how late
Moshi's voice arrives and the time left, and after each conversation its stereo
recording to download, with the conversation's id in its details. What it shows is
laid out in `layout`; this module wires it to the conversations. Busy, time limit and errors are
shown as the sentence `endings.ending_message` gives.

The page's own script (`static/page.js`, see `pagescript`) watches WebRTC: when it
cannot connect, the same conversation goes over this app's `/api/chat` websocket,
with Opus in the browser, the same controls, messages and recording.
Only this module and `layout` import gradio.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import gradio as gr
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastrtc import WebRTC

from ..conversation import Sampling, SessionLimits
from ..door.access import BROWSER_COOKIE, BrowserIdentity, cookie_value
from ..door.line import QUEUE_PLACES, QUEUE_TIMEOUT_S
from ..engine import MoshiEngine, Voices
from ..watch.metrics import Metrics
from ..wire.protocol import Protocol
from ..wire.remote import RemoteSession, with_query
from .conversation_log import ConversationLog, ConversationRecord
from .endings import Ending, ending_message, line_message
from .event_stream import KeptEventStreams
from .ice import (
    abandon_unconnected,
    browser_rtc_configuration,
    ice_source,
    keep_consent_through_outages,
    webrtc_id_of,
)
from .layout import CSS, download_link, free_slots, layout, status_line, voice_status
from .opus_rtp import use_fec_opus
from .pagescript import RECORDING_READY, page_config, page_head
from .rtc import MoshiHandler, OpenConversation
from .static_files import STATIC_PATH, mount_static

log = logging.getLogger(__name__)

STATUS_REFRESH_S = 1.0
# FastRTC's own time limit closes the connection abruptly; ours ends the conversation
# first with a message, so FastRTC's only backs it up.
TIME_LIMIT_GRACE_S = 5.0
# The page's own WebRTC routes, under its mount (`page.js` reads them from its config): it abandons an
# attempt that never connected, learns its call's resume token, and says that the visitor stopped.
WEBRTC_ROUTES = {"abandon": "/webrtc/abandon", "resume": "/webrtc/resume-token", "stop": "/webrtc/stop"}

StatusSource = Callable[[], dict | None] | Callable[[], Awaitable[dict | None]]

@dataclass
class MoshiPage:
    """The mounted page and what tests and callers may need from it."""

    blocks: gr.Blocks
    webrtc: WebRTC
    conversations: ConversationLog
    handler: MoshiHandler


def sampling_from_inputs(inputs: list[Any]) -> Sampling:
    """The page's controls, in order (audio temperature, audio top-k, text temperature,
    text top-k, seed; then the voice, if the page offers several), as a Sampling; a negative
    or blank seed is a random one. ValueError if invalid."""
    temp, top_k, temp_text, top_k_text, seed = inputs[:5]
    return Sampling(
        temp=float(temp),
        top_k=int(round(top_k)),
        temp_text=float(temp_text),
        top_k_text=int(round(top_k_text)),
        seed=None if seed is None or seed == "" or int(seed) < 0 else int(seed),
    )


def build_page(
    open_conversation: OpenConversation,
    *,
    capacity: int,
    line_places: int = QUEUE_PLACES,
    line_timeout_s: float = QUEUE_TIMEOUT_S,
    default_sampling: Sampling = Sampling(),
    status: StatusSource | None = None,
    remote: str | None = None,
    limits: SessionLimits = SessionLimits(),
    host: str = "127.0.0.1",
    conversations: ConversationLog | None = None,
    chat_path: str | None = None,
    webrtc_routes: Mapping[str, str] = WEBRTC_ROUTES,
    static_path: str = STATIC_PATH,
    voices: list[str] | None = None,
    metrics: Metrics | None = None,
) -> MoshiPage:
    """The page as a Blocks, one conversation per browser session from `open_conversation`.

    `capacity` is the number of conversation slots behind the page, and `line_places`
    the places in its waiting lines (each waits at most `line_timeout_s`): together they
    bound concurrent WebRTC connections. With two `voices` or more the page offers a picker,
    and `open_conversation` is called with `voice=` the one picked (its status line is that
    voice's). `host` is where the server listens, which decides
    the ICE servers (`rtc.ice_source`); `status` feeds the status line. `chat_path` is the
    app's `/api/chat`, where the page talks when WebRTC cannot connect (None: nowhere);
    the page's script is served from `static_path` (`static_files.mount_static`). Each
    conversation's end is counted in `metrics`, as the voice picked (the first: `voices[0]`).
    """
    source = ice_source(host)  # fails here, at start, on a half-set TURN configuration
    keep_consent_through_outages()
    use_fec_opus()
    log.info("WebRTC ICE servers for host %s: %s", host, source)
    conversations = conversations or ConversationLog()
    picking = len(voices or ()) > 1
    handler = MoshiHandler(
        open_conversation,
        conversations,
        sampling_from_args=sampling_from_inputs,
        voice_from_args=voice_from_inputs if picking else None,
        limits=limits,
        metrics=metrics,
        voice=(voices or [""])[0],
        resume_from_args=resume_from_inputs,
    )

    async def rtc_configuration() -> dict:  # a plain function: FastRTC calls it per connection
        return await browser_rtc_configuration(host)

    async def read_status() -> dict | None:
        if status is None:
            return None
        try:
            result = status()
            return await result if inspect.isawaitable(result) else result
        except Exception:
            log.warning("reading the status failed", exc_info=True)
            return None

    theme = gr.themes.Soft(font=["system-ui", "sans-serif"])  # no web fonts to fetch
    config = page_config(limits, line_timeout_s=line_timeout_s, places=line_places, chat_path=chat_path,
                         webrtc_routes=webrtc_routes)
    head = page_head(config, static_path)
    with gr.Blocks(title="Moshi voice chat", theme=theme, css=CSS, head=head) as blocks:
        shown_page = layout(voices, remote, host, rtc_configuration, default_sampling)
        status_md, voice, webrtc, controls = shown_page.status, shown_page.voice, shown_page.webrtc, shown_page.controls
        message_md, transcript = shown_page.message, shown_page.transcript
        recording = shown_page.recording
        handler.peer_connection = webrtc.pcs.get
        shown = gr.State(None)  # the WebRTC id whose ending the page already shows
        timer = gr.Timer(STATUS_REFRESH_S)

        webrtc.stream(
            handler,
            inputs=[webrtc, *controls] + ([voice] if picking else []) + [shown_page.resume],
            outputs=[webrtc],
            # Visitors in line hold a connection too, and their time in line is not talk time; a
            # handover holds two for a moment (the dead one lingers until its consent expires).
            concurrency_limit=2 * capacity + line_places,
            time_limit=limits.max_session_s + line_timeout_s + TIME_LIMIT_GRACE_S,
        )
        # Unlimited: each connection holds one of these streams open while it lasts, so
        # Gradio's default limit of 1 would stall every transcript but the first.
        webrtc.on_additional_outputs(lambda text: text, outputs=[transcript], concurrency_limit=None)

        async def on_start(picked: str | None):
            """Clear the last conversation; if no slot of the voice is free and its line is full,
            say so before FastRTC refuses."""
            message = ""
            status_now = voice_status(await read_status(), picked)
            queue = (status_now or {}).get("queue") or {}
            if free_slots(status_now) == 0 and queue.get("waiting", 0) >= queue.get("places", line_places):
                message = ending_message(Ending.BUSY, limits)
            return message, "", gr.update(value="")

        webrtc.start_recording(
            on_start, inputs=[voice], outputs=[message_md, transcript, recording], concurrency_limit=None,
            show_progress="hidden",
        )

        async def refresh(webrtc_id: str | None, shown_id: str | None, picked: str | None, request: gr.Request):
            """Every second: the status line; while in line, its place; once per conversation, how
            it ended. The first browser to ask about a connection owns its record. Only a WebRTC
            connection has a record: while the page talks over its websocket (page.js), this
            leaves the message, transcript and recording alone."""
            line = status_line(await read_status(), remote, picked if picking else None)
            record = conversations.claim(webrtc_id, cookie_value(request.headers, BROWSER_COOKIE))
            if record is not None and not record.ended:
                return line, line_message(record.line) if record.line else "", gr.update(), gr.update(), shown_id
            if record is None or shown_id == webrtc_id:
                return line, gr.update(), gr.update(), gr.update(), shown_id
            message = record.message
            download = gr.update()
            if record.recording:
                message += RECORDING_READY
                download = gr.update(value=download_link(record))
            return line, message, record.transcript, download, webrtc_id

        async def show_status(picked: str | None) -> str:
            return status_line(await read_status(), remote, picked if picking else None)

        blocks.load(show_status, inputs=[voice], outputs=[status_md], concurrency_limit=None, show_progress="hidden")
        voice.change(show_status, inputs=[voice], outputs=[status_md], concurrency_limit=None, show_progress="hidden")
        timer.tick(
            refresh,
            inputs=[webrtc, shown, voice],
            outputs=[status_md, message_md, transcript, recording, shown],
            concurrency_limit=None,
            show_progress="hidden",
        )
    return MoshiPage(blocks=blocks, webrtc=webrtc, conversations=conversations, handler=handler)


def resume_from_inputs(inputs: list[Any]) -> str | None:
    """The resume token the page sent for a handover: always the last input (None: a new conversation)."""
    token = inputs[-1] if len(inputs) > 5 else None
    return str(token) if isinstance(token, str) and token.strip() else None


def voice_from_inputs(inputs: list[Any]) -> str | None:
    """The voice picked on the page: the input after the sampling controls."""
    return str(inputs[5]) if len(inputs) > 5 and inputs[5] else None


def mount_ui(
    app: FastAPI,
    engine: Voices | MoshiEngine | None = None,
    *,
    remote: str | None = None,
    remote_voices: list[str] | None = None,
    capacity: int | None = None,
    status: StatusSource | None = None,
    limits: SessionLimits = SessionLimits(),
    host: str = "127.0.0.1",
    path: str = "/",
    conversations: ConversationLog | None = None,
    connect_timeout_s: float = 10.0,
    metrics: Metrics | None = None,
) -> MoshiPage:
    """Mount the page on `app` at `path`; mount it after the app's own routes.

    Give either a local `engine` (one voice, or several as `engine.Voices`; capacity: their
    slots, status: theirs) or the `remote` URL of a Moshi server (`/api/chat` or `/ws`; capacity
    defaults to 1, the number of sessions the page may hold on it at once; `remote_voices`: the
    names of its voices, if it has several, for `?voice=`; `connect_timeout_s`: how long a
    session may take to connect, e.g. while a worker starts from cold).

    Also served: the page's scripts (`static_files.mount_static`, under `path`), each
    browser's recordings, and a route where the page abandons a WebRTC attempt that
    never connected. When `app` serves `/api/chat` (a local engine's `wire.server.create_api`, or
    a page-only app's relay to its remote server), the page talks over it whenever WebRTC
    cannot connect. The page's conversations are counted in `metrics` (by default the app's
    server's, `app.state.moshi.metrics`, if it has one).
    """
    if (engine is None) == (remote is None):
        raise ValueError("give either a local engine or the URL of a remote Moshi server")
    base = path.rstrip("/")
    server = getattr(app.state, "moshi", None)
    metrics = metrics or (server.metrics if server is not None else None)
    serves_chat = any(getattr(route, "path", None) == Protocol.MOSHI.path for route in app.routes)
    where = {
        "chat_path": Protocol.MOSHI.path if serves_chat else None,
        "webrtc_routes": {name: base + route for name, route in WEBRTC_ROUTES.items()},
        "static_path": base + STATIC_PATH,
    }
    if engine is not None:
        voices = Voices.of(engine)

        async def open_local(sampling: Sampling | None, on_position, voice: str | None = None):
            return await voices.pick(voice)[1].acquire(sampling, on_position)

        default = voices.default
        page = build_page(
            open_local,
            capacity=capacity or sum(engine.capacity for engine in voices),
            line_places=sum(engine.line.places for engine in voices),
            line_timeout_s=default.line.timeout_s,
            default_sampling=default.default_sampling,
            status=status or voices.status,
            limits=limits,
            host=host,
            conversations=conversations,
            voices=voices.names,
            metrics=metrics,
            **where,
        )
    else:
        async def open_remote(sampling: Sampling | None, on_position, voice: str | None = None) -> RemoteSession:
            # The remote server keeps its own line: start() waits in it.
            url = with_query(remote, "?" + urlencode({"voice": voice})) if voice else remote
            return RemoteSession(url, sampling=sampling, open_timeout=connect_timeout_s, on_position=on_position)

        page = build_page(
            open_remote,
            capacity=capacity or 1,
            status=status,
            remote=remote,
            limits=limits,
            host=host,
            conversations=conversations,
            voices=remote_voices,
            metrics=metrics,
            **where,
        )
    app.add_middleware(BrowserIdentity)
    app.add_middleware(KeptEventStreams)  # Gradio's event stream, moved to a new connection after a handover
    # Before the page: its mount at `path` would catch every path registered after it.
    mount_static(app, where["static_path"])

    @app.get(path.rstrip("/") + "/recordings/{download_id}", include_in_schema=False)
    async def download_recording(download_id: str, request: Request) -> FileResponse:
        """A conversation's recording, for the browser that had it; a 404 for anyone else."""
        record = page.conversations.recording_for(download_id, cookie_value(request.headers, BROWSER_COOKIE))
        if record is None:
            raise HTTPException(404, "no such recording")
        return FileResponse(record.recording, media_type="audio/wav", filename=record.recording.name)

    async def offer_ufrag(request: Request) -> str:
        """The ICE ufrag of the page's offer, which names its WebRTC connection: {"ufrag": ...}."""
        try:
            return str((await request.json())["ufrag"])
        except (ValueError, KeyError, TypeError):
            raise HTTPException(400, 'expected JSON {"ufrag": "<the offer\'s ICE ufrag>"}') from None

    async def browsers_record(request: Request) -> ConversationRecord | None:
        """The record of the connection that the request's ufrag names, if it is this browser's."""
        webrtc_id = webrtc_id_of(page.webrtc.pcs, await offer_ufrag(request))
        return page.conversations.claim(webrtc_id, cookie_value(request.headers, BROWSER_COOKIE))

    @app.post(base + WEBRTC_ROUTES["resume"], include_in_schema=False)
    async def resume_token(request: Request) -> JSONResponse:
        """The resume token of this browser's WebRTC conversation (its offer's ICE ufrag names it):
        what takes the conversation up on a new connection if this one's path dies. Null until
        the conversation has started, and for any other browser."""
        record = await browsers_record(request)
        token = record.resume_token if record is not None and not record.ended else None
        return JSONResponse({"token": token})

    @app.post(base + WEBRTC_ROUTES["stop"], include_in_schema=False)
    async def stop_webrtc(request: Request) -> JSONResponse:
        """The visitor pressed Stop on this browser's WebRTC call (or closed its tab): end its
        conversation now. The closing connection alone cannot say so: a call whose packets stopped
        before its close looks like one whose path went quiet, and keeps its slot for a handover."""
        record = await browsers_record(request)
        return JSONResponse({"stopped": record is not None and await page.conversations.stop(record)})

    @app.post(base + WEBRTC_ROUTES["abandon"], include_in_schema=False)
    async def abandon_webrtc(request: Request) -> JSONResponse:
        """The page gave up on a WebRTC attempt that never connected (it talks over the
        websocket instead): close the server's side of it now rather than in FastRTC's 30 s,
        so that it holds no place among the page's WebRTC connections."""
        return JSONResponse({"closed": await abandon_unconnected(page.webrtc.pcs, await offer_ufrag(request))})

    gr.mount_gradio_app(app, page.blocks, path=path, show_api=False)
    return page
