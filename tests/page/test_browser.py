"""The page in a real browser: Debian's chromium, driven by playwright, with a fake
microphone playing a speech asset, talking to the tiny model over WebRTC.

One conversation is run (module fixture) and each test checks one thing it should
have done. Screenshots go to $MOSHI_SCREENSHOTS (e.g. `docs`) when set.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402

from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE, rms  # noqa: E402
from moshi_engine.engine import load_engine  # noqa: E402
from moshi_engine.page.conversation_log import ConversationRecord  # noqa: E402
from moshi_engine.page.endings import LEFT_LINE_MESSAGE, Ending  # noqa: E402
from moshi_engine.web import create_app  # noqa: E402
from tests.conftest import HELLO_WAV  # noqa: E402
from tests.live import serve_asgi  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={HELLO_WAV.resolve()}",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]
# Keeps every RTCPeerConnection the page creates, so that the test can read its stats.
HOOK_PEER_CONNECTIONS = """
window.__peerConnections = [];
const NativePeerConnection = window.RTCPeerConnection;
window.RTCPeerConnection = class extends NativePeerConnection {
  constructor(...args) { super(...args); window.__peerConnections.push(this); }
};
"""
INBOUND_AUDIO = """async () => {
  let packets = 0, energy = 0;
  for (const pc of window.__peerConnections) {
    (await pc.getStats()).forEach(r => {
      if (r.type !== 'inbound-rtp' || r.kind !== 'audio') return;
      packets += r.packetsReceived;
      energy += r.totalAudioEnergy;
    });
  }
  return {packets, energy};
}"""
TALK_BUTTON = "#moshi-webrtc button[aria-label='start stream']"  # "Talk to Moshi", then "Stop"
# How long the first conversation goes on once Moshi's first words are on the page; counted
# from then, not from the click, because connecting takes as long as this machine needs.
CONVERSATION_S = 4.0
TOKEN = "browser-test-token"  # the page runs private: every request the page makes must carry it


@dataclass
class Evidence:
    """What the browser conversations left behind."""

    transcript: str
    inbound: dict
    record: ConversationRecord
    active_after_stop: int
    talked_s: float  # from "Talk to Moshi" to "Stop"
    recording: Path
    line_message: str
    left_message: str
    queue_after_leaving: dict
    started_by_itself: str  # the transcript of the visitor whose turn came
    foreign_download: int  # the recording's link, fetched by another browser
    cookieless_download: int


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=10) as response:
        return json.load(response)


def screenshot(page: Page, name: str) -> None:
    directory = os.environ.get("MOSHI_SCREENSHOTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(directory) / name), full_page=True)


def open_page(browser, url: str, token: str | None = None) -> Page:
    """A visitor of its own (its own browser context, so its own cookies) opening the page; a
    private page's link once with its `token`, which goes into a cookie and out of the address."""
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.add_init_script(HOOK_PEER_CONNECTIONS)
    page.goto(f"{url}/?token={token}" if token else url)
    assert "token" not in page.url
    # the page's script watches every click on Talk: a click before it runs would go to FastRTC alone
    page.wait_for_function("() => window.moshiPage?.ready", timeout=60_000)
    page.click("#moshi-webrtc button", timeout=30_000)  # "Click to Access Microphone"
    page.wait_for_selector(TALK_BUTTON, timeout=30_000)
    return page


# The message's own text, without Gradio's progress timer ("0.3s") that shows over it while an update is pending.
MESSAGE_TEXT = """() => {
  const message = document.querySelector('#moshi-message')?.cloneNode(true);
  message?.querySelectorAll('.wrap, .progress-text, .meta-text, .eta-bar').forEach((e) => e.remove());
  return message?.innerText || '';
}"""


def message_containing(page: Page, text: str) -> str:
    page.wait_for_function(f"t => ({MESSAGE_TEXT})().includes(t)", arg=text, timeout=30_000)
    return page.evaluate(MESSAGE_TEXT).strip()


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


