"""The browser's own websocket path, timed: Chromium with a fake microphone talks to a
server's `/api/chat` through `moshi_engine/page/static/` (MoshiSocket), Opus encoded and
decoded in the page; and the voice chat page's two paths, WebRTC and its websocket.

    python -m moshi_engine.bench.browser                       # tiny model on CPU, 10 s per codec
    python -m moshi_engine.bench.browser --model random --device cuda --seconds 20 --json browser.json
    python -m moshi_engine.bench.browser --page                # the page: WebRTC, websocket, fallback

The server runs in a child process (`serve.server_process`, as every measurement
of the benchmark does), the page is served from this process; both on loopback.
For each codec (WebCodecs, and opus-recorder's WASM with WebCodecs hidden) it reports:

- `first_audio_ms`: from the page sending its first microphone frame to Moshi's
  first audio decoded in the page (`first_played_ms`: handed to the speaker);
- `lag_ms`: for every answered frame, from the page sending a microphone frame to
  Moshi's answer to it decoded (Moshi answers frame k + 1 with its frame k), the
  steady network + compute + codec delay;
- `queue_ms`: what the player held, sampled every 250 ms after the first second:
  the playback buffering on top of the lag;
- what the player dropped (overflows and trimmed backlogs) and how often it ran dry.

Not counted: the microphone's own framing (a frame leaves once its 80 ms are
captured), and the audio devices' latencies, which a fake microphone and a headless
speaker do not have. Needs playwright and Debian's chromium (`/usr/bin/chromium`).

`page_paths` times the real page (`web.create_app`, served by the child process) on
each of its paths, with one method for both (`page_probe.js`, injected into the page):

- `talk_to_first_audio_ms`: from pressing Talk to Moshi's first audio in the page
  (WebRTC: the first inbound audio with energy in getStats, polled every 10 ms;
  websocket: the first audio decoded). It includes what each path does first: WebRTC's
  offer, ICE, DTLS and data channel; the websocket's codec and microphone set-up; the
  fallback also its wait for WebRTC (5 s from the answer). `first_sent_to_first_audio_ms`
  starts at the first microphone packet sent instead (WebRTC: first outbound packet);
- `drain_ms`: the steady lag before playback, by a drain probe: the page stops feeding
  the microphone to the transport (WebRTC: `replaceTrack(null)`; websocket: its frames
  are no longer sent) and the time from the last input sent to the last answer received
  is measured. Moshi answers each 80 ms frame only once the next one is in, so what
  still comes is what was in flight: network, queues, model, codecs, and on WebRTC the
  server's real-time pacing. On WebRTC the input stops mid-frame (20 ms packets; a
  partial frame is never answered), so its drain reads up to 60 ms short, 30 on average;
- `playout_ms`: the playback buffering on top: WebRTC's jitter buffer (the mean delay
  of the samples it emitted over the steady window), the websocket player's queue (p50);
- `lag_ms`: drain p50 + playout, the steady delay from a sound leaving the microphone
  stack to Moshi's answer to it leaving the speaker stack (devices excluded);
- websocket only, `frame_lag_ms`: MoshiSocket's own per-frame lag (sent to decoded), the
  same quantity as the drain measured frame by frame, as a check of the probe.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from ..audio import FRAME_SECONDS

CHROMIUM = "/usr/bin/chromium"
PAGE_PROBE = Path(__file__).resolve().with_name("page_probe.js")
PAGE_PATHS = ("webrtc", "websocket", "fallback")
TALK_BUTTON = "#moshi-webrtc button[aria-label='start stream']"
STOP_BUTTON = "#moshi-transport .moshi-transport-stop"
DRAIN_WAIT_MS = 1500  # long enough for every answer in flight to arrive
SPEECH_WAV = Path(__file__).resolve().parents[2] / "assets" / "speech" / "hello.wav"
DEMO_PAGE = "/moshi-static/ws-demo.html"
HIDE_WEBCODECS = "delete window.AudioEncoder; delete window.AudioDecoder;"
# A Chromium with no WebRTC path to the server, as behind a strict NAT with no TURN: every
# ICE candidate of the other side is kept from the peer connection (stripped from the
# answer, ignored when trickled), and the page's own never reach the server (not in the
# offer it reads, never handed to a listener), so no candidate pair exists and ICE waits
# forever. Nothing touches the network.
NO_WEBRTC_PATH = """(() => {
  const Native = window.RTCPeerConnection;
  const strip = (sdp) =>
    sdp.split("\\r\\n").filter((line) => !/^a=(candidate|end-of-candidates)/.test(line)).join("\\r\\n");
  const stripped = (d) => {
    if (!d || !d.sdp) return d;
    const sdp = strip(d.sdp);
    return { type: d.type, sdp, toJSON: () => ({ type: d.type, sdp }) };
  };
  window.RTCPeerConnection = class extends Native {
    setRemoteDescription(description) { return super.setRemoteDescription(stripped(description)); }
    addIceCandidate() { return Promise.resolve(); }
    get localDescription() { return stripped(super.localDescription); }
    set onicecandidate(handler) {}
    get onicecandidate() { return null; }
    addEventListener(type, ...rest) { if (type !== "icecandidate") super.addEventListener(type, ...rest); }
  };
})();"""
SAMPLE_PERIOD_S = 0.25
MIN_PAGE_SECONDS = 4.0  # a page conversation in the benchmark: long enough for the steady window
PAGE_PAUSES = 3  # drain probes per path in the benchmark, at most: one per PAGE_PAUSE_FRAMES of stream
PAGE_PAUSE_FRAMES = 40
CODECS = ("webcodecs", "wasm")

log = logging.getLogger(__name__)


def chromium_args(microphone_wav: Path = SPEECH_WAV) -> list[str]:
    """Headless Chromium with `microphone_wav` as a microphone that needs no permission prompt."""
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={Path(microphone_wav).resolve()}",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--autoplay-policy=no-user-gesture-required",
    ]


def demo_url(page_base: str, chat_url: str | None = None, codec: str = "auto", **query: str | int | float) -> str:
    """The harness page at `page_base` talking to `chat_url` (default: its own server)."""
    from urllib.parse import urlencode

    params = {"codec": codec, **query}
    if chat_url:
        params["server"] = chat_url
    return f"{page_base}{DEMO_PAGE}?{urlencode(params)}"


def converse(browser, page_url: str, seconds: float, hide_webcodecs: bool = False, timeout_s: float = 60.0) -> dict:
    """One conversation of `seconds` of microphone audio in a fresh page; returns the
    MoshiSocket's stats just before stopping, plus `queue_samples` (the player's queue,
    sampled) and `close` (code and reason)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        if hide_webcodecs:
            page.add_init_script(HIDE_WEBCODECS)
        page.goto(page_url)
        page.click("#start")
        page.wait_for_function("() => window.moshiDemo.socket?.state === 'live'", timeout=timeout_s * 1000)
        queue: list[int] = []
        deadline = time.monotonic() + seconds + timeout_s
        while True:
            stats = page.evaluate("() => window.moshiDemo.socket.stats()")
            if stats["secondsSent"] >= 1.0 and stats["player"]:
                queue.append(stats["player"]["queuedSamples"])
            if stats["secondsSent"] >= seconds or stats["state"] != "live" or time.monotonic() > deadline:
                break
            time.sleep(SAMPLE_PERIOD_S)
        page.click("#start")  # Stop
        page.wait_for_function("() => window.moshiDemo.closes.length > 0", timeout=timeout_s * 1000)
        stats["close"] = page.evaluate("() => window.moshiDemo.closes[0]")
        stats["queue_samples"] = queue
        return stats
    finally:
        context.close()


