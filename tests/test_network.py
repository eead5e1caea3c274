"""The visitor is on the internet: `python app.py` behind an emulated 4G link
(moshi_engine.bench.netem: 40±10 ms each way, 1% loss), with the visitor's side, Chromium
or our websocket client, in the other network namespace.

Per behaviour the fewest conversations that prove it: an 8 s outage, longer than the time
after which ICE calls a connection "disconnected" (and FastRTC would end the call), survived
on WebRTC and on the websocket with the slot kept; a handover on both, resumed in the same
slot (the websocket with its token, WebRTC on a new connection that takes the call up); UDP
blocked, and the page takes the websocket without waiting out WebRTC's timeout; a satellite
link's call held to its session limit. The model steps as slowly as a real Moshi at a full batch (--min-step-ms 65), so
that a backlog left by an outage would show as lag that never drains; the server's own
figures say how soon the lag was back to normal. The matrix of profiles and events, and
the timings, are the benchmark's (`network` section).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from moshi_engine.bench.netem import in_namespace, missing
from moshi_engine.bench.network import AppBehindWire, total
from moshi_engine.page.endings import RECONNECTING_MESSAGE
from moshi_engine.watch.metrics import API_CHAT, WEBRTC
from tests.conftest import until

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"no network emulation: {missing()}")

OUTAGE_S = 8.0  # past ICE's "disconnected" (about 5 s in Chromium), well inside the 15 s grace
GRACE_S = 15.0


@pytest.fixture(scope="module")
def wired(tmp_path_factory):
    """`python app.py` in the server namespace of an emulated 4G link, on its address there, with
    no STUN (no internet); its log is app.log in the module's temporary directory."""
    log = tmp_path_factory.mktemp("app") / "app.log"
    with AppBehindWire("4g", seed=33, sessions=2, min_step_ms=65, grace_s=GRACE_S, log_path=log) as app:
        yield app


@pytest.fixture(scope="module")
def net(wired):
    return wired.net


@pytest.fixture(scope="module")
def app(wired):
    return wired.base


def lag_recoveries_within(figures: dict, transport: str, bound_s: float) -> tuple[float, float]:
    """(recoveries measured, those back to normal lag within bound_s) for that transport."""
    count = total(figures, "moshi_lag_recovery_seconds_count", transport=transport)
    within = total(figures, "moshi_lag_recovery_seconds_bucket", transport=transport, le=f"{bound_s:.1f}")
    return count, within


# ## The websocket: our client in the visitor's namespace


def test_the_websocket_conversation_survives_an_outage_and_a_handover_in_its_slot(wired, net, app, hello_pcm):
    from moshi_engine.wire.protocol import Protocol
    from tests.wire.test_resume import Talk
    from tests.wire.test_server import ws_url

    async def conversation() -> dict:
        async with Talk(app, hello_pcm) as talk:
            session = talk.session
            first_id = session.conversation_id
            await until(lambda: talk.audio >= 25, timeout=30)  # 2 s of Moshi's voice
            slots = []

            async def watch_slots() -> None:
                while True:
                    slots.append(await asyncio.to_thread(wired.active))
                    await asyncio.sleep(0.5)

            watcher = asyncio.create_task(watch_slots())
            await net.outage_async(OUTAGE_S)
            heard = talk.audio
            await until(lambda: talk.audio >= heard + 25, timeout=30)  # Moshi goes on answering
            after_outage = session.resumes

            old_address = net.client_address
            await asyncio.to_thread(net.handover)
            heard = talk.audio
            await until(lambda: session.resumes > after_outage and talk.audio >= heard + 25, timeout=30)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            return dict(first_id=first_id, last_id=session.conversation_id, slots=slots, old=old_address,
                        resumes=session.resumes, url=ws_url(app, Protocol.MOSHI))

    before = wired.figures()
    seen = in_namespace(net.client_ns, lambda: asyncio.run(conversation()))
    after = wired.figures()

    assert seen["last_id"] == seen["first_id"]  # one conversation throughout: Moshi's state kept
    assert set(seen["slots"]) == {1}  # its slot held through the outage and the handover, never freed
    assert net.client_address != seen["old"]
    # The server saw both: a connection that went quiet and came back (by itself, or resumed), then one taken up.
    gained = {outcome: total(after, "moshi_interruptions_total", transport=API_CHAT, outcome=outcome)
              - total(before, "moshi_interruptions_total", transport=API_CHAT, outcome=outcome)
              for outcome in ("recovered", "resumed", "lost")}
    assert gained["recovered"] + gained["resumed"] >= 2 and gained["resumed"] >= 1 and gained["lost"] == 0
    # Moshi answers what is said now: the lag is back to normal within 1 s of each return.
    count, within = lag_recoveries_within(after, API_CHAT, 1.0)
    assert count >= 1 and within == count
    assert wired.wait_idle(10) == 0  # and the closed conversation freed its slot at once


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