TRANSCRIPT_SHOWN = "() => document.querySelector('#moshi-transcript textarea').value.trim().length > 0"


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> Evidence:
    engine = load_engine("tiny", device="cpu", sessions=1)
    app = create_app(engine, token=TOKEN)
    ui = app.state.page
    try:
        with serve_asgi(app) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = open_page(browser, url, TOKEN)
            started = time.monotonic()
            page.click(TALK_BUTTON)
            page.wait_for_function(TRANSCRIPT_SHOWN, timeout=30_000)
            time.sleep(CONVERSATION_S)
            inbound = page.evaluate(INBOUND_AUDIO)
            transcript = page.input_value("#moshi-transcript textarea")
            screenshot(page, "screenshot-conversation.png")

            # a second visitor while the only slot is in this conversation: in line, then leaves
            other = open_page(browser, url, TOKEN)
            other.click(TALK_BUTTON)
            line = message_containing(other, "in line")
            screenshot(other, "screenshot-line.png")
            other.click(TALK_BUTTON)  # "Stop": leaves the line
            left = message_containing(other, "You left the line")
            wait_until(lambda: status(url)["queue"]["waiting"] == 0)
            queue_after_leaving = status(url)["queue"]

            # a third visitor waits, and talks as soon as the first hangs up
            third = open_page(browser, url, TOKEN)
            third.click(TALK_BUTTON)
            message_containing(third, "1st in line")
            page.click(TALK_BUTTON)  # "Stop"
            talked_s = time.monotonic() - started
            third.wait_for_function(TRANSCRIPT_SHOWN, timeout=30_000)
            started_by_itself = third.input_value("#moshi-transcript textarea")
            third.click(TALK_BUTTON)
            wait_until(lambda: status(url)["sessions"]["active"] == 0)
            active_after_stop = status(url)["sessions"]["active"]

            page.wait_for_selector("#moshi-recording a", state="visible", timeout=15_000)
            with page.expect_download() as download:
                page.click("#moshi-recording a")
            recording = tmp_path_factory.mktemp("download") / "conversation.wav"
            download.value.save_as(recording)
            screenshot(page, "screenshot-recording.png")
            link = page.get_attribute("#moshi-recording a", "href")
            foreign_download = other.request.get(f"{url}/{link}").status
            cookieless = urllib.request.Request(f"{url}/{link}", headers={"Authorization": f"Bearer {TOKEN}"})
            try:
                cookieless_download = urllib.request.urlopen(cookieless, timeout=10).status
            except urllib.error.HTTPError as error:
                cookieless_download = error.code
            browser.close()
    finally:
        engine.close()
    record = ui.conversations.records()[0]
    return Evidence(transcript, inbound, record, active_after_stop, talked_s, recording, line, left,
                    queue_after_leaving, started_by_itself, foreign_download, cookieless_download)


def test_the_handler_hears_the_microphone(evidence):
    assert evidence.record.person_samples > 2 * SAMPLE_RATE
    assert evidence.record.person_rms > 0.01  # the speech asset, not silence


def test_the_transcript_shows_what_moshi_says(evidence):
    assert evidence.transcript.strip()
    assert evidence.record.transcript.startswith(evidence.transcript.strip()[:10])


def test_the_browser_receives_moshis_voice(evidence):
    assert evidence.inbound["packets"] > 50
    assert evidence.inbound["energy"] > 0


def test_stopping_releases_the_slot(evidence):
    assert evidence.active_after_stop == 0
    assert evidence.record.ending is Ending.STOPPED


def test_the_recording_downloads_as_a_stereo_wav_of_the_conversation(evidence):
    with wave.open(str(evidence.recording), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, SAMPLE_RATE)
        frames = wav.getnframes()
        samples = np.frombuffer(wav.readframes(frames), dtype="<i2").reshape(-1, 2)
    # as long as the microphone was heard: every sample the handler got (on a loaded machine
    # WebRTC delivers fewer than the wall clock says), never more than the talk lasted
    assert frames == evidence.record.person_samples
    assert CONVERSATION_S / 2 <= frames / SAMPLE_RATE <= evidence.talked_s + 0.5
    person, moshi = samples[:, 0].astype(np.float32) / 32768, samples[:, 1].astype(np.float32) / 32768
    assert rms(person) > 0.01 and rms(moshi) > 0.01
    # Moshi speaks from its second 80 ms frame on, once the first reply reaches the browser
    assert rms(moshi[SAMPLE_RATE:]) > 0.01 and not moshi[:FRAME_SIZE].any()


def test_a_second_visitor_waits_in_line_and_stop_leaves_it(evidence):
    assert "Every conversation slot is taken: you are 1st in line" in evidence.line_message
    assert "Stop leaves the line" in evidence.line_message
    assert evidence.left_message == LEFT_LINE_MESSAGE
    assert evidence.queue_after_leaving["waiting"] == 0


def test_a_visitor_in_line_talks_as_soon_as_a_slot_frees_up(evidence):
    assert evidence.started_by_itself.strip()


def test_the_recording_is_the_browsers_that_had_it_and_no_one_elses(evidence):
    assert evidence.foreign_download == 404  # another visitor's browser, with the link
    assert evidence.cookieless_download == 404  # the token, but not that browser
