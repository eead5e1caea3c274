"""What the visitor sees of a conversation as it runs, in Debian's chromium with a fake microphone:
the live readout (how far behind real time Moshi's voice arrives, from the browser's own view:
WebRTC's getStats() on that path, the player's queue on the websocket) and the time left; with a
session limit of a few seconds, the last minute's warning and then the limit's message. After it,
the conversation's id in the page's details is the one in its recording's name, in the server's
log and, with its transport and how it ended, in /metrics."""

from __future__ import annotations

import logging
import os
import re
import urllib.request

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from playwright.sync_api import Page  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from moshi_engine.conversation import SessionLimits  # noqa: E402
from moshi_engine.engine import load_engine  # noqa: E402
from moshi_engine.web import create_app  # noqa: E402
from tests.live import serve_asgi  # noqa: E402

LIMIT_S = 10.0
TALK = "#moshi-webrtc button[aria-label='start stream']"
TIMEOUT_MS = 30_000
READOUT = "#moshi-transport .moshi-readout"
WARNING = "#moshi-transport .moshi-readout-warning"


@pytest.fixture(scope="module")
def served():
    engine = load_engine("tiny", device="cpu", sessions=1)
    try:
        with serve_asgi(create_app(engine, limits=SessionLimits(max_session_s=LIMIT_S, idle_s=60))) as url:
            yield url, engine
    finally:
        engine.close()


def screenshot(page: Page, name: str) -> None:
    """To $MOSHI_SCREENSHOTS (e.g. `docs`) when set."""
    from tests.page.test_browser import screenshot as save

    save(page, name)


def ended_conversations(url: str) -> dict[tuple[str, str], float]:
    """moshi_conversations_total by (transport, ending), and each transport's count of first
    audios by (transport, "first_audio"), as Prometheus would read /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    counts = {(s.labels["transport"], s.labels["ending"]): s.value for s in families["moshi_conversations"].samples
              if s.name == "moshi_conversations_total"}
    return counts | {(s.labels["transport"], "first_audio"): s.value
                     for s in families["moshi_first_audio_seconds"].samples if s.name.endswith("_count")}


@pytest.mark.parametrize(("query", "transport", "message"),
                         [("", "webrtc", "#moshi-message"),
                          ("?transport=websocket", "api/chat", "#moshi-transport .moshi-transport-message")],
                         ids=["webrtc", "websocket"])
def test_the_readout_shows_the_lag_and_the_time_left_then_the_limit_ends_the_conversation(
        browser, served, caplog, query, transport, message):
    url, engine = served
    before = ended_conversations(url)
    caplog.set_level(logging.INFO, logger="moshi_engine")
    context = browser.new_context(accept_downloads=True)
    page: Page = context.new_page()
    try:
        page.goto(url + "/" + query)
        page.wait_for_function("() => window.moshiPage?.ready", timeout=TIMEOUT_MS)
        page.click("#moshi-webrtc button", timeout=TIMEOUT_MS)  # "Click to Access Microphone"
        page.wait_for_selector(TALK, timeout=TIMEOUT_MS)
        page.click(TALK)

        # During the conversation: a number of ms behind, and the time left counting down.
        page.wait_for_function("() => window.moshiPage.readout.state.behindMs !== null", timeout=TIMEOUT_MS)
        shown = page.inner_text(READOUT)
        assert re.search(r"Moshi's voice arrives \d+ ms behind", shown), shown
        assert re.search(r"\d:\d\d left", shown), shown
        state = page.evaluate("() => window.moshiPage.readout.state")
        assert state["transport"] == ("websocket" if query else "webrtc")
        assert 0 <= state["behindMs"] < 10_000 and 0 < state["leftS"] <= LIMIT_S
        if not query:
            assert "jitter buffer" in shown and "round trip" in shown  # the browser's own WebRTC figures
        first_left = state["leftS"]
        page.wait_for_function(f"() => window.moshiPage.readout.state.leftS < {first_left} - 1", timeout=TIMEOUT_MS)
        # Under a minute from the start (the limit is 10 s): the warning stays in view.
        assert page.is_visible(WARNING)
        assert page.inner_text(WARNING).startswith("Less than a minute left")
        if not query:
            screenshot(page, "screenshot-readout.png")
        assert engine.active == 1

        # The limit ends it: the readout goes, the page says why and how to start anew.
        page.wait_for_function(
            f"() => (document.querySelector('{message}')?.textContent ?? '').includes('Time is up')",
            timeout=TIMEOUT_MS)
        assert "Press the button to start a new one" in page.inner_text(message)
        page.wait_for_selector(READOUT, state="hidden", timeout=TIMEOUT_MS)
        assert not page.is_visible(WARNING)
        assert engine.active == 0

        # Its id: in the page's details, the recording's name, the server's log and /metrics.
        page.wait_for_selector("#moshi-recording .moshi-details", state="attached", timeout=TIMEOUT_MS)
        conversation_id = page.text_content("#moshi-recording .moshi-details code", timeout=TIMEOUT_MS)
        with page.expect_download() as download:
            page.click("#moshi-recording a", timeout=TIMEOUT_MS)
        assert download.value.suggested_filename.endswith(f"-{conversation_id}.wav")
    finally:
        context.close()
    ends = [r for r in caplog.records if r.getMessage() == "conversation ended"
            and getattr(r, "conversation", None) == conversation_id]
    assert len(ends) == 1 and ends[0].fields["ending"] == "limit" and ends[0].fields["transport"] == transport
    after = ended_conversations(url)
    for key in ((transport, "limit"), (transport, "first_audio")):  # this conversation, once
        assert after[key] == before.get(key, 0.0) + 1
