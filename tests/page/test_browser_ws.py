"""The browser's own Opus websocket client (`moshi_engine/page/static/`) in Debian's chromium,
driven by playwright, with a fake microphone playing a speech asset.

A real server (the tiny model, `/api/chat`) and the harness page `ws-demo.html` run one
conversation per codec: WebCodecs, and opus-recorder's WASM with WebCodecs hidden
(module fixture); each test checks one thing it should have done. The player, the
microphone's resampling and the protocol's queue and close messages are tested on
their own, the last against a scripted server.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass

import numpy as np
import pytest
from fastapi import FastAPI, WebSocket
from playwright.sync_api import Page

from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE, rms
from moshi_engine.bench.browser import HIDE_WEBCODECS, demo_url
from moshi_engine.page.static_files import STATIC_PATH, mount_static
from moshi_engine.timings import STEP
from moshi_engine.wire.codec import OpusDecoder
from moshi_engine.wire.protocol import CloseCode
from moshi_engine.wire.server import create_api
from tests.live import serve_asgi

CONVERSATION_S = 4.0
DECODED_S = 3.0  # of Moshi's voice decoded before the stop: that many frames stepped, however slow the machine
TIMEOUT_MS = 30_000
# Keeps a copy of every message the page sends on a websocket.
RECORD_SENT = """
window.__sent = [];
const nativeSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  window.__sent.push(new Uint8Array(data).slice());
  return nativeSend.call(this, data);
};
"""
SENT_BYTES = "() => window.__sent.map((m) => Array.from(m))"
OGG_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, sequence, crc, segments


@dataclass
class Conversation:
    """What one browser conversation over /api/chat left behind."""

    codec: str
    stats: dict  # MoshiSocket.stats() while live
    final: dict  # ... after the close
    transcript: str
    texts: list[str]
    sent: list[bytes]  # every websocket message the page sent
    closes: list[dict]
    frames_stepped: int
    active_after_stop: int
    foreign_requests: list[str]


@pytest.fixture(scope="module")
def served(tiny_engine):
    app = create_api(tiny_engine)
    mount_static(app)
    with serve_asgi(app) as url:
        yield url, tiny_engine


def new_page(browser, url: str, foreign: list[str], *scripts: str) -> Page:
    page = browser.new_context().new_page()
    for script in scripts:
        page.add_init_script(script)
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else foreign.append(r.url))
    return page


def on_demo_page(browser, url: str, script: str):
    """Run `script` (a JS function of the static files' base path) on the harness page, alone."""
    page = new_page(browser, url, [])
    try:
        page.goto(url + STATIC_PATH + "/ws-demo.html")
        return page.evaluate(script, STATIC_PATH)
    finally:
        page.context.close()


def wait_until(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["webcodecs", "wasm"])
def conversation(request, browser, served) -> Conversation:
    url, engine = served
    codec = request.param
    foreign: list[str] = []
    scripts = [RECORD_SENT] + ([HIDE_WEBCODECS] if codec == "wasm" else [])
    page = new_page(browser, url, foreign, *scripts)
    try:
        page.goto(demo_url(url, seed=42))  # codec "auto": the page picks what the browser has
        engine.timings.clear()
        page.click("#start")
        page.wait_for_function(
            f"() => window.moshiDemo.socket?.counters.sentSamples >= {CONVERSATION_S * SAMPLE_RATE}"
            f" && window.moshiDemo.socket.counters.decodedSamples >= {DECODED_S * SAMPLE_RATE}"
            " && window.moshiDemo.texts.length > 0",
            timeout=TIMEOUT_MS,
        )
        stats = page.evaluate("() => window.moshiDemo.socket.stats()")
        transcript = page.inner_text("#transcript")
        page.click("#start")  # Stop
        page.wait_for_function("() => window.moshiDemo.closes.length > 0", timeout=TIMEOUT_MS)
        wait_until(lambda: engine.active == 0)
        return Conversation(
            codec=codec,
            stats=stats,
            final=page.evaluate("() => window.moshiDemo.socket.stats()"),
            transcript=transcript,
            texts=page.evaluate("() => window.moshiDemo.texts"),
            sent=[bytes(m) for m in page.evaluate(SENT_BYTES)],
            closes=page.evaluate("() => window.moshiDemo.closes"),
            frames_stepped=engine.timings.percentiles(STEP)["count"],
            active_after_stop=engine.active,
            foreign_requests=foreign,
        )
    finally:
        page.context.close()


def ogg_pages(data: bytes) -> list[tuple[int, int, int, int, list[bytes]]]:
    """(header type, granule, serial, sequence, packets) of each page; packets do not span pages here."""
    pages, start = [], 0
    while start < len(data):
        capture, _, kind, granule, serial, sequence, _, count = OGG_HEADER.unpack_from(data, start)
        assert capture == b"OggS"
        sizes = data[start + OGG_HEADER.size : start + OGG_HEADER.size + count]
        body = start + OGG_HEADER.size + count
        packets = []
        for size in sizes:
            packets.append(data[body : body + size])
            body += size
        pages.append((kind, granule, serial, sequence, packets))
        start = body
    return pages


def test_the_page_uses_webcodecs_where_the_browser_has_it_and_the_vendored_wasm_otherwise(conversation):
    assert conversation.stats["backend"] == conversation.codec
    assert conversation.stats["state"] == "live"


def test_moshi_answers_with_words_that_reach_the_transcript(conversation):
    assert conversation.stats["textPieces"] > 0
    assert conversation.transcript.strip()
    assert "".join(conversation.texts).strip().startswith(conversation.transcript.strip()[:10])


def test_moshis_voice_is_decoded_and_played_by_the_worklet(conversation):
    player = conversation.stats["player"]
    assert conversation.stats["secondsDecoded"] >= 1.0
    assert player["framesPlayed"] > 0 and player["samplesPlayed"] > SAMPLE_RATE / 2
    assert player["energy"] > 0  # Moshi's noise, not silence
    assert conversation.stats["firstAudioMs"] is not None
    assert conversation.stats["lagMs"]["count"] > 0


def test_the_browser_sends_one_ogg_opus_page_per_80_ms_frame_after_the_headers(conversation):
    assert all(message[0] == 1 for message in conversation.sent)  # kind 1: audio
    pages = ogg_pages(b"".join(message[1:] for message in conversation.sent))
    (head_type, _, serial, _, (head,)), (_, _, _, _, (tags,)) = pages[:2]
    assert head_type & 2 and head.startswith(b"OpusHead") and head[9] == 1  # first page, mono
    assert tags.startswith(b"OpusTags")
    data = pages[2:]
    assert [page[3] for page in pages] == list(range(len(pages)))  # sequence numbers
    assert {page[2] for page in pages} == {serial}
    granules = [page[1] for page in data]
    assert granules == [3840 * (i + 1) for i in range(len(data))]  # 48 kHz granules: 80 ms a page
    # every message ends on a page boundary, so the server decodes each one at once
    assert sum(len(ogg_pages(message[1:])) for message in conversation.sent) == len(pages)


def test_the_pages_the_browser_sends_decode_on_the_server_to_the_microphone_audio(conversation):
    pcm = OpusDecoder().decode(b"".join(message[1:] for message in conversation.sent))
    sent_frames = conversation.final["framesSent"]
    assert pcm.size == sent_frames * FRAME_SIZE
    assert rms(pcm) > 0.01  # the speech asset, not silence
    # and the model stepped those frames, less those still in flight at the stop (how many
    # depends on the machine's speed), and at least one for every frame of voice decoded
    decoded_frames = conversation.final["secondsDecoded"] * SAMPLE_RATE / FRAME_SIZE
    assert decoded_frames >= DECODED_S * 12.5
    assert decoded_frames <= conversation.frames_stepped <= sent_frames


def test_stopping_closes_with_1000_and_releases_the_slot(conversation):
    assert conversation.closes == [{"code": 1000, "reason": "stopped by the user"}]
    assert conversation.final["state"] == "closed"
    assert conversation.active_after_stop == 0


def test_the_page_loads_nothing_from_elsewhere(conversation):
    assert conversation.foreign_requests == []


# ogg.js on its own: packets of awkward sizes (0, 255, 510: lacing's edge cases) through the
# writer, the bytes fed back in odd chunks; a packet continued across pages; a flipped bit.
OGG_ROUND_TRIP = """async (base) => {
  const { OggOpusWriter, OggReader, oggCrc, oggPage, isOpusHead } = await import(`${base}/ogg.js`);
  const sizes = [1, 0, 255, 510, 254, 256, 700, 3, 1000, 120, 255, 9];
  const packets = sizes.map((n, i) => Uint8Array.from({ length: n }, (_, j) => (i * 31 + j) & 0xff));
  for (const p of packets) if (p.length) p[0] = 0x78; // TOC: CELT fullband 20 ms, one frame
  const writer = new OggOpusWriter({ serial: 7 });
  const chunks = [writer.headers()];
  for (const p of packets) { const page = writer.push(p); if (page) chunks.push(page); }
  chunks.push(writer.flush());
  const bytes = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) { bytes.set(c, at); at += c.length; }
  const reader = new OggReader();
  const pages = [];
  for (let i = 0; i < bytes.length; i += 37) pages.push(...reader.push(bytes.subarray(i, i + 37)));
  const read = pages.flatMap((page) => page.packets).slice(2).map((p) => Array.from(p));

  // a 520-byte packet continued on a second page: the first page's lacing ends on 255
  const big = Uint8Array.from({ length: 520 }, (_, j) => j & 0xff);
  const first = oggPage({ packets: [big.subarray(0, 510)], granule: -1, serial: 7, sequence: 0 });
  const cut = new Uint8Array(first.length - 1); // drop the lacing's closing 0: the packet goes on
  cut.set(first.subarray(0, 26)); cut[26] = 2; cut.set(first.subarray(27, 29), 27); cut.set(first.subarray(30), 29);
  cut.fill(0, 22, 26); new DataView(cut.buffer).setUint32(22, oggCrc(cut), true);
  const second = oggPage({ packets: [big.subarray(510)], granule: 960, serial: 7, sequence: 1, headerType: 1 });
  const spanning = new OggReader();
  const continued = [...spanning.push(cut), ...spanning.push(second)].flatMap((page) => page.packets);

  const corrupt = bytes.slice(0, 200); corrupt[60] ^= 1;
  let error = null;
  try { new OggReader().push(corrupt); } catch (e) { error = `${e.name}: ${e.message}`; }
  return {
    same: JSON.stringify(read) === JSON.stringify(packets.map((p) => Array.from(p))),
    head: isOpusHead(pages[0].packets[0]),
    granules: pages.map((page) => page.granule),
    sequences: pages.map((page) => page.sequence),
    continued: continued.map((p) => p.length),
    continuedSame: continued.length === 1 && continued[0].every((x, j) => x === (j & 0xff)),
    error,
  };
}"""


def test_ogg_pages_round_trip_packets_of_any_size_and_reject_a_corrupt_page(browser, served):
    result = on_demo_page(browser, served[0], OGG_ROUND_TRIP)
    assert result["same"] and result["head"]
    assert result["sequences"] == list(range(len(result["sequences"])))
    # 20 ms packets (960 at 48 kHz; the empty one counts none), four to an 80 ms page
    assert result["granules"] == [0, 0, 3840, 7680, 10560]
    assert result["continued"] == [520] and result["continuedSame"]
    assert result["error"] == "OggError: corrupt Ogg page: checksum mismatch"


# The player's queue, in an OfflineAudioContext: rendering is as fast as the CPU allows,
# and what comes out is exactly what the worklet decided, whatever the machine's speed.
PLAYER_FLOOD = """async (base) => {
  const { Player } = await import(`${base}/audio.js`);
  const context = new OfflineAudioContext({ numberOfChannels: 1, length: 24000, sampleRate: 24000 });
  const player = await Player.create(context, { startMs: 80, maxMs: 300, keepMs: 160 });
  // 2 s of audio at once, faster than real time: frame i holds the constant (i + 1) / 100
  for (let i = 0; i < 25; i++) player.push(new Float32Array(1920).fill((i + 1) / 100));
  const queued = await player.stats();
  const rendered = (await context.startRendering()).getChannelData(0);
  return { queued, rendered: Array.from(rendered) };
}"""


def test_the_player_drops_the_oldest_audio_when_fed_faster_than_real_time(browser, served):
    result = on_demo_page(browser, served[0], PLAYER_FLOOD)
    stats, rendered = result["queued"], np.array(result["rendered"], dtype=np.float32)
    assert stats["samplesReceived"] == 25 * 1920
    assert stats["maxQueuedSamples"] <= 7200  # never more than 300 ms queued
    assert stats["droppedSamples"] == 25 * 1920 - stats["queuedSamples"]
    kept = stats["queuedSamples"]
    assert 0 < kept <= 7200
    # what stayed plays once (from a fade-in of one render quantum), then silence
    assert np.all(rendered[1:kept] != 0) and not rendered[kept:].any()
    # and it is the newest audio: the last frame (0.25) and the ones just before it
    oldest_kept = (25 - np.ceil(kept / 1920) + 1) / 100
    assert rendered[128:kept].min() == pytest.approx(oldest_kept)
    assert rendered[kept - 1] == pytest.approx(0.25)


# Moshi's frames arriving in real time after a burst, rendered offline: suspend() stops the
# render at each 80 ms boundary, where the next frame is pushed, as the network would.
PLAYER_CATCH_UP = """async (base) => {
  const { Player } = await import(`${base}/audio.js`);
  const context = new OfflineAudioContext({ numberOfChannels: 1, length: 4 * 24000, sampleRate: 24000 });
  const player = await Player.create(context, { startMs: 80, maxMs: 300, keepMs: 160, slackMs: 40, windowMs: 1000 });
  const frame = () => new Float32Array(1920).fill(0.1);
  for (let i = 0; i < 3; i++) player.push(frame()); // 240 ms at once: a stall that caught up
  const snapshots = [];
  for (let k = 1; k < 50; k++) {
    context.suspend((k * 1920) / 24000).then(async () => {
      player.push(frame());
      snapshots.push(await player.stats()); // the reply also says the push arrived
      await context.resume();
    });
  }
  await player.stats();
  await context.startRendering();
  return snapshots;
}"""


def test_the_player_trims_a_backlog_it_does_not_need_back_to_its_slack(browser, served):
    snapshots = on_demo_page(browser, served[0], PLAYER_CATCH_UP)
    queued_ms = [snapshot["queuedSamples"] / 24 for snapshot in snapshots]
    last = snapshots[-1]
    assert len(snapshots) == 49
    assert queued_ms[0] >= 240  # the burst, plus the frame just pushed, less what played
    assert max(queued_ms[-12:]) <= 40 + 80 + 128 / 24  # slack + the frame just pushed (+ a quantum)
    assert last["trims"] >= 1 and last["drops"] == 0 and last["underruns"] == 0
    assert last["droppedSamples"] == last["samplesReceived"] - last["samplesPlayed"] - last["queuedSamples"]


MICROPHONE_AT_48K = """async (base) => {
  const { Microphone } = await import(`${base}/audio.js`);
  const context = new AudioContext({ sampleRate: 48000 });
  const frames = [];
  const microphone = await Microphone.open(context, { onFrame: (frame) => frames.push(frame) });
  const started = context.currentTime;
  await new Promise((resolve) => setTimeout(resolve, 1500));
  const elapsed = context.currentTime - started;
  microphone.close();
  await context.close();
  let peak = 0;
  for (const frame of frames) for (const x of frame) peak = Math.max(peak, Math.abs(x));
  return { count: frames.length, lengths: [...new Set(frames.map((f) => f.length))], elapsed, peak };
}"""


def test_the_microphone_comes_as_24_khz_frames_of_80_ms_from_a_context_at_another_rate(browser, served):
    result = on_demo_page(browser, served[0], MICROPHONE_AT_48K)
    assert result["lengths"] == [FRAME_SIZE]
    # 12.5 frames per second of the context's clock: 48 kHz in, 24 kHz out
    assert abs(result["count"] - result["elapsed"] * 12.5) <= 2
    assert result["peak"] > 0.05  # the speech asset


def scripted_chat(script: list[bytes], close: tuple[int, str]) -> tuple[FastAPI, list[dict]]:
    """An /api/chat that sends `script` (after the first audio from the client when it
    follows a handshake), then closes with `close`; it records each connection's query."""
    app = FastAPI()
    queries: list[dict] = []

    @app.websocket("/api/chat")
    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        queries.append(dict(ws.query_params))
        for message in script:
            await ws.send_bytes(message)
        if b"\x00" in script:
            await ws.receive_bytes()  # the page speaks once the handshake came
        await ws.close(code=close[0], reason=close[1])

    mount_static(app)
    return app, queries


def test_the_page_reports_its_place_in_line_then_talks_once_the_handshake_comes(browser):
    queue = [
        {"queue": {"position": 2, "waiting": 3, "eta_s": 180, "slots": 2}},  # unknown keys pass through
        {"queue": {"position": 1, "waiting": 2, "eta_s": 60}},
    ]
    script = [b"\x04" + json.dumps(q).encode() for q in queue]
    script += [b"\x04not json", b"\x09a kind from the future", b"\x00", b"\x02hello"]
    app, queries = scripted_chat(script, (1000, "conversation ended"))
    with serve_asgi(app) as url:
        page = new_page(browser, url, [])
        try:
            page.goto(demo_url(url, queue=1, seed=7, temp=0.5, top_k_text=20))
            page.click("#start")
            page.wait_for_function("() => window.moshiDemo.closes.length > 0", timeout=TIMEOUT_MS)
            demo = page.evaluate("() => window.moshiDemo")
            status = page.inner_text("#status")
        finally:
            page.context.close()
    assert queries == [{"queue": "1", "seed": "7", "temp": "0.5", "top_k_text": "20"}]
    assert demo["queue"] == [q["queue"] for q in queue]
    assert demo["states"] == ["starting", "connecting", "queued", "live", "closing", "closed"]
    assert demo["texts"] == ["hello"]
    assert demo["closes"] == [{"code": 1000, "reason": "conversation ended"}]
    assert demo["errors"] == []
    assert status == "The conversation ended (conversation ended)."


def test_a_busy_server_is_reported_with_its_close_code_and_reason(browser):
    app, _ = scripted_chat([], (CloseCode.TRY_AGAIN_LATER, "every conversation slot is taken; try again later"))
    with serve_asgi(app) as url:
        page = new_page(browser, url, [])
        try:
            page.goto(demo_url(url))
            page.click("#start")
            page.wait_for_function("() => window.moshiDemo.closes.length > 0", timeout=TIMEOUT_MS)
            closes = page.evaluate("() => window.moshiDemo.closes")
            status = page.inner_text("#status")
            state = page.evaluate("() => window.moshiDemo.socket.state")
        finally:
            page.context.close()
    assert closes == [{"code": 1013, "reason": "every conversation slot is taken; try again later"}]
    assert status.startswith("Moshi is busy")
    assert state == "closed"
