"""`GET /metrics`: the server's Prometheus families, read with prometheus_client's own parser, as
conversations over both websocket protocols move them: how each ended, first audio, the batched
step timed in the model's own process, refusals and idle endings; open like /status, or behind a
token of its own."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moshi_engine.audio import FRAME_SIZE
from moshi_engine.conversation import SessionLimits
from moshi_engine.engine import load_engine
from moshi_engine.model.process import ModelProcess
from moshi_engine.web import create_app
from moshi_engine.wire.remote import RemoteSession, exchange
from moshi_engine.wire.server import create_api
from tests.live import serve_asgi

IDLE_S = 4.0
FAMILIES = {
    "moshi_slots": "gauge",
    "moshi_slots_leased": "gauge",
    "moshi_queue_waiting": "gauge",
    "moshi_conversations": "counter",
    "moshi_first_audio_seconds": "histogram",
    "moshi_step_seconds": "histogram",
    "moshi_frame_lag_seconds": "histogram",
    "moshi_queue_wait_seconds": "histogram",
    "moshi_model_restarts": "counter",
    "moshi_dropped_audio_frames": "counter",
    "moshi_model_info": "gauge",  # an info metric, as the text format writes one
}


@pytest.fixture(scope="module")
def served():
    """One slot, no waiting line, a short idle limit; the model steps in its own process."""
    engine = load_engine("tiny", device="cpu", sessions=1, queue=0)
    try:
        with serve_asgi(create_api(engine, SessionLimits(idle_s=IDLE_S))) as url:
            yield url, engine
    finally:
        engine.close()


def scrape(url: str, headers: dict | None = None) -> dict[str, dict[tuple, float]]:
    """Every sample of /metrics by name, then by its labels (sorted (name, value) pairs)."""
    request = urllib.request.Request(url + "/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def counted(url: str, before: dict, more: int = 1, **labels: str) -> dict:
    """The samples once moshi_conversations_total{labels} is `more` above `before` (the server
    counts a conversation as it finishes with it, a moment after the client has gone)."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(url)
        now = value(samples, "moshi_conversations_total", **labels)
        if now >= value(before, "moshi_conversations_total", **labels) + more or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def ws(url: str, path: str) -> str:
    return url.replace("http://", "ws://") + path


def test_metrics_parse_with_prometheus_own_parser_every_family_with_its_help_and_voice(served):
    url, _ = served
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        families = {family.name: family for family in text_string_to_metric_families(response.read().decode())}
    assert {name: families[name].type for name in FAMILIES if name in families} == FAMILIES
    assert all(families[name].documentation for name in families)
    samples = scrape(url)
    assert value(samples, "moshi_slots", voice="tiny") == 1
    assert value(samples, "moshi_model_info", voice="tiny", model="tiny", weights="float32", dtype="float32",
                 device="cpu") == 1
    assert not any(name.endswith("_created") for name in samples)


@pytest.mark.parametrize("path", ["/ws", "/api/chat"])
def test_a_conversation_on_each_protocol_is_counted_once_with_its_labels_and_its_first_audio(served, hello_pcm, path):
    url, _ = served
    transport = path.strip("/")
    before = scrape(url)
    result = asyncio.run(exchange(ws(url, path), hello_pcm[: 24000 * 2], realtime=False))
    assert result.pcm.size > 0
    ended = {"voice": "tiny", "transport": transport, "ending": "normal"}
    after = counted(url, before, **ended)
    assert value(after, "moshi_conversations_total", **ended) == value(before, "moshi_conversations_total",
                                                                       **ended) + 1
    labels = {"voice": "tiny", "transport": transport}
    assert value(after, "moshi_first_audio_seconds_count", **labels) == value(
        before, "moshi_first_audio_seconds_count", **labels) + 1
    assert 0 < value(after, "moshi_first_audio_seconds_sum", **labels) - value(
        before, "moshi_first_audio_seconds_sum", **labels) < 10
    assert value(after, "moshi_frame_lag_seconds_count", **labels) > value(before, "moshi_frame_lag_seconds_count",
                                                                           **labels)
    assert value(after, "moshi_queue_wait_seconds_count", voice="tiny") == value(
        before, "moshi_queue_wait_seconds_count", voice="tiny") + 1


def test_the_step_histogram_grows_while_a_conversation_runs_in_the_model_process(served):
    url, engine = served
    assert isinstance(engine.model, ModelProcess)  # the step is timed in another process

    async def talk() -> tuple[float, float, float]:
        session = RemoteSession(ws(url, "/api/chat"))
        await session.start()
        silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        try:
            counts = []
            for _ in range(2):
                for _ in range(10):  # 0.8 s of audio, in real time
                    await session.send_pcm(silence)
                    await asyncio.sleep(0.08)
                counts.append(value(await asyncio.to_thread(scrape, url), "moshi_step_seconds_count", voice="tiny"))
            leased = value(await asyncio.to_thread(scrape, url), "moshi_slots_leased", voice="tiny")
        finally:
            await session.close()
        return counts[0], counts[1], leased

    first, second, leased = asyncio.run(talk())
    assert second >= first + 5 and leased == 1


