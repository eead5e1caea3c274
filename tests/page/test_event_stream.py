"""Gradio's event stream carried over to a new connection (`page.event_stream`), against a real
Gradio app served by uvicorn: the events a page missed arrive on its new connection, none twice,
and the old connection's going ends nothing."""

from __future__ import annotations

import asyncio
import json
import time

import gradio as gr
import httpx
from fastapi import FastAPI

from moshi_engine.page.event_stream import TAKE_OVER, KeptEventStreams
from tests.page.test_webrtc import serving

STEPS = 40


def counting_app() -> FastAPI:
    def count(steps: int):
        for step in range(int(steps)):
            time.sleep(0.05)
            yield str(step)

    with gr.Blocks() as blocks:
        steps, out = gr.Number(STEPS), gr.Textbox()
        gr.Button().click(count, inputs=[steps], outputs=[out], api_name="count")
    app = FastAPI()
    app.add_middleware(KeptEventStreams)
    return gr.mount_gradio_app(app, blocks, path="/")


async def join(http: httpx.AsyncClient, session: str) -> str:
    response = await http.post("/gradio_api/queue/join", json={
        "data": [STEPS], "fn_index": 0, "session_hash": session, "event_data": None, "trigger_id": None})
    response.raise_for_status()
    return response.json()["event_id"]


async def events(lines, until=lambda message: False):
    """Each message of an open stream's `aiter_lines()`, as the page reads them; stops after
    `until` says so (the rest stays unread)."""
    async for line in lines:
        if line.startswith("data: "):
            message = json.loads(line.removeprefix("data: "))
            yield message
            if until(message) or message["msg"] == "close_stream":
                return


def outputs(messages: list[dict]) -> list[str]:
    """The generator's steps as the page rebuilds them (each later one a diff of the last)."""
    shown, text = [], None
    for message in messages:
        if message["msg"] not in ("process_generating", "process_completed"):
            continue
        data = message["output"]["data"][0]
        if isinstance(data, str):
            text = data
        else:
            for action, _, value in data:
                text = value if action == "replace" else text + value  # "append"
        shown.append(text)
    return shown


async def test_a_new_connection_takes_the_stream_over_from_the_first_event_the_page_missed():
    async with serving(counting_app()) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        session = "moved-page"
        await join(http, session)
        old = httpx.AsyncClient(base_url=url, timeout=30)  # the dead path's connection, of its own
        first: list[dict] = []
        async with old.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
            lines = stream.aiter_lines()
            async for message in events(lines, until=lambda m: m["msg"] == "process_generating" and len(first) > 8):
                first.append(message)
            await asyncio.sleep(0.5)  # more is sent, and never read: it is on the dead path
            # The page moves on with what it has; the old connection goes later (a dead one never says).
            query = f"session_hash={session}&{TAKE_OVER}={len(first)}"
            async with http.stream("GET", f"/gradio_api/queue/data?{query}") as moved:
                then = [message async for message in events(moved.aiter_lines())]
                leftover = [message async for message in events(lines)]  # the old one was ended
        await old.aclose()

    kinds = [message["msg"] for message in first + then]
    assert kinds.count("process_starts") == 1 and kinds.count("process_completed") == 1
    assert kinds[-1] == "close_stream" and kinds[-2] == "process_completed"
    assert outputs(first + then) == [str(step) for step in range(STEPS)] + [str(STEPS - 1)]  # none missed, none twice
    assert len(leftover) < STEPS - 8  # its response ended soon after the move, not with the event


async def test_the_old_connection_going_after_the_move_ends_no_event_and_a_plain_stream_is_gradios():
    async with serving(counting_app()) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        session = "left-page"
        await join(http, session)
        old = httpx.AsyncClient(base_url=url, timeout=30)
        got = 0
        async with old.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
            async for _ in events(stream.aiter_lines(), until=lambda m: m["msg"] == "process_generating"):
                got += 1
            moved = await http.send(http.build_request(
                "GET", f"/gradio_api/queue/data?session_hash={session}&{TAKE_OVER}={got}"), stream=True)
        await old.aclose()  # the old connection closes for real: Gradio would cancel the session's events
        await asyncio.sleep(0.3)
        then = [message async for message in events(moved.aiter_lines())]
        await moved.aclose()

        # With no stream running for the session, a take-over is a plain stream.
        fresh = "fresh-page"
        await join(http, fresh)
        async with http.stream("GET", f"/gradio_api/queue/data?session_hash={fresh}&{TAKE_OVER}=5") as stream:
            plain = [message async for message in events(stream.aiter_lines())]

    assert [m["msg"] for m in then][-2:] == ["process_completed", "close_stream"]
    assert outputs(plain)[:-1] == [str(step) for step in range(STEPS)]  # from its start