# ## The page: Chromium in the visitor's namespace


@pytest.fixture(scope="module")
def playwright():
    """One Playwright for the module: its sync API runs one at a time in a process."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(net, app, playwright):
    from tests.page.test_browser import CHROMIUM_ARGS

    launched = playwright.chromium.launch(executable_path=net.chromium(), args=[
        *CHROMIUM_ARGS, f"--unsafely-treat-insecure-origin-as-secure={app}"])  # a microphone off localhost
    yield launched
    launched.close()


TRANSCRIPT_LENGTH = "() => document.querySelector('#moshi-transcript textarea').value.length"
PAGE_MESSAGE = "() => document.querySelector('#moshi-transport .moshi-transport-message')?.textContent || ''"
RECEIVED_PACKETS = """async () => {
  let received = 0;
  for (const pc of window.moshiPage.peerConnections) {
    if (pc.connectionState !== 'connected') continue;
    (await pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'audio') received += r.packetsReceived;
    });
  }
  return received;
}"""


def test_a_webrtc_call_rides_out_an_outage_longer_than_ices_disconnect_time_and_another_after_it(
        wired, net, app, browser):
    from tests.page.test_browser import TALK_BUTTON, TRANSCRIPT_SHOWN, open_page

    before = wired.figures()
    recoveries_before = total(before, "moshi_lag_recovery_seconds_count", transport=WEBRTC)
    page = open_page(browser, app)
    try:
        page.click(TALK_BUTTON)
        page.wait_for_function("() => window.moshiPage.transport === 'webrtc'", timeout=30_000)
        page.wait_for_function(TRANSCRIPT_SHOWN, timeout=30_000)
        time.sleep(2.0)  # a conversation under way: its usual lag is known
        slots, messages = [], set()
        # An outage past ICE's "disconnected", then soon after another one, shorter: each is noticed.
        for number, outage_s in enumerate((OUTAGE_S, 3.0), start=1):
            net.cut()
            try:
                cut_until = time.monotonic() + outage_s
                while time.monotonic() < cut_until:
                    slots.append(wired.active())
                    messages.add(page.evaluate(PAGE_MESSAGE))
                    time.sleep(0.5)
            finally:
                net.restore()
            # The server hears the visitor again on the same call, and its answers are back to their usual lag, ...
            wait_until(lambda number=number: total(wired.figures(), "moshi_lag_recovery_seconds_count",
                                                   transport=WEBRTC) >= recoveries_before + number, timeout=20)
            # ... and the page shows Moshi's words again; then the message is gone.
            words = page.evaluate(TRANSCRIPT_LENGTH)
            page.wait_for_function(f"() => ({TRANSCRIPT_LENGTH})() > {words}", timeout=30_000)
            page.wait_for_function(f"() => !({PAGE_MESSAGE})()", timeout=10_000)
        state = page.evaluate("() => ({why: moshiPage.why, attempts: moshiPage.attempts.map((a) => a.state),"
                              " reconnecting: document.querySelector('#moshi-transport')?.innerText || ''})")
        after = wired.figures()
        page.click(TALK_BUTTON)  # Stop
        assert wired.wait_idle(10) == 0
    finally:
        page.close()

    reconnecting = RECONNECTING_MESSAGE.format(grace="15 seconds").split(":")[0]
    assert any(message.startswith(reconnecting) for message in messages), messages
    assert set(slots) == {1}  # the slot was held for the visitor throughout
    assert state["why"] == "webrtc" and state["attempts"] == ["connected"]  # one call, never fell back
    recovered = (total(after, "moshi_interruptions_total", transport=WEBRTC, outcome="recovered")
                 - total(before, "moshi_interruptions_total", transport=WEBRTC, outcome="recovered"))
    assert recovered == 2
    count, within = lag_recoveries_within(after, WEBRTC, 1.0)
    assert count == recoveries_before + 2 and within == count  # back to its usual lag within 1 s, each time


def test_after_a_handover_the_page_takes_its_webrtc_call_up_on_a_new_connection_in_the_same_slot(
        wired, net, app, browser):
    """The visitor's address changes: the call's path is dead for good (aiortc cannot restart
    ICE). The page sees the server still answer while the call stays silent, and takes the same
    conversation up on a new WebRTC connection with its resume token: the slot held throughout,
    Moshi's voice arriving on the new call at its usual lag."""
    from tests.page.test_browser import TALK_BUTTON, TRANSCRIPT_SHOWN, open_page

    before = wired.figures()
    page = open_page(browser, app)
    try:
        page.click(TALK_BUTTON)
        page.wait_for_function("() => window.moshiPage.transport === 'webrtc'", timeout=30_000)
        page.wait_for_function(TRANSCRIPT_SHOWN, timeout=30_000)
        page.wait_for_function("() => window.moshiPage.attempt?.token", timeout=20_000)  # it can be taken up
        time.sleep(1.0)
        slots = []
        net.handover()
        deadline = time.monotonic() + GRACE_S + 5
        while not page.evaluate("() => window.moshiPage.handovers"):
            assert time.monotonic() < deadline, page.evaluate("() => moshiPage.attempts.map((a) => a.state)")
            slots.append(wired.active())
            time.sleep(0.5)
        # Moshi's voice arrives on the new call (once the server has read the page's inputs, the token
        # among them, over Gradio), and the server's answers are back to their usual lag.
        # Polled here: wait_for_function takes an async predicate's Promise for true.
        wait_until(lambda: page.evaluate(RECEIVED_PACKETS) > 0, timeout=15)
        received = [page.evaluate(RECEIVED_PACKETS)]
        time.sleep(2.0)
        received.append(page.evaluate(RECEIVED_PACKETS))
        wait_until(lambda: total(wired.figures(), "moshi_lag_recovery_seconds_count", transport=WEBRTC)
                   > total(before, "moshi_lag_recovery_seconds_count", transport=WEBRTC), timeout=10)
        # Gradio's event stream came along (it was on the dead path too): Moshi's words go on
        # showing, and the ending's recording link arrives.
        words = page.evaluate(TRANSCRIPT_LENGTH)
        page.wait_for_function(f"() => ({TRANSCRIPT_LENGTH})() > {words}", timeout=15_000)
        states = page.evaluate("() => moshiPage.attempts.map((a) => a.state)")
        moved = page.evaluate("() => moshiPage.streamsMoved")
        after = wired.figures()
        page.click(TALK_BUTTON)  # Stop
        assert wired.wait_idle(10) == 0  # the conversation ends with its new connection
        page.wait_for_selector("#moshi-recording a", state="visible", timeout=15_000)
    finally:
        page.close()

    assert moved == 1

    assert set(slots) == {1}  # one slot, held for the visitor throughout
    assert states[-1] == "connected" and states.count("connected") == 1, states  # the old call ended
    assert received[1] > received[0] + 50  # 2 s of Moshi's 20 ms packets, give or take

    def more(name: str, **labels: str) -> float:
        return total(after, name, transport=WEBRTC, **labels) - total(before, name, transport=WEBRTC, **labels)

    assert more("moshi_interruptions_total", outcome="resumed") == 1
    assert more("moshi_resumes_total", outcome="resumed") == 1


