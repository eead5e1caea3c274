"""The page's WebRTC path under load: aiortc peers that do what the page's front end does.

Each peer posts its SDP offer to the page's WebRTC component (Gradio's component
server, fn `offer`), answers the handler's request for the page's inputs through
Gradio's queue (the component's `tick` event), sends the speech assets as its
microphone, paced in real time at 48 kHz as a browser would, and times every
audio frame Moshi sends back.

Per frame there is no way to pair an answer with the input frame that caused it
(the RTP stream carries no frame numbers), so a WebRTC stream is judged by its
own timeline: the first audio arrives at `first_audio`; from then on, audio that
keeps real time arrives at `first_audio + samples so far / rate`, and its lag
behind that line is what grows when the server falls behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from ..audio import read_wav
from .stats import summarize
from .streams import SPEECH_DIR, SPEECH_FILES

RATE = 48_000  # what browsers send over WebRTC, and what Opus decodes to
PACKET = 960  # 20 ms
PAGE_INPUTS = [0.8, 250, 0.7, 25, -1]  # audio temp, audio top-k, text temp, text top-k, seed


@dataclass
class WebRTCRun:
    """One peer's call: when it started sending, and each audio frame that came back."""

    seconds: float  # of microphone audio sent
    started_at: float = 0.0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, samples at RATE)
    refused: str | None = None

    @property
    def received_s(self) -> float:
        return sum(samples for _, samples in self.arrivals) / RATE

    def received_ratio(self) -> float:
        """Audio received over the time from its first frame to the microphone's end: about 1
        when every frame is answered (the microphone's first moments, before the handler has
        its conversation, are not; the tail after the microphone stops makes up for latency)."""
        if not self.arrivals:
            return 0.0
        window = self.started_at + self.seconds - self.arrivals[0][0]
        return self.received_s / window if window > 0 else 0.0

    def time_to_first_audio_ms(self) -> float | None:
        return (self.arrivals[0][0] - self.started_at) * 1000.0 if self.arrivals else None

    def lags_ms(self) -> np.ndarray:
        """How late each frame arrived behind real-time playback from the first frame (ms)."""
        if not self.arrivals:
            return np.zeros(0)
        times = np.array([arrived for arrived, _ in self.arrivals])
        before = np.concatenate([[0], np.cumsum([samples for _, samples in self.arrivals])[:-1]])
        return (times - times[0] - before / RATE) * 1000.0


def _speech_48k(seconds: float) -> np.ndarray:
    from scipy.signal import resample_poly

    speech = np.concatenate([read_wav(SPEECH_DIR / name) for name in SPEECH_FILES])
    speech = resample_poly(speech, 2, 1).astype(np.float32)  # 24 -> 48 kHz
    return np.resize(speech, int(seconds * RATE))


def _speech_track(pcm: np.ndarray):
    """An aiortc audio track playing `pcm` (48 kHz mono) in real time, 20 ms per frame, then ending."""
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    samples = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)

    class SpeechTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._index = 0
            self._start: float | None = None

        async def recv(self):
            if self._index * PACKET >= samples.size:
                self.stop()
                raise MediaStreamError
            if self._start is None:
                self._start = time.perf_counter()
            delay = self._start + self._index * PACKET / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = samples[self._index * PACKET : (self._index + 1) * PACKET]
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = RATE
            frame.pts = self._index * PACKET
            frame.time_base = fractions.Fraction(1, RATE)
            self._index += 1
            return frame

    return SpeechTrack()


async def page_endpoints(http) -> tuple[int, int]:
    """The WebRTC component's id and the fn_index of its `tick` event (where the page sends
    its inputs), read from the page's Gradio config."""
    config = (await http.get("/config")).json()
    component = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "moshi-webrtc")
    tick = next(d["id"] for d in config["dependencies"] if [component, "tick"] in d.get("targets", []))
    return component, tick


