"""The page in Firefox (Debian's firefox-esr, headless, under Selenium) as in Chromium: a
conversation over WebRTC on the voice picked (of two: tiny and tiny-q8) and one over the page's
websocket on the default voice, with a PulseAudio microphone playing hello.wav; and over http
from another machine, the microphone's message."""

from __future__ import annotations

import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from moshi_engine.conversation import SessionLimits  # noqa: E402
from moshi_engine.engine import load_voices  # noqa: E402
from moshi_engine.web import create_app  # noqa: E402
from tests.conftest import HELLO_WAV  # noqa: E402
from tests.firefox import firefox, pulse_microphone  # noqa: E402
from tests.live import serve_asgi  # noqa: E402

ACCESS = "#moshi-webrtc button"  # "Click to Access Microphone"
TALK = "#moshi-webrtc button[aria-label='start stream']"  # "Talk to Moshi", then "Stop"
STOP = "#moshi-transport .moshi-transport-stop"
TIMEOUT_S = 30.0
NAME = "gpubox"  # resolved to this machine by Firefox itself (network.dns.localDomains)


@pytest.fixture(scope="module")
def served():
    voices = load_voices("tiny,tiny-q8", device="cpu", sessions=1)
    try:
        with serve_asgi(create_app(voices, limits=SessionLimits(idle_s=120))) as url:
            yield url, voices
    finally:
        voices.close()


@pytest.fixture(scope="module")
def driver():
    with pulse_microphone(HELLO_WAV) as env, firefox(env, {"network.dns.localDomains": NAME}) as running:
        yield running


def wait_for(driver, script: str, timeout_s: float = TIMEOUT_S):
    """The value of `script` (a JavaScript expression) once it is truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := driver.execute_script(f"return {script}")):
        assert time.monotonic() < deadline, f"{script} did not hold in time"
        time.sleep(0.1)
    return value


def until(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, "window.moshiPage?.ready && window.moshiPage.microphone !== undefined")


def transcript(driver) -> str:
    return driver.execute_script("return document.querySelector('#moshi-transcript textarea').value").strip()


def leased(voices) -> dict[str, int]:
    return {name: engine.active for name, engine in voices.engines.items()}


@pytest.mark.parametrize(("query", "voice"), [("", "tiny-q8"), ("?transport=websocket", None)],
                         ids=["webrtc", "websocket"])
def test_firefox_talks_with_moshi_and_stop_releases_the_slot(served, driver, query, voice):
    url, voices = served
    open_page(driver, url + "/" + query)
    assert driver.execute_script("return window.moshiPage.microphone") is None
    if voice:
        driver.find_element(By.CSS_SELECTOR, f"#moshi-voice input[type=radio][value='{voice}']").click()
    driver.find_element(By.CSS_SELECTOR, ACCESS).click()
    wait_for(driver, f"document.querySelector(\"{TALK}\")")
    driver.find_element(By.CSS_SELECTOR, TALK).click()
    wait_for(driver, "document.querySelector('#moshi-transcript textarea').value.trim().length > 0")
    # the live readout has a number in Firefox too (its own getStats(), or the player's queue)
    wait_for(driver, "window.moshiPage.readout.state.behindMs !== null")
    readout = driver.find_element(By.CSS_SELECTOR, "#moshi-transport .moshi-readout").text
    assert "ms behind" in readout and " left" in readout, readout
    picked = voice or "tiny"  # the first voice, unless the visitor picks another
    assert leased(voices) == {"tiny": int(picked == "tiny"), "tiny-q8": int(picked == "tiny-q8")}
    first = transcript(driver)
    time.sleep(2)
    assert len(transcript(driver)) > len(first)  # and goes on
    transport = driver.execute_script("return window.moshiPage.transport")
    if query:
        assert transport == "websocket"
        assert driver.execute_script("return window.moshiPage.socket.state") == "live"
        driver.find_element(By.CSS_SELECTOR, STOP).click()
    else:
        assert transport == "webrtc"
        driver.find_element(By.CSS_SELECTOR, TALK).click()  # "Stop"
    until(lambda: sum(leased(voices).values()) == 0)


def test_firefox_over_http_from_another_machine_says_how_to_get_a_microphone(served, driver):
    url, _ = served
    port = url.rsplit(":", 1)[1]
    open_page(driver, f"http://{NAME}:{port}/")
    assert driver.execute_script("return window.isSecureContext") is False
    assert driver.execute_script("return window.moshiPage.microphone") == "insecure"
    shown = driver.find_element(By.CSS_SELECTOR, "#moshi-microphone .moshi-microphone-problem").text
    assert "--https" in shown and f"ssh -L {port}:localhost:{port} {NAME}" in shown
    assert not any(button.is_displayed() for button in driver.find_elements(By.CSS_SELECTOR, "#moshi-webrtc button"))
