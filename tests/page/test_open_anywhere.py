"""The page opened as people open it: from another machine by its name, over http and over
`--https`, with the microphone blocked or missing, and left by closing the tab or by a browser
that dies. Debian's chromium, driven by playwright, a fake microphone playing hello.wav;
`gpubox` is a name that the browser resolves to 127.0.0.1, as another machine's would be."""

from __future__ import annotations

import contextlib
import os
import signal
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import psutil  # noqa: E402
import pytest  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402

from moshi_engine.conversation import SessionLimits  # noqa: E402
from moshi_engine.engine import load_engine  # noqa: E402
from moshi_engine.page.endings import MICROPHONE_WORDS  # noqa: E402
from moshi_engine.web import create_app  # noqa: E402
from moshi_engine.wire.tls import self_signed_certificate  # noqa: E402
from tests.live import serve_asgi  # noqa: E402
from tests.page.test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

NAME = "gpubox"
ARGS = [*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {NAME} 127.0.0.1", "--ignore-certificate-errors"]
TALK = "#moshi-webrtc button[aria-label='start stream']"
ACCESS = "#moshi-webrtc button"  # "Click to Access Microphone", before the microphone is granted
STOP = "#moshi-transport .moshi-transport-stop"
PROBLEM = "#moshi-microphone .moshi-microphone-problem"
TIMEOUT_MS = 30_000
TRANSCRIPT_SHOWN = "() => document.querySelector('#moshi-transcript textarea').value.trim().length > 0"
# The idle limit is far off, so that only what these tests are about can end a conversation;
# the reconnect grace is short, so that a browser that vanished is let go of soon.
LIMITS = SessionLimits(idle_s=120, reconnect_grace_s=5.0)
# Within a few seconds of the tab closing; a browser that vanished, after its connection was
# quiet for 1.5 s and the grace (both generous bounds on a slow machine, far below the idle limit).
TAB_CLOSED_S = 8.0
BROWSER_GONE_S = 20.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The page over https, with a self-signed certificate made as `python app.py --https` makes
    it, as another machine reaches it: (its https base URL, the engine)."""
    engine = load_engine("tiny", device="cpu", sessions=2)
    certificate = self_signed_certificate("0.0.0.0", tmp_path_factory.mktemp("tls"))
    try:
        with serve_asgi(create_app(engine, limits=LIMITS, host="0.0.0.0"), tls=certificate.files) as https:
            yield https.replace("127.0.0.1", NAME), engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def served_over_http():
    """The same page over plain http, as another machine reaches it."""
    engine = load_engine("tiny", device="cpu", sessions=1, model_process=False)
    try:
        with serve_asgi(create_app(engine, limits=LIMITS, host="0.0.0.0")) as http:
            yield http.replace("127.0.0.1", NAME)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def playwright():
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def chromium(playwright, served, served_over_http):
    """The module's Chromium, closed before the servers it talks to stop (a server waits for
    the connections a browser still holds open)."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    yield browser
    browser.close()


