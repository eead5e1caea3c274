"""The page of a server with two voices (tiny and tiny-q8, one slot each) in Debian's chromium
with a fake microphone: the visitor picks a voice, and the conversation, over WebRTC and over
the page's websocket, is that voice's, on that voice's slot, and so is the recording's name."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from dataclasses import dataclass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from playwright.sync_api import Page  # noqa: E402

from moshi_engine.engine import load_voices  # noqa: E402
from moshi_engine.web import create_app  # noqa: E402
from tests.live import serve_asgi  # noqa: E402

TALK = "#moshi-webrtc button[aria-label='start stream']"
STOP = "#moshi-transport .moshi-transport-stop"
TIMEOUT_MS = 30_000
TRANSCRIPT_SHOWN = "() => document.querySelector('#moshi-transcript textarea').value.trim().length > 0"


@pytest.fixture(scope="module")
def served():
    voices = load_voices("tiny,tiny-q8", device="cpu", sessions=1)
    app = create_app(voices)
    try:
        with serve_asgi(app) as url:
            yield url, app, voices
    finally:
        voices.close()


def active(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/status", timeout=10) as response:
        return {voice["name"]: voice["sessions"]["active"] for voice in json.load(response)["voices"]}


def wait_until(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@dataclass
class Talk:
    """One conversation on the voice the visitor picked."""

    choices: list[str]
    picked: str | None  # what the page's script reads from the picker
    active_while_talking: dict[str, int]
    chats: list[str]  # the page's /api/chat websockets
    recording_name: str
    voice_of_record: str | None  # the server's record of a WebRTC conversation


def talk_on(browser, url: str, app, voice: str | None, query: str = "") -> Talk:
    """Open the page, pick `voice` (None: leave the picker as it came), talk until Moshi's words
    show, stop, and download the recording."""
    context = browser.new_context(accept_downloads=True)
    page: Page = context.new_page()
    chats: list[str] = []
    page.on("websocket", lambda ws: chats.append(ws.url) if "/api/chat" in ws.url else None)
    try:
        page.goto(url + "/" + query)
        page.wait_for_function("() => window.moshiPage?.ready", timeout=TIMEOUT_MS)
        choices = page.eval_on_selector_all("#moshi-voice input[type=radio]", "els => els.map((e) => e.value)")
        if voice:
            page.check(f"#moshi-voice input[type=radio][value='{voice}']")
        picked = page.evaluate("() => document.querySelector('#moshi-voice input[type=radio]:checked')?.value")
        page.click("#moshi-webrtc button", timeout=TIMEOUT_MS)  # "Click to Access Microphone"
        page.wait_for_selector(TALK, timeout=TIMEOUT_MS)
        page.click(TALK)
        page.wait_for_function(TRANSCRIPT_SHOWN, timeout=TIMEOUT_MS)
        active_while_talking = active(url)
        page.click(STOP if "websocket" in query else TALK)
        wait_until(lambda: sum(active(url).values()) == 0)
        with page.expect_download() as download:
            page.click("#moshi-recording a", timeout=TIMEOUT_MS)
        records = [r for r in app.state.page.conversations.records() if r.person_samples]
        return Talk(choices, picked, active_while_talking, chats, download.value.suggested_filename,
                    records[-1].voice if records and not query else None)
    finally:
        context.close()


def test_the_page_offers_both_voices_and_a_webrtc_conversation_is_the_picked_ones(browser, served):
    url, app, _ = served
    talk = talk_on(browser, url, app, "tiny-q8")
    assert talk.choices == ["tiny", "tiny-q8"] and talk.picked == "tiny-q8"
    assert talk.active_while_talking == {"tiny": 0, "tiny-q8": 1}  # tiny-q8's slot, not tiny's
    assert talk.voice_of_record == "tiny-q8"
    assert talk.recording_name.startswith("moshi-conversation-tiny-q8-") and talk.recording_name.endswith(".wav")
    assert talk.chats == []  # WebRTC carried it


def test_over_the_pages_websocket_the_conversation_is_the_picked_voices_too(browser, served):
    url, app, _ = served
    talk = talk_on(browser, url, app, "tiny-q8", "?transport=websocket")
    assert talk.active_while_talking == {"tiny": 0, "tiny-q8": 1}
    assert len(talk.chats) == 1 and "voice=tiny-q8" in talk.chats[0]
    assert talk.recording_name.startswith("moshi-conversation-tiny-q8-")


def test_the_first_voice_is_picked_until_the_visitor_picks_another(browser, served):
    url, app, _ = served
    talk = talk_on(browser, url, app, None)
    assert talk.picked == "tiny" and talk.active_while_talking == {"tiny": 1, "tiny-q8": 0}
    assert talk.voice_of_record == "tiny" and re.fullmatch(r"moshi-conversation-tiny-\d.*\.wav", talk.recording_name)
