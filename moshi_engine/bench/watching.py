"""What watching costs: our server with its metrics and conversation log on (as deployed) and
off (`create_api(watching=False)`), under the same load.

- **rounds**: N = `batch_slots` real-time conversations over `/api/chat` against two servers
  with N slots each, one watching and one not, both started before anything is timed; each of
  `compare_rounds` rounds runs both back to back, alternating which goes first (as the stepping
  section does), so that the machine's drift hits both alike. Per way: frame latency, the
  server's CPU (its model process's included), and the web server's own CPU per answered frame
  in µs: websockets, Opus both ways, the sessions' loops and, when on, the watching.
- **code**: the watching calls alone, timed in this process: what one answer frame costs (the
  conversation's clock: first audio, the frame-lag histogram and the lag it follows; one step
  observation, as if each frame had a step of its own) and what one line of the conversation
  log costs to make and format. A floor under what the rounds can resolve.
- **capacity**: the capacity section's websocket ramp, watching and not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np

from ..wire.protocol import Protocol
from .capacity import capacity
from .resources import OURS, Bench
from .serve import server_process
from .stepping import interleaved_rounds

log = logging.getLogger(__name__)

WAYS = {"watching": True, "not_watching": False}  # name -> watching
CODE_FRAMES = 20_000
CODE_LINES = 2_000
SCRAPES = 200


def watching(bench: Bench) -> dict:
    config = bench.config
    conversations = config.batch_slots
    bench.stop_servers()
    bench.release_engine(weights=True)

    def web_cpu(server, runs: list, usage: dict) -> dict:
        answered = sum(len(run.answered_at) for run in runs)
        return {"web_cpu_percent": usage["own_cpu_percent"],
                "web_us_per_frame": _us_per_frame(usage["own_cpu_percent"], usage["seconds"], answered)}

    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(server_process(OURS, config.model, config.device, conversations,
                                                            model_process=not config.in_process, watching=flag))
                   for name, flag in WAYS.items()}
        rounds, latencies = interleaved_rounds(bench, servers, conversations, web_cpu)
    pooled = {name: {"latency": latencies[name],
                     "web_us_per_frame": _mean(round_["web_us_per_frame"] for round_ in rounds[name]),
                     "server_cpu_percent": _mean(round_["server_cpu_percent"] for round_ in rounds[name])}
              for name in WAYS}
    pooled["cost_us_per_frame"] = round(pooled["watching"]["web_us_per_frame"]
                                        - pooled["not_watching"]["web_us_per_frame"], 1)
    capacities = {name: capacity(bench, "websocket", watching=flag) for name, flag in WAYS.items()}
    return {
        "conversations": conversations,
        "path": Protocol.MOSHI.path,
        "rounds": rounds,
        "pooled": pooled,
        "code": watching_code(),
        "capacity": {name: {"capacity": result["capacity"], "limited_by_ceiling": result["limited_by_ceiling"],
                            "levels": result["levels"]} for name, result in capacities.items()},
    }


def _us_per_frame(cpu_percent: float, seconds: float, frames: int) -> float | None:
    return round(cpu_percent / 100.0 * seconds / frames * 1e6, 1) if frames else None


def _mean(values) -> float:
    return round(float(np.mean([value for value in values if value is not None])), 1)


def watching_code(frames: int = CODE_FRAMES, lines: int = CODE_LINES) -> dict:
    """µs of the watching calls themselves: per answer frame, per line of the conversation log,
    and per scrape of `/metrics` (its exposition, every family with samples in it)."""
    from ..watch.logs import TextFormatter, conversation_context, log_fields
    from ..watch.metrics import API_CHAT, NORMAL, Metrics

    metrics = Metrics()
    step = metrics.step.labels("bench").observe
    clock = metrics.conversation("bench", API_CHAT, "bench000")
    clock.talking()
    started = time.perf_counter()
    for _ in range(frames):
        clock.heard()
        clock.answered(time.perf_counter() - 0.02)
        step(0.02)
    per_frame = (time.perf_counter() - started) / frames * 1e6
    metrics.conversations.labels("bench", API_CHAT, NORMAL).inc()  # a scrape with every family in use
    started = time.perf_counter()
    for _ in range(SCRAPES):
        metrics.exposition()
    per_scrape = (time.perf_counter() - started) / SCRAPES * 1e6

    conversation_log = logging.getLogger("moshi_engine.conversations")
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - closed below
    handler.setFormatter(TextFormatter())
    level, propagate = conversation_log.level, conversation_log.propagate
    conversation_log.addHandler(handler)
    conversation_log.setLevel(logging.INFO)
    conversation_log.propagate = False  # the bench's own output is not the thing timed
    try:
        with conversation_context("bench000"):
            started = time.perf_counter()
            for _ in range(lines):
                conversation_log.info("conversation ended", extra=log_fields(
                    transport=API_CHAT, voice="bench", ending=NORMAL, duration_s=61.234, waited_s=0.0,
                    first_audio_s=0.321, frames_out=765, reason=None))
            per_line = (time.perf_counter() - started) / lines * 1e6
    finally:
        conversation_log.removeHandler(handler)
        conversation_log.setLevel(level)
        conversation_log.propagate = propagate
        handler.stream.close()
    return {"frames": frames, "us_per_frame": round(per_frame, 2), "lines": lines, "us_per_line": round(per_line, 2),
            "scrapes": SCRAPES, "us_per_scrape": round(per_scrape, 1)}


def watching_section(runs: list[tuple[int, dict]]) -> list[str]:
    """The report's tables: each round of both ways, the pooled figures, the code's own cost and
    the capacity each way."""
    from .documents import fmt_ms, markdown_table, measured, not_measured
    from .tables import capacity_table

    lines = [
        "## What watching costs",
        "",
        "Our server as deployed (its Prometheus metrics observed as things happen, every line about a",
        "conversation formatted as the app logs it) against the same server watching nothing",
        "(`create_api(watching=False)`; `/metrics` then has the live figures only). N real-time",
        "conversations over `/api/chat` (each at its own phase) against a server of each way with N",
        "slots, both started before anything is timed; each round runs both back to back, alternating",
        "which goes first. **Web CPU a frame** is the web server's own CPU (its model process left",
        "out: websockets, Opus both ways, the sessions' loops and the watching) over the frames it",
        "answered. **Code** times the watching calls alone in one process: one answer frame's (the",
        "conversation's clock, the frame-lag histogram, a step observation), one log line's, and one",
        "scrape's (`/metrics`' exposition of one voice's families, every histogram with samples).",
        "",
    ]
    rows, summary, notes = [], [], []
    for index, doc in runs:
        result = measured(doc, "watching")
        if result is None:
            notes.append(f"Run {index + 1}: {not_measured(doc, 'watching')}.")
            continue
        rounds = result["rounds"]
        for number, pair in enumerate(zip(rounds["watching"], rounds["not_watching"], strict=True), start=1):
            on, off = pair
            rows.append([f"run {index + 1}", f"{number} ({'watching' if on['first'] else 'not watching'} first)",
                         str(result["conversations"]),
                         *(f"p50 {fmt_ms(way['latency']['p50_ms'])}, p95 {fmt_ms(way['latency']['p95_ms'])} ms; "
                           f"{way['answered']}/{way['expected']}; {way['server_cpu_percent']:.0f} %; "
                           f"web {way['web_us_per_frame']:.0f} µs a frame" for way in (on, off))])
        pooled, code, capacities = result["pooled"], result["code"], result["capacity"]
        rows.append([f"run {index + 1}", "pooled", str(result["conversations"]),
                     *(f"p50 {fmt_ms(pooled[way]['latency']['p50_ms'])}, p95 "
                       f"{fmt_ms(pooled[way]['latency']['p95_ms'])} ms; web {pooled[way]['web_us_per_frame']:.0f} "
                       "µs a frame" for way in WAYS)])
        summary.append([f"run {index + 1}", f"{pooled['cost_us_per_frame']:+.0f} µs",
                        f"{code['us_per_frame']:.1f} µs", f"{code['us_per_line']:.0f} µs",
                        f"{code['us_per_scrape'] / 1000:.1f} ms" if "us_per_scrape" in code else "–",
                        *(f"{capacities[way]['capacity']}{'+' if capacities[way]['limited_by_ceiling'] else ''}"
                          for way in WAYS)])
    lines += markdown_table(["run", "round", "conversations", "watching (as deployed)", "not watching"], rows)
    lines += ["What it comes to: the web CPU a frame that watching adds (pooled rounds, watching minus not),",
              "the watching code's own cost, and the websocket capacity each way (+: the ramp's ceiling).", ""]
    lines += markdown_table(["run", "added web CPU a frame", "code a frame", "code a log line", "a scrape",
                             "capacity watching", "capacity not watching"], summary)
    for index, doc in runs:  # each way's capacity ramp, with the web server's own CPU and memory
        result = measured(doc, "watching")
        for way, ramp in (result or {}).get("capacity", {}).items():
            lines += ["", f"Run {index + 1}, {way.replace('_', ' ')}:", ""]
            lines += capacity_table({"transport": "websocket", "max_sessions": doc["config"]["max_sessions"],
                                     "criterion": doc["config"]["criterion"], **ramp})
    lines += [note for item in notes for note in (item, "")]
    return lines
