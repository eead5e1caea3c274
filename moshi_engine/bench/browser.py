"""The browser's own websocket path, timed: Chromium with a fake microphone talks to a
server's `/api/chat` through `moshi_engine/static/` (MoshiSocket), Opus encoded and
decoded in the page.

    python -m moshi_engine.bench.browser                       # tiny model on CPU, 10 s per codec
    python -m moshi_engine.bench.browser --model random --device cuda --seconds 20 --json browser.json

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
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
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


def main(argv: list[str] | None = None) -> int:
    from fastapi import FastAPI

    from ..browser import mount_static
    from .serve import OURS, serve_asgi, server_process

    parser = argparse.ArgumentParser(prog="python -m moshi_engine.bench.browser", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="microphone audio per conversation")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated: webcodecs, wasm")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

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
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
