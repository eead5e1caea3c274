"""The page's WebRTC route without a browser: an aiortc peer posts its SDP offer where the
page's WebRTC component posts it (Gradio's component server, fn `offer`), sends a speech
asset as its microphone and gets Moshi back, all on a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.contrib.media import MediaPlayer  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from moshi_engine.audio import SAMPLE_RATE, rms  # noqa: E402
from moshi_engine.conversation import SessionLimits  # noqa: E402
from moshi_engine.engine import load_engine  # noqa: E402
from moshi_engine.page.endings import Ending, ending_message, line_message  # noqa: E402
from moshi_engine.page.ui import WEBRTC_ROUTES, MoshiPage, mount_ui  # noqa: E402
from moshi_engine.wire.server import create_api  # noqa: E402
from tests.conftest import DEVICE, HELLO_WAV, until  # noqa: E402

PAGE_INPUTS = [0.8, 250, 0.7, 25, 42]  # audio temp, audio top-k, text temp, text top-k, seed


@contextlib.asynccontextmanager
async def serving(app):
    """Serve `app` with uvicorn in this test's event loop (the aiortc peer shares it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(30):
        while not server.started:
            await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def page_server(engine, **page_options):
    app = create_api(engine)
    page = mount_ui(app, engine, **page_options)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield page, http


async def call_component(http: httpx.AsyncClient, page: MoshiPage, fn_name: str, data) -> dict:
    """What the WebRTC component's front end does to reach its server functions."""
    response = await http.post(
        "/gradio_api/component_server/",
        json={"session_hash": "aiortc-peer", "component_id": page.webrtc._id, "fn_name": fn_name, "data": data},
    )
    response.raise_for_status()
    return response.json()


@dataclass
class Peer:
    """An aiortc peer playing a WAV as its microphone, as the page's front end would."""

    page: MoshiPage
    webrtc_id: str
    pc: RTCPeerConnection = field(default_factory=lambda: RTCPeerConnection(RTCConfiguration(iceServers=[])))
    messages: list[dict] = field(default_factory=list)
    received: list[np.ndarray] = field(default_factory=list)
    resume: str | None = None  # a conversation's resume token, as the page sends it after a handover
    _reader: asyncio.Task | None = None

    async def offer(self, http: httpx.AsyncClient) -> dict:
        channel = self.pc.createDataChannel("text")

        @channel.on("message")
        def on_message(message: str) -> None:
            self.messages.append(json.loads(message))
            if self.messages[-1]["type"] == "send_input":  # the page answers with its inputs
                resume = [self.resume] if self.resume is not None else []
                self.page.webrtc.set_input(self.webrtc_id, self.webrtc_id, *PAGE_INPUTS, *resume)

        @self.pc.on("track")
        def on_track(track) -> None:
            self._reader = asyncio.create_task(self._read(track))

        self.pc.addTrack(MediaPlayer(str(HELLO_WAV)).audio)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer", "webrtc_id": self.webrtc_id}
        answer = await call_component(http, self.page, "offer", body)
        if "sdp" in answer:
            await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        return answer

    async def _read(self, track) -> None:
        with contextlib.suppress(Exception):  # ends when the track does
            while True:
                frame = await track.recv()
                self.received.append(frame.to_ndarray().astype(np.float32).ravel() / 32768)

    def received_seconds(self) -> float:
        return sum(chunk.size for chunk in self.received) / 2 / 48000  # Opus decodes to 48 kHz stereo

    def types(self) -> list[str]:
        return [message["type"] for message in self.messages]

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()


