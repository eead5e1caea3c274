"""Churn: many conversations that finish, hang up, break the protocol or vanish mid-stream,
more at once than there are slots, leave nothing behind: no slot leased, nobody in line,
no connection held, and the server's memory flat."""

from __future__ import annotations

import asyncio
import gc
import random
import time

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from moshi_engine.audio import FRAME_SIZE
from moshi_engine.engine import load_engine
from moshi_engine.wire.codec import OpusEncoder
from moshi_engine.wire.protocol import HANDSHAKE
from moshi_engine.wire.server import create_api
from tests.conftest import DEVICE
from tests.live import serve_asgi

CONVERSATIONS = 120
AT_ONCE = 6  # more than the slots: some wait in line
ENDINGS = ("complete", "hang-up", "abort", "garbage", "silent-leave")


@pytest.fixture(scope="module")
def churn_server():
    engine = load_engine("tiny", device=DEVICE, sessions=4, warmup_frames=1)
    app = create_api(engine)
    with serve_asgi(app) as url:
        yield engine, app.state.moshi, url.replace("http", "ws") + "/api/chat"
    engine.close()


async def one_conversation(url: str, pages: list[bytes], rng: random.Random) -> str:
    """Talk for a random number of frames, then end the way `rng` picks."""
    ending = rng.choice(ENDINGS)
    frames = rng.randint(1, len(pages))
    ws = await connect(url)
    try:
        if ending == "silent-leave" and rng.random() < 0.5:
            ws.transport.abort()  # gone before (or while) waiting for a slot
            return ending
        assert await asyncio.wait_for(ws.recv(), 60) == HANDSHAKE
        for page in pages[:frames]:
            await ws.send(b"\x01" + page)
        if ending == "complete":
            answered = 0
            while answered < frames - 1:
                message = await asyncio.wait_for(ws.recv(), 30)
                answered += message[0] == 1
            await ws.close()
        elif ending == "hang-up":
            await ws.close()
        elif ending == "garbage":
            await ws.send(b"\x01" + b"\x00" * 64)  # not Ogg: the server closes with 1007
            await asyncio.wait_for(ws.wait_closed(), 30)
        else:
            ws.transport.abort()  # the TCP connection just dies, mid-stream
    except ConnectionClosed:
        pass
    return ending


async def test_a_hundred_and_twenty_conversations_ending_every_way_leave_nothing_behind(churn_server, hello_pcm):
    engine, server, url = churn_server
    encoder = OpusEncoder()
    pages = [encoder.encode(hello_pcm[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]) for i in range(12)]
    rng = random.Random(20261126)
    process = psutil.Process()
    limit = asyncio.Semaphore(AT_ONCE)

    async def run(count: int) -> list[str]:
        async def limited() -> str:
            async with limit:
                return await one_conversation(url, pages, random.Random(rng.random()))

        return await asyncio.gather(*(limited() for _ in range(count)))

    async def settled() -> None:
        deadline = time.monotonic() + 30
        while engine.active or engine.line.waiting or server.connections:
            assert time.monotonic() < deadline, (engine.active, engine.line.waiting, server.connections)
            await asyncio.sleep(0.02)

    warmup = await run(20)  # allocator pools and caches settle first
    await settled()
    gc.collect()
    before = process.memory_info().rss
    endings = await run(CONVERSATIONS - len(warmup))
    await settled()
    gc.collect()
    grown_mb = (process.memory_info().rss - before) / 2**20

    assert set(warmup + endings) == set(ENDINGS)  # every way of ending happened
    assert engine.active == 0 and engine.line.waiting == 0 and server.connections == 0
    assert grown_mb < 30, f"RSS grew by {grown_mb:.1f} MB over {len(endings)} conversations"
    status = engine.status()
    assert status["sessions"]["active"] == 0 and status["queue"]["waiting"] == 0
