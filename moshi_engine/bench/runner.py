"""One benchmark run: the chosen sections, in an order that loads each model as few times as
possible, into one JSON-ready dict.

Work through the in-process session code comes first (the engine is loaded
once), then everything over websockets (the servers are started once). A part
that cannot run here (no web stack) is `skipped` with the reason; a part that
fails is recorded as `error` and the others still run, so one bad section does
not cost a whole GPU session.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime

from . import batch, browser, capacity, door, network, precision, sections, stepping, voices, watching
from .machine import describe_machine, load_average
from .resources import BROWSER_STACK, PAGE_STACK, REFERENCE_STACK, WEB_STACK, Bench, BenchConfig, missing_packages

log = logging.getLogger(__name__)

SCHEMA = 1
SECTIONS = ("frame", "e2e", "idle", "batch", "capacity", "door", "page", "compare", "stepping", "watching",
            "precision", "voices", "network")


def _attempt(name: str, measure: Callable[[], dict]) -> dict:
    log.info("measuring %s", name)
    started = time.perf_counter()
    try:
        result = measure()
    except Exception as error:
        log.error("%s failed:\n%s", name, traceback.format_exc())
        result = {"error": f"{type(error).__name__}: {error}"}
    result["duration_s"] = round(time.perf_counter() - started, 1)
    return result


def run_benchmark(config: BenchConfig, chosen: tuple[str, ...] = SECTIONS,
                  on_progress: Callable[[dict], None] | None = None) -> dict:
    """Measure the `chosen` sections with `config`; returns the results document
    (machine, config, engine, one entry per section).

    `on_progress(document)` is called after each part with the results so far, so
    that a caller can save them: a crash or a timeout late in a GPU session then
    still leaves the earlier sections on disk.
    """
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    no_web = missing_packages(WEB_STACK)
    no_reference = no_web or missing_packages(REFERENCE_STACK)
    transports = config.capacity_transports()
    unknown = set(transports) - set(capacity.TRANSPORTS)
    if unknown:
        raise ValueError(f"unknown transport(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(capacity.TRANSPORTS)}")
    results: dict[str, dict] = {name: {} for name in SECTIONS if name in chosen}
    document = {
        "schema": SCHEMA,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "machine": describe_machine(),
        "config": {**dataclasses.asdict(config), "sections": list(results), "capacity_transports": list(transports)},
        "sections": results,
    }
    started = time.perf_counter()
    bench = Bench(config)

    def finish() -> None:
        import torch

        document["engine"] = bench.engine_info
        # Loading an engine may change it (one thread for a small model on CPU).
        document["machine"]["torch_threads"] = torch.get_num_threads()
        document["duration_s"] = round(time.perf_counter() - started, 1)
        document["load_average_after"] = load_average()

    def part(section: str, name: str, measure: Callable[[], dict], per_transport: bool = False) -> None:
        result = _attempt(name, measure)
        if per_transport:
            results[section].setdefault("runs", []).append(result)
        else:
            results[section] = result
        finish()
        if on_progress is not None:
            on_progress(document)

    try:
        # In-process session work, on one engine.
        if "frame" in results:
            part("frame", "frame budget (session)", lambda: sections.frame_session(bench), per_transport=True)
        if "idle" in results:
            part("idle", "idle CPU (session)", lambda: sections.idle_session(bench), per_transport=True)
        if "batch" in results:
            part("batch", "step time and stepping policy", lambda: batch.batch(bench))
        if "capacity" in results and "session" in transports:
            part("capacity", "capacity (session)", lambda: capacity.capacity(bench, "session"), per_transport=True)
        # Websocket work, on servers in child processes.
        if no_web:
            for name in ("frame", "idle"):
                if name in results:
                    results[name].setdefault("runs", []).append({"transport": "websocket", "skipped": no_web})
            if "e2e" in results:
                results["e2e"] = {"skipped": no_web}
        else:
            if "frame" in results:
                part("frame", "frame budget (websocket)", lambda: sections.frame_websocket(bench), per_transport=True)
            if "e2e" in results:
                part("e2e", "end to end", lambda: sections.e2e(bench))
            if "idle" in results:
                part("idle", "idle CPU (websocket)", lambda: sections.idle_websocket(bench), per_transport=True)
        if "door" in results:
            if no_web:
                results["door"] = {"skipped": no_web}
            else:
                part("door", "the door", lambda: door.door(bench))
        if "page" in results:
            missing = no_web or missing_packages(PAGE_STACK + BROWSER_STACK) or browser.missing_chromium()
            if missing:
                results["page"] = {"skipped": missing}
            else:
                part("page", "the page's two paths", lambda: browser.page_section(bench))
        if "compare" in results:
            if no_reference:
                results["compare"] = {"skipped": no_reference}
            else:
                part("compare", "ours against moshi's server", lambda: sections.compare(bench))
        if "precision" in results:
            part("precision", "full precision against 8 bits", lambda: precision.precision(bench))
        if "stepping" in results:
            if no_web:
                results["stepping"] = {"skipped": no_web}
            else:
                part("stepping", "the model process against the thread", lambda: stepping.stepping(bench))
        if "watching" in results:
            if no_web:
                results["watching"] = {"skipped": no_web}
            else:
                part("watching", "what watching costs", lambda: watching.watching(bench))
        if "voices" in results:
            if no_web:
                results["voices"] = {"skipped": no_web}
            else:
                part("voices", "two voices on one machine", lambda: voices.voices(bench))
        if "network" in results:
            # The tiny model behind an emulated link, whatever --model says: what it measures is the network.
            missing = (no_web or missing_packages(PAGE_STACK + BROWSER_STACK) or browser.missing_chromium()
                       or network.missing())
            if missing:
                results["network"] = {"skipped": missing}
            else:
                split = lambda text: tuple(item.strip() for item in text.split(",") if item.strip())  # noqa: E731
                part("network", "the visitor on the internet", functools.partial(
                    network.network_section, split(config.network_profiles), holds=split(config.network_holds)))
        for transport in ("websocket", "webrtc"):
            if "capacity" in results and transport in transports:
                missing = no_web or (missing_packages(PAGE_STACK) if transport == "webrtc" else None)
                if missing:
                    results["capacity"].setdefault("runs", []).append({"transport": transport, "skipped": missing})
                    continue
                part("capacity", f"capacity ({transport})",
                     functools.partial(capacity.capacity, bench, transport), per_transport=True)
    finally:
        bench.close()
    finish()
    return document
