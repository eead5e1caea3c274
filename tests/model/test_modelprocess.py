"""The slots stepped in a process of their own: the same conversations as in process, the
server's bookkeeping across the pipe, and what happens when that process dies: its
conversations end, and another process serves."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import numpy as np
import psutil
import pytest

from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE
from moshi_engine.conversation import BusyError, ModelRestarting, Sampling, SessionError
from moshi_engine.engine import load_engine
from moshi_engine.model import process as model_process
from moshi_engine.model.batched import BatchedMoshi
from moshi_engine.model.checkpoint import TINY_DIR, ModelUnavailableError
from moshi_engine.model.child import FAILED_STEPS_TO_EXIT
from moshi_engine.model.process import RESTART_DELAYS_S, RESTART_STABLE_S, ModelProcess, restart_delay
from tests.conftest import DEVICE, converse, fail_every_step, until

GREEDY = Sampling(temp=0.0, temp_text=0.0)
SEEDED = Sampling(temp=0.9, top_k=50, temp_text=0.8, top_k_text=20, seed=5)


@pytest.fixture(scope="module")
def process_engine():
    engine = load_engine("tiny", device=DEVICE, sessions=2, warmup_frames=1)
    assert isinstance(engine.model, ModelProcess)
    yield engine
    engine.close()


def _where(model: BatchedMoshi) -> tuple[int, int]:
    return os.getpid(), model.capacity


def _fails(model: BatchedMoshi) -> None:
    raise ValueError("asked to fail")


def _unpicklable(model: BatchedMoshi):
    return lambda: None


async def test_conversations_in_the_model_process_answer_exactly_as_in_process(process_engine, hello_pcm,
                                                                                music_pcm):
    speeches = [hello_pcm[: 2 * SAMPLE_RATE], music_pcm[: 2 * SAMPLE_RATE]]
    samplings = [GREEDY, SEEDED]

    async def both(engine):
        async def one(sampling, pcm):
            async with engine.session(sampling) as session:
                return await converse(session, pcm)

        return await asyncio.gather(*(one(sampling, pcm) for sampling, pcm in zip(samplings, speeches, strict=True)))

    in_thread = load_engine("tiny", device=DEVICE, sessions=2, warmup_frames=1, model_process=False)
    try:
        expected = await both(in_thread)
    finally:
        in_thread.close()
    answers = await both(process_engine)
    for (audio, texts), (expected_audio, expected_texts) in zip(answers, expected, strict=True):
        assert texts == expected_texts
        assert np.array_equal(audio, expected_audio)


async def test_a_late_output_of_an_ended_conversation_never_reaches_the_next_on_its_slot(process_engine,
                                                                                       hello_pcm):
    frames = hello_pcm[: 20 * FRAME_SIZE]
    for _ in range(3):
        first = await process_engine.acquire(GREEDY)
        slot = first.slot
        await first.send_pcm(frames)  # 20 frames in flight...
        await first.close()  # ...and the conversation gone at once
        second = await process_engine.acquire(GREEDY)
        assert second.slot == slot
        await second.send_pcm(frames[: 3 * FRAME_SIZE])
        await until(lambda: second.frames_in == 3)  # noqa: B023
        await asyncio.sleep(0.3)  # room for anything stray to arrive
        assert second.frames_in == 3 and first.frames_in < 20
        await second.close()


async def test_the_status_counts_the_steps_made_in_the_model_process(process_engine, hello_pcm):
    async with process_engine.session(GREEDY) as session:
        await converse(session, hello_pcm[:SAMPLE_RATE])
    batch = process_engine.status()["batch"]
    assert batch["step"]["count"] >= SAMPLE_RATE // FRAME_SIZE
    assert batch["rows_per_step_mean"] >= 1 and batch["step"]["p50_ms"] > 0


def test_a_job_runs_on_the_stepping_thread_of_the_model_process_and_its_error_comes_back(process_engine):
    pid, capacity = process_engine.model.run(_where)
    assert pid == process_engine.model.pid != os.getpid()
    assert capacity == 2
    with pytest.raises(ValueError, match="asked to fail"):
        process_engine.model.run(_fails)
    with pytest.raises(Exception, match="pickle"):  # a job that cannot go there says so...
        process_engine.model.run(lambda model: None)
    with pytest.raises(Exception, match="pickle"):  # ...as does a result that cannot come back...
        process_engine.model.run(_unpicklable)
    assert process_engine.model.run(_where)[0] == pid  # ...and the process goes on


def test_a_checkpoint_that_cannot_load_raises_its_error_in_the_server(tmp_path):
    with pytest.raises(ModelUnavailableError):
        load_engine(str(tmp_path / "nothing-here"), device=DEVICE)


@pytest.mark.parametrize("model", ["tiny", "tiny-q8"])  # tiny-q8: int8 layers, as Kyutai's q8 repos
async def test_when_the_model_process_dies_its_conversations_end_and_another_serves_from_fresh_rows(hello_pcm, model):
    engine = load_engine(model, device=DEVICE, sessions=2, warmup_frames=1)
    try:
        speech = hello_pcm[: 2 * SAMPLE_RATE]
        async with engine.session(GREEDY) as session:
            before = await converse(session, speech)
        dying = await engine.acquire(GREEDY)
        await dying.send_pcm(hello_pcm[: 2 * FRAME_SIZE])
        await until(lambda: dying.frames_in == 2)
        first_pid = engine.model.pid
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(SessionError, match="model process stopped"):
            while True:
                await asyncio.wait_for(dying.receive(), timeout=30)
        with pytest.raises(ModelRestarting, match="model process stopped .*restarting"):
            await engine.acquire(GREEDY)
        assert engine.stopped is not None and engine.active == 0

        await until(lambda: engine.stopped is None, timeout=300)  # a fresh child loads and warms up
        assert engine.model.pid != first_pid and engine.status()["model_restarts"] == 1
        assert engine.status()["weights"] == ("int8" if model == "tiny-q8" else "float32")  # the same model again
        async with engine.session(GREEDY) as session:
            after = await converse(session, speech)
        assert after[1] == before[1] and np.array_equal(after[0], before[0])  # as from a fresh start
    finally:
        engine.close()


async def test_a_failed_step_ends_its_conversations_and_steps_failing_in_a_row_replace_the_process(hello_pcm):
    engine = load_engine("tiny", device=DEVICE, sessions=1, warmup_frames=1)
    try:
        engine.model.run(fail_every_step, ValueError("a step that fails"))
        broken_pid = engine.model.pid
        for _ in range(FAILED_STEPS_TO_EXIT):
            assert engine.model.pid == broken_pid  # a failed step alone does not stop it
            session = await engine.acquire(GREEDY)
            await session.send_pcm(hello_pcm[:FRAME_SIZE])
            with pytest.raises(SessionError, match="a step that fails"):
                await asyncio.wait_for(session.receive(), timeout=30)
        await until(lambda: engine.model.pid != broken_pid and engine.stopped is None, timeout=300)
        async with engine.session(GREEDY) as session:
            audio, _ = await converse(session, hello_pcm[: 2 * SAMPLE_RATE])
        assert audio.size > 0
    finally:
        engine.close()


async def test_when_no_new_model_process_will_start_the_engine_says_the_model_is_lost(tmp_path, monkeypatch):
    checkpoint = tmp_path / "tiny-moshi"
    shutil.copytree(TINY_DIR, checkpoint)
    monkeypatch.setattr(model_process, "RESTART_DELAYS_S", (0.01, 0.01))
    monkeypatch.setattr(model_process, "RESTART_TRIES", 2)
    engine = load_engine(str(checkpoint), device=DEVICE, sessions=1, warmup_frames=1)
    told: list[str] = []
    engine.on_model_lost = told.append
    try:
        shutil.rmtree(checkpoint)  # the volume with the weights is gone: no new process can load them
        os.kill(engine.model.pid, signal.SIGKILL)
        await until(lambda: told, timeout=120)
        assert "could not be restarted (2 tries" in told[0] and "ModelUnavailableError" in told[0]
        assert engine.lost == told[0] == engine.stopped and engine.model.restarts == 0
        with pytest.raises(BusyError, match="could not be restarted") as refused:
            await engine.acquire(GREEDY)
        assert not isinstance(refused.value, ModelRestarting)  # no "try again in a minute" now
    finally:
        engine.close()


async def test_closing_while_a_new_model_process_loads_leaves_no_process_behind():
    others = {child.pid for child in psutil.Process().children()}  # other tests' model processes
    engine = load_engine("tiny", device=DEVICE, sessions=1, warmup_frames=1)

    def ours() -> set[int]:
        return {child.pid for child in psutil.Process().children()} - others

    first = engine.model.pid
    os.kill(first, signal.SIGKILL)
    await until(lambda: ours() and first not in ours(), timeout=30)  # the replacement exists
    engine.close()  # the replacement is loading: it is killed, not waited for
    assert ours() == set() and engine.model.restarts == 0
    with pytest.raises(BusyError):
        await engine.acquire(GREEDY)


def test_a_model_process_that_keeps_dying_is_restarted_after_a_growing_wait():
    first, longest = RESTART_DELAYS_S
    assert restart_delay(lived_s=RESTART_STABLE_S, previous_s=0.0) == 0.0  # a crash after a long run
    assert restart_delay(lived_s=RESTART_STABLE_S + 3600, previous_s=longest) == 0.0
    waits = [0.0]
    for _ in range(12):
        waits.append(restart_delay(lived_s=1.0, previous_s=waits[-1]))
    assert waits[1] == first and all(b == min(2 * a, longest) for a, b in zip(waits[1:], waits[2:], strict=False))
    assert waits[-1] == longest


def test_closing_ends_the_model_process():
    engine = load_engine("tiny", device=DEVICE, sessions=1, warmup_frames=1)
    process = engine.model._process
    engine.close()
    assert process.returncode == 0


async def test_with_a_gather_time_the_model_process_waits_for_every_conversation_then_steps_them_together(
        hello_pcm):
    engine = load_engine("tiny", device=DEVICE, sessions=2, warmup_frames=1, gather_ms=1500)
    try:
        first, second = await engine.acquire(GREEDY), await engine.acquire(GREEDY)
        await first.send_pcm(hello_pcm[:FRAME_SIZE])
        await asyncio.sleep(0.3)
        assert first.frames_in == 0  # held for the other conversation's frame
        await second.send_pcm(hello_pcm[FRAME_SIZE : 2 * FRAME_SIZE])
        await until(lambda: first.frames_in == second.frames_in == 1)
        assert list(engine.model.rows_per_step) == [2]  # one step served both
        await first.send_pcm(hello_pcm[:FRAME_SIZE])  # alone this time: stepped once the time is up
        await until(lambda: first.frames_in == 2)
        assert list(engine.model.rows_per_step) == [2, 1] and second.frames_in == 1
        await first.close()
        await second.close()
    finally:
        engine.close()
