"""How many concurrent conversations one machine keeps in real time.

k real-time clients each stream the same speech, one session (one Moshi
instance) each, starting 80/k ms apart as independent users would rather than
all on the same beat. k doubles from 1 until a level fails `RealTimeCriterion`
(or `max_sessions` is reached), then the gap between the last level that passed
and the first that failed is bisected. The capacity is the largest k that passed.

Over websockets the clients are real clients of our server in a child process
(loaded with k instances); with the "session" transport they are sessions of an
engine in this process, through the same session code and Opus work, which is
what a GPU machine without the web stack runs. Loading k full-size instances
may not fit on the GPU: such a level fails with the reason, it does not crash
the benchmark.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from ..audio import FRAME_SECONDS
from ..protocol import Protocol
from .resources import OURS, Bench, cpu_counters, cpu_usage
from .sections import websocket_url
from .streams import stream_session, stream_websocket

log = logging.getLogger(__name__)


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_level(bench: Bench, sessions: int, transport: str) -> dict:
    """k = `sessions` concurrent real-time clients, judged by the run's criterion."""
    config = bench.config
    offsets = [index * FRAME_SECONDS / sessions for index in range(sessions)]
    make_stream = None
    try:
        if transport == "session":
            pid = None  # the engine runs in this process
            make_stream = functools.partial(stream_session, bench.engine(sessions), bench.pages, True,
                                            tail_s=config.tail_s)
        else:
            server = bench.server(OURS, sessions)
            server.wait_idle()
            pid = server.pid
            make_stream = functools.partial(stream_websocket, websocket_url(server, Protocol.MOSHI.path),
                                            bench.pages, True, tail_s=config.tail_s)
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        log.warning("%d instance(s) do not fit in memory: %s", sessions, str(error).strip().splitlines()[-1])
    if make_stream is None:
        # Out here, the error's traceback no longer holds the half-loaded models.
        bench.release_engine()
        return {"sessions": sessions, "keeps_real_time": False,
                "failures": [f"{sessions} instances do not fit in memory"]}

    async def together() -> tuple[list, dict]:
        before = cpu_counters(pid)
        runs = await asyncio.gather(*(make_stream(offset_s=offset) for offset in offsets))
        return runs, cpu_usage(before, cpu_counters(pid))

    runs, usage = asyncio.run(together())
    level = config.criterion.judge(list(runs))
    level["server_cpu_percent"] = usage["cpu_percent"]
    log.info("capacity: %d session(s): %s (p95 %.1f ms, drift %.1f ms)", sessions,
             "real time" if level["keeps_real_time"] else "; ".join(level["failures"]),
             level["latency"]["p95_ms"], level["drift_ms"])
    return level


def capacity(bench: Bench) -> dict:
    """Ramp k = 1, 2, 4, ... then bisect; returns every level tried and the capacity."""
    config = bench.config
    transport = config.capacity_transport()
    levels: dict[int, dict] = {}

    def passes(k: int) -> bool:
        levels[k] = run_level(bench, k, transport)
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
    return {
        "transport": transport,
        "path": None if transport == "session" else Protocol.MOSHI.path,
        "criterion": config.criterion.describe(),
        "max_sessions": config.max_sessions,
        "levels": [levels[k] for k in sorted(levels)],
        "capacity": passed,
        "limited_by_ceiling": failed is None,
    }