async def stream_webrtc(base_url: str, seconds: float, offset_s: float = 0.0, tail_s: float = 2.0) -> WebRTCRun:
    """One page visitor's call over WebRTC: `seconds` of speech as the microphone, Moshi's
    audio timed as it arrives; hangs up `tail_s` after the microphone stops."""
    import httpx
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    run = WebRTCRun(seconds)
    webrtc_id, session_hash = secrets.token_hex(8), secrets.token_hex(8)
    await asyncio.sleep(offset_s)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        component, tick = await page_endpoints(http)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = pc.createDataChannel("text")
        pending: set[asyncio.Task] = set()

        async def send_inputs() -> None:
            await http.post("/gradio_api/queue/join", json={
                "data": [webrtc_id, *PAGE_INPUTS, ""], "event_data": None, "fn_index": tick,  # "": no resume token
                "trigger_id": component, "session_hash": session_hash})

        @channel.on("message")
        def on_message(message: str) -> None:
            if json.loads(message).get("type") == "send_input":
                task = asyncio.ensure_future(send_inputs())
                pending.add(task)
                task.add_done_callback(pending.discard)

        received = asyncio.Event()

        async def read(track) -> None:
            with contextlib.suppress(Exception):  # ends with the track
                while True:
                    frame = await track.recv()
                    run.arrivals.append((time.perf_counter(), frame.samples))
                    received.set()

        readers: list[asyncio.Task] = []
        pc.on("track", lambda track: readers.append(asyncio.ensure_future(read(track))))
        pc.addTrack(_speech_track(_speech_48k(seconds)))
        try:
            await pc.setLocalDescription(await pc.createOffer())
            body = {"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": webrtc_id}
            answer = (await http.post("/gradio_api/component_server/", json={
                "session_hash": session_hash, "component_id": component, "fn_name": "offer", "data": body})).json()
            if "sdp" not in answer:
                run.refused = json.dumps(answer)
                return run
            run.started_at = time.perf_counter()
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            await asyncio.sleep(max(0.0, run.started_at + seconds + tail_s - time.perf_counter()))
        finally:
            await pc.close()
            for task in [*readers, *pending]:
                task.cancel()
            await asyncio.gather(*readers, *pending, return_exceptions=True)
    return run


@dataclass(frozen=True)
class WebRTCCriterion:
    """When k concurrent WebRTC calls are kept in real time: every call got audio for at least
    `min_received` of the time from its first audio to the end of its microphone (Moshi answers
    every 80 ms frame), and no call's audio fell behind real-time playback by more than
    `drift_bound_ms` between the first and the last third of the call (medians)."""

    min_received: float = 0.95
    drift_bound_ms: float = 20.0

    def judge(self, runs: list[WebRTCRun]) -> dict:
        failures = [f"refused: {run.refused}" for run in runs if run.refused]
        ratios = [run.received_ratio() for run in runs if not run.refused]
        short = [ratio for ratio in ratios if ratio < self.min_received]
        if short:
            failures.append(f"{len(short)} call(s) got under {self.min_received:.0%} of their audio "
                            f"(least {min(short):.0%})")
        drifts = []
        for run in runs:
            thirds = np.array_split(run.lags_ms(), 3)
            if all(part.size for part in thirds):
                drifts.append(float(np.median(thirds[2]) - np.median(thirds[0])))
        drift = max(drifts, default=0.0)
        if drift > self.drift_bound_ms:
            failures.append(f"audio fell behind by {drift:.1f} ms > {self.drift_bound_ms:g} ms")
        first = [run.time_to_first_audio_ms() for run in runs if run.arrivals]
        return {
            "sessions": len(runs),
            "received_ratio_min": round(min(ratios, default=0.0), 3),
            "drift_ms": round(drift, 3),
            "lag_jitter": summarize(np.concatenate([run.lags_ms() - np.median(run.lags_ms())
                                                    for run in runs if run.arrivals] or [np.zeros(0)])),
            "time_to_first_audio": summarize(first),
            "keeps_real_time": not failures,
            "failures": failures,
        }

    def describe(self) -> dict:
        return {"min_received": self.min_received, "drift_bound_ms": self.drift_bound_ms}
