"""The benchmark's `network` section: the visitor on the other side of a real network.

`python app.py` runs in the server namespace of a `netem.NetworkEmulator`; the visitor, in the
client namespace, is Chromium on the page's WebRTC path, Chromium on its websocket path, or our
websocket client (`wire.remote.RemoteSession`). Per profile (loopback first: the baseline the
others add to) and path:

- `talk_to_first_audio_ms` (the page: from Talk) or `first_audio_ms` (the client: from its
  first frame sent), and the steady lag: the page's drain probe plus playout (`browser.py`), the
  client's per-frame lag (an input frame sent to Moshi's answer to it received), p50 and p95;
- `concealed_share`: WebRTC only, what the browser's decoder made up of Moshi's audio
  (getStats' concealedSamples over totalSamplesReceived) in the steady window, outside outages;
- per event (a 3 s and a 10 s outage, a handover): whether the conversation survived (the same
  one goes on, Moshi answering again within 15 s of the link's return), how the server saw it
  come back (recovered, resumed) and how long until its lag was back to normal (the server's
  `moshi_lag_recovery_seconds`).

The model takes a real step's time (`--min-step-ms`, 65 ms by default), so that a backlog would
show as lag that never drains. Needs root, `ip`, /dev/net/tun (`netem.missing()`), playwright
and Debian's chromium.

    python -m moshi_engine.bench.network --json network.json            # every profile and path
    python -m moshi_engine.bench.network --profiles 4g --paths client   # one cell
    python -m moshi_engine.bench.network --profiles "" --hold satellite  # a call kept to the session limit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..audio import FRAME_SECONDS, FRAME_SIZE
from .netem import NetworkEmulator, in_namespace, missing

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PROFILE_ORDER = ("loopback", "wifi", "4g", "poor", "satellite")
PATHS = ("webrtc", "websocket", "client")
EVENT_ORDER = ("outage-3s", "outage-10s", "handover")
PORT = 7860
COME_BACK_S = 15.0  # how long after the link's return Moshi must be answering again
ANSWERED_AGAIN = 12  # frames of Moshi's voice (about a second) that prove it
# The `transport` label of each path's conversations on the server (watch.metrics).
SERVER_TRANSPORT = {"webrtc": "webrtc", "websocket": "api/chat", "client": "api/chat"}


# ## The app behind the wire


class AppBehindWire:
    """`python app.py --model tiny` in the server namespace of a NetworkEmulator, on its address
    there, with no STUN (there is no internet); `close()` (or `with`) ends both. Its log goes to
    `log_path` (default: discarded); `session_limit_s` replaces app.py's 600 s."""

    def __init__(self, profile: str = "4g", seed: int = 0, sessions: int = 2, min_step_ms: float = 65.0,
                 grace_s: float = 15.0, log_path: Path | None = None, startup_timeout_s: float = 120.0,
                 session_limit_s: float | None = None) -> None:
        self.net = NetworkEmulator(profile, seed=seed)
        self.grace_s = grace_s
        self.base = f"http://{self.net.server_address}:{PORT}"
        env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}
        env.update(MOSHI_STUN_URLS="", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 (kept open while it runs)
        try:
            self.process = self.net.popen("server", [
                sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--sessions", str(sessions),
                "--host", self.net.server_address, "--port", str(PORT), "--queue", "0",
                "--min-step-ms", str(min_step_ms), "--reconnect-grace", str(grace_s),
                *(["--session-limit", str(session_limit_s)] if session_limit_s else []),
            ], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + startup_timeout_s
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"app.py exited with {self.process.returncode}" +
                                       (f" (its log: {log_path})" if log_path else ""))
                try:
                    self.status()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("app.py did not answer /status in time") from None
                    time.sleep(0.3)
        except BaseException:
            self.close()
            raise

    def served(self, path: str) -> str:
        """GET from inside the server's namespace: it answers there whatever the wire does."""
        def get() -> str:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return response.read().decode()

        return in_namespace(self.net.server_ns, get)

    def status(self) -> dict:
        return json.loads(self.served("/status"))

    def active(self) -> int:
        return self.status()["sessions"]["active"]

    def wait_idle(self, timeout_s: float = 30.0) -> int:
        """Wait until no conversation holds a slot; returns how many still do."""
        deadline = time.monotonic() + timeout_s
        while (now := self.active()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return now

    def figures(self) -> dict[tuple[str, tuple], float]:
        """/metrics as {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        figures = {}
        for family in text_string_to_metric_families(self.served("/metrics")):
            for sample in family.samples:
                figures[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return figures

    def close(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.net.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> AppBehindWire:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def total(figures: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(value for (sample, have), value in figures.items()
               if sample == name and all((key, want) in have for key, want in labels.items()))


def _comeback(before: dict, after: dict, transport: str) -> dict:
    """How the server saw the conversation come back between two readings of /metrics."""
    def delta(name: str, **labels: str) -> float:
        return total(after, name, transport=transport, **labels) - total(before, name, transport=transport, **labels)

    recoveries = delta("moshi_lag_recovery_seconds_count")
    return {
        "recovered": int(delta("moshi_interruptions_total", outcome="recovered")),
        "resumed": int(delta("moshi_interruptions_total", outcome="resumed")),
        "lost": int(delta("moshi_interruptions_total", outcome="lost")),
        "lag_back_s": round(delta("moshi_lag_recovery_seconds_sum") / recoveries, 3) if recoveries else None,
    }


def _event(wired: AppBehindWire, name: str) -> None:
    log.info("network event %s", name)
    wired.net.event(name)


# ## Our websocket client


async def _client_conversation(wired: AppBehindWire, pcm, seconds: float, events: tuple[str, ...]) -> dict:
    from ..conversation import AudioOut
    from ..wire.protocol import Protocol
    from ..wire.remote import RemoteSession

    session = RemoteSession(wired.base.replace("http://", "ws://") + Protocol.MOSHI.path, on_position=lambda _: None)
    sent: dict[int, float] = {}
    answers: list[tuple[float, float | None]] = []  # (received at, lag: its input frame sent -> received)
    loop = asyncio.get_running_loop()
    await session.start()

    async def feed() -> None:
        start = loop.time()
        for index in range(1_000_000):
            await asyncio.sleep(max(0.0, start + index * FRAME_SECONDS - loop.time()))
            at = index * FRAME_SIZE % (pcm.size - FRAME_SIZE)
            sent[index] = time.perf_counter()
            await session.send_pcm(pcm[at : at + FRAME_SIZE])

    async def read() -> None:
        count = 0
        while True:
            if isinstance(await session.receive(), AudioOut):
                now = time.perf_counter()
                answered = sent.get(count + 1)  # Moshi's frame k answers input frame k + 1
                answers.append((now, now - answered if answered is not None and not session.resumes else None))
                count += 1

    tasks = [asyncio.create_task(feed()), asyncio.create_task(read())]
    try:
        started = time.perf_counter()
        while not answers:
            await asyncio.sleep(0.01)
        first_audio_ms = (answers[0][0] - started) * 1000
        await asyncio.sleep(seconds)
        lags = sorted(lag * 1000 for _, lag in answers[len(answers) // 4 :] if lag is not None)
        result = {
            "first_audio_ms": round(first_audio_ms, 1),
            "lag_ms": _percentiles(lags),
            "events": {},
        }
        conversation = session.conversation_id
        for name in events:
            before = await asyncio.to_thread(wired.figures)
            await asyncio.to_thread(_event, wired, name)
            heard = len(answers)
            deadline = loop.time() + COME_BACK_S
            while len(answers) < heard + ANSWERED_AGAIN and loop.time() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # the server's lag back to normal is measured by now
            survived = len(answers) >= heard + ANSWERED_AGAIN and session.conversation_id == conversation
            result["events"][name] = {"survived": survived,
                                      **_comeback(before, await asyncio.to_thread(wired.figures), "api/chat")}
            if not survived:
                break
        return result
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "count": 0}
    values = sorted(values)
    return {"p50": round(statistics.median(values), 1), "p95": round(values[int(0.95 * (len(values) - 1))], 1),
            "count": len(values)}


def client_path(wired: AppBehindWire, seconds: float, events: tuple[str, ...]) -> dict:
    from ..audio import read_wav
    from .browser import SPEECH_WAV

    pcm = read_wav(SPEECH_WAV)
    return in_namespace(wired.net.client_ns, lambda: asyncio.run(_client_conversation(wired, pcm, seconds, events)))


# ## The page in Chromium


CONCEALED = """async () => {
  let concealed = 0, total = 0;
  for (const pc of window.moshiProbe.pcs) {
    (await pc.getStats()).forEach((r) => {
      if (r.type !== 'inbound-rtp' || r.kind !== 'audio') return;
      concealed += r.concealedSamples; total += r.totalSamplesReceived;
    });
  }
  return [concealed, total];
}"""
TRANSCRIPT_LENGTH = "() => document.querySelector('#moshi-transcript textarea')?.value.length || 0"
LIVE = {"webrtc": "window.moshiPage.attempt?.state === 'connected'",
        "websocket": "window.moshiPage.socket?.state === 'live'"}


def _start_call(context, wired: AppBehindWire, path: str):
    """A page in `context` that pressed Talk on `path` and whose conversation is live."""
    from .browser import PAGE_PROBE, TALK_BUTTON

    page = context.new_page()
    page.add_init_script(path=str(PAGE_PROBE))
    page.goto(f"{wired.base}/?transport={path}")
    page.wait_for_function("() => window.moshiPage?.ready", timeout=60_000)
    page.click("#moshi-webrtc button", timeout=60_000)  # "Click to Access Microphone"
    page.wait_for_selector(TALK_BUTTON, timeout=60_000)
    page.click(TALK_BUTTON)
    page.wait_for_function(f"() => {LIVE[path]}", timeout=60_000)
    return page


def page_events(browser, wired: AppBehindWire, path: str, seconds: float, events: tuple[str, ...]) -> dict:
    """One conversation on that page path: the concealed share over `seconds` of steady talk,
    then the events one after the other while it lasts."""
    from .browser import STOP_BUTTON, TALK_BUTTON

    context = browser.new_context()
    result: dict = {"events": {}}
    try:
        page = _start_call(context, wired, path)
        page.wait_for_function(f"() => ({TRANSCRIPT_LENGTH})() > 0", timeout=60_000)
        if path == "webrtc":
            time.sleep(1.0)
            concealed, total_samples = page.evaluate(CONCEALED)
            time.sleep(seconds)
            concealed_after, total_after = page.evaluate(CONCEALED)
            received = total_after - total_samples
            result["concealed_share"] = round((concealed_after - concealed) / received, 4) if received else None
        for name in events:
            before = wired.figures()
            _event(wired, name)
            words = page.evaluate(TRANSCRIPT_LENGTH)
            deadline = time.monotonic() + COME_BACK_S
            while time.monotonic() < deadline:
                back = _comeback(before, wired.figures(), SERVER_TRANSPORT[path])
                if back["recovered"] + back["resumed"] and page.evaluate(TRANSCRIPT_LENGTH) > words:
                    break
                time.sleep(0.25)
            time.sleep(1.5)  # the server's lag back to normal is measured by now
            back = _comeback(before, wired.figures(), SERVER_TRANSPORT[path])
            survived = bool(back["recovered"] + back["resumed"]) and page.evaluate(f"() => {LIVE[path]}") and \
                page.evaluate(TRANSCRIPT_LENGTH) > words
            result["events"][name] = {"survived": bool(survived), **back}
            if not survived:
                break
        if page.evaluate(f"() => {LIVE[path]}"):
            page.click(TALK_BUTTON if path == "webrtc" else STOP_BUTTON)
        return result
    finally:
        context.close()
        if wired.wait_idle(wired.grace_s + 10):
            log.warning("a conversation still holds its slot after the page closed")


HOLD_TIMEOUT_S = 900.0  # a held call the server has not ended by then was not ended by its limit


def page_hold(browser, wired: AppBehindWire, path: str = "webrtc") -> dict:
    """One call on that page path, kept talking until the server ends it (its session limit, if
    the link holds it up that long): how long it was live, how the server ended it, the
    interruptions it saw, and what the browser concealed of Moshi's audio over the call."""
    context = browser.new_context()
    try:
        page = _start_call(context, wired, path)
        before = wired.figures()
        started = time.monotonic()
        first = last = page.evaluate(CONCEALED) if path == "webrtc" else None
        while page.evaluate(f"() => {LIVE[path]}") and time.monotonic() - started < HOLD_TIMEOUT_S:
            if path == "webrtc":
                last = page.evaluate(CONCEALED)  # while the call lasts: its statistics go with it
            time.sleep(2.0)
        held_s = time.monotonic() - started
        wired.wait_idle(wired.grace_s + 10)
        after = wired.figures()
    finally:
        context.close()
    transport = SERVER_TRANSPORT[path]
    endings = {ending: total(after, "moshi_conversations_total", transport=transport, ending=ending)
               - total(before, "moshi_conversations_total", transport=transport, ending=ending)
               for ending in ("normal", "limit", "idle", "client_gone", "error", "restart")}
    received = last[1] - first[1] if first is not None else 0
    return {
        "path": path,
        "held_s": round(held_s, 1),
        "ended_by": [ending for ending, count in endings.items() if count] or None,
        "interruptions": total(after, "moshi_interruptions_total", transport=transport)
        - total(before, "moshi_interruptions_total", transport=transport),
        "concealed_share": round((last[0] - first[0]) / received, 4) if received else None,
    }


# ## The section


def network_section(profiles: tuple[str, ...] = PROFILE_ORDER, paths: tuple[str, ...] = PATHS,
                    events: tuple[str, ...] = EVENT_ORDER, seconds: float = 6.0, min_step_ms: float = 65.0,
                    log_path: Path | None = None, holds: tuple[str, ...] = ()) -> dict:
    """Every profile on each path, on one app behind one emulated link whose profile changes;
    then, on each of the `holds` profiles, one WebRTC call held until the server ends it (the
    session limit: 10 minutes each)."""
    problem = missing()
    if problem:
        return {"skipped": problem}
    from playwright.sync_api import sync_playwright

    from .browser import CHROMIUM, _page_path, chromium_args

    results: dict = {"min_step_ms": min_step_ms, "profiles": {}}
    with AppBehindWire("loopback", seed=33, min_step_ms=min_step_ms, log_path=log_path) as wired, \
            sync_playwright() as playwright:
        def visitor():
            """A browser of its own for each visitor: Chromium follows the first change of its
            interface's address, not a second one in the same process (its next connection still
            gathers the address before), so one browser for every cell would fail each later handover."""
            return playwright.chromium.launch(executable_path=wired.net.chromium(CHROMIUM), args=[
                *chromium_args(), f"--unsafely-treat-insecure-origin-as-secure={wired.base}"])

        for profile in profiles:
            wired.net.set_profile(profile)
            cells = results["profiles"][profile] = {}
            for path in paths:
                log.info("network: %s over %s", path, profile)
                started = time.perf_counter()
                try:
                    if path == "client":
                        cell = client_path(wired, seconds, events)
                    else:
                        with visitor() as browser:
                            cell = _page_path(browser, wired.base, path, seconds, 2, 60.0)
                            wired.wait_idle()
                            cell.update(page_events(browser, wired, path, seconds, events))
                except Exception as error:  # one cell's failure is recorded, the others still run
                    log.exception("network: %s over %s failed", path, profile)
                    cell = {"error": f"{type(error).__name__}: {error}"}
                cell["duration_s"] = round(time.perf_counter() - started, 1)
                cells[path] = cell
                log.info("network: %s over %s: %s", path, profile, cell)
                wired.wait_idle(wired.grace_s + 10)
        for profile in holds:
            wired.net.set_profile(profile)
            log.info("network: a WebRTC call held over %s", profile)
            try:
                with visitor() as browser:
                    held = page_hold(browser, wired)
            except Exception as error:
                log.exception("network: the call held over %s failed", profile)
                held = {"error": f"{type(error).__name__}: {error}"}
            results.setdefault("holds", {})[profile] = held
            log.info("network: held over %s: %s", profile, held)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moshi_engine.bench.network", description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default=",".join(PROFILE_ORDER))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--events", default=",".join(EVENT_ORDER))
    parser.add_argument("--seconds", type=float, default=6.0, help="the steady window of each conversation")
    parser.add_argument("--min-step-ms", type=float, default=65.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--app-log", type=Path, help="where app.py's log goes")
    parser.add_argument("--hold", default="", help="profiles to hold a WebRTC call on until the session limit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    split = lambda text: tuple(item.strip() for item in text.split(",") if item.strip())  # noqa: E731
    result = network_section(split(args.profiles), split(args.paths), split(args.events), args.seconds,
                             args.min_step_ms, args.app_log, split(args.hold))
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if "skipped" not in result else 2


if __name__ == "__main__":
    sys.exit(main())
