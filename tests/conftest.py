"""Shared fixtures: the tiny checkpoint on CPU, real speech, and a helper that runs a session."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

from moshi_engine.audio import read_wav
from moshi_engine.conversation import AudioOut, TextOut
from moshi_engine.engine import load_engine
from moshi_engine.session import MoshiSession

SPEECH_DIR = Path(__file__).resolve().parent.parent / "assets" / "speech"
HELLO_WAV = SPEECH_DIR / "hello.wav"
MUSIC_WAV = SPEECH_DIR / "music.wav"
# CPU in CI; `MOSHI_TEST_DEVICE=cuda` runs the engine, session and server tests on a GPU.
DEVICE = os.environ.get("MOSHI_TEST_DEVICE", "cpu")
# Where these are set, the engine leaves reaching the hub to the hub client (and its
# retries), so the tests of failing fast without a network run without them.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(scope="session")
def hello_pcm() -> np.ndarray:
    return read_wav(HELLO_WAV)


@pytest.fixture(scope="session")
def music_pcm() -> np.ndarray:
    return read_wav(MUSIC_WAV)


@pytest.fixture(scope="session")
def tiny_engine():
    """The tiny checkpoint with two conversation slots, shared by the tests that only lease."""
    engine = load_engine("tiny", device=DEVICE, sessions=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def single_engine():
    """The tiny checkpoint with one slot, for the tests of one module that need every
    lease taken by one conversation."""
    engine = load_engine("tiny", device=DEVICE, sessions=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, launched by playwright with a fake microphone playing hello.wav, for the
    tests of one module."""
    from playwright.sync_api import sync_playwright

    from moshi_engine.bench.browser import CHROMIUM, chromium_args

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=chromium_args())
        yield chromium
        chromium.close()


async def until(condition, timeout: float = 10.0) -> float:
    """Wait until condition() holds, looking every 10 ms; returns how long that took. The
    timeouts are generous bounds on a machine's slowness, never measurements."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def converse(session: MoshiSession, pcm: np.ndarray, chunk: int = 1920) -> tuple[np.ndarray, list[str]]:
    """Stream pcm into a started session in `chunk`-sample pieces; collect every output
    the input produces (one step per full frame; the first step answers nothing)."""
    expected_frames = pcm.size // 1920 - 1

    async def feed() -> None:
        for start in range(0, pcm.size, chunk):
            await session.send_pcm(pcm[start : start + chunk])

    feeder = asyncio.create_task(feed())
    frames: list[np.ndarray] = []
    texts: list[str] = []
    try:
        while len(frames) < expected_frames:
            out = await asyncio.wait_for(session.receive(), timeout=30)
            if isinstance(out, AudioOut):
                frames.append(out.pcm)
            else:
                assert isinstance(out, TextOut)
                texts.append(out.text)
        await feeder
    finally:
        feeder.cancel()
    return np.concatenate(frames), texts


def fail_every_step(model, error: Exception) -> None:
    """Run on the stepping thread (`engine.model.run(fail_every_step, error)`, in the model
    process too): from now on every step of `model` raises `error`."""

    def failing_step(batch):
        raise error

    model._step = failing_step