async def test_a_webrtc_peer_speaks_and_hears_moshi_and_closing_releases_the_slot(single_engine):
    async with page_server(single_engine) as (page, http):
        peer = Peer(page, "peer-talks")
        offered = time.monotonic()
        await peer.offer(http)
        await until(lambda: peer.received_seconds() > 3.0, timeout=30)
        live = page.conversations.get("peer-talks")
        assert single_engine.active == 1 and not live.ended
        assert "fetch_output" in peer.types()  # the server told the page to fetch the transcript
        await peer.close()
        talked_s = time.monotonic() - offered
        await until(lambda: single_engine.active == 0 and live.ended, timeout=15)

    heard = np.concatenate(peer.received[-100:])  # the last two seconds the peer heard
    assert rms(heard) > 0.01  # Moshi's voice, not silence
    assert live.ending is Ending.STOPPED
    # the speech asset reached the handler at 24 kHz, in real time
    assert 2.0 <= live.person_samples / SAMPLE_RATE <= talked_s and live.person_rms > 0.01
    assert live.transcript and live.text_pieces > 0
    assert live.sampling.seed == 42 and live.recording.exists()


async def test_a_second_connection_waits_in_line_and_talks_once_the_first_hangs_up(single_engine):
    async with page_server(single_engine) as (page, http):
        first = Peer(page, "first-in")
        await first.offer(http)
        await until(lambda: first.received_seconds() > 0.5, timeout=30)
        second = Peer(page, "second-in")
        await second.offer(http)
        await until(lambda: getattr(page.conversations.get("second-in"), "line", None) is not None, timeout=30)
        waiting = page.conversations.get("second-in")
        assert waiting.line.position == 1 and second.received_seconds() == 0
        assert line_message(waiting.line).startswith("Every conversation slot is taken: you are 1st in line")
        await first.close()
        await until(lambda: second.received_seconds() > 0.5, timeout=30)  # its turn came by itself
        assert waiting.line is None and single_engine.active == 1
        await second.close()
        await until(lambda: single_engine.active == 0, timeout=15)


async def test_a_connection_beyond_the_slots_is_told_busy_and_one_beyond_the_handover_room_is_refused(
        single_engine, monkeypatch):
    monkeypatch.setattr(single_engine.line, "places", 0)  # --queue 0
    async with page_server(single_engine) as (page, http):
        first = Peer(page, "first")
        await first.offer(http)
        await until(lambda: first.received_seconds() > 0.5, timeout=30)
        # FastRTC takes a second connection per slot (a handover holds the dead one for a while),
        # and the page tells it why there is no conversation for it ...
        second = Peer(page, "second")
        await second.offer(http)
        await until(lambda: "end_stream" in second.types(), timeout=30)
        # ... and refuses any more
        third = Peer(page, "third")
        answer = await third.offer(http)
        for peer in (third, second, first):
            await peer.close()
        await until(lambda: single_engine.active == 0, timeout=15)
    end = next(message for message in second.messages if message["type"] == "end_stream")
    assert end["data"] == ending_message(Ending.BUSY)
    assert answer == {"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": 2}}


async def test_a_busy_engine_with_a_full_line_ends_the_stream_with_the_busy_message(single_engine, monkeypatch):
    monkeypatch.setattr(single_engine.line, "places", 0)
    held = single_engine.open_session()  # e.g. a websocket client holds the only slot
    try:
        async with page_server(single_engine) as (page, http):
            peer = Peer(page, "too-late")
            await peer.offer(http)
            await until(lambda: "end_stream" in peer.types(), timeout=30)
            await peer.close()
    finally:
        await held.close()
    end = next(message for message in peer.messages if message["type"] == "end_stream")
    assert end["data"] == ending_message(Ending.BUSY)
    assert page.conversations.get("too-late").ending is Ending.BUSY
    assert single_engine.active == 0


async def test_the_time_limit_ends_the_stream_with_its_message_and_releases_the_slot(single_engine):
    async with page_server(single_engine, limits=SessionLimits(max_session_s=2.0)) as (page, http):
        peer = Peer(page, "long-talk")
        await peer.offer(http)
        await until(lambda: "end_stream" in peer.types(), timeout=30)
        await until(lambda: single_engine.active == 0, timeout=10)
        await peer.close()
    end = next(message for message in peer.messages if message["type"] == "end_stream")
    assert end["data"].startswith("Time is up: a conversation lasts at most 2 s.")
    record = page.conversations.get("long-talk")
    assert record.ending is Ending.TIME_LIMIT and record.recording.exists()


