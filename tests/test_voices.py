"""Two voices on one server: tiny and tiny-q8 (two checkpoints, one code), each its own engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from moshi_engine import client
from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE, read_wav
from moshi_engine.engine import load_voices
from moshi_engine.model.voices import parse_voices
from moshi_engine.wire.codec import OpusEncoder
from moshi_engine.wire.protocol import HANDSHAKE, KIND_AUDIO, KIND_METADATA, CloseCode, Protocol
from moshi_engine.wire.remote import exchange, websocket_url
from moshi_engine.wire.server import create_api
from tests.conftest import DEVICE, HELLO_WAV, until
from tests.live import serve_asgi

PROTOCOLS = [Protocol.QUILLMAN, Protocol.MOSHI]


def test_voices_are_named_after_their_repos_directories_or_specs():
    names = [v.name for v in parse_voices("kyutai/moshiko-pytorch-bf16,kyutai/moshika-pytorch-q8,tiny,tiny,/x/ckpt/")]
    assert names == ["moshiko", "moshika", "tiny", "tiny-2", "ckpt"]
    assert parse_voices("ko=kyutai/moshiko-pytorch-bf16")[0].name == "ko"
    with pytest.raises(ValueError):
        parse_voices("tiny,,tiny-q8")


@pytest.fixture(scope="module")
def voices():
    loaded = load_voices("tiny,tiny-q8", device=DEVICE, sessions=1)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def server(voices):
    with serve_asgi(create_api(voices)) as url:
        yield url


def test_status_lists_every_voice_with_its_own_slots(server, voices):
    with urllib.request.urlopen(server + "/status", timeout=10) as response:
        status = json.load(response)
    assert [v["name"] for v in status["voices"]] == ["tiny", "tiny-q8"]
    assert [v["weights"] for v in status["voices"]] == ["float32", "int8"]
    assert status["sessions"]["capacity"] == 2 and status["model"] == "tiny"


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.value)
@pytest.mark.parametrize("voice", ["tiny", "tiny-q8"])
async def test_a_conversation_on_a_voice_leases_a_slot_of_that_voice_only(server, voices, hello_pcm, protocol,
                                                                          voice):
    other = next(name for name in voices.names if name != voice)
    steps_before = len(voices.engines[other].model.rows_per_step)
    url = websocket_url(server + protocol.path) + f"?voice={voice}"
    result = await exchange(url, hello_pcm[:SAMPLE_RATE], realtime=False)
    assert result.pcm.size > 0 and result.close_code == CloseCode.NORMAL
    assert len(voices.engines[other].model.rows_per_step) == steps_before
    await until(lambda: voices.active == 0)


def test_metrics_carry_each_voice_as_its_label(server):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server + "/metrics", timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    assert {s.labels["voice"]: s.value for s in families["moshi_slots"].samples} == {"tiny": 1, "tiny-q8": 1}
    assert {s.labels["voice"]: s.labels["weights"] for s in families["moshi_model_info"].samples} == {
        "tiny": "float32", "tiny-q8": "int8"}


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.value)
async def test_an_unknown_voice_is_closed_with_1008_naming_the_voices(server, protocol):
    ws = await connect(websocket_url(server + protocol.path) + "?voice=nobody")
    with pytest.raises(ConnectionClosed):
        while True:
            await ws.recv()
    assert ws.close_code == CloseCode.POLICY_VIOLATION
    assert "tiny, tiny-q8" in ws.close_reason


async def next_message(ws) -> bytes:
    return await asyncio.wait_for(ws.recv(), 10)


async def test_a_voice_with_every_slot_taken_puts_its_visitor_in_line_while_the_other_admits_at_once(server, voices):
    tiny = websocket_url(server + "/api/chat") + "?voice=tiny"
    holder = await connect(tiny)
    assert await next_message(holder) == HANDSHAKE  # tiny's one slot
    waiting = await connect(tiny + "&queue=1")
    message = await next_message(waiting)
    assert message[0] == KIND_METADATA and json.loads(message[1:])["queue"]["position"] == 1
    other = await connect(websocket_url(server + "/api/chat") + "?voice=tiny-q8")
    assert await next_message(other) == HANDSHAKE  # tiny-q8's line is its own, and empty
    assert voices.engines["tiny"].line.waiting == 1 and voices.engines["tiny-q8"].line.waiting == 0
    with urllib.request.urlopen(server + "/status", timeout=10) as response:
        status = json.load(response)
    assert [v["queue"]["waiting"] for v in status["voices"]] == [1, 0] and status["queue"]["waiting"] == 1
    await holder.close()
    assert await next_message(waiting) == HANDSHAKE  # the slot freed was tiny's, for tiny's line
    for ws in (waiting, other):
        await ws.close()
    await until(lambda: voices.active == 0)


def test_the_command_line_client_talks_to_the_voice_it_names(server, voices, capsys, tmp_path):
    steps = {name: len(engine.model.rows_per_step) for name, engine in voices.engines.items()}
    out = tmp_path / "answer.wav"
    assert client.main([server, "--voice", "tiny-q8", "--wav", str(HELLO_WAV), "--fast", "--out", str(out)]) == 0
    assert read_wav(out).size > 0
    assert len(voices.engines["tiny"].model.rows_per_step) == steps["tiny"]
    assert len(voices.engines["tiny-q8"].model.rows_per_step) > steps["tiny-q8"]
    capsys.readouterr()
    assert client.main([server, "--voice", "nobody", "--wav", str(HELLO_WAV), "--fast"]) == 1
    assert "tiny, tiny-q8" in capsys.readouterr().err


# Last in the module: tiny's model process is replaced, which takes a while.
async def test_when_one_voices_model_process_dies_the_other_voice_keeps_talking(server, voices, hello_pcm):
    tiny, q8 = voices.engines["tiny"], voices.engines["tiny-q8"]
    talking = await connect(websocket_url(server + "/api/chat") + "?voice=tiny-q8")
    assert await next_message(talking) == HANDSHAKE
    dead = tiny.model.pid
    os.kill(dead, signal.SIGKILL)
    await until(lambda: tiny.stopped is not None, timeout=30)
    with urllib.request.urlopen(server + "/status", timeout=10) as response:
        status = json.load(response)
    assert status["status"] == "ready"  # one voice down is not the server down
    assert "restarting" in status["voices"][0]["unavailable"] and not status["voices"][1].get("unavailable")
    # the conversation that was going on tiny-q8 goes on: its answers keep coming
    encoder = OpusEncoder()
    for index in range(5):
        frame = hello_pcm[index * FRAME_SIZE : (index + 1) * FRAME_SIZE]
        await talking.send(bytes([KIND_AUDIO]) + encoder.encode(frame))
    answered = 0
    while answered < 4:  # 5 frames answer 4 (the first step answers nothing)
        answered += (await next_message(talking))[0] == KIND_AUDIO
    await talking.close()
    # and a new one on tiny-q8 is served at once, while tiny refuses until its new process is up
    result = await exchange(websocket_url(server + "/api/chat") + "?voice=tiny-q8", hello_pcm[:SAMPLE_RATE],
                            realtime=False)
    assert result.pcm.size > 0 and result.close_code == CloseCode.NORMAL
    await until(lambda: tiny.stopped is None, timeout=300)
    assert tiny.model.pid != dead and tiny.status()["model_restarts"] == 1 and q8.status()["model_restarts"] == 0
    result = await exchange(websocket_url(server + "/api/chat") + "?voice=tiny", hello_pcm[:SAMPLE_RATE],
                            realtime=False)
    assert result.pcm.size > 0 and result.close_code == CloseCode.NORMAL
    await until(lambda: voices.active == 0)