def summarize(stats: dict) -> dict:
    """The numbers this benchmark reports, from `converse`'s stats."""
    player = stats["player"] or {}
    queue_ms = [samples / 24 for samples in stats["queue_samples"]]
    return {
        "backend": stats["backend"],
        "seconds_sent": stats["secondsSent"],
        "first_audio_ms": stats["firstAudioMs"],
        "first_played_ms": stats["firstPlayedMs"],
        "lag_ms": stats["lagMs"],
        "queue_ms": {
            "p50": statistics.median(queue_ms) if queue_ms else None,
            "max": max(queue_ms) if queue_ms else None,
            "count": len(queue_ms),
        },
        "dropped_ms": player.get("droppedSamples", 0) / 24,
        "drops": player.get("drops"),  # the queue overflowed (past maxMs)
        "trims": player.get("trims"),  # a backlog it did not need was trimmed
        "underruns": player.get("underruns"),
        "close": stats["close"],
    }


def measure(page_base: str, chat_url: str, seconds: float, codecs: tuple[str, ...] = CODECS) -> dict:
    """Run one conversation per codec against `chat_url`, the page served at `page_base`."""
    from playwright.sync_api import sync_playwright

    results = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=chromium_args())
        try:
            for codec in codecs:
                url = demo_url(page_base, chat_url, codec=codec, seed=42)
                results[codec] = summarize(converse(browser, url, seconds, hide_webcodecs=codec == "wasm"))
                log.info("%s: %s", codec, results[codec])
        finally:
            browser.close()
    return results


