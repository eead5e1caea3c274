"""The waiting line: first come, first served places for conversations that find every slot
taken, over real websockets to a real server on the one-slot tiny engine."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect

from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE
from moshi_engine.conversation import BusyError, Sampling
from moshi_engine.door.line import DEFAULT_CONVERSATION_S, LinePosition, WaitingLine
from moshi_engine.page.endings import line_message
from moshi_engine.wire.codec import OpusEncoder
from moshi_engine.wire.protocol import HANDSHAKE, KIND_AUDIO, KIND_METADATA, CloseCode
from moshi_engine.wire.remote import exchange, websocket_url
from moshi_engine.wire.server import create_api
from tests.conftest import until
from tests.live import serve_asgi


@pytest.fixture(scope="module")
def server(single_engine):
    with serve_asgi(create_api(single_engine)) as url:
        yield url


@pytest.fixture(autouse=True)
def nobody_left(single_engine):
    yield
    assert single_engine.line.waiting == 0


def _nothing(model) -> None:
    return None


def chat_url(base: str, query: str = "") -> str:
    return websocket_url(base + "/api/chat") + query


async def next_message(ws) -> bytes:
    return await asyncio.wait_for(ws.recv(), 10)


def place(message: bytes) -> dict:
    assert message[0] == KIND_METADATA
    return json.loads(message[1:])["queue"]


async def take_the_only_slot(server: str):
    """A connection holding the engine's one slot (its handshake received)."""
    holder = await connect(chat_url(server))
    assert await next_message(holder) == HANDSHAKE
    return holder


async def close_of(ws) -> tuple[int, str]:
    await asyncio.wait_for(ws.wait_closed(), 10)
    return ws.close_code, ws.close_reason


async def test_conversations_are_served_in_the_order_they_came_and_hear_their_place(server, single_engine):
    holder = await take_the_only_slot(server)
    line = []
    for index in range(3):
        ws = await connect(chat_url(server, "?queue=1"))
        assert place(await next_message(ws))["position"] == index + 1
        line.append(ws)
    await until(lambda: single_engine.line.waiting == 3)
    for index, ws in enumerate(line[:2]):  # each told as someone joined behind it
        for waiting in range(index + 2, 4):
            assert place(await next_message(ws))["waiting"] == waiting
    await holder.close()
    assert await next_message(line[0]) == HANDSHAKE  # the first in line got the slot
    assert place(await next_message(line[1]))["position"] == 1  # and the others moved up
    assert place(await next_message(line[2]))["position"] == 2
    await line[0].close()
    assert await next_message(line[1]) == HANDSHAKE
    assert place(await next_message(line[2]))["position"] == 1
    await line[1].close()
    assert await next_message(line[2]) == HANDSHAKE
    await line[2].close()
    await until(lambda: single_engine.active == 0)


async def test_each_place_is_announced_as_the_line_grows_and_moves(server, single_engine):
    holder = await take_the_only_slot(server)
    first = await connect(chat_url(server, "?queue=1"))
    first_place = place(await next_message(first))
    assert first_place["position"] == first_place["waiting"] == 1 and first_place["eta_s"] >= 0
    second = await connect(chat_url(server, "?queue=1"))
    assert place(await next_message(second))["position"] == 2
    assert place(await next_message(first))["waiting"] == 2  # told that someone joined behind
    await first.close()  # leaves the line
    assert place(await next_message(second))["position"] == 1
    status = single_engine.status()
    await until(lambda: single_engine.line.waiting == 1)
    assert status["queue"]["places"] == single_engine.line.places
    await holder.close()
    assert await next_message(second) == HANDSHAKE
    await second.close()
    await until(lambda: single_engine.active == 0)


async def test_a_full_line_refuses_the_newcomer_at_once_with_1013(server, single_engine, monkeypatch):
    monkeypatch.setattr(single_engine.line, "places", 1)
    holder = await take_the_only_slot(server)
    waiting = await connect(chat_url(server))
    await until(lambda: single_engine.line.waiting == 1)
    started = time.monotonic()
    refused = await connect(chat_url(server))
    code, reason = await close_of(refused)
    assert code == CloseCode.TRY_AGAIN_LATER and "waiting line is full" in reason
    assert time.monotonic() - started < 5  # at once: nothing waits (the benchmark times it)
    await waiting.close()
    await holder.close()
    await until(lambda: single_engine.active == 0)


async def test_a_wait_longer_than_the_timeout_ends_with_1013_and_a_reason(server, single_engine, monkeypatch):
    monkeypatch.setattr(single_engine.line, "timeout_s", 0.5)
    holder = await take_the_only_slot(server)
    waiting = await connect(chat_url(server))
    code, reason = await close_of(waiting)
    assert code == CloseCode.TRY_AGAIN_LATER and "no conversation slot freed up in 0.5 s" in reason
    await holder.close()
    await until(lambda: single_engine.active == 0)


