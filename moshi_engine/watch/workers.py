"""Every GPU worker's figures in one scrape of the page, without waking a worker.

In the scale-out layout the page runs in one cheap CPU container and the conversations in GPU
workers behind one URL: a scrape of a worker's `/metrics` reaches whichever worker the platform
routes it to, and starts one if none is up. So each worker publishes its own exposition into a
shared store while it runs, and the page's `/metrics` serves those beside its own figures, each
worker's samples with a `worker` label:

    stop = publish(metrics, store, worker="ta-01H...", every_s=15)    # in each worker
    metrics.gather(store)                                           # in the page's app

`store` is any mapping shared by both sides: a `modal.Dict` on Modal (`app.py`), a dict in tests.
A worker's entry is `{"at": unix time, "text": its exposition}`; entries older than `fresh_s`
(a worker scaled down, its counters gone with it) are left out, and forgotten after `FORGET_S`.
Publishing is a thread's write every `every_s`; it is no request, so it keeps no worker up.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

WORKER_LABEL = "worker"
PUBLISH_EVERY_S = 15.0
FRESH_S = 3 * PUBLISH_EVERY_S  # a worker silent this long is gone (scaled down, or dead)
FORGET_S = 3600.0


def publish(metrics, store: MutableMapping, worker: str, every_s: float = PUBLISH_EVERY_S) -> Callable[[], None]:
    """Write `metrics`' exposition into `store[worker]` now and every `every_s` from a daemon
    thread; returns what stops it (after one last write, so that a draining worker's final
    counts are seen)."""
    stopped = threading.Event()

    def write() -> None:
        try:
            store[worker] = {"at": time.time(), "text": metrics.exposition().decode()}
        except Exception:  # the store is over a network on Modal: a failed write waits for the next
            log.warning("could not publish this worker's figures", exc_info=True)

    def run() -> None:
        while not stopped.wait(every_s):
            write()

    write()
    thread = threading.Thread(target=run, name=f"publish-metrics-{worker}", daemon=True)
    thread.start()

    def stop() -> None:
        if not stopped.is_set():
            stopped.set()
            thread.join(timeout=every_s + 5)
            write()

    return stop


class WorkerFigures:
    """The fresh entries of `store`, as families whose samples carry a `worker` label."""

    def __init__(self, store: MutableMapping, fresh_s: float = FRESH_S) -> None:
        self.store = store
        self.fresh_s = fresh_s

    def families(self) -> Iterator[Metric]:
        now = time.time()
        for worker, entry in sorted(list(self.store.items()), key=lambda item: str(item[0])):
            at = entry.get("at", 0.0) if isinstance(entry, dict) else 0.0
            if now - at > FORGET_S:
                with contextlib.suppress(KeyError):
                    del self.store[worker]
            if now - at > self.fresh_s:
                continue
            try:
                parsed = list(text_string_to_metric_families(entry["text"]))
            except (KeyError, TypeError, ValueError):
                log.warning("worker %s published figures that do not parse; left out", worker)
                continue
            for family in parsed:
                family.samples = [Sample(sample.name, {**sample.labels, WORKER_LABEL: str(worker)}, sample.value,
                                         sample.timestamp, sample.exemplar) for sample in family.samples]
                yield family


class Merged:
    """A registry's own families and the workers', one family per name (Prometheus refuses a
    name described twice): a worker's samples join the page's family of that name."""

    def __init__(self, registry, workers: WorkerFigures) -> None:
        self.registry = registry
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for family in self.registry.collect():
            if family.type == "info":  # written as a gauge named `<name>_info`, as a parser reads it back
                gauge = Metric(family.name + "_info", family.documentation, "gauge")
                gauge.samples = list(family.samples)
                family = gauge
            families[family.name] = family
        for family in self.workers.families():
            own = families.get(family.name)
            if own is None:
                families[family.name] = family
            elif own.type == family.type:
                own.samples = [*own.samples, *family.samples]
            else:
                log.warning("a worker's %s is a %s, the page's a %s; left out", family.name, family.type, own.type)
        yield from families.values()