def page_paths(page_base: str, seconds: float = 10.0, pauses: int = 3, paths: tuple[str, ...] = PAGE_PATHS,
               wait_idle=None, timeout_s: float = 60.0) -> dict:
    """Time the voice chat page at `page_base` (a `web.create_app` app) on each of `paths`:
    "webrtc" (`?transport=webrtc`), "websocket" (`?transport=websocket`) and "fallback" (no
    WebRTC path: the page switches by itself). Each is one conversation of `seconds` of
    microphone audio after Moshi's first answer, then `pauses` drain probes. `wait_idle()`
    runs between paths (the server's slots must be free). Returns a JSON-ready dict."""
    from playwright.sync_api import sync_playwright

    results = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=chromium_args())
        try:
            for path in paths:
                results[path] = _page_path(browser, page_base, path, seconds, pauses, timeout_s)
                log.info("page over %s: %s", path, results[path])
                if wait_idle is not None:
                    wait_idle()
        finally:
            browser.close()
    return results


def _page_path(browser, page_base: str, path: str, seconds: float, pauses: int, timeout_s: float) -> dict:
    timeout_ms = timeout_s * 1000
    context = browser.new_context()
    try:
        page = context.new_page()
        page.add_init_script(path=str(PAGE_PROBE))
        if path == "fallback":
            page.add_init_script(NO_WEBRTC_PATH)
        query = {"webrtc": "?transport=webrtc", "websocket": "?transport=websocket", "fallback": ""}[path]
        page.goto(f"{page_base}/{query}")
        page.wait_for_function("() => window.moshiPage?.ready", timeout=timeout_ms)
        page.click("#moshi-webrtc button", timeout=timeout_ms)  # "Click to Access Microphone"
        page.wait_for_selector(TALK_BUTTON, timeout=timeout_ms)
        page.click(TALK_BUTTON)
        webrtc = path == "webrtc"
        if webrtc:
            page.wait_for_function("() => window.moshiProbe.firstEnergyAt !== null", timeout=timeout_ms)
        else:
            page.wait_for_function("() => window.moshiPage.socket?.times.firstAudio != null", timeout=timeout_ms)
            page.evaluate("() => window.moshiProbe.watchSocket()")
        first = page.evaluate("""() => {
          const probe = window.moshiProbe, times = window.moshiPage.socket?.times;
          const audio = times ? times.firstAudio : probe.firstEnergyAt;
          const sent = times ? times.firstSent : probe.firstOutboundAt;
          return { talk: audio - probe.talkAt, sent: sent === null ? null : audio - sent,
                   transport: window.moshiPage.transport };
        }""")
        # the steady window: playback buffering over all of it, after a second to settle
        time.sleep(1.0)
        queue: list[float] = []
        if webrtc:
            page.evaluate("() => window.moshiProbe.jitterBufferMs()")
        deadline = time.monotonic() + seconds - 1.0
        while time.monotonic() < deadline:
            if not webrtc:
                player = page.evaluate("async () => (await window.moshiPage.socket.stats()).player")
                if player:
                    queue.append(player["queuedSamples"] / 24)
            time.sleep(SAMPLE_PERIOD_S)
        playout = page.evaluate("() => window.moshiProbe.jitterBufferMs()") if webrtc else (
            statistics.median(queue) if queue else None)
        frame_lag = None if webrtc else page.evaluate("async () => (await window.moshiPage.socket.stats()).lagMs")
        drain = []
        for pause in range(pauses):
            if pause:
                time.sleep(2.0)  # back to steady after the last probe
            probe = "drainWebRTC" if webrtc else "drainWebsocket"
            drain.append(page.evaluate(f"() => window.moshiProbe.{probe}({DRAIN_WAIT_MS})"))
        page.click(TALK_BUTTON if webrtc else STOP_BUTTON)  # Stop
        # Closing the page at once would leave the server to notice the loss (30 s on WebRTC).
        ended = "window.moshiPage.why === 'webrtcEnded'" if webrtc else "window.moshiPage.conversation === null"
        page.wait_for_function(f"() => {ended}", timeout=timeout_ms)
        drain_p50 = statistics.median(drain) if drain else None
        return {
            "transport": first["transport"],
            "talk_to_first_audio_ms": first["talk"],
            "first_sent_to_first_audio_ms": first["sent"],
            "drain_ms": {"p50": drain_p50, "values": drain},
            "playout_ms": playout,
            "lag_ms": drain_p50 + playout if drain_p50 is not None and playout is not None else None,
            "frame_lag_ms": frame_lag,
        }
    finally:
        context.close()


