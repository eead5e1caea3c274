"""An asyncio client for Moshi servers: ours (`/ws`, `/api/chat`) and moshi's reference server.

`RemoteSession` is a `Conversation` like a local `MoshiSession`: pcm in, Moshi's
frames and text out, with Opus on the wire. When our server gave it a resume token, a
connection that drops or goes quiet (an outage, a new address) is taken up again on a new
websocket: the conversation goes on in its slot, and what was said meanwhile is lost. `exchange()` streams a whole
recording (in real time or as fast as the server takes it) and reports what came
back and how fast (`python -m moshi_engine.client` is its command line). Nothing here
imports torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ..audio import FRAME_SECONDS, FRAME_SIZE, check_pcm
from ..conversation import (
    AudioOut,
    BusyError,
    Output,
    OutputIteration,
    OutputQueue,
    Sampling,
    ServerRestarting,
    SessionClosed,
    SessionError,
    TextOut,
)
from ..door.line import LinePosition
from .codec import OpusDecoder, OpusEncoder, OpusError
from .protocol import (
    HANDSHAKE,
    KIND_AUDIO,
    KIND_HANDSHAKE,
    KIND_METADATA,
    KIND_TEXT,
    CloseCode,
    Protocol,
    client_message,
    sampling_query,
)

log = logging.getLogger(__name__)

MAX_OUTPUT_FRAMES = 250  # 20 s: a client keeps what it is sent unless told otherwise
# A live conversation hears from the server every 80 ms: this long without a word, the link is
# down (an outage, a handover), and the client resumes rather than wait for TCP to notice.
RECONNECT_AFTER_S = 2.5
RESUME_FOR_S = 20.0  # how long a client tries to resume (the server's grace decides; 15 s by default)
RESUME_ATTEMPT_S = 1.0  # each try's own time (at least; three times what the first connect took)


def websocket_url(url: str) -> str:
    """ws(s):// URL for `url`; http(s) becomes ws(s), and a bare host gets `/api/chat`."""
    parts = urlsplit(url if "://" in url else "ws://" + url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"{url!r} is not a websocket or http URL")
    path = parts.path if parts.path.rstrip("/") else Protocol.MOSHI.path
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def with_query(url: str, query: str) -> str:
    """`url` with `query` ("?a=1&b=2" or "") added to any query it already has (a token, say)."""
    if not query:
        return url
    return url + ("&" + query[1:] if urlsplit(url).query else query)


def _close_error(code: int | None, reason: str) -> Exception:
    """The exception a transport sees for a server's close code."""
    if code == CloseCode.TRY_AGAIN_LATER:
        return BusyError(reason or "the Moshi server is busy")
    if code in (CloseCode.SERVICE_RESTART, CloseCode.GOING_AWAY):
        return ServerRestarting(reason or "the Moshi server is restarting")
    if code == CloseCode.INTERNAL_ERROR:
        return SessionError(f"server error: {reason or 'no reason given'}")
    return SessionClosed(f"server closed the connection ({code}: {reason or 'no reason given'})")


