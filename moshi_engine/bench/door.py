"""The door: how fast a full server says no, whether a client that reconnects at once is ever
refused, and how fast a freed slot reaches whoever waits in line.

All over `/api/chat` to our server in a child process with one conversation slot:

- **refusal**: the slot is held and the line has no place (`--queue 0`); each newcomer's
  close (1013) is timed from the moment its websocket opened.
- **back to back**: one client talks briefly, hangs up and reconnects at once, again and
  again; refusals are counted with the waiting line (`--queue 8`) and without (`--queue 0`):
  without a line, a reconnect can arrive before the server has seen the last hang-up.
- **hand-over**: the slot is held and one client waits in line; the holder hangs up, and the
  time from its close completing to the waiting client's handshake is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..audio import FRAME_SIZE
from ..wire.protocol import HANDSHAKE, CloseCode, Protocol
from .resources import Bench
from .sections import websocket_url
from .serve import OURS, server_process
from .stats import summarize

log = logging.getLogger(__name__)

TRIES = 30
BACK_TO_BACK = 50


def door(bench: Bench) -> dict:
    bench.stop_servers()
    bench.release_engine()
    config = bench.config
    results = {}
    in_thread = {"model_process": not config.in_process}
    with server_process(OURS, config.model, config.device, sessions=1, queue=0, **in_thread) as server:
        url = websocket_url(server, Protocol.MOSHI.path)
        results["refusal"] = asyncio.run(_refusals(url))
        results["back_to_back_without_line"] = asyncio.run(_back_to_back(url, bench.pages))
    with server_process(OURS, config.model, config.device, sessions=1, **in_thread) as server:
        url = websocket_url(server, Protocol.MOSHI.path)
        results["back_to_back_with_line"] = asyncio.run(_back_to_back(url, bench.pages))
        results["hand_over"] = asyncio.run(_hand_overs(url))
    log.info("door: refusal p95 %.1f ms, hand-over p95 %.1f ms, back-to-back refusals %d (line) / %d (none)",
             results["refusal"]["p95_ms"], results["hand_over"]["p95_ms"],
             results["back_to_back_with_line"]["refused"], results["back_to_back_without_line"]["refused"])
    return results


async def _refusals(url: str) -> dict:
    from websockets.asyncio.client import connect

    async with connect(url) as holder:
        assert await holder.recv() == HANDSHAKE
        times = []
        for _ in range(TRIES):
            async with connect(url) as ws:
                opened = time.perf_counter()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.recv(), 10)
                await ws.wait_closed()
                times.append((time.perf_counter() - opened) * 1000.0)
                if ws.close_code != CloseCode.TRY_AGAIN_LATER:
                    raise RuntimeError(f"expected 1013, got {ws.close_code}")
    return summarize(times)


async def _back_to_back(url: str, pages: list[bytes]) -> dict:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    refused = 0
    for _ in range(BACK_TO_BACK):
        async with connect(url) as ws:
            try:
                if await asyncio.wait_for(ws.recv(), 10) != HANDSHAKE:
                    raise RuntimeError("no handshake")
                for page in pages[:3]:
                    await ws.send(b"\x01" + page)
                await asyncio.wait_for(ws.recv(), 10)  # an answer: the conversation ran
            except ConnectionClosed:
                if ws.close_code == CloseCode.TRY_AGAIN_LATER:
                    refused += 1
                else:
                    raise
    return {"tries": BACK_TO_BACK, "refused": refused, "frame_size": FRAME_SIZE}


async def _hand_overs(url: str) -> dict:
    from websockets.asyncio.client import connect

    times = []
    holder = await connect(url)
    assert await holder.recv() == HANDSHAKE
    for _ in range(TRIES):
        waiting = await connect(url + "?queue=1")
        await asyncio.wait_for(waiting.recv(), 10)  # its place in line
        await holder.close()
        closed = time.perf_counter()
        while await asyncio.wait_for(waiting.recv(), 10) != HANDSHAKE:
            pass  # other place messages
        times.append((time.perf_counter() - closed) * 1000.0)
        holder = waiting
    await holder.close()
    return summarize(times)
