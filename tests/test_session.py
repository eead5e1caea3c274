"""Sessions on leased slots: streaming, reproducibility, leasing, input validation."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from moshi_engine.audio import FRAME_SECONDS, FRAME_SIZE, SAMPLE_RATE
from moshi_engine.conversation import AudioOut, BusyError, Sampling, SessionClosed
from moshi_engine.engine import load_engine
from moshi_engine.session import InputClock
from tests.conftest import DEVICE, converse


async def test_three_seconds_of_speech_give_three_seconds_of_frames_and_text(tiny_engine, hello_pcm):
    pcm = hello_pcm[: 3 * SAMPLE_RATE]
    async with tiny_engine.session(Sampling(seed=0)) as session:
        audio, texts = await converse(session, pcm, chunk=1000)
    assert audio.dtype == np.float32
    assert audio.size % FRAME_SIZE == 0
    # one frame of initial delay: 37 input frames answer 36 frames
    assert audio.size == (pcm.size // FRAME_SIZE - 1) * FRAME_SIZE
    assert abs(audio.size / SAMPLE_RATE - 3.0) <= 0.2
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert texts and all(isinstance(t, str) and t for t in texts)


async def test_output_does_not_depend_on_how_input_is_chunked(tiny_engine, hello_pcm):
    pcm = hello_pcm[: 2 * SAMPLE_RATE]
    results = []
    for chunk in (FRAME_SIZE, 7, 5000):
        async with tiny_engine.session(Sampling(seed=3)) as session:
            results.append(await converse(session, pcm, chunk=chunk))
    for audio, texts in results[1:]:
        assert np.array_equal(audio, results[0][0]) and texts == results[0][1]


async def test_a_session_on_a_returned_slot_is_identical_to_one_on_a_fresh_engine(
    single_engine, hello_pcm, music_pcm
):
    pcm = hello_pcm[: 2 * SAMPLE_RATE]
    fresh = load_engine("tiny", device=DEVICE, sessions=1)
    try:
        async with fresh.session(Sampling(seed=11)) as session:
            on_fresh = await converse(session, pcm)
    finally:
        fresh.close()
    # something else runs first on the single slot, with other sampling and input
    async with single_engine.session(Sampling(seed=99, temp=1.2, top_k=5)) as session:
        await converse(session, music_pcm[: 2 * SAMPLE_RATE])
    async with single_engine.session(Sampling(seed=11)) as session:
        after_other = await converse(session, pcm)
    assert np.array_equal(on_fresh[0], after_other[0])
    assert on_fresh[1] == after_other[1]


async def test_different_seeds_give_different_answers(tiny_engine, hello_pcm):
    pcm = hello_pcm[: SAMPLE_RATE]
    answers = []
    for seed in (1, 2):
        async with tiny_engine.session(Sampling(seed=seed)) as session:
            answers.append((await converse(session, pcm))[0])
    assert not np.array_equal(*answers)


async def test_leasing_beyond_capacity_raises_busy_at_once_and_close_returns_the_lease(tiny_engine):
    first = tiny_engine.open_session()
    second = tiny_engine.open_session()
    assert tiny_engine.active == 2
    with pytest.raises(BusyError):
        tiny_engine.open_session()
    await first.start()
    await first.close()
    await second.close()  # never started: closing still returns it
    assert tiny_engine.active == 0
    third = tiny_engine.open_session()
    await third.close()
    assert tiny_engine.active == 0


async def test_cancelling_a_conversation_returns_its_lease(tiny_engine, hello_pcm):
    started = asyncio.Event()

    async def talk_forever():
        async with tiny_engine.session() as session:
            started.set()
            while True:
                await session.send_pcm(hello_pcm[:FRAME_SIZE])
                await session.receive()

    task = asyncio.create_task(talk_forever())
    await started.wait()
    await asyncio.sleep(0.3)
    assert tiny_engine.active == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tiny_engine.active == 0


async def test_a_closed_session_ends_its_output_and_refuses_input(tiny_engine, hello_pcm):
    session = tiny_engine.open_session()
    await session.start()
    await session.close()
    with pytest.raises(SessionClosed):
        await session.receive()
    with pytest.raises(SessionClosed):
        await session.send_pcm(hello_pcm[: 2 * FRAME_SIZE])
    assert [out async for out in session] == []


@pytest.mark.parametrize(
    ("pcm", "message"),
    [
        (np.zeros(FRAME_SIZE, dtype=np.int16), "float32"),
        (np.zeros(FRAME_SIZE, dtype=np.float64), "float32"),
        (np.zeros((1, FRAME_SIZE), dtype=np.float32), "1-d"),
        (np.array([0.0, np.nan] * 10, dtype=np.float32), "NaN or inf"),
        (np.array([0.0, np.inf] * 10, dtype=np.float32), "NaN or inf"),
        (np.zeros(0, dtype=np.float32), "empty"),
        ([0.0] * FRAME_SIZE, "numpy array"),
    ],
)
async def test_bad_input_raises_value_error_saying_what_is_wrong(tiny_engine, pcm, message):
    async with tiny_engine.session() as session:
        with pytest.raises(ValueError, match=message):
            await session.send_pcm(pcm)
    assert tiny_engine.active == 0


async def test_a_reader_that_falls_behind_loses_oldest_audio_not_memory(hello_pcm):
    engine = load_engine("tiny", device=DEVICE, sessions=1, warmup_frames=1)
    try:
        session = engine.open_session(Sampling(seed=5), max_output_frames=4)
        await session.start()
        for start in range(0, 20 * FRAME_SIZE, FRAME_SIZE):
            await session.send_pcm(hello_pcm[start : start + FRAME_SIZE])
        async with asyncio.timeout(30):
            while session.frames_in < 20:
                await asyncio.sleep(0.01)
        await session.close()
        assert session.frames_out == 19
        assert session.dropped_frames == 15
        queued = []
        while True:
            try:
                queued.append(await session.receive())
            except SessionClosed:
                break
        assert sum(isinstance(out, AudioOut) for out in queued) == 4
    finally:
        engine.close()


def test_sampling_rejects_nonsense():
    for bad in ({"temp": -1.0}, {"top_k": 0}, {"top_k_text": 2.5}, {"seed": -3}, {"temp_text": "hot"}):
        with pytest.raises(ValueError):
            Sampling(**bad)


@pytest.fixture(scope="module")
def slow_engine():
    """The tiny model taking a real Moshi's step time (65 ms of the 80 ms a frame lasts)."""
    engine = load_engine("tiny", device=DEVICE, sessions=1, min_step_ms=65)
    yield engine
    engine.close()


