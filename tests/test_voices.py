"""Two voices on one server: tiny and tiny-q8 (two checkpoints, one code), each its own engine."""

from __future__ import annotations

import json
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from moshi_engine.audio import SAMPLE_RATE
from moshi_engine.engine import load_voices
from moshi_engine.model.voices import parse_voices
from moshi_engine.wire.protocol import CloseCode, Protocol
from moshi_engine.wire.remote import exchange, websocket_url
from moshi_engine.wire.server import create_api
from tests.conftest import DEVICE, until
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


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.value)
async def test_an_unknown_voice_is_closed_with_1008_naming_the_voices(server, protocol):
    ws = await connect(websocket_url(server + protocol.path) + "?voice=nobody")
    with pytest.raises(ConnectionClosed):
        while True:
            await ws.recv()
    assert ws.close_code == CloseCode.POLICY_VIOLATION
    assert "tiny, tiny-q8" in ws.close_reason