def missing_chromium() -> str | None:
    """None if the browser the page is timed in is installed, else why not (for `skipped`)."""
    return None if Path(CHROMIUM).exists() else f"no Chromium at {CHROMIUM}"


def page_section(bench) -> dict:
    """The benchmark's `page` section: the page's paths against our server with its page mounted,
    one slot, each conversation as long as the run's streams (at least a few seconds)."""
    from .serve import OURS

    seconds = max(bench.config.frames * FRAME_SECONDS, MIN_PAGE_SECONDS)
    server = bench.server(OURS, 1, page=True)
    server.wait_idle()
    pauses = min(PAGE_PAUSES, max(1, bench.config.frames // PAGE_PAUSE_FRAMES))
    paths = page_paths(server.url, seconds, pauses, wait_idle=server.wait_idle)
    bench.stop_server(OURS)
    return {"seconds": seconds, "pauses": pauses, "paths": paths}


def main(argv: list[str] | None = None) -> int:
    from fastapi import FastAPI

    from ..page.static_files import mount_static
    from .serve import OURS, serve_asgi, server_process

    parser = argparse.ArgumentParser(prog="python -m moshi_engine.bench.browser", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="microphone audio per conversation")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated: webcodecs, wasm")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--page", action="store_true",
                        help="time the voice chat page's paths (webrtc, websocket, fallback) instead of the codecs")
    parser.add_argument("--paths", default=",".join(PAGE_PATHS), help="with --page: which paths")
    parser.add_argument("--pauses", type=int, default=3, help="with --page: drain probes per path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.page:
        with server_process(OURS, args.model, args.device, page=True) as server:
            results = {
                "model": args.model,
                "device": args.device,
                "server": server.engine_info,
                "page_paths": page_paths(server.url, args.seconds, args.pauses, tuple(args.paths.split(",")),
                                         wait_idle=server.wait_idle),
            }
        return _report(results, args.json)

    pages = FastAPI()
    mount_static(pages)
    with server_process(OURS, args.model, args.device) as server, serve_asgi(pages) as page_base:
        chat_url = server.url.replace("http://", "ws://") + "/api/chat"
        results = {
            "model": args.model,
            "device": args.device,
            "server": server.engine_info,
            "codecs": measure(page_base, chat_url, args.seconds, tuple(args.codecs.split(","))),
        }
    return _report(results, args.json)


def _report(results: dict, path: Path | None) -> int:
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
