"""How many concurrent conversations one machine keeps in real time, per transport.

k real-time clients each stream the same speech, one conversation slot each,
starting 80/k ms apart as independent users would rather than all on the same
beat. k doubles from 1 until a level fails its criterion (or `max_sessions` is
reached), then the gap between the last level that passed and the first that
failed is bisected. The capacity is the largest k that passed. Each level runs on
an engine with exactly k slots, as an operator would size it (`--sessions k`).

- **websocket**: real clients of our `/api/chat` in a child process, judged frame
  by frame (`RealTimeCriterion`).
- **webrtc**: aiortc peers on the page's WebRTC route of the same server with its
  page mounted (`webrtc.py`): aiortc's Opus, SRTP and resampling are per-connection
  Python work on both sides, judged by `WebRTCCriterion`.
- **session**: sessions of an engine in this process, through the same session code
  and Opus work, which is what a GPU machine without the web stack runs.

Each level also records the server's CPU (per conversation too) and its batched
step's numbers from `/status`. A level whose slots do not fit in memory fails with
the reason; it does not crash the benchmark.
"""

from __future__ import annotations

import functools
import logging

from ..audio import FRAME_SECONDS
from ..wire.protocol import Protocol
from .resources import OURS, Bench, peak_resident_bytes, resident_bytes, staggered_streams
from .sections import websocket_url
from .streams import stream_session, stream_websocket
from .webrtc import WebRTCCriterion, stream_webrtc

log = logging.getLogger(__name__)

TRANSPORTS = ("session", "websocket", "webrtc")
MIN_WEBRTC_CALL_S = 4.0


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_level(bench: Bench, sessions: int, transport: str, watching: bool = True) -> dict:
    """k = `sessions` concurrent real-time clients on k slots, judged by the transport's criterion
    (the server's metrics and conversation log on, as deployed, unless not `watching`)."""
    config = bench.config
    make_stream = status = None
    criterion = WebRTCCriterion() if transport == "webrtc" else config.criterion
    try:
        if transport == "session":
            pid = None  # the engine runs in this process
            engine = bench.engine(sessions)
            status = engine.status
            make_stream = functools.partial(stream_session, engine, bench.pages, True, tail_s=config.tail_s)
        else:
            server = bench.server(OURS, sessions, page=transport == "webrtc", watching=watching)
            server.wait_idle()
            pid, status = server.pid, server.status
            if transport == "webrtc":
                # A call needs a few seconds to connect before it talks: keep it long enough to.
                seconds = max(config.frames * FRAME_SECONDS, MIN_WEBRTC_CALL_S)
                make_stream = functools.partial(stream_webrtc, server.url, seconds, tail_s=config.tail_s)
            else:
                make_stream = functools.partial(stream_websocket, websocket_url(server, Protocol.MOSHI.path),
                                                bench.pages, True, tail_s=config.tail_s)
    except Exception as error:
        if not _is_out_of_memory(error) and "do not fit" not in str(error):
            raise
        log.warning("%d slot(s) do not fit in memory: %s", sessions, str(error).strip().splitlines()[-1])
    if make_stream is None:
        # Out here, the error's traceback no longer holds the half-loaded models.
        bench.release_engine()
        return {"sessions": sessions, "keeps_real_time": False,
                "failures": [f"{sessions} conversation slots do not fit in memory"]}

    web_before = resident_bytes(pid, children=False) if pid is not None else None
    runs, usage = staggered_streams(make_stream, sessions, pid)
    level = criterion.judge(runs)
    level["server_cpu_percent"] = usage["cpu_percent"]
    level["server_cpu_percent_per_session"] = round(usage["cpu_percent"] / sessions, 2)
    if pid is not None:  # the web server's own part, its model process left out
        level["web_cpu_percent"] = usage["own_cpu_percent"]
        level["web_cpu_percent_per_session"] = round(usage["own_cpu_percent"] / sessions, 2)
        # memory: the web server's before its conversations and its peak during them; the whole
        # server's (its model process included) at the end
        level["web_resident_bytes_before"] = web_before
        level["web_peak_resident_bytes"] = peak_resident_bytes(pid)
        level["server_resident_bytes"] = resident_bytes(pid)
    level["batch"] = status()["batch"]
    log.info("capacity %s: %d session(s): %s (%.0f %% CPU)", transport, sessions,
             "real time" if level["keeps_real_time"] else "; ".join(level["failures"]), usage["cpu_percent"])
    return level


def capacity(bench: Bench, transport: str, watching: bool = True) -> dict:
    """Ramp k = 1, 2, 4, ... then bisect; returns every level tried and the capacity."""
    config = bench.config
    levels: dict[int, dict] = {}

    def passes(k: int) -> bool:
        levels[k] = run_level(bench, k, transport, watching)
        return levels[k]["keeps_real_time"]

    passed, failed, k = 0, None, 1
    while k <= config.max_sessions:
        if not passes(k):
            failed = k
            break
        passed, k = k, k * 2
    if failed is None and passed < config.max_sessions and k > config.max_sessions:
        # the ramp overshot the ceiling: the ceiling itself is the last level worth trying
        if passes(config.max_sessions):
            passed = config.max_sessions
        else:
            failed = config.max_sessions
    while failed is not None and failed - passed > 1:
        middle = (passed + failed) // 2
        if passes(middle):
            passed = middle
        else:
            failed = middle
    bench.stop_servers()
    criterion = WebRTCCriterion() if transport == "webrtc" else config.criterion
    return {
        "transport": transport,
        "path": {"websocket": Protocol.MOSHI.path, "webrtc": "the page's WebRTC offer route"}.get(transport),
        "criterion": criterion.describe(),
        "max_sessions": config.max_sessions,
        "levels": [levels[k] for k in sorted(levels)],
        "capacity": passed,
        "limited_by_ceiling": failed is None,
    }
