"""The server's log: `python app.py --log-format json` writes one JSON object a line, every line
about a conversation carries that conversation's id (two at once: two ids), and each end is
logged once with its transport, duration, first audio and how it ended; the readable text
format puts the id in front of the message."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np

from moshi_engine.audio import FRAME_SIZE
from moshi_engine.watch.logs import JsonFormatter, TextFormatter, conversation_context, log_fields
from moshi_engine.wire.remote import RemoteSession
from tests.test_app import ROOT, free_port


def start_json_app() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--sessions", "2", "--port", str(port),
         "--log-format", "json"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # the log is stderr
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            with urllib.request.urlopen(base + "/status", timeout=2):
                return process, base
        except OSError:
            assert time.monotonic() < deadline, "app.py did not answer /status in time"
            time.sleep(0.2)


async def two_interleaved_conversations(base: str) -> list[str]:
    """One on /api/chat and one on /ws, open at once, their frames taking turns; their ids, as
    the server told them (a client that reads metadata hears it)."""
    url = base.replace("http://", "ws://")
    sessions = [RemoteSession(url + path, on_position=lambda position: None) for path in ("/api/chat", "/ws")]
    for session in sessions:
        await session.start()
    speech = (0.1 * np.sin(np.arange(FRAME_SIZE) * 0.05)).astype(np.float32)
    for _ in range(15):
        for session in sessions:
            await session.send_pcm(speech)
        await asyncio.sleep(0.08)
    await asyncio.sleep(0.5)
    for session in sessions:
        await session.close()
        await asyncio.sleep(0.3)
    return [session.conversation_id for session in sessions]


def test_json_lines_parse_and_two_interleaved_conversations_log_under_their_own_ids():
    process, base = start_json_app()
    try:
        ids = asyncio.run(two_interleaved_conversations(base))
        time.sleep(1.0)  # the server logs each end as it finishes with it
    finally:
        process.send_signal(signal.SIGINT)
        _, log = process.communicate(timeout=60)
    assert process.returncode == 0, log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"] == "moshi_engine.model.process" for line in lines)  # the model's process too
    assert len(set(ids)) == 2 and all(ids)
    about = [line for line in lines if "conversation" in line]
    assert {line["conversation"] for line in about} == set(ids)
    for conversation_id, transport in zip(ids, ("api/chat", "ws"), strict=True):
        own = [line for line in about if line["conversation"] == conversation_id]
        assert [line["message"] for line in own] == ["conversation started", "conversation ended"]
        end = own[-1]
        assert end["transport"] == transport and end["voice"] == "tiny" and end["ending"] == "normal"
        assert end["duration_s"] > 1.0 and 0 < end["first_audio_s"] < end["duration_s"]


def test_the_text_format_puts_the_conversations_id_before_the_message_and_its_fields_after():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("tests.logs.text")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with conversation_context("3f9a0c1e"):
            logger.warning("conversation ended", extra=log_fields(ending="idle", first_audio_s=0.4125, reason=None))
        logger.warning("outside any conversation")
    finally:
        logger.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("tests.logs.text: [3f9a0c1e] conversation ended ending=idle first_audio_s=0.412")
    assert second.endswith("tests.logs.text: outside any conversation")


def test_a_json_line_carries_the_traceback_of_an_exception():
    record = logging.getLogger("tests.logs.json").makeRecord(
        "tests.logs.json", logging.ERROR, __file__, 1, "the step failed", (), sys.exc_info())
    try:
        raise RuntimeError("CUDA error: an illegal memory access")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "the step failed" and "RuntimeError: CUDA error" in line["exception"]
