"""The load the benchmark puts on Moshi: real speech as Ogg Opus pages, one per 80 ms frame,
streamed into a session in this process or to a server over a loopback websocket.

Both ways produce a `StreamRun`: when each input frame left the client and when
the first byte of each answer frame came back (`time.perf_counter`, seconds).
Servers answer every input frame but the first (`ANSWER_DELAY_FRAMES`): answer
frame m comes from the step on input frame m + 1, so its latency is
`answered_at[m] - sent_at[m + 1]`.

Pacing a real-time client sleeps until each frame is due, as a microphone would
deliver it; the timestamps are taken when a frame actually leaves, so the
pacing itself is never part of a measured interval.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..audio import FRAME_SECONDS, FRAME_SIZE, read_wav

SPEECH_DIR = Path(__file__).resolve().parents[2] / "assets" / "speech"
SPEECH_FILES = ("hello.wav", "music.wav")
ANSWER_DELAY_FRAMES = 1  # the step on the first frame answers nothing (moshi's delay)


def speech_pages(frames: int) -> list[bytes]:
    """`frames` 80 ms frames of the speech assets (looped) as Ogg Opus, one page set per frame.

    Encoding happens here, before anything is timed: the client's encoder is not
    part of the server's frame. The first item also carries the stream's headers.
    """
    from ..wire.codec import OpusEncoder

    speech = np.concatenate([read_wav(SPEECH_DIR / name) for name in SPEECH_FILES])
    pcm = np.resize(speech, frames * FRAME_SIZE)  # repeats the recording as needed
    encoder = OpusEncoder()
    pages = [encoder.encode(pcm[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]) for i in range(frames)]
    if not all(pages):
        raise RuntimeError("the Opus writer held a frame back; the per-frame pairing below assumes one page per frame")
    return pages


@dataclass
class StreamRun:
    """One client's stream: `frames` input frames and the answers that came back."""

    frames: int
    sent_at: list[float] = field(default_factory=list)  # each input frame leaving the client
    answered_at: list[float] = field(default_factory=list)  # first byte of each answer frame
    texts: int = 0  # text pieces received

    @property
    def expected_answers(self) -> int:
        return max(0, self.frames - ANSWER_DELAY_FRAMES)

    @property
    def complete(self) -> bool:
        """Every frame that should have been answered was."""
        return len(self.answered_at) >= self.expected_answers

    def latencies_ms(self) -> np.ndarray:
        """Per answered frame: first byte of the answer minus the input frame leaving (ms)."""
        answered = np.asarray(self.answered_at[: self.expected_answers])
        sent = np.asarray(self.sent_at[ANSWER_DELAY_FRAMES : ANSWER_DELAY_FRAMES + answered.size])
        return (answered[: sent.size] - sent) * 1000.0

    def throughput_fps(self) -> float:
        """Answer frames per second of wall time, from the first frame sent to the last answer."""
        if not self.answered_at:
            return 0.0
        return len(self.answered_at) / (self.answered_at[-1] - self.sent_at[0])

    def real_time_factor(self) -> float | None:
        """Wall time to answer the recording over its duration (below 1: faster than real time)."""
        if not self.complete or not self.answered_at:
            return None
        return (self.answered_at[-1] - self.sent_at[0]) / (self.frames * FRAME_SECONDS)

    def time_to_first_audio_ms(self) -> float | None:
        """From the first frame leaving to the first byte of the first answer (includes the
        model's one-frame delay: the first answer comes from the second frame)."""
        if not self.answered_at:
            return None
        return (self.answered_at[0] - self.sent_at[0]) * 1000.0


async def _pace(start: float, index: int, realtime: bool) -> None:
    if realtime:
        delay = start + index * FRAME_SECONDS - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


