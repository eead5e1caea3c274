"""Gradio's event stream, carried over to a page's new connection after a handover.

Gradio's page hears every event's progress and results (the transcript, the ending's message,
the recording's link) on one long response per browser session, `queue/data?session_hash=…`
(server-sent events), which stays open while any event is pending: during a WebRTC call, all
along. When the visitor's address changes, that response's TCP connection is dead: the page
waits on it for good, and the server goes on writing Gradio's messages into it (each taken off
the session's queue, so none is left for a newer connection) until TCP gives up, many minutes
later. A message lost so, an event's completion, leaves that event pending in the page for good,
and Gradio starts no other of its kind meanwhile.

So `KeptEventStreams`, an ASGI middleware around Gradio's routes, writes each stream's events
to its connection from a record of them, and after a handover the page (`gradio-stream.js`)
opens the stream again with `TAKE_OVER=<how many events it has>` in its query: that connection
carries the running stream on from the first event the page missed, the old response is ended,
and Gradio hears of a disconnect only from the connection that carries its stream now. Without
`TAKE_OVER`, or with no stream running for that session, a request starts Gradio's stream as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

STREAM_PATH = "/queue/data"  # Gradio's event stream, under its API prefix
TAKE_OVER = "moshi_take_over"  # in the query, with how many events the page has: carry its stream on
KEPT_EVENTS = 4096  # a stream's latest events, kept for a connection that takes it over
END_WAIT_S = 1.0  # how long ending the old response may wait on its dead connection
END = {"type": "http.response.body", "body": b"", "more_body": False}


async def _any(*events: asyncio.Event) -> None:
    """Wait until one of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class _Writer:
    """One connection that carries a stream: it writes the stream's events from `cursor` on."""

    def __init__(self, stream: _Stream, send: Send, receive: Receive, cursor: int) -> None:
        self.stream, self.cursor = stream, cursor
        self._send = send
        self.gone = asyncio.Event()  # the browser's side closed
        self.finished = asyncio.Event()  # its response is complete
        self._task = asyncio.create_task(self._write(), name="moshi-event-stream-writer")
        self._watcher = asyncio.create_task(self._watch(receive), name="moshi-event-stream-watcher")

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def _write(self) -> None:
        stream = self.stream
        try:
            await stream.started.wait()
            await self._send(stream.start)
            while True:
                news = stream.news
                self.cursor = max(self.cursor, stream.first)
                if self.cursor < stream.count:
                    chunk = b"".join(stream.events[self.cursor - stream.first:])
                    self.cursor = stream.count
                    await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
                elif stream.closed:
                    await self._send(END)
                    self.finished.set()
                    return
                else:
                    await news.wait()
        except OSError:
            self.gone.set()  # the connection went under it

    async def end(self) -> None:
        """Stop writing here and end this response (the stream goes on elsewhere)."""
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        if not self.finished.is_set() and self.stream.start is not None:
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(self._send(END), END_WAIT_S)  # a dead connection may take it, or not
        self.finished.set()
        self._watcher.cancel()

    async def until_done(self) -> None:
        """Until its response is complete, or its browser gone."""
        try:
            await _any(self.finished, self.gone)
        finally:
            if self.gone.is_set():
                self._task.cancel()
            self._watcher.cancel()


class _Stream:
    """One session's running stream (one call of Gradio's route): its events, and the writer
    that carries them to the browser now."""

    def __init__(self) -> None:
        self.start: Message | None = None
        self.started = asyncio.Event()
        self.events: list[bytes] = []  # whole events, the first of them the stream's `first`-th
        self.first = 0
        self.closed = False  # Gradio's response is complete
        self.news = asyncio.Event()  # set, and replaced by a fresh one, at each event and at the end
        self.moved = asyncio.Event()  # likewise when a connection takes the stream over
        self.writer: _Writer | None = None
        self._partial = b""

    @property
    def count(self) -> int:
        return self.first + len(self.events)

    @property
    def running(self) -> bool:
        return self.started.is_set() and not self.closed

    def attach(self, send: Send, receive: Receive, cursor: int = 0) -> _Writer:
        old, self.writer = self.writer, _Writer(self, send, receive, cursor)
        if old is not None:
            self.moved.set()
            self.moved = asyncio.Event()
        return self.writer

    async def receive(self) -> Message:
        """What Gradio's route hears: the disconnect of the connection that carries its stream now.
        Returns at once when it is gone (Starlette's `is_disconnected` reads without waiting)."""
        while True:
            writer, moved = self.writer, self.moved
            if writer.gone.is_set():
                return {"type": "http.disconnect"}
            await _any(writer.gone, moved)

    async def send(self, message: Message) -> None:
        """Gradio's response: recorded, for the writer to carry (Gradio never waits on a dead connection)."""
        if message["type"] == "http.response.start":
            self.start = message
            self.started.set()
            return
        *whole, self._partial = (self._partial + message.get("body", b"")).split(b"\n\n")
        self.events.extend(event + b"\n\n" for event in whole)
        if len(self.events) > KEPT_EVENTS:
            dropped = len(self.events) - KEPT_EVENTS
            del self.events[:dropped]
            self.first += dropped
        if not message.get("more_body", False):
            self.close()
        self.news.set()
        self.news = asyncio.Event()

    def close(self) -> None:
        if self._partial:  # not an event Gradio ever sends, but it goes out as it came
            self.events.append(self._partial)
            self._partial = b""
        self.closed = True
        self.news.set()
        self.news = asyncio.Event()


class KeptEventStreams:
    """ASGI middleware: a page's connection to Gradio's event stream with `TAKE_OVER` in its
    query carries on the session's running stream (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._streams: dict[str, _Stream] = {}
        self._endings: set[asyncio.Task] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(STREAM_PATH):
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        session = (query.get("session_hash") or [""])[0]
        running = self._streams.get(session)
        if TAKE_OVER in query and running is not None and running.running:
            await self._take_over(running, query[TAKE_OVER][0], receive, send)
            return
        stream = self._streams[session] = _Stream()
        writer = stream.attach(send, receive)
        try:
            await self.app(scope, stream.receive, stream.send)
        except Exception:
            if not stream.started.is_set():
                await writer.end()
                raise  # no response began: the server answers the error
            log.exception("Gradio's event stream failed")  # it ends below, as Gradio's own would
        except BaseException:
            await writer.end()
            raise
        finally:
            if self._streams.get(session) is stream:
                del self._streams[session]
        stream.close()  # a route that returned without ending its response (e.g. its browser gone)
        if stream.writer is writer:
            await writer.until_done()

    async def _take_over(self, stream: _Stream, had: str, receive: Receive, send: Send) -> None:
        """Carry `stream` on this connection from the first event after the page's `had`."""
        try:
            cursor = max(0, int(had))
        except ValueError:
            cursor = stream.first  # all we still have
        old = stream.writer
        writer = stream.attach(send, receive, cursor)
        ending = asyncio.create_task(old.end(), name="moshi-event-stream-old-end")
        self._endings.add(ending)
        ending.add_done_callback(self._endings.discard)
        log.info("Gradio's event stream moved to the page's new connection (from event %d of %d)",
                 cursor, stream.count)
        await writer.until_done()