async def test_a_backlog_after_an_outage_is_dropped_and_the_lag_is_back_within_a_second(slow_engine, hello_pcm):
    """Real time, then nothing for 3 s, then those 3 s at once (what TCP delivers when the link
    comes back), then real time again: the backlog is dropped down to the frame of the moment,
    and the answers are as little behind as before the outage within a second of its end."""
    frame = hello_pcm[:FRAME_SIZE]
    lags: list[tuple[float, float]] = []  # (when the answer came, how late against its input's place)
    loop = asyncio.get_running_loop()

    async with slow_engine.session(Sampling(seed=0)) as session:
        async def read() -> None:
            while True:
                out = await session.receive()
                if isinstance(out, AudioOut):
                    lags.append((loop.time(), time.perf_counter() - out.due))

        reader = asyncio.create_task(read())
        start = loop.time()
        async def at(index: int) -> None:
            await asyncio.sleep(max(0.0, start + index * FRAME_SECONDS - loop.time()))

        for index in range(25):  # 2 s in real time
            await at(index)
            await session.send_pcm(frame)
        await at(25 + 37)  # the outage: 3 s in which nothing arrives
        back = loop.time()
        for _ in range(37):  # ... and then arrives at once
            await session.send_pcm(frame)
        for index in range(25 + 37, 25 + 37 + 25):  # 2 s in real time again
            await at(index)
            await session.send_pcm(frame)
        await asyncio.sleep(0.3)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    before = sorted(lag for when, lag in lags if start + 0.5 < when < back)
    after = [lag for when, lag in lags if when > back + 1.0]
    assert session.stale_frames >= 30  # most of the backlog went, never to Moshi
    assert before and after
    normal = before[len(before) // 2]
    assert max(after) <= max(0.2, 1.5 * normal)  # back to its usual lag, whatever a step takes


def feed(clock: InputClock, first: int, count: int, at: float, pace: float = FRAME_SECONDS, jitter=()) -> float:
    """Frames first.. arriving from `at`, one every `pace` s (plus the given jitter, cycled); the last arrival."""
    for n in range(count):
        arrival = at + n * pace + (jitter[n % len(jitter)] if jitter else 0.0)
        clock.arrived(first + n, arrival)
    return arrival


def test_after_a_gap_a_fresh_stream_is_on_time_again_within_half_a_second_and_a_backlog_stays_late():
    jitter = (0.0, 0.03, -0.02, 0.05, 0.01)  # a 4G link's
    # A resumed connection: 4 s of frames never sent, then the stream goes on in real time.
    clock = InputClock()
    last = feed(clock, 0, 50, 100.0, jitter=jitter)
    back = last + 4.0
    last = feed(clock, 50, 5, back, jitter=jitter)
    assert last - back < 0.5 and clock.behind(54, last) < 0.1
    # What TCP held for 4 s, delivered at once, then real time again: late as it is, then on time.
    clock = InputClock()
    last = feed(clock, 0, 50, 100.0, jitter=jitter)
    backlog = feed(clock, 50, 50, last + 4.0, pace=0.002)
    assert clock.behind(50, backlog) > 3.5  # its head is behind by the outage: dropped, not fed to Moshi
    last = feed(clock, 100, 10, backlog + FRAME_SECONDS, jitter=jitter)
    assert abs(clock.behind(109, last)) < 0.1  # and what follows is on time, not ahead
