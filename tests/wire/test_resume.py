"""A websocket conversation whose connection breaks is taken up again with its resume token:
same conversation, same slot, Moshi's state kept, also while the old connection still seems to
work (the visitor moved first); wrong, used and expired tokens are refused with a reason and
touch nothing else. Real uvicorn, real websockets; the network's own outages and handovers are
in tests/test_network.py."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect

from moshi_engine.audio import FRAME_SECONDS, FRAME_SIZE
from moshi_engine.conversation import AudioOut, SessionClosed, SessionLimits
from moshi_engine.wire.protocol import KIND_METADATA, RESUMED_ELSEWHERE, CloseCode, Protocol
from moshi_engine.wire.remote import RemoteSession
from moshi_engine.wire.server import create_api
from tests.conftest import until
from tests.live import serve_asgi
from tests.wire.test_server import close_of, ws_url


@pytest.fixture(scope="module")
def server(tiny_engine):
    with serve_asgi(create_api(tiny_engine)) as url:
        yield url


class Talk:
    """A RemoteSession that reads our metadata (so it holds a resume token), fed in real time."""

    def __init__(self, base: str, pcm) -> None:
        self.session = RemoteSession(ws_url(base, Protocol.MOSHI), on_position=lambda _: None)
        self.pcm = pcm
        self.audio = 0
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Talk:
        await self.session.start()
        self.tasks = [asyncio.create_task(self._feed()), asyncio.create_task(self._read())]
        await until(lambda: self.audio >= 3 and self.session.resume_token is not None)
        return self

    async def _feed(self) -> None:
        start = time.monotonic()
        for index in range(10_000):
            await asyncio.sleep(max(0.0, start + index * FRAME_SECONDS - time.monotonic()))
            at = index * FRAME_SIZE % (self.pcm.size - FRAME_SIZE)
            await self.session.send_pcm(self.pcm[at : at + FRAME_SIZE])

    async def _read(self) -> None:
        while True:
            if isinstance(await self.session.receive(), AudioOut):
                self.audio += 1

    async def __aexit__(self, *exc_info) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.session.close()


async def refusal(base: str, token: str) -> tuple[int, str]:
    ws = await connect(ws_url(base, Protocol.MOSHI, f"?resume={token}&queue=1"))
    return await close_of(ws)


async def test_a_dropped_connection_is_resumed_in_the_same_slot_and_its_old_token_is_spent(
        server, tiny_engine, hello_pcm):
    async with Talk(server, hello_pcm) as talk:
        conversation, token = talk.session.conversation_id, talk.session.resume_token
        slots = []
        talk.session._ws.transport.abort()  # the link dies: no close frame
        while talk.session.resumes == 0:
            slots.append(tiny_engine.active)
            await asyncio.sleep(0.01)
        heard = talk.audio
        await until(lambda: talk.audio >= heard + 5)  # Moshi goes on answering on the new connection
        assert set(slots) == {1}  # the slot was held throughout, never freed and taken again
        await until(lambda: talk.session.resume_token not in (None, token))
        assert talk.session.conversation_id == conversation
        code, reason = await refusal(server, token)
        assert code == CloseCode.POLICY_VIOLATION and "used already" in reason
        assert not talk.tasks[1].done() and tiny_engine.active == 1  # the refusal touched nothing
    await until(lambda: tiny_engine.active == 0)


async def test_a_wrong_token_is_refused_and_the_conversation_goes_on(server, tiny_engine, hello_pcm):
    async with Talk(server, hello_pcm) as talk:
        code, reason = await refusal(server, "not-a-token")
        assert code == CloseCode.POLICY_VIOLATION and reason == "unknown resume token"
        heard = talk.audio
        await until(lambda: talk.audio >= heard + 5)
        assert talk.session.resumes == 0 and tiny_engine.active == 1


async def test_a_token_takes_the_conversation_over_from_a_connection_that_still_seems_to_work(
        server, tiny_engine, hello_pcm):
    """The visitor moved first: its old connection has not failed yet as the server sees it (a
    socket closed in an outage even delivers its backlog later), and the resume wins."""
    async with Talk(server, hello_pcm) as talk:
        conversation = talk.session.conversation_id
        ws = await connect(ws_url(server, Protocol.MOSHI, f"?resume={talk.session.resume_token}&queue=1"))
        try:
            metadata = None
            while metadata is None:
                message = await ws.recv()
                if message[:1] == bytes([KIND_METADATA]) and b"conversation" in message:
                    metadata = message
            assert conversation.encode() in metadata  # the same conversation, on the new connection
            await until(lambda: talk.session.close_code is not None)
            assert talk.session.close_code == CloseCode.NORMAL and talk.session.close_reason == RESUMED_ELSEWHERE
            assert tiny_engine.active == 1  # one slot all along
        finally:
            await ws.close()
    await until(lambda: tiny_engine.active == 0)


async def test_after_the_grace_the_slot_is_freed_and_the_token_has_expired(tiny_engine, hello_pcm):
    with serve_asgi(create_api(tiny_engine, SessionLimits(reconnect_grace_s=1.0))) as base:
        session = RemoteSession(ws_url(base, Protocol.MOSHI), on_position=lambda _: None)
        await session.start()
        for _ in range(12):
            await session.send_pcm(hello_pcm[:FRAME_SIZE])
        await until(lambda: session.resume_token is not None)
        token = session.resume_token
        session._reader.cancel()  # this client will not come back
        session._ws.transport.abort()
        waited = await until(lambda: tiny_engine.active == 0)
        assert waited >= 0.9  # kept for the grace, not freed at once
        code, reason = await refusal(base, token)
        assert code == CloseCode.POLICY_VIOLATION and "has ended" in reason
        await session.close()


async def test_a_closed_tab_frees_its_slot_at_once_despite_the_grace(server, tiny_engine, hello_pcm):
    session = RemoteSession(ws_url(server, Protocol.MOSHI), on_position=lambda _: None)
    await session.start()
    await session.send_pcm(hello_pcm[: 4 * FRAME_SIZE])
    await until(lambda: session.resume_token is not None and tiny_engine.active == 1)
    await session.close()  # a close frame: the visitor left
    assert await until(lambda: tiny_engine.active == 0, timeout=3) < 3  # not the 15 s grace
    with pytest.raises(SessionClosed):
        await session.receive()
