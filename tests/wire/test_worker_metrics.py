"""The scale-out layout's one scrape: two API servers (the GPU workers) publish their figures
into a shared store (a dict here, a modal.Dict on Modal), and the page in front of one of them
serves every worker's beside its own, each with a `worker` label, one family per name; a worker
that stopped publishing drops out."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moshi_engine.engine import load_engine
from moshi_engine.watch.workers import publish
from moshi_engine.web import create_app
from moshi_engine.wire.remote import exchange
from moshi_engine.wire.server import create_api
from tests.live import serve_asgi

EVERY_S = 0.2


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """(name, sorted labels) -> value of every sample."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def worker_samples(found: dict, worker: str, name: str) -> dict[tuple, float]:
    return {labels: value for (sample, labels), value in found.items()
            if sample == name and ("worker", worker) in labels}


@pytest.fixture(scope="module")
def workers():
    engines = [load_engine("tiny", device="cpu", sessions=1, queue=0, warmup_frames=1) for _ in range(2)]
    try:
        yield engines
    finally:
        for engine in engines:
            engine.close()


def test_the_page_serves_every_workers_figures_with_its_label_and_drops_a_silent_one(workers, hello_pcm):
    store: dict = {}
    apps = [create_api(engine) for engine in workers]
    with serve_asgi(apps[0]) as first_url, serve_asgi(apps[1]):
        stops = [publish(app.state.moshi.metrics, store, worker, every_s=EVERY_S)
                 for app, worker in zip(apps, ("worker-a", "worker-b"), strict=True)]
        try:
            page = create_app(remote=first_url + "/api/chat", worker_metrics=store)
            with serve_asgi(page) as page_url:
                # a conversation through the page's websocket, carried to the first worker
                result = asyncio.run(exchange(page_url.replace("http://", "ws://") + "/api/chat",
                                              hello_pcm[: 2 * 24_000], realtime=False))
                assert result.pcm.size > 0
                ended = {"voice": "tiny", "transport": "api/chat", "ending": "normal"}
                deadline = time.monotonic() + 15
                while True:
                    text = scrape_text(page_url)
                    found = samples(text)
                    counted = worker_samples(found, "worker-a", "moshi_conversations_total")
                    if counted or time.monotonic() > deadline:
                        break
                    time.sleep(EVERY_S)
                assert counted == {tuple(sorted({**ended, "worker": "worker-a"}.items())): 1.0}
                assert worker_samples(found, "worker-b", "moshi_conversations_total") == {}
                for worker in ("worker-a", "worker-b"):
                    assert list(worker_samples(found, worker, "moshi_slots").values()) == [1.0]
                    assert worker_samples(found, worker, "moshi_model_info")
                assert sum(worker_samples(found, "worker-a", "moshi_step_seconds_count").values()) > 0
                # one HELP and one TYPE per family, as Prometheus wants, the page's own among them
                described = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
                assert len(described) == len(set(described)) and "moshi_conversations_total" in described

                stops.pop()()  # the second worker scaled down: it published once more, then no more
                store["worker-b"]["at"] -= 3600
                found = samples(scrape_text(page_url))
                assert worker_samples(found, "worker-b", "moshi_slots") == {}
                assert worker_samples(found, "worker-a", "moshi_slots")
        finally:
            for stop in stops:
                stop()