async def test_a_call_whose_model_process_dies_ends_saying_why_and_later_calls_are_served():
    engine = load_engine("tiny", device=DEVICE, sessions=1, warmup_frames=1)
    try:
        async with page_server(engine) as (page, http):
            talking = Peer(page, "talking")
            await talking.offer(http)
            await until(lambda: talking.received_seconds() > 0.5, timeout=30)
            dead_pid = engine.model.pid
            os.kill(dead_pid, signal.SIGKILL)
            await until(lambda: "end_stream" in talking.types(), timeout=30)
            await talking.close()
            end = next(message for message in talking.messages if message["type"] == "end_stream")
            assert "model process stopped" in end["data"] and "restarting" in end["data"]
            assert page.conversations.get("talking").ending is Ending.ERROR

            await until(lambda: engine.stopped is None, timeout=300)  # another model process is warm
            later = Peer(page, "later")
            await later.offer(http)
            await until(lambda: later.received_seconds() > 0.5, timeout=30)
            assert engine.model.pid != dead_pid and engine.active == 1
            await later.close()
            await until(lambda: engine.active == 0, timeout=15)
    finally:
        engine.close()


@contextlib.asynccontextmanager
async def remote_page_server(moshi_url: str):
    """A page with no model of its own: every browser session is a websocket session on `moshi_url`."""
    app = FastAPI()
    page = mount_ui(app, remote=moshi_url.replace("http://", "ws://") + "/api/chat")
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield page, http


async def test_remote_mode_carries_the_call_to_a_moshi_server_over_the_opus_websocket(single_engine):
    async with serving(create_api(single_engine)) as moshi_url, remote_page_server(moshi_url) as (page, http):
        peer = Peer(page, "via-websocket")
        await peer.offer(http)
        await until(lambda: peer.received_seconds() > 3.0, timeout=30)
        assert single_engine.active == 1  # the Moshi server leased a slot for this call
        await peer.close()
        await until(lambda: single_engine.active == 0, timeout=15)
    record = page.conversations.get("via-websocket")
    assert rms(np.concatenate(peer.received[-100:])) > 0.01
    assert record.ending is Ending.STOPPED and record.person_rms > 0.01 and record.transcript


async def test_remote_mode_says_moshi_is_busy_when_the_server_is(single_engine, monkeypatch):
    monkeypatch.setattr(single_engine.line, "places", 0)
    held = single_engine.open_session()
    try:
        async with serving(create_api(single_engine)) as moshi_url, remote_page_server(moshi_url) as (page, http):
            peer = Peer(page, "remote-busy")
            await peer.offer(http)
            await until(lambda: "end_stream" in peer.types(), timeout=30)
            await peer.close()
    finally:
        await held.close()
    end = next(message for message in peer.messages if message["type"] == "end_stream")
    assert end["data"] == ending_message(Ending.BUSY)


async def test_the_page_asks_for_no_ice_servers_on_loopback(single_engine):
    async with page_server(single_engine, host="127.0.0.1") as (page, http):
        assert await call_component(http, page, "turn", {}) == {}


async def test_a_page_in_front_of_a_remote_moshi_relays_its_websocket_path_there(single_engine, hello_pcm,
                                                                                monkeypatch):
    from websockets.asyncio.client import connect

    from moshi_engine.web import create_app
    from moshi_engine.wire.protocol import HANDSHAKE, CloseCode
    from moshi_engine.wire.remote import exchange

    async with serving(create_api(single_engine)) as moshi_url:
        page_app = create_app(remote=moshi_url.replace("http://", "ws://") + "/api/chat", poll_remote_status=False)
        async with serving(page_app) as page_url:
            chat = page_url.replace("http://", "ws://") + "/api/chat"
            result = await exchange(chat + "?seed=3", hello_pcm[:SAMPLE_RATE], realtime=False)
            assert result.close_code == CloseCode.NORMAL and result.pcm.size > 0 and result.texts
            await until(lambda: single_engine.active == 0, timeout=10)

            holder = await connect(chat)  # the remote's only slot, held through the page
            assert await holder.recv() == HANDSHAKE and single_engine.active == 1
            monkeypatch.setattr(single_engine.line, "places", 0)
            refused = await connect(chat)
            await asyncio.wait_for(refused.wait_closed(), 10)  # the remote's refusal, passed through
            assert refused.close_code == CloseCode.TRY_AGAIN_LATER and "waiting line is full" in refused.close_reason
            await holder.close()
            await until(lambda: single_engine.active == 0, timeout=10)


