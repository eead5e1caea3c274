"""Interoperability both ways with moshi's reference server, and the client's command line."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE, read_wav
from moshi_engine.conversation import SessionLimits
from moshi_engine.wire.protocol import HANDSHAKE, CloseCode
from moshi_engine.wire.reference import reference_app
from moshi_engine.wire.remote import exchange
from moshi_engine.wire.server import create_api
from tests.conftest import HELLO_WAV
from tests.live import serve_aiohttp, serve_asgi


@pytest.fixture(scope="module")
def reference_server():
    """moshi's own aiohttp server (`ServerState.handle_chat`) over the tiny checkpoint."""
    with serve_aiohttp(reference_app("tiny", device="cpu")) as url:
        yield url


async def test_our_client_talks_to_moshis_reference_server(reference_server, hello_pcm):
    pcm = hello_pcm[: 3 * SAMPLE_RATE]
    result = await exchange(reference_server + "/api/chat", pcm, realtime=False)
    assert abs(result.pcm.size - pcm.size) <= 2 * FRAME_SIZE
    assert np.sqrt(np.mean(result.pcm**2)) > 0.01
    assert result.text.strip()


async def test_our_client_accepts_a_bare_host_url_as_moshis_client_does(reference_server, hello_pcm):
    result = await exchange(reference_server, hello_pcm[:SAMPLE_RATE], realtime=False)
    assert result.pcm.size >= (SAMPLE_RATE // FRAME_SIZE - 2) * FRAME_SIZE


class _FakeSoundDevice(types.ModuleType):
    """Stands in for PortAudio: the "microphone" plays a WAV in 80 ms blocks, the
    "speaker" records what moshi's client plays. Callbacks run on threads, as PortAudio's do."""

    def __init__(self, pcm: np.ndarray) -> None:
        super().__init__("sounddevice")
        self.played: list[np.ndarray] = []
        fake = self

        class Stream:
            def __init__(self, samplerate, channels, blocksize, callback):
                self.blocksize, self.callback, self.channels = blocksize, callback, channels
                self._stop = threading.Event()

            def __enter__(self):
                threading.Thread(target=self._run, daemon=True).start()
                return self

            def __exit__(self, *exc):
                self._stop.set()

        class InputStream(Stream):
            def _run(self):
                for start in range(0, pcm.size - self.blocksize + 1, self.blocksize):
                    if self._stop.wait(0.02):
                        return
                    block = pcm[start : start + self.blocksize].reshape(-1, 1).copy()
                    self.callback(block, self.blocksize, None, None)

        class OutputStream(Stream):
            def _run(self):
                while not self._stop.wait(0.02):
                    out = np.zeros((self.blocksize, self.channels), dtype=np.float32)
                    self.callback(out, self.blocksize, None, None)
                    if np.any(out):
                        fake.played.append(out[:, 0].copy())

        self.InputStream, self.OutputStream = InputStream, OutputStream


async def test_moshis_own_client_runs_unchanged_against_our_api_chat(tiny_engine, monkeypatch):
    fake_sd = _FakeSoundDevice(read_wav(HELLO_WAV)[: 4 * SAMPLE_RATE])
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sd)
    monkeypatch.delitem(sys.modules, "moshi.client", raising=False)
    from moshi import client as moshi_client
    from moshi.client_utils import RawPrinter

    # Our server ends the conversation once no audio came for 2 s, after the WAV played out,
    # which ends moshi's client. With a time limit, how much got answered would depend on this
    # machine's speed; this way all but at most 2 s of the WAV (the bound of the server's input
    # queue) is answered before the WAV's end even reaches the server.
    with serve_asgi(create_api(tiny_engine, SessionLimits(idle_s=2.0))) as base:
        args = types.SimpleNamespace(url=base, host=None, port=None, https=False)
        printed, errors = io.StringIO(), io.StringIO()
        await asyncio.wait_for(moshi_client.run(RawPrinter(printed, errors), args), timeout=30)
    printed = printed.getvalue()
    assert len(fake_sd.played) >= 10  # ~0.8 s or more of Moshi played through its "speaker"
    assert all(frame.shape == (FRAME_SIZE,) for frame in fake_sd.played)
    assert printed.strip()  # its printer showed Moshi's words


def test_client_command_line_prints_the_transcript_and_writes_the_answer(tiny_engine, tmp_path):
    out = tmp_path / "reply.wav"
    with serve_asgi(create_api(tiny_engine)) as base:
        run = subprocess.run(
            [sys.executable, "-m", "moshi_engine.client", base.replace("http", "ws") + "/ws",
             "--wav", str(HELLO_WAV), "--out", str(out), "--fast", "--seed", "3"],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()  # the transcript
    assert "first audio after" in run.stderr and f"closed {CloseCode.NORMAL.value}" in run.stderr
    assert re.search(r"\[conversation [0-9a-f]{8}: ", run.stderr)  # the id in the server's log lines
    answer = read_wav(out)
    assert abs(answer.size - read_wav(HELLO_WAV).size) <= 2 * FRAME_SIZE


def test_client_command_line_says_busy_and_fails_when_the_server_and_its_line_are_full(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine.line, "places", 0)  # --queue 0
    engine_full = [tiny_engine.open_session() for _ in range(tiny_engine.capacity)]
    try:
        with serve_asgi(create_api(tiny_engine)) as base:
            run = subprocess.run(
                [sys.executable, "-m", "moshi_engine.client", base, "--wav", str(HELLO_WAV)],
                capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
            )
    finally:
        for session in engine_full:
            asyncio.run(session.close())
    assert run.returncode == 1
    assert "try again later" in run.stderr


async def test_client_command_line_waits_in_line_saying_where_it_stands_then_talks(tiny_engine):
    with serve_asgi(create_api(tiny_engine)) as base:
        url = base.replace("http", "ws") + "/api/chat"
        holders = [await connect(url) for _ in range(tiny_engine.capacity)]  # every slot taken
        for holder in holders:
            assert await holder.recv() == HANDSHAKE
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "moshi_engine.client", url, "--wav", str(HELLO_WAV), "--fast",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[2],
        )
        in_line = (await asyncio.wait_for(client.stderr.readline(), 60)).decode()
        assert "every slot is taken: number 1 of 1 in line" in in_line
        await holders[0].close()  # a slot frees up: the client's turn
        stdout, stderr = await asyncio.wait_for(client.communicate(), 120)
        await holders[1].close()
    assert client.returncode == 0, stderr.decode()
    assert stdout.decode().strip() and f"closed {CloseCode.NORMAL.value}" in stderr.decode()