async def test_audio_sent_while_waiting_is_dropped_so_the_conversation_starts_fresh(server, single_engine, hello_pcm):
    holder = await take_the_only_slot(server)
    ws = await connect(websocket_url(server + "/ws") + "?queue=1")  # QuiLLMan's protocol: no handshake
    assert place(await next_message(ws))["position"] == 1
    encoder = OpusEncoder()
    pages = [encoder.encode(hello_pcm[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]) for i in range(15)]
    for page in pages[:10]:
        await ws.send(page)  # while in line
    await asyncio.sleep(0.2)
    await holder.close()
    await until(lambda: single_engine.active == 1 and single_engine.line.waiting == 0)
    for page in pages[10:]:
        await ws.send(page)
    answers = []
    while len(answers) < 4:  # 5 frames answer 4 (the first step answers nothing)
        message = await next_message(ws)
        if message[0] == KIND_AUDIO:
            answers.append(message)
    await asyncio.sleep(0.3)
    assert single_engine.model.run(_nothing) is None  # a barrier: every frame sent so far has reached the model
    with pytest.raises(TimeoutError):  # nothing else: the 10 frames sent in line were never stepped
        while True:
            message = await asyncio.wait_for(ws.recv(), 0.5)
            assert message[0] != KIND_AUDIO
    await ws.close()
    await until(lambda: single_engine.active == 0)


async def test_fifty_back_to_back_reconnects_are_never_refused(server, single_engine, hello_pcm):
    url = chat_url(server)
    pcm = hello_pcm[: 3 * FRAME_SIZE]
    for _ in range(50):
        result = await exchange(url, pcm, Sampling(seed=1), realtime=False)
        assert result.close_code == CloseCode.NORMAL, result.close_reason
        assert result.pcm.size == 2 * FRAME_SIZE
    await until(lambda: single_engine.active == 0)


async def test_the_client_waits_in_line_and_hears_its_place(server, single_engine, hello_pcm):
    holder = await take_the_only_slot(server)
    places = []
    talking = asyncio.create_task(exchange(chat_url(server), hello_pcm[:SAMPLE_RATE], realtime=False,
                                           on_position=places.append))
    await until(lambda: places)
    assert places[0].position == 1 and places[0].waiting == 1
    await holder.close()
    result = await asyncio.wait_for(talking, 30)
    assert result.close_code == CloseCode.NORMAL and result.pcm.size > 0
    await until(lambda: single_engine.active == 0)


# ## The line itself


class Slots:
    """`count` free slots to lease, for the line's own bookkeeping (no model needed)."""

    def __init__(self, count: int) -> None:
        self.free = count
        self.given_back: list[object] = []

    def open_now(self) -> object:
        if not self.free:
            raise BusyError("every slot is taken")
        self.free -= 1
        return object()

    def give_back(self, lease: object) -> None:
        self.given_back.append(lease)
        self.free += 1


async def test_a_slot_handed_over_in_the_instant_its_waiter_gives_up_goes_back():
    slots = Slots(0)
    line = WaitingLine(places=2, timeout_s=10, capacity=1, give_back=slots.give_back)
    waiter = asyncio.create_task(line.wait(slots.open_now))
    await asyncio.sleep(0)
    assert line.waiting == 1
    slots.free = 1
    line.freed(object())  # the slot goes to the waiter...
    waiter.cancel()  # ...which leaves the line before it could take it
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(slots.given_back) == 1 and slots.free == 1 and line.waiting == 0


async def test_the_estimate_counts_down_the_running_conversations_and_then_whole_rounds():
    slots = Slots(2)
    line = WaitingLine(places=5, timeout_s=10, capacity=2, give_back=slots.give_back)
    for _ in range(2):
        line.started(await line.wait(slots.open_now))
    first, third = line.position(1), line.position(3)
    assert first.eta_s == pytest.approx(DEFAULT_CONVERSATION_S, abs=1)  # one of the two running ends
    assert third.eta_s == pytest.approx(2 * DEFAULT_CONVERSATION_S, abs=1)  # then a whole round more


@pytest.mark.parametrize(
    ("position", "eta_s", "expected"),
    [(1, 30, "you are 1st in line, less than a minute"), (2, 170, "you are 2nd in line, about 3 minutes"),
     (3, 60, "you are 3rd in line, about 1 minute"), (11, 600, "you are 11th in line, about 10 minutes")],
)
def test_the_page_says_the_place_and_the_wait_in_words(position, eta_s, expected):
    message = line_message(LinePosition(position, position, eta_s))
    assert expected in message and "Stop leaves the line" in message


async def test_with_a_slot_free_a_ws_clients_first_frames_are_never_dropped(server, single_engine, hello_pcm):
    encoder = OpusEncoder()
    pages = [encoder.encode(hello_pcm[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]) for i in range(10)]
    for _ in range(5):
        async with connect(websocket_url(server + "/ws")) as ws:  # no handshake: it talks at once
            for page in pages:
                await ws.send(page)
            answers = 0
            while answers < len(pages) - 1:  # every frame but the first is answered
                answers += (await next_message(ws))[0] == KIND_AUDIO
        await until(lambda: single_engine.active == 0)
