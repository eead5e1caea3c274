"""The page talks without TURN: when WebRTC cannot connect, it carries the conversation over
its own `/api/chat` websocket, by itself (`moshi_engine/page/static/page.js`).

Debian's chromium with a fake microphone playing a speech asset, against the real app
(`web.create_app`, private: the token rides in the cookie) with the tiny model and one
slot. A Chromium with no WebRTC path is simulated by an init script that keeps every ICE
candidate from the peer connection (`bench.browser.NO_WEBRTC_PATH`), as a strict NAT with
no TURN does. One fallback conversation is run (module fixture) and each test checks one
thing it should have done; the other paths each get a short conversation of their own.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from playwright.sync_api import Page  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from moshi_engine.audio import SAMPLE_RATE, rms, write_wav  # noqa: E402
from moshi_engine.bench.browser import NO_WEBRTC_PATH  # noqa: E402
from moshi_engine.conversation import SessionLimits  # noqa: E402
from moshi_engine.door.line import LinePosition  # noqa: E402
from moshi_engine.engine import load_engine  # noqa: E402
from moshi_engine.page.endings import LEFT_LINE_MESSAGE, Ending, duration_words, ending_message, line_message  # noqa: E402
from moshi_engine.page.pagescript import RECORDING_READY  # noqa: E402
from moshi_engine.page.recording import Recording  # noqa: E402
from moshi_engine.web import create_app  # noqa: E402
from moshi_engine.wire.protocol import HANDSHAKE  # noqa: E402
from tests.live import serve_asgi  # noqa: E402

TOKEN = "fallback-test-token"
TALK = "#moshi-webrtc button[aria-label='start stream']"
STOP = "#moshi-transport .moshi-transport-stop"
STATUS = "#moshi-transport .moshi-transport-status"
MESSAGE = "#moshi-transport .moshi-transport-message"
TIMEOUT_MS = 30_000
CONVERSATION_S = 4.0
LIMITS = SessionLimits()
# Keeps every RTCPeerConnection the page creates (installed before the page's own watcher).
HOOK_PEER_CONNECTIONS = """
window.__peerConnections = [];
const NativePeerConnection = window.RTCPeerConnection;
window.RTCPeerConnection = class extends NativePeerConnection {
  constructor(...args) { super(...args); window.__peerConnections.push(this); }
};
"""
PEER_CONNECTIONS = "() => window.__peerConnections.length"
SOCKET_LIVE = "() => window.moshiPage.socket?.state === 'live'"
SOCKET_STATS = "() => window.moshiPage.socket.stats()"
TRANSCRIPT_SHOWN = "() => document.querySelector('#moshi-transcript textarea').value.trim().length > 0"


@dataclass
class Visitor:
    """A page of its own browser context, and the websockets it opened."""

    page: Page
    websockets: list[str] = field(default_factory=list)

    @property
    def chats(self) -> list[str]:
        return [url for url in self.websockets if "/api/chat" in url]

    def state(self) -> dict:
        return self.page.evaluate(
            "() => ({why: moshiPage.why, transport: moshiPage.transport, fallbacks: moshiPage.fallbacks,"
            " attempts: moshiPage.attempts.map((a) => a.state)})"
        )


@pytest.fixture(scope="module")
def served():
    engine = load_engine("tiny", device="cpu", sessions=1)
    app = create_app(engine, token=TOKEN, limits=LIMITS)
    try:
        with serve_asgi(app) as url:
            yield url, app, engine
    finally:
        engine.close()


def visit(browser, url: str, query: str = "", *, webrtc: bool = True, talk: bool = True,
          scripts: tuple[str, ...] = ()) -> Visitor:
    """Open the private page (the token goes into a cookie), with `query` on its address and,
    unless `webrtc`, no WebRTC path; with `talk`, ready for Talk (the microphone granted);
    `scripts` run first."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    for script in scripts:
        page.add_init_script(script)
    page.add_init_script(HOOK_PEER_CONNECTIONS)
    if not webrtc:
        page.add_init_script(NO_WEBRTC_PATH)
    visitor = Visitor(page)
    page.on("websocket", lambda ws: visitor.websockets.append(ws.url))
    page.goto(f"{url}/?token={TOKEN}" + (f"&{query}" if query else ""))
    assert "token" not in page.url and (not query or query in page.url)  # only the token leaves the address
    page.wait_for_function("() => window.moshiPage?.ready", timeout=TIMEOUT_MS)
    if talk:
        page.click("#moshi-webrtc button", timeout=TIMEOUT_MS)  # "Click to Access Microphone"
        page.wait_for_selector(TALK, timeout=TIMEOUT_MS)
    return visitor


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=10) as response:
        return json.load(response)


