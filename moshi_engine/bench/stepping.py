"""Where our server steps its model: in a process of its own (the default) or in a thread of the
server's process (`--in-process`), under the same load.

N = `batch_slots` real-time conversations over `/api/chat`, each at its own phase of the
80 ms frame, against two servers with N slots each, one per way, both started before anything
is timed (an idle server costs no CPU). Each of `compare_rounds` rounds runs both back to
back, alternating which goes first, so that the machine's drift from minute to minute hits
both alike; a single capacity ramp of each, minutes apart, says less than these pairs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import numpy as np

from ..wire.protocol import Protocol
from .resources import OURS, Bench, staggered_streams
from .sections import websocket_url
from .serve import ServerProcess, server_process
from .stats import summarize
from .streams import stream_websocket

log = logging.getLogger(__name__)

WAYS = {"process": True, "thread": False}  # name -> model_process


def interleaved_rounds(bench: Bench, servers: dict[str, ServerProcess], conversations: int,
                       extra: Callable[[ServerProcess, list, dict], dict]) -> tuple[dict[str, list[dict]], dict]:
    """`compare_rounds` rounds of `conversations` real-time conversations over `/api/chat` against
    each of `servers`, back to back, alternating which goes first. Returns each round's figures by
    server (latency, frames answered and expected, the server's CPU, and `extra(server, runs,
    usage)`'s), and every frame's latency pooled by server."""
    config = bench.config
    rounds: dict[str, list[dict]] = {name: [] for name in servers}
    latencies: dict[str, list[np.ndarray]] = {name: [] for name in servers}
    for round_index in range(config.compare_rounds):
        order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
        for name in order:
            server = servers[name]
            server.wait_idle()
            server.clear_timings()
            make_stream = functools.partial(stream_websocket, websocket_url(server, Protocol.MOSHI.path),
                                            bench.pages, True, tail_s=config.tail_s)
            runs, usage = staggered_streams(make_stream, conversations, server.pid)
            ms = np.concatenate([run.latencies_ms() for run in runs])
            latencies[name].append(ms)
            rounds[name].append({
                "first": name == order[0],
                "latency": summarize(ms),
                "answered": sum(len(run.answered_at) for run in runs),
                "expected": sum(run.expected_answers for run in runs),
                "server_cpu_percent": usage["cpu_percent"],
                **extra(server, runs, usage),
            })
            log.info("%s, round %d: p50 %.1f, p95 %.1f ms", name, round_index + 1,
                     rounds[name][-1]["latency"]["p50_ms"], rounds[name][-1]["latency"]["p95_ms"])
    return rounds, {name: summarize(np.concatenate(latencies[name])) for name in servers}


def stepping(bench: Bench) -> dict:
    config = bench.config
    conversations = config.batch_slots
    bench.stop_servers()
    bench.release_engine(weights=True)

    def step(server: ServerProcess, runs: list, usage: dict) -> dict:
        batch = server.status()["batch"]
        return {"step": batch["step"], "rows_per_step_mean": batch["rows_per_step_mean"]}

    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(server_process(OURS, config.model, config.device, conversations,
                                                            model_process=flag))
                   for name, flag in WAYS.items()}
        rounds, pooled = interleaved_rounds(bench, servers, conversations, step)
    return {"conversations": conversations, "path": Protocol.MOSHI.path, "rounds": rounds, "pooled": pooled}


def stepping_section(runs: list[tuple[int, dict]]) -> list[str]:
    """The report's table: each round's latency and CPU of both ways, and the rounds pooled."""
    from .documents import fmt_ms, markdown_table, measured, not_measured

    lines = [
        "## Where the model steps: its own process or the server's",
        "",
        "Our server steps the model in a process of its own by default; `--in-process` steps it in a",
        "thread of the server's process, where it shares the interpreter lock with the event loop that",
        "handles the websockets, Opus and sessions. N real-time conversations over `/api/chat` (each at",
        "its own phase) against a server of each kind with N slots, both started before anything is",
        "timed; each round runs both back to back, alternating which goes first. Latency is per frame,",
        "from leaving the client to the first byte of its answer; CPU is the server's, its model",
        "process's included, in % of one core.",
        "",
    ]
    rows, notes = [], []
    for index, doc in runs:
        result = measured(doc, "stepping")
        if result is None:
            notes.append(f"Run {index + 1}: {not_measured(doc, 'stepping')}.")
            continue
        rounds = result["rounds"]
        for number, pair in enumerate(zip(rounds["process"], rounds["thread"], strict=True), start=1):
            process, thread = pair
            rows.append([f"run {index + 1}", f"{number} ({'process' if process['first'] else 'thread'} first)",
                         str(result["conversations"]),
                         *(f"p50 {fmt_ms(way['latency']['p50_ms'])}, p95 {fmt_ms(way['latency']['p95_ms'])} ms; "
                           f"{way['answered']}/{way['expected']}; step p50 {fmt_ms(way['step']['p50_ms'])} ms; "
                           f"{way['server_cpu_percent']:.0f} %" for way in (process, thread))])
        pooled = result["pooled"]
        rows.append([f"run {index + 1}", "pooled", str(result["conversations"]),
                     *(f"p50 {fmt_ms(pooled[way]['p50_ms'])}, p95 {fmt_ms(pooled[way]['p95_ms'])} ms"
                       for way in ("process", "thread"))])
    lines += markdown_table(["run", "round", "conversations", "model process (default)", "thread (`--in-process`)"],
                            rows)
    lines += [note for item in notes for note in (item, "")]
    return lines
