"""The measurements: frame budget, end to end over loopback, idle CPU, and ours against moshi's server.

Each function measures one thing with the shared resources of a `Bench` and
returns a JSON-ready dict. "session" measurements run the engine in this
process through `MoshiSession` with Opus on both sides but no web stack (what a
GPU machine without fastapi can run); "websocket" ones run a real server in a
child process and a real websocket client here, over 127.0.0.1. Capacity lives
in `capacity.py`.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from ..timings import STAGES
from ..wire.protocol import Protocol
from .resources import ECHO, OURS, REFERENCE, Bench, cpu_counters, cpu_usage
from .stats import frame_budget, summarize
from .streams import StreamRun, stream_session, stream_websocket

log = logging.getLogger(__name__)

PATHS = (Protocol.QUILLMAN.path, Protocol.MOSHI.path)  # /ws, /api/chat


def websocket_url(server, path: str) -> str:
    return server.url.replace("http://", "ws://", 1) + path


def _stream_over(bench: Bench, kind: str, path: str, realtime: bool) -> StreamRun:
    server = bench.server(kind)
    server.wait_idle()
    return asyncio.run(stream_websocket(websocket_url(server, path), bench.pages, realtime, tail_s=bench.config.tail_s))


def _stream_result(run: StreamRun) -> dict:
    return {"frames": run.frames, "answered": len(run.answered_at), "texts": run.texts,
            "latency": summarize(run.latencies_ms())}


# ## Frame budget


def frame_session(bench: Bench) -> dict:
    """The 80 ms frame through the session code in this process, streamed in real time:
    Opus decode, Mimi encode, LM step, Mimi decode, Opus encode, and what is left."""
    engine = bench.engine(1)
    engine.timings.clear()
    run = asyncio.run(stream_session(engine, bench.pages, realtime=True, tail_s=bench.config.tail_s))
    stages = {stage: engine.timings.samples_ms(stage) for stage in STAGES}
    log.info("frame budget (session): %d frames", run.frames)
    return {"transport": "session", "path": None, **frame_budget(run, stages)}


def frame_websocket(bench: Bench) -> dict:
    """The same over our /api/chat on loopback: the server's stage timings come from its
    process, the end-to-end times from the client's. The run is kept for `e2e`."""
    server = bench.server(OURS)
    server.wait_idle()  # the last session's final steps are recorded before this clears them
    server.clear_timings()
    run = _stream_over(bench, OURS, Protocol.MOSHI.path, realtime=True)
    bench.remember((OURS, Protocol.MOSHI.path, True), run)
    budget = frame_budget(run, server.stage_samples_ms())
    # The same stream through the same web stack with no model behind it: how much of
    # "everything else" is the websocket round trip itself rather than our queues and threads.
    echo = _stream_over(bench, ECHO, Protocol.MOSHI.path, realtime=True)
    bench.stop_server(ECHO)
    log.info("frame budget (websocket): %d frames", run.frames)
    return {"transport": "websocket", "path": Protocol.MOSHI.path, **budget,
            "websocket_echo": summarize(echo.latencies_ms())}


# ## End to end


def e2e(bench: Bench) -> dict:
    """Per path: latency of every frame in real time, time to first audio, and, sending as
    fast as the server takes it, the real-time factor and frames per second."""
    paths = {}
    for path in PATHS:
        realtime = bench.remembered((OURS, path, True))
        if realtime is None:
            realtime = _stream_over(bench, OURS, path, realtime=True)
            bench.remember((OURS, path, True), realtime)
        fast = _stream_over(bench, OURS, path, realtime=False)
        first = realtime.time_to_first_audio_ms()
        rtf = fast.real_time_factor()
        paths[path] = {
            **_stream_result(realtime),
            "time_to_first_audio_ms": None if first is None else round(first, 3),
            "real_time_factor": None if rtf is None else round(rtf, 4),
            "throughput_fps": round(fast.throughput_fps(), 2),
            "fast_answered": len(fast.answered_at),
        }
        log.info("e2e %s: p50 %.1f ms", path, paths[path]["latency"]["p50_ms"])
    return {"paths": paths}


# ## Idle session