async def test_a_new_connection_with_the_token_takes_the_conversation_up_and_a_wrong_or_used_one_is_refused(
        single_engine):
    """A handover as the page makes it: a second connection sends the first one's resume token among
    its inputs and carries on the same conversation in the same slot; a wrong or spent token ends
    that connection with the reason and leaves the conversation alone."""
    async with page_server(single_engine) as (page, http):
        first = Peer(page, "first-connection")
        await first.offer(http)
        await until(lambda: first.received_seconds() > 0.5, timeout=30)
        record = page.conversations.get("first-connection")
        token = record.resume_token
        assert token and single_engine.active == 1

        wrong = Peer(page, "wrong-token", resume="not-a-token")
        await wrong.offer(http)
        await until(lambda: "end_stream" in wrong.types(), timeout=30)
        heard = first.received_seconds()
        await until(lambda: first.received_seconds() > heard + 0.3, timeout=30)  # untouched, still talking

        second = Peer(page, "second-connection", resume=token)
        await second.offer(http)
        await until(lambda: second.received_seconds() > 0.5, timeout=30)
        taken = page.conversations.get("second-connection")
        assert taken.conversation_id == record.conversation_id and single_engine.active == 1

        used = Peer(page, "used-token", resume=token)
        await used.offer(http)
        await until(lambda: "end_stream" in used.types(), timeout=30)

        await first.close()  # the old connection goes: the conversation is the new one's now
        heard = second.received_seconds()
        await until(lambda: second.received_seconds() > heard + 0.3, timeout=30)
        assert single_engine.active == 1
        for peer in (used, second, wrong):
            await peer.close()
        await until(lambda: single_engine.active == 0, timeout=15)

    def ending(peer: Peer) -> str:
        return next(message["data"] for message in peer.messages if message["type"] == "end_stream")

    assert "unknown resume token" in ending(wrong)
    assert "used already" in ending(used)
    assert taken.ending is Ending.STOPPED and record.ending is None  # one conversation, ended once


async def test_the_page_stopping_a_call_whose_sound_stopped_first_frees_its_slot_at_once(single_engine):
    """FastRTC's Stop stops sending half a second before it closes the connection, and a call that
    fell silent keeps its slot for a handover: the page's word that the visitor stopped ends the
    conversation at once. Another connection's ufrag stops nothing."""
    async with page_server(single_engine) as (page, http):
        peer = Peer(page, "stopped-call")
        await peer.offer(http)
        await until(lambda: peer.received_seconds() > 0.5, timeout=30)
        record = page.conversations.get("stopped-call")
        (handler,) = [connection for connection in page.conversations.live if connection.record is record]
        microphone = peer.pc.getSenders()[0].track
        peer.pc.getSenders()[0].replaceTrack(None)  # the microphone goes quiet, the connection stays
        await until(lambda: handler.clock.interrupted_at is not None, timeout=10)

        stop = WEBRTC_ROUTES["stop"]  # the page is mounted at /
        wrong = await http.post(stop, json={"ufrag": "not-this-call"})
        assert wrong.json() == {"stopped": False} and single_engine.active == 1
        assert (await http.post(stop, json={})).status_code == 400
        ufrag = re.search(r"^a=ice-ufrag:(\S+)", peer.pc.localDescription.sdp, re.MULTILINE).group(1)
        stopped = await http.post(stop, json={"ufrag": ufrag})
        assert stopped.json() == {"stopped": True}
        assert single_engine.active == 0 and record.ended  # at once, not after the grace
        await peer.close()
        microphone.stop()  # its player, no longer the connection's to stop

    assert record.ending is Ending.STOPPED