def wait_until(condition, timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - started


def open_page(browser, url: str, scripts: tuple[str, ...] = (), **context) -> Page:
    page = browser.new_context(viewport={"width": 1280, "height": 900}, **context).new_page()
    for script in scripts:
        page.add_init_script(script)
    page.goto(url)
    page.wait_for_function("() => window.moshiPage?.ready && window.moshiPage.microphone !== undefined",
                           timeout=TIMEOUT_MS)
    return page


def problem_shown(page: Page) -> str:
    return page.inner_text(PROBLEM).strip()


def buttons_offered(page: Page) -> int:
    return sum(button.is_visible() for button in page.query_selector_all("#moshi-webrtc button"))


def talk(page: Page, engine) -> None:
    """Press Talk (after the microphone) and wait until Moshi's words show and a slot is leased."""
    page.click(ACCESS, timeout=TIMEOUT_MS)
    page.wait_for_selector(TALK, timeout=TIMEOUT_MS)
    page.click(TALK)
    page.wait_for_function(TRANSCRIPT_SHOWN, timeout=TIMEOUT_MS)
    assert engine.active >= 1


def test_over_http_from_another_machine_the_page_says_how_to_get_a_microphone_and_offers_no_button(
        served_over_http, chromium):
    http = served_over_http
    page = open_page(chromium, http + "/")
    port = http.rsplit(":", 1)[1]
    assert page.evaluate("window.isSecureContext") is False
    assert page.evaluate("window.moshiPage.microphone") == "insecure"
    shown = problem_shown(page)
    assert shown.startswith("This page cannot use your microphone")
    for way_out in ("--https", "--share", f"ssh -L {port}:localhost:{port} {NAME}", f"http://localhost:{port}"):
        assert way_out in shown
    codes = page.locator(f"{PROBLEM} code").all_inner_texts()  # commands and addresses set off as code
    assert {"--https", "--share", f"ssh -L {port}:localhost:{port} {NAME}"} <= set(codes)
    assert buttons_offered(page) == 0
    time.sleep(2)  # it stays: not a toast that fades
    assert problem_shown(page) == shown
    page.context.close()


@pytest.mark.parametrize("query", ["", "?transport=websocket"], ids=["webrtc", "websocket"])
def test_over_https_the_same_page_talks(served, chromium, query):
    https, engine = served
    page = open_page(chromium, https + "/" + query)
    assert page.evaluate("window.isSecureContext") is True
    assert page.evaluate("window.moshiPage.microphone") is None and problem_shown(page) == ""
    talk(page, engine)
    transport = page.evaluate("window.moshiPage.transport")
    assert transport == ("websocket" if query else "webrtc")
    if query:
        assert page.evaluate("window.moshiPage.socket.url").startswith(f"wss://{NAME}:")
        page.click(STOP)
    else:
        page.click(TALK)  # "Stop"
    wait_until(lambda: engine.active == 0, timeout_s=10)
    page.context.close()


def test_a_blocked_microphone_is_said_and_its_button_comes_back_once_allowed(served, chromium):
    https, _ = served
    context = chromium.new_context()
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    context_id = cdp.send("Target.getTargetInfo")["targetInfo"]["browserContextId"]

    def microphone(setting: str) -> None:
        """The site's microphone permission, as the person sets it in the browser's settings."""
        cdp.send("Browser.setPermission", {"permission": {"name": "microphone"}, "setting": setting,
                                           "origin": https, "browserContextId": context_id})

    microphone("denied")
    page.goto(https + "/")
    page.wait_for_function("() => window.moshiPage?.microphone === 'denied'", timeout=TIMEOUT_MS)
    page.wait_for_function(f"() => document.querySelector('{PROBLEM}')?.textContent.length > 0", timeout=TIMEOUT_MS)
    assert problem_shown(page) == MICROPHONE_WORDS["denied"]
    assert buttons_offered(page) == 0
    microphone("granted")  # the person allows it in the site's settings
    page.wait_for_function("() => window.moshiPage.microphone === null", timeout=TIMEOUT_MS)
    assert problem_shown(page) == "" and buttons_offered(page) >= 1
    context.close()


def test_no_microphone_is_said_and_no_button_offered(served, chromium):
    https, _ = served
    no_devices = "navigator.mediaDevices.enumerateDevices = async () => [];"
    page = open_page(chromium, https + "/", scripts=(no_devices,))
    assert page.evaluate("window.moshiPage.microphone") == "missing"
    assert problem_shown(page) == MICROPHONE_WORDS["missing"]
    assert buttons_offered(page) == 0
    page.context.close()


@pytest.mark.parametrize("query", ["", "?transport=websocket"], ids=["webrtc", "websocket"])
def test_a_tab_closed_mid_conversation_frees_its_slot_within_seconds(served, chromium, query):
    https, engine = served
    page = open_page(chromium, https + "/" + query)
    talk(page, engine)
    page.close(run_before_unload=True)
    wait_until(lambda: engine.active == 0, timeout_s=TAB_CLOSED_S)


def test_a_browser_that_dies_mid_conversation_frees_its_slot_after_the_reconnect_grace(served, playwright):
    """No pagehide, no closed connection, no packet: only the silence of its connection, for
    longer than the reconnect grace, says that the browser is gone."""
    https, engine = served
    before = {process.pid for process in psutil.Process().children(recursive=True)}
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = open_page(browser, https + "/")
    talk(page, engine)
    assert page.evaluate("window.moshiPage.transport") == "webrtc"
    its_processes = [process for process in psutil.Process().children(recursive=True)
                     if process.pid not in before and "chrom" in process.name()]
    assert its_processes
    for process in its_processes:
        os.kill(process.pid, signal.SIGKILL)
    gone_after = wait_until(lambda: engine.active == 0, timeout_s=BROWSER_GONE_S)
    with contextlib.suppress(Exception):  # the browser is gone, whatever playwright makes of that
        browser.close()
    assert LIMITS.reconnect_grace_s <= gone_after < LIMITS.idle_s