def wait_until(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def screenshot(page: Page, name: str) -> None:
    directory = os.environ.get("MOSHI_SCREENSHOTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(directory) / name), full_page=True)


def message(page: Page) -> str:
    return page.inner_text(MESSAGE).strip()


def talk_until_heard(page: Page) -> dict:
    """Wait until the websocket conversation is live, has sent CONVERSATION_S of microphone
    audio and shows Moshi's words; returns its stats."""
    page.wait_for_function(SOCKET_LIVE, timeout=TIMEOUT_MS)
    page.wait_for_function(
        f"() => window.moshiPage.socket.counters.sentSamples >= {CONVERSATION_S * SAMPLE_RATE}", timeout=TIMEOUT_MS
    )
    page.wait_for_function(TRANSCRIPT_SHOWN, timeout=TIMEOUT_MS)
    return page.evaluate(SOCKET_STATS)


# ## WebRTC cannot connect: the page falls back by itself


@dataclass
class Fallback:
    """What the conversation of a page with no WebRTC path left behind."""

    fell_back_after_s: float
    state: dict
    status_text: str
    chats: list[str]
    peer_connections: int
    server_webrtc_left: int  # FastRTC's connections still open on the server after the fallback
    active_while_talking: int
    waiting_while_talking: int
    stats: dict
    transcript: str
    talk_button_hidden: bool
    stopped_message: str
    active_after_stop: int
    waiting_after_stop: int
    talk_button_back: str
    transcript_after_ticks: str  # the page's refresh tick, seconds later, left it alone
    message_after_ticks: str
    recording: Path
    recording_href: str
    person_samples: int


@pytest.fixture(scope="module")
def fallback(browser, served, tmp_path_factory) -> Fallback:
    url, app, engine = served
    visitor = visit(browser, url, webrtc=False)
    page = visitor.page
    try:
        page.fill("#moshi-seed input", "42")  # the page's sampling controls apply on this path too
        page.press("#moshi-seed input", "Tab")
        pressed = time.monotonic()
        page.click(TALK)
        page.wait_for_function("() => window.moshiPage.transport === 'websocket'", timeout=TIMEOUT_MS)
        fell_back_after_s = time.monotonic() - pressed
        # FastRTC would keep its side 30 s; the page's word closes it at once
        wait_until(lambda: len(app.state.page.webrtc.pcs) == 0, timeout_s=10)
        server_webrtc_left = len(app.state.page.webrtc.pcs)
        stats = talk_until_heard(page)
        screenshot(page, "screenshot-websocket.png")
        now = status(url)
        evidence = dict(
            fell_back_after_s=fell_back_after_s,
            state=visitor.state(),
            status_text=page.inner_text(STATUS).strip(),
            chats=visitor.chats,
            peer_connections=page.evaluate(PEER_CONNECTIONS),
            server_webrtc_left=server_webrtc_left,
            active_while_talking=now["sessions"]["active"],
            waiting_while_talking=now["queue"]["waiting"],
            stats=stats,
            transcript=page.input_value("#moshi-transcript textarea"),
            talk_button_hidden=not page.is_visible(TALK),
        )
        page.click(STOP)
        page.wait_for_function(f"() => document.querySelector('{MESSAGE}').innerText.includes('ended')",
                               timeout=TIMEOUT_MS)
        wait_until(lambda: engine.active == 0)
        after = status(url)
        link = "#moshi-recording a"
        page.wait_for_selector(link, state="visible", timeout=TIMEOUT_MS)
        with page.expect_download() as download:
            page.click(link)
        recording = tmp_path_factory.mktemp("fallback") / "conversation.wav"
        download.value.save_as(recording)
        stopped_message = message(page)
        time.sleep(2.5)  # the page's refresh tick runs every second
        return Fallback(
            **evidence,
            stopped_message=stopped_message,
            transcript_after_ticks=page.input_value("#moshi-transcript textarea"),
            message_after_ticks=message(page),
            active_after_stop=after["sessions"]["active"],
            waiting_after_stop=after["queue"]["waiting"],
            talk_button_back=page.inner_text(TALK).strip(),
            recording=recording,
            recording_href=page.get_attribute(link, "href"),
            person_samples=page.evaluate("() => window.moshiPage.recording.personSamples"),
        )
    finally:
        page.context.close()


def test_without_a_webrtc_path_the_page_switches_to_its_websocket_by_itself(fallback):
    assert fallback.state["transport"] == "websocket" and fallback.state["fallbacks"] == 1
    assert fallback.state["attempts"] == ["abandoned"]  # FastRTC's one attempt, given up
    assert fallback.peer_connections == 1
    assert len(fallback.chats) == 1 and "queue=1" in fallback.chats[0]
    # after the default wait for WebRTC (5 s from the server's answer), not before
    assert 5.0 <= fallback.fell_back_after_s < 20.0


def test_the_page_says_which_transport_carries_the_conversation(fallback):
    assert fallback.status_text == "WebRTC could not connect, so this conversation goes over the page's websocket."


def test_the_abandoned_webrtc_attempt_holds_no_slot_no_place_in_line_and_no_connection(fallback):
    assert fallback.server_webrtc_left == 0
    assert fallback.active_while_talking == 1  # the websocket's conversation, and nothing else
    assert fallback.waiting_while_talking == 0


def test_the_sampling_controls_ride_on_the_websocket(fallback):
    assert "seed=42" in fallback.chats[0] and "temp=0.8" in fallback.chats[0] and "top_k=250" in fallback.chats[0]


def test_moshis_words_reach_the_transcript(fallback):
    assert fallback.stats["textPieces"] > 0
    assert fallback.transcript.strip()


def test_moshis_voice_reaches_the_pages_player(fallback):
    player = fallback.stats["player"]
    assert fallback.stats["backend"] == "webcodecs"
    assert player["framesPlayed"] > 0 and player["samplesPlayed"] > SAMPLE_RATE / 2
    assert player["energy"] > 0  # Moshi's noise, not silence


def test_the_websocket_path_shows_its_own_stop_instead_of_fastrtcs_talk_button(fallback):
    assert fallback.talk_button_hidden
    assert fallback.talk_button_back == "Talk to Moshi"  # FastRTC's component is back to rest, no error


def test_stop_ends_the_websocket_conversation_and_releases_the_slot(fallback):
    assert fallback.active_after_stop == 0 and fallback.waiting_after_stop == 0
    seconds = duration_words(round(fallback.person_samples / SAMPLE_RATE))
    assert fallback.stopped_message == ending_message(Ending.STOPPED, LIMITS, seconds) + RECORDING_READY


def test_the_pages_refresh_tick_leaves_what_the_websocket_path_shows(fallback):
    assert fallback.transcript_after_ticks.startswith(fallback.transcript)
    assert fallback.message_after_ticks == fallback.stopped_message


def test_the_recording_is_made_in_the_browser_as_a_stereo_wav_of_the_conversation(fallback):
    assert fallback.recording_href.startswith("blob:")  # it never went to the server, nor comes from it
    with wave.open(str(fallback.recording), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, SAMPLE_RATE)
        frames = wav.getnframes()
        samples = np.frombuffer(wav.readframes(frames), dtype="<i2").reshape(-1, 2)
    assert frames == fallback.person_samples >= CONVERSATION_S * SAMPLE_RATE  # as long as the microphone was live
    person, moshi = samples[:, 0].astype(np.float32) / 32768, samples[:, 1].astype(np.float32) / 32768
    assert rms(person) > 0.01 and rms(moshi) > 0.01
    assert not moshi[:1920].any()  # Moshi answers the first frame, once it was sent


def test_the_abandon_route_closes_only_an_unconnected_attempt_it_can_name(served):
    url, _, _ = served

    def abandon(body: bytes) -> tuple[int, dict | None]:
        request = urllib.request.Request(url + "/webrtc/abandon", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, None

    assert abandon(b'{"ufrag": "nobodys"}') == (200, {"closed": 0})
    assert abandon(b"not json")[0] == 400 and abandon(b"{}")[0] == 400


# ## The other paths


def test_an_unmodified_chromium_still_talks_over_webrtc(browser, served):
    url, _, engine = served
    visitor = visit(browser, url, "webrtc_timeout=60")  # a slow machine is no reason to fall back here
    page = visitor.page
    try:
        page.click(TALK)
        page.wait_for_function("() => window.moshiPage.transport === 'webrtc'", timeout=TIMEOUT_MS)
        page.wait_for_function(TRANSCRIPT_SHOWN, timeout=TIMEOUT_MS)
        assert page.inner_text(STATUS).strip() == "Talking over WebRTC."
        assert visitor.state()["attempts"] == ["connected"] and engine.active == 1
        page.click(TALK)  # FastRTC's Stop
        wait_until(lambda: engine.active == 0)
        page.wait_for_function("() => window.moshiPage.why === 'webrtcEnded'", timeout=TIMEOUT_MS)
        assert page.inner_text(STATUS).strip() == "The last conversation went over WebRTC."
        assert visitor.chats == []  # no websocket to /api/chat was opened
    finally:
        page.context.close()


def test_a_browser_without_webrtc_talks_over_the_websocket_at_once(browser, served):
    url, _, engine = served
    visitor = visit(browser, url, scripts=("delete window.RTCPeerConnection;",))
    page = visitor.page
    try:
        page.click(TALK)
        page.wait_for_function(SOCKET_LIVE, timeout=TIMEOUT_MS)
        assert page.inner_text(STATUS).strip() == (
            "This browser has no WebRTC, so this conversation goes over the page's websocket."
        )
        page.click(STOP)
        wait_until(lambda: engine.active == 0)
        assert len(visitor.chats) == 1
    finally:
        page.context.close()


def test_transport_websocket_goes_straight_to_the_websocket(browser, served):
    url, _, engine = served
    visitor = visit(browser, url, "transport=websocket")
    page = visitor.page
    try:
        assert page.inner_text(STATUS).strip() == "Talks over this page's websocket (?transport=websocket)."
        page.click(TALK)
        page.wait_for_function(SOCKET_LIVE, timeout=TIMEOUT_MS)
        assert page.inner_text(STATUS).strip() == "Talking over the page's websocket (?transport=websocket)."
        assert page.evaluate(PEER_CONNECTIONS) == 0  # FastRTC never started
        assert len(visitor.chats) == 1
        page.click(STOP)
        wait_until(lambda: engine.active == 0)
    finally:
        page.context.close()


def test_transport_webrtc_never_falls_back_and_talk_cancels_the_attempt(browser, served):
    url, app, engine = served
    visitor = visit(browser, url, "transport=webrtc&webrtc_timeout=1", webrtc=False)
    page = visitor.page
    try:
        page.click(TALK)
        page.wait_for_function("() => window.moshiPage.why === 'stillTrying'", timeout=TIMEOUT_MS)
        time.sleep(2.0)  # well past the timeout: still nothing but WebRTC
        assert visitor.state()["attempts"] == ["connecting"] and visitor.chats == []
        assert page.inner_text(STATUS).strip().startswith("WebRTC has not connected after 1 s; still trying")
        assert page.inner_text(TALK).strip() == "Connecting"
        page.click(TALK)  # would start a second connection beside the first; cancels this one
        page.wait_for_function("() => window.moshiPage.why === 'cancelled'", timeout=TIMEOUT_MS)
        page.wait_for_function(f"() => document.querySelector(\"{TALK}\").innerText.includes('Talk')",
                               timeout=TIMEOUT_MS)
        wait_until(lambda: len(app.state.page.webrtc.pcs) == 0, timeout_s=10)
        assert page.evaluate(PEER_CONNECTIONS) == 1 and visitor.chats == [] and engine.active == 0
    finally:
        page.context.close()


def test_the_time_limit_ends_a_websocket_conversation_with_the_webrtc_paths_sentence(browser, served):
    _, _, engine = served
    short = SessionLimits(max_session_s=2.0)
    with serve_asgi(create_app(engine, token=TOKEN, limits=short)) as url:
        visitor = visit(browser, url, "transport=websocket")
        page = visitor.page
        try:
            page.click(TALK)
            page.wait_for_function(f"() => document.querySelector('{MESSAGE}').innerText.includes('Time is up')",
                                   timeout=TIMEOUT_MS)
            said = message(page)
            wait_until(lambda: engine.active == 0)
            assert not page.is_visible(STOP) and page.is_visible(TALK)  # ready for another
        finally:
            page.context.close()
    assert said == ending_message(Ending.TIME_LIMIT, short) + RECORDING_READY


def test_the_fallback_waits_in_line_and_talks_by_itself_once_the_slot_frees(browser, served):
    url, _, engine = served
    visitor = visit(browser, url, "webrtc_timeout=2", webrtc=False)
    page = visitor.page
    ws_url = url.replace("http", "ws") + f"/api/chat?token={TOKEN}"
    try:
        with connect(ws_url) as holder:  # the only slot, taken
            assert holder.recv(timeout=30) == HANDSHAKE
            page.click(TALK)
            page.wait_for_function(f"() => document.querySelector('{MESSAGE}').innerText.includes('in line')",
                                   timeout=TIMEOUT_MS)
            in_line = message(page)
            waiting = status(url)["queue"]["waiting"]
        talk_until_heard(page)  # the holder hung up: this page's turn
        assert message(page) == ""
        page.click(STOP)
        wait_until(lambda: engine.active == 0)
    finally:
        page.context.close()
    assert in_line == line_message(LinePosition(position=1, waiting=1, eta_s=0))
    assert waiting == 1  # the page's websocket, and not its abandoned WebRTC attempt too


# ## One source for the words, one rule for the recording

WORDS = """async () => {
  const { PageWords } = await import("/moshi-static/page-words.js");
  const config = JSON.parse(document.getElementById("moshi-page-config").textContent);
  const words = new PageWords(config.words, config.reasons);
  const etas = [0, 59, 60, 89, 90, 150, 210, 3600];
  return {
    line: [1, 2, 3, 8].flatMap((position) => etas.map((eta_s) => words.line({ position, waiting: 8, eta_s }))),
    durations: [0, 1, 2.5, 59, 60, 61, 120, 150, 600].map((s) => words.duration(s)),
    endings: [
      words.ending({ code: 1000, reason: "stopped by the user", byUser: true, seconds: 4.6 }),
      words.ending({ code: 1000, reason: "stopped by the user", byUser: true, queued: true }),
      words.ending({ code: 1000, reason: config.reasons.timeLimit, seconds: 600 }),
      words.ending({ code: 1000, reason: "conversation ended", seconds: 125 }),
      words.ending({ code: 1008, reason: config.reasons.idle, seconds: 30 }),
      words.ending({ code: 1008, reason: "temp='x' is not a valid float" }),
      words.ending({ code: 1012, reason: "the server is restarting; connect again in a minute" }),
      words.ending({ code: 1013, reason: "all 1 conversation slots are taken and the waiting line is full" }),
      words.ending({ code: 1013, reason: "no conversation slot freed up", queued: true }),
      words.ending({ code: 1011, reason: "internal error" }),
    ],
  };
}"""


def test_the_page_says_what_endings_py_says(browser, served):
    url, app, _ = served
    visitor = visit(browser, url, talk=False)
    try:
        said = visitor.page.evaluate(WORDS)
    finally:
        visitor.page.context.close()
    etas = [0, 59, 60, 89, 90, 150, 210, 3600]
    assert said["line"] == [line_message(LinePosition(p, 8, eta)) for p in (1, 2, 3, 8) for eta in etas]
    assert said["durations"] == [duration_words(s) for s in (0, 1, 2.5, 59, 60, 61, 120, 150, 600)]
    timeout = duration_words(app.state.moshi.engine.line.timeout_s)
    assert said["endings"] == [
        ending_message(Ending.STOPPED, LIMITS, duration_words(5)),
        LEFT_LINE_MESSAGE,
        ending_message(Ending.TIME_LIMIT, LIMITS),
        ending_message(Ending.STOPPED, LIMITS, duration_words(125)),
        ending_message(Ending.IDLE, LIMITS),
        ending_message(Ending.ERROR, LIMITS, "temp='x' is not a valid float"),
        ending_message(Ending.RESTART, LIMITS),
        ending_message(Ending.BUSY, LIMITS),
        ending_message(Ending.LINE_TIMEOUT, LIMITS, timeout),
        ending_message(Ending.ERROR, LIMITS, "internal error"),
    ]


RECORD = """async (steps) => {
  const { Recording, wavBytes } = await import("/moshi-static/recording.js");
  const recording = new Recording();
  const starts = steps.map(([side, pcm]) =>
    side === "person" ? recording.addPerson(Float32Array.from(pcm)) : recording.addMoshi(Float32Array.from(pcm)));
  return { starts, wav: Array.from(wavBytes(recording.stereo(), 2, 24000)) };
}"""


def test_the_browsers_recording_follows_the_servers_rule_to_the_byte(browser, served, tmp_path):
    url, _, _ = served
    rng = np.random.default_rng(7)
    steps = []  # the person speaks; Moshi's chunks come late, early, in bursts, loud enough to clip
    for side, size in [("person", 4800), ("moshi", 1920), ("moshi", 1920), ("person", 1000), ("moshi", 480),
                       ("person", 8000), ("moshi", 1920), ("moshi", 1920), ("moshi", 1920), ("person", 300),
                       ("moshi", 7000)]:
        steps.append((side, rng.uniform(-1.3, 1.3, size).astype(np.float32)))
    visitor = visit(browser, url, talk=False)
    try:
        result = visitor.page.evaluate(RECORD, [(side, pcm.tolist()) for side, pcm in steps])
    finally:
        visitor.page.context.close()
    recording = Recording()
    starts = [recording.add_person(pcm) if side == "person" else recording.add_moshi(pcm) for side, pcm in steps]
    write_wav(tmp_path / "server.wav", recording.stereo())
    assert [start for start, (side, _) in zip(result["starts"], steps, strict=True) if side == "moshi"] == [
        start for start, (side, _) in zip(starts, steps, strict=True) if side == "moshi"
    ]
    assert bytes(result["wav"]) == (tmp_path / "server.wav").read_bytes()