def test_a_refused_and_an_idle_ended_conversation_carry_their_labels(served):
    url, _ = served
    before = scrape(url)

    async def refused_while_the_slot_is_held_then_idle() -> tuple[int | None, int | None]:
        holder = RemoteSession(ws(url, "/api/chat"))
        await holder.start()  # the one slot, then silent: the idle limit ends it
        refused = RemoteSession(ws(url, "/api/chat"))
        try:
            await refused.start()
        except Exception:  # noqa: BLE001 - BusyError: no slot and no place in line
            pass
        with pytest.raises(Exception):  # noqa: B017 - the idle limit closed it
            while True:
                await holder.receive()
        return refused.close_code, holder.close_code

    refused_code, idle_code = asyncio.run(refused_while_the_slot_is_held_then_idle())
    assert (refused_code, idle_code) == (1013, 1008)
    for ending in ("refused", "idle"):
        labels = {"voice": "tiny", "transport": "api/chat", "ending": ending}
        after = counted(url, before, **labels)
        assert value(after, "moshi_conversations_total", **labels) == value(before, "moshi_conversations_total",
                                                                            **labels) + 1


def test_metrics_are_open_on_a_private_app_unless_they_have_a_token_of_their_own(tiny_engine):
    app = create_app(tiny_engine, token="s3cret")
    with serve_asgi(app) as url:
        assert value(scrape(url), "moshi_slots", voice="tiny") == 2  # like /status: no token asked
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/", timeout=10)
        assert refused.value.code == 401  # the rest of the app is private
    with serve_asgi(create_api(tiny_engine, metrics_token="prometheus-only")) as url:
        for headers, code in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                scrape(url, headers)
            assert refused.value.code == code
        assert value(scrape(url, {"Authorization": "Bearer prometheus-only"}), "moshi_slots", voice="tiny") == 2


def counts(metrics) -> dict[str, float]:
    """The step and queue-wait histograms' counts in that registry's exposition."""
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name in ("moshi_step_seconds_count", "moshi_queue_wait_seconds_count"):
                found[sample.name] = found.get(sample.name, 0) + sample.value
    return found


async def test_every_watcher_comes_off_with_what_registered_it_and_none_piles_up(hello_pcm):
    """Many registrations, each removed by what it returned, then one of each kind: every real
    step and every wait for a slot is observed exactly once, by the metrics and by the observers."""
    from moshi_engine.timings import STEP
    from moshi_engine.watch.metrics import Metrics
    from tests.conftest import converse

    engine = load_engine("tiny", device="cpu", sessions=1, queue=0, warmup_frames=1)
    try:
        metrics = Metrics()
        for _ in range(50):
            metrics.watch("tiny", engine)()
            engine.timings.observe(STEP, lambda seconds: None)()
            engine.observe_queue_wait(lambda seconds: None)()
        steps, waits = [], []
        stop_steps, stop_waits = engine.timings.observe(STEP, steps.append), engine.observe_queue_wait(waits.append)
        unwatch = metrics.watch("tiny", engine)
        async with engine.session() as session:
            await converse(session, hello_pcm[: 2 * 24_000])
        figures = counts(metrics)
        assert figures["moshi_step_seconds_count"] == len(steps) > 0
        assert figures["moshi_queue_wait_seconds_count"] == len(waits) == 1

        unwatch()  # the metrics watch no more; the observers still do
        figures, observed = counts(metrics), len(steps)
        async with engine.session() as session:
            await converse(session, hello_pcm[:24_000])
        assert counts(metrics) == figures and len(waits) == 2 and len(steps) > observed
        stop_steps()
        stop_waits()
    finally:
        engine.close()


def test_a_server_that_does_not_watch_answers_alike_and_observes_nothing(served, hello_pcm):
    """`watching=False`, the bench's baseline for what watching costs: the same conversation is
    served, /metrics keeps the live figures, and nothing is observed as it happens."""
    _, engine = served
    with serve_asgi(create_api(engine, watching=False)) as url:
        before = scrape(url)
        result = asyncio.run(exchange(ws(url, "/api/chat"), hello_pcm[: 24000 * 2], realtime=False))
        assert result.pcm.size > 0
        time.sleep(0.5)  # the server finishes with the conversation a moment after the client left
        after = scrape(url)
    assert value(after, "moshi_slots", voice="tiny") == 1  # read from the engine when scraped
    for name in ("moshi_conversations_total", "moshi_frame_lag_seconds_count", "moshi_first_audio_seconds_count",
                 "moshi_step_seconds_count", "moshi_queue_wait_seconds_count"):
        assert sum(after.get(name, {}).values()) == sum(before.get(name, {}).values()) == 0, name