async def _finish(run: StreamRun, reader: asyncio.Task, tail_s: float, realtime: bool) -> None:
    """Wait for the rest of the answers once every frame is sent.

    In real time, at most `tail_s`: a server still answering later than that is seconds
    behind and fails real time anyway, and waiting for its backlog would only make an
    overloaded capacity level last much longer than its stream. Sent as fast as
    possible, for as long as answers keep coming, giving up `tail_s` after the last one.
    """
    if realtime:
        await asyncio.wait({reader}, timeout=tail_s)
    else:
        while not reader.done():
            answered = len(run.answered_at)
            await asyncio.wait({reader}, timeout=tail_s)
            if len(run.answered_at) == answered:
                break
    if not reader.done():
        reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    if not reader.cancelled() and reader.exception() is not None:
        raise reader.exception()


async def stream_session(engine, pages: list[bytes], realtime: bool = True, offset_s: float = 0.0,
                         tail_s: float = 2.0, sampling=None) -> StreamRun:
    """Stream `pages` through a session of `engine` in this process, doing a server's
    per-frame work without the web stack: Opus decode -> session -> Opus encode.

    `sent_at` is when a frame's bytes are handed over (as if just received) and
    `answered_at` when the answer's Opus bytes are ready to go out. Opus decode and
    encode are recorded into `engine.timings` as the server records them.
    """
    from ..conversation import AudioOut
    from ..timings import OPUS_DECODE, OPUS_ENCODE
    from ..wire.codec import OpusDecoder, OpusEncoder

    decoder, encoder, timings = OpusDecoder(), OpusEncoder(), engine.timings
    run = StreamRun(len(pages))

    async with engine.session(sampling) as session:

        async def read() -> None:
            while len(run.answered_at) < run.expected_answers:
                out = await session.receive()
                if isinstance(out, AudioOut):
                    started = time.perf_counter()
                    encoder.encode(out.pcm)
                    ready = time.perf_counter()
                    timings.record(OPUS_ENCODE, ready - started)
                    run.answered_at.append(ready)
                else:
                    run.texts += 1

        reader = asyncio.create_task(read())
        start = time.perf_counter() + offset_s
        try:
            for index, page in enumerate(pages):
                await _pace(start, index, realtime)
                arrived = time.perf_counter()
                run.sent_at.append(arrived)
                pcm = decoder.decode(page)
                timings.record(OPUS_DECODE, time.perf_counter() - arrived)
                await session.send_pcm(pcm)
            await _finish(run, reader, tail_s, realtime)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return run


async def stream_websocket(url: str, pages: list[bytes], realtime: bool = True, offset_s: float = 0.0,
                           tail_s: float = 2.0) -> StreamRun:
    """Stream `pages` to a Moshi server's `/ws` or `/api/chat` (ours or moshi's) and time
    the answers as they arrive. Answers are not decoded: the first byte of an audio
    message is what is timed, and decoding would only load the client."""
    from websockets.asyncio.client import connect

    from ..wire.protocol import HANDSHAKE, KIND_AUDIO, KIND_TEXT, Protocol, client_message

    protocol = Protocol.from_url(url)
    run = StreamRun(len(pages))
    messages = [client_message(protocol, page) for page in pages]
    async with connect(url, max_size=None, compression=None, open_timeout=60) as ws:
        if protocol is Protocol.MOSHI:
            handshake = await asyncio.wait_for(ws.recv(), 60)
            if handshake != HANDSHAKE:
                raise RuntimeError(f"{url} answered {handshake[:8]!r} instead of the handshake")

        async def read() -> None:
            async for message in ws:
                arrived = time.perf_counter()
                if message[0] == KIND_AUDIO:
                    run.answered_at.append(arrived)
                    if len(run.answered_at) >= run.expected_answers:
                        return
                elif message[0] == KIND_TEXT:
                    run.texts += 1

        reader = asyncio.create_task(read())
        start = time.perf_counter() + offset_s
        try:
            for index, message in enumerate(messages):
                await _pace(start, index, realtime)
                run.sent_at.append(time.perf_counter())
                await ws.send(message)
            await _finish(run, reader, tail_s, realtime)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return run