def test_with_udp_blocked_the_page_takes_its_websocket_without_waiting_out_webrtc(wired, net, app, browser):
    from tests.page.test_browser import TALK_BUTTON, open_page

    net.block_udp()
    page = open_page(browser, app)
    try:
        clicked = page.evaluate("() => performance.now()")
        page.click(TALK_BUTTON)
        page.wait_for_function("() => window.moshiPage.socket?.times.firstAudio != null", timeout=30_000)
        seen = page.evaluate("() => ({why: moshiPage.why, transport: moshiPage.transport,"
                             " timeoutMs: moshiPage.timeoutMs, firstAudio: moshiPage.socket.times.firstAudio,"
                             " status: document.querySelector('#moshi-transport .moshi-transport-status')"
                             "?.textContent})")
        page.click("#moshi-transport .moshi-transport-stop")
        assert wired.wait_idle(10) == 0
    finally:
        page.close()
        net.block_udp(False)
    assert seen["transport"] == "websocket"
    assert seen["why"] == "unreachable"  # learnt from the connectivity checks, not from the timeout
    assert "UDP blocked" in seen["status"]  # and the page says why it took that path
    assert seen["firstAudio"] - clicked < seen["timeoutMs"]  # Moshi answered before WebRTC's timeout would end



def test_at_5_percent_loss_fec_is_negotiated_both_ways_and_the_server_rebuilds_lost_packets(wired, net, app, browser):
    from moshi_engine.bench.netem import Profile
    from tests.page.test_browser import TALK_BUTTON, TRANSCRIPT_SHOWN, open_page

    before = wired.figures()
    net.set_profile(Profile(20, 5, 0.05))
    page = open_page(browser, app)
    try:
        page.click(TALK_BUTTON)
        page.wait_for_function("() => window.moshiPage.transport === 'webrtc'", timeout=30_000)
        page.wait_for_function(TRANSCRIPT_SHOWN, timeout=30_000)
        time.sleep(6.0)
        sdp = page.evaluate("() => { const pc = window.__peerConnections.at(-1);"
                            " return {offer: pc.localDescription.sdp, answer: pc.remoteDescription.sdp}; }")
        page.click(TALK_BUTTON)  # Stop
        assert wired.wait_idle(10) == 0
    finally:
        page.close()
        net.set_profile("4g")
    after = wired.figures()

    for side in ("offer", "answer"):  # the browser asks for FEC from the server, and the server from it
        opus = next(line.split()[0].split(":")[1] for line in sdp[side].splitlines() if "opus/48000/2" in line)
        fmtp = next(line for line in sdp[side].splitlines() if line.startswith(f"a=fmtp:{opus} "))
        assert "useinbandfec=1" in fmtp, (side, fmtp)
    packets = {outcome: total(after, "moshi_input_packets_total", outcome=outcome)
               - total(before, "moshi_input_packets_total", outcome=outcome)
               for outcome in ("received", "lost", "recovered", "concealed", "late")}
    sent = packets["received"] + packets["lost"]
    assert sent > 200 and packets["lost"] > 0  # about 5% of some 6 s at 50 packets a second
    assert packets["recovered"] > 0  # rebuilt from the next packet's FEC, counted
    assert packets["recovered"] + packets["concealed"] == packets["lost"]


def test_over_a_satellite_link_a_webrtc_call_outlives_the_30_s_consent_checks_and_ends_at_the_session_limit(
        tmp_path, playwright):
    """A 600 ms round trip: aiortc's own consent checks (0.5 s answers) dropped such a call after
    about 30 s. With a 45 s session limit the call must last until the limit ends it, the server
    never seeing it interrupted (the benchmark holds one for the full 600 s)."""
    from moshi_engine.bench.network import page_hold
    from tests.page.test_browser import CHROMIUM_ARGS

    limit_s = 45.0
    with AppBehindWire("satellite", seed=7, sessions=1, min_step_ms=0, grace_s=GRACE_S, session_limit_s=limit_s,
                       log_path=tmp_path / "app.log") as wired:
        browser = playwright.chromium.launch(executable_path=wired.net.chromium(), args=[
            *CHROMIUM_ARGS, f"--unsafely-treat-insecure-origin-as-secure={wired.base}"])
        try:
            held = page_hold(browser, wired)
        finally:
            browser.close()
    assert held["ended_by"] == ["limit"], held
    assert limit_s - 5 < held["held_s"] < limit_s + 15 and held["interruptions"] == 0, held