async def _idle_window(seconds: float, pid: int | None = None) -> dict:
    before = cpu_counters(pid)
    await asyncio.sleep(seconds)  # the thing measured is what happens while nothing does
    return cpu_usage(before, cpu_counters(pid))


def idle_session(bench: Bench) -> dict:
    """CPU of this process with the engine loaded and no session, then with a started session
    that is sent nothing (its worker waits on a queue; nothing should wake up)."""
    engine = bench.engine(1)
    seconds = bench.config.idle_s

    async def measure() -> dict:
        baseline = await _idle_window(seconds)
        async with engine.session():
            session = await _idle_window(seconds)
        return {"baseline": baseline, "session": session}

    result = asyncio.run(measure())
    return {"transport": "session", **result, **_idle_delta(result)}


def idle_websocket(bench: Bench) -> dict:
    """CPU of our server's process with no connection, then with an open /api/chat session
    (handshake received) whose client sends nothing."""
    from websockets.asyncio.client import connect

    server = bench.server(OURS)
    server.wait_idle()
    seconds = bench.config.idle_s

    async def measure() -> dict:
        baseline = await _idle_window(seconds, server.pid)
        async with connect(websocket_url(server, Protocol.MOSHI.path), open_timeout=60) as ws:
            await asyncio.wait_for(ws.recv(), 60)  # the handshake: the session is open
            session = await _idle_window(seconds, server.pid)
        return {"baseline": baseline, "session": session}

    result = asyncio.run(measure())
    return {"transport": "websocket", "path": Protocol.MOSHI.path, **result, **_idle_delta(result)}


def _idle_delta(result: dict) -> dict:
    base, session = result["baseline"], result["session"]
    delta = {"session_cpu_percent": round(session["cpu_percent"] - base["cpu_percent"], 2)}
    if session["wakeups_per_s"] is not None:
        delta["session_wakeups_per_s"] = round(session["wakeups_per_s"] - base["wakeups_per_s"], 1)
    return delta


# ## Side by side with moshi's reference server


def compare(bench: Bench) -> dict:
    """Our /api/chat against moshi's reference server over the same checkpoint, with the
    same client and the same speech: per-frame latency in real time, and throughput when
    sending as fast as each server takes it.

    Each of `compare_rounds` rounds runs both servers back to back, alternating which
    goes first (ours, reference; then reference, ours; ...), so that a drift in the
    machine's load hits both alike; latencies are pooled over the rounds, throughput
    is the mean of the rounds'.
    """
    servers = {"ours": OURS, "reference": REFERENCE}
    for kind in servers.values():
        bench.server(kind)  # both loaded before anything is timed
    realtime: dict[str, list[StreamRun]] = {name: [] for name in servers}
    fast: dict[str, list[StreamRun]] = {name: [] for name in servers}
    for round_index in range(bench.config.compare_rounds):
        order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
        for name in order:
            realtime[name].append(_stream_over(bench, servers[name], Protocol.MOSHI.path, realtime=True))
        for name in reversed(order):
            fast[name].append(_stream_over(bench, servers[name], Protocol.MOSHI.path, realtime=False))
    results: dict[str, dict] = {}
    for name in servers:
        runs = realtime[name]
        results[name] = {
            "rounds": len(runs),
            "frames": sum(run.frames for run in runs),
            "answered": sum(len(run.answered_at) for run in runs),
            "texts": sum(run.texts for run in runs),
            "latency": summarize(np.concatenate([run.latencies_ms() for run in runs])),
            "throughput_fps": round(float(np.mean([run.throughput_fps() for run in fast[name]])), 2),
            "fast_answered": sum(len(run.answered_at) for run in fast[name]),
        }
    ours, reference = results["ours"], results["reference"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    results["ratios"] = {  # ours / reference: below 1 is better for latency, above 1 for throughput
        "latency_p50": ratio(ours["latency"]["p50_ms"], reference["latency"]["p50_ms"]),
        "latency_p95": ratio(ours["latency"]["p95_ms"], reference["latency"]["p95_ms"]),
        "throughput": ratio(ours["throughput_fps"], reference["throughput_fps"]),
    }
    log.info("compare: %s", results["ratios"])
    return {"path": Protocol.MOSHI.path, **results}