class RemoteSession(OutputIteration):
    """A conversation with a Moshi server over one websocket.

    `start()` connects; on `/api/chat` it also waits for the handshake, which our server
    sends once a slot is free: while every slot is taken it waits in the server's line
    (`on_position` hears its place, from the server's `KIND_METADATA` messages), and a
    server with no room raises BusyError there. On `/ws` (no handshake) a busy server's
    1013 surfaces from `receive()` or `send_pcm()` instead.
    """

    def __init__(
        self,
        url: str,
        sampling: Sampling | None = None,
        protocol: Protocol | None = None,
        open_timeout: float = 10.0,
        max_output_frames: int = MAX_OUTPUT_FRAMES,
        on_position: Callable[[LinePosition], None] | None = None,
    ) -> None:
        self.url = websocket_url(url)
        self.on_position = on_position
        self.protocol = protocol or Protocol.from_url(self.url)
        self.sampling = sampling
        self.open_timeout = open_timeout
        self.close_code: int | None = None
        self.close_reason = ""
        # Our server's id for this conversation (in its logs), told to clients that read its
        # metadata (`on_position` given); None from other servers.
        self.conversation_id: str | None = None
        self._outputs = OutputQueue(max_output_frames)
        self._encoder = OpusEncoder()
        self._decoder = OpusDecoder()
        self._pending = np.zeros(0, dtype=np.float32)
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self.resume_token: str | None = None  # what takes this conversation up on a new connection
        self.resumes = 0  # times it was taken up on a new connection
        self.unsent_frames = 0  # input frames dropped while no connection could carry them
        self._connect_s = 0.0
        self._resuming = False

    @property
    def dropped_frames(self) -> int:
        return self._outputs.dropped

    async def start(self) -> None:
        s = self.sampling or Sampling()
        query = sampling_query(
            **(dict(temp=s.temp, temp_text=s.temp_text, top_k=s.top_k, top_k_text=s.top_k_text, seed=s.seed,
                    text_seed=s.text_seed, audio_seed=s.audio_seed)
               if self.sampling is not None else {}),
            queue=1 if self.on_position is not None else None,
        )
        started = time.monotonic()
        self._ws = await connect(with_query(self.url, query), open_timeout=self.open_timeout, max_size=None,
                                 compression=None)
        self._connect_s = time.monotonic() - started
        if self.protocol is Protocol.MOSHI:
            try:
                await self._wait_for_handshake()
            except ConnectionClosed:
                raise self._closed() from None
        self._reader = asyncio.create_task(self._read())

    async def _wait_for_handshake(self) -> None:
        """The handshake comes once the server has a slot for us; until then, a server that
        keeps us in its line says where we stand (then its own timeout bounds the wait)."""
        in_line = False
        while True:
            message = await asyncio.wait_for(self._ws.recv(), None if in_line else self.open_timeout)
            if message == HANDSHAKE:
                return
            if isinstance(message, bytes) and message[:1] == bytes([KIND_METADATA]):
                queue = self._metadata(message[1:]).get("queue")
                if queue and self.on_position is not None:
                    in_line = True
                    self.on_position(LinePosition(queue["position"], queue["waiting"], queue["eta_s"]))
                continue
            await self._ws.close()
            raise SessionClosed(f"expected the handshake {HANDSHAKE!r}, got {message[:8]!r}")

    def _metadata(self, payload: bytes) -> dict:
        """The server's JSON metadata (its line, this conversation's id); {} if it is not JSON."""
        try:
            metadata = json.loads(payload)
        except ValueError:
            log.warning("ignoring metadata that is not JSON")
            return {}
        if not isinstance(metadata, dict):
            return {}
        conversation = metadata.get("conversation")
        if isinstance(conversation, dict) and isinstance(conversation.get("id"), str):
            self.conversation_id = conversation["id"]
        if isinstance(conversation, dict) and isinstance(conversation.get("resume"), str):
            self.resume_token = conversation["resume"]
        return metadata

    async def send_pcm(self, pcm: np.ndarray) -> None:
        check_pcm(pcm)
        if self._ws is None:
            raise SessionClosed("not started")
        if self._resuming:  # nothing carries it now; by the time something does, it is stale
            self.unsent_frames += 1
            return
        ws = self._ws
        ogg = self._encoder.encode(pcm)
        if ogg:
            try:
                await ws.send(client_message(self.protocol, ogg))
            except ConnectionClosed:
                if ws.close_code == CloseCode.ABNORMAL and self.resume_token is not None:
                    self.unsent_frames += 1  # the reader takes the conversation up again
                    return
                raise self._closed() from None

    async def receive(self) -> Output:
        return await self._outputs.get()

    async def _read(self) -> None:
        while await self._read_connection():
            if not await self._resume():
                return

    async def _read_connection(self) -> bool:
        """Read the current websocket until it ends; True when it broke or went quiet and the
        conversation has a resume token (take it up again), else False (it ended)."""
        ws = self._ws
        assert ws is not None
        live = False  # the conversation's audio is flowing: silence from now on means trouble
        try:
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), RECONNECT_AFTER_S if live else None)
                except TimeoutError:
                    if self.resume_token is None:
                        continue
                    log.info("no word from the server for %.1f s: resuming", RECONNECT_AFTER_S)
                    ws.transport.abort()
                    return True
                if isinstance(message, str) or not message:
                    log.warning("ignoring a %s message from the server", "text" if message else "empty")
                    continue
                kind, payload = message[0], message[1:]
                if kind == KIND_AUDIO:
                    live = True
                    self._queue_audio(self._decoder.decode(payload))
                elif kind == KIND_TEXT:
                    self._outputs.put(TextOut(payload.decode("utf-8", errors="replace")))
                elif kind == KIND_METADATA:
                    self._metadata(payload)
                elif kind != KIND_HANDSHAKE:
                    log.warning("ignoring a message of unknown kind %d", kind)
        except ConnectionClosed:
            if ws.close_code == CloseCode.ABNORMAL and self.resume_token is not None:
                return True  # dropped without a close frame: the network, not the server
            self._outputs.end(self._closed())
        except OpusError as error:
            self._outputs.end(SessionError(f"server sent invalid Opus: {error}"))
            await ws.close(CloseCode.INVALID_PAYLOAD, "invalid Opus")
        return False

    async def _resume(self) -> bool:
        """Take the conversation up on a new websocket with its resume token, trying for
        RESUME_FOR_S; True once it goes on, False when it cannot (the reason ends the outputs)."""
        self._resuming = True
        deadline = time.monotonic() + RESUME_FOR_S
        attempt_s = max(RESUME_ATTEMPT_S, 3 * self._connect_s)
        url = with_query(self.url, sampling_query(resume=self.resume_token, queue=1))
        try:
            while time.monotonic() < deadline:
                try:
                    ws = await connect(url, open_timeout=attempt_s, max_size=None, compression=None)
                except (OSError, TimeoutError) as error:
                    log.debug("resume attempt failed: %r", error)
                    await asyncio.sleep(max(0.0, min(0.25, deadline - time.monotonic())))
                    continue
                except Exception as error:  # refused at the HTTP level: no use trying again
                    self._outputs.end(SessionClosed(f"could not resume the conversation: {error}"))
                    return False
                self._ws = ws
                try:
                    if self.protocol is Protocol.MOSHI:
                        await self._wait_for_handshake()
                except ConnectionClosed:
                    if ws.close_code == CloseCode.ABNORMAL:
                        continue  # the link failed again: try again
                    self._outputs.end(self._closed())  # refused: the reason says why
                    return False
                except TimeoutError:
                    ws.transport.abort()
                    continue
                self._encoder, self._decoder = OpusEncoder(), OpusDecoder()  # new Ogg streams both ways
                self._pending = np.zeros(0, dtype=np.float32)
                self.resumes += 1
                log.info("conversation resumed on a new connection")
                return True
            self._outputs.end(SessionClosed(f"connection lost for {RESUME_FOR_S:.0f} s"))
            return False
        finally:
            self._resuming = False

    def _queue_audio(self, pcm: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, pcm])
        while self._pending.size >= FRAME_SIZE:
            frame, self._pending = self._pending[:FRAME_SIZE], self._pending[FRAME_SIZE:]
            self._outputs.put(AudioOut(frame))

    def _closed(self) -> Exception:
        if self._ws is not None:
            self.close_code, self.close_reason = self._ws.close_code, self._ws.close_reason or ""
        return _close_error(self.close_code, self.close_reason)

    async def close(self) -> None:
        """Close the websocket (1000) and stop reading. Idempotent."""
        if self._ws is not None:
            await self._ws.close()
            if self.close_code is None:
                self.close_code, self.close_reason = self._ws.close_code, self._ws.close_reason or ""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._outputs.end(SessionClosed("session closed"))

    async def __aenter__(self) -> RemoteSession:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


@dataclass
class Exchange:
    """What a server answered to a recording, with timestamps (seconds, monotonic clock)."""

    pcm: np.ndarray
    texts: list[str]
    sent_at: list[float] = field(default_factory=list)  # when each input frame left
    received_at: list[float] = field(default_factory=list)  # when each answer frame arrived
    close_code: int | None = None
    close_reason: str = ""
    conversation_id: str | None = None  # our server's id for it, when it told one
    resumes: int = 0  # times the conversation was taken up on a new connection
    unsent_frames: int = 0  # input frames dropped while no connection could carry them

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def time_to_first_audio(self) -> float | None:
        """From the first frame sent to the first frame of answer received."""
        if not self.sent_at or not self.received_at:
            return None
        return self.received_at[0] - self.sent_at[0]


async def exchange(
    url: str,
    pcm: np.ndarray,
    sampling: Sampling | None = None,
    realtime: bool = True,
    tail_s: float = 1.0,
    protocol: Protocol | None = None,
    on_position: Callable[[LinePosition], None] | None = None,
) -> Exchange:
    """Stream pcm to a Moshi server frame by frame and collect the answer.

    With `realtime` frames leave every 80 ms, as from a microphone; otherwise as
    fast as the server accepts them. Collection ends once every input frame has
    been answered (servers answer all but the first), or `tail_s` after the last
    frame when answers stop coming.
    """
    check_pcm(pcm)
    frames = [pcm[i : i + FRAME_SIZE] for i in range(0, pcm.size, FRAME_SIZE)]
    frames[-1] = np.pad(frames[-1], (0, FRAME_SIZE - frames[-1].size))
    result = Exchange(np.zeros(0, dtype=np.float32), [])
    session = RemoteSession(url, sampling, protocol, on_position=on_position)
    await session.start()

    async def feed() -> None:
        start = time.monotonic()
        for index, frame in enumerate(frames):
            if realtime:
                await asyncio.sleep(max(0.0, start + index * FRAME_SECONDS - time.monotonic()))
            result.sent_at.append(time.monotonic())
            await session.send_pcm(frame)

    feeder = asyncio.create_task(feed())
    answer: list[np.ndarray] = []
    try:
        while not (feeder.done() and len(answer) >= len(frames) - 1):
            try:
                out = await asyncio.wait_for(session.receive(), tail_s)
            except TimeoutError:
                if feeder.done():
                    break
                continue
            except SessionClosed:
                break
            if isinstance(out, AudioOut):
                result.received_at.append(time.monotonic())
                answer.append(out.pcm)
            else:
                result.texts.append(out.text)
        if feeder.done() and not isinstance(feeder.exception(), SessionClosed):
            feeder.result()  # a send that failed (busy, server error) says why
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        await session.close()
    result.close_code, result.close_reason = session.close_code, session.close_reason
    result.conversation_id = session.conversation_id
    result.resumes, result.unsent_frames = session.resumes, session.unsent_frames
    if answer:
        result.pcm = np.concatenate(answer)
    return result
