"""Conversation slots: rows of one batched Moshi that join, leave and reset without
disturbing each other, in process and over /api/chat."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect

from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE
from moshi_engine.conversation import AudioOut, Sampling, TextOut
from moshi_engine.engine import load_engine
from moshi_engine.model.batched import BatchedMoshi
from moshi_engine.model.cpukernels import ExpELU, PointwiseConv1d, use_cpu_kernels
from moshi_engine.model.loading import load_weights
from moshi_engine.model.memory import counted_slot_bytes
from moshi_engine.model.sizing import AUTO, CapacityError, fit_sessions
from moshi_engine.session import MoshiSession
from moshi_engine.wire.codec import OpusEncoder
from moshi_engine.wire.protocol import HANDSHAKE, CloseCode
from moshi_engine.wire.remote import exchange, websocket_url
from moshi_engine.wire.server import create_api
from tests.conftest import DEVICE, converse, until
from tests.live import serve_asgi

SLOTS = 4
GREEDY = Sampling(temp=0.0, temp_text=0.0)
SEEDED = Sampling(temp=0.9, top_k=50, temp_text=0.8, top_k_text=20, seed=77)


@pytest.fixture(scope="module")
def engine():
    engine = load_engine("tiny", device=DEVICE, sessions=SLOTS, model_process=False)
    yield engine
    engine.close()


class Talker:
    """A conversation stepped one frame at a time: each `say` waits until the frame is stepped,
    so the test decides which rows share a step."""

    def __init__(self, session: MoshiSession, pcm: np.ndarray) -> None:
        self.session = session
        self.frames = [pcm[i : i + FRAME_SIZE] for i in range(0, pcm.size - FRAME_SIZE + 1, FRAME_SIZE)]
        self.said = 0
        self.audio: list[np.ndarray] = []
        self.texts: list[str] = []

    async def send(self) -> None:
        await self.session.send_pcm(self.frames[self.said % len(self.frames)])
        self.said += 1

    async def stepped(self) -> None:
        await until(lambda: self.session.frames_in == self.said)
        while True:  # everything delivered so far, without waiting for more
            try:
                out = await asyncio.wait_for(self.session.receive(), timeout=0.001)
            except TimeoutError:
                return
            if isinstance(out, AudioOut):
                self.audio.append(out.pcm)
            else:
                assert isinstance(out, TextOut)
                self.texts.append(out.text)

    async def say(self, *others: Talker) -> None:
        """One frame of this talker and of each of `others`, all in one step."""
        for talker in (self, *others):
            await talker.send()
        for talker in (self, *others):
            await talker.stepped()


async def alone(engine, sampling: Sampling, pcm: np.ndarray) -> Talker:
    async with engine.session(sampling) as session:
        talker = Talker(session, pcm)
        for _ in talker.frames:
            await talker.say()
        return talker


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["temperature-0", "seeded"])
async def test_a_conversation_answers_the_same_alone_and_amid_rows_that_join_leave_and_reset(
    engine, sampling, hello_pcm, music_pcm
):
    pcm = hello_pcm[: 2 * SAMPLE_RATE]
    reference = await alone(engine, sampling, pcm)
    assert reference.session.slot == 0 and len(reference.audio) == len(reference.frames) - 1

    main = Talker(engine.open_session(sampling), pcm)
    assert main.session.slot == 0
    other = Talker(engine.open_session(Sampling(temp=1.5, top_k=64, seed=1)), music_pcm)
    await other.say()  # steps without the main row
    await main.say(other)  # steps together
    await other.say()
    joiner = Talker(engine.open_session(Sampling(temp=0.0, temp_text=0.0)), music_pcm[::-1].copy())
    for index in range(1, len(main.frames)):
        if index == 8:
            await joiner.session.close()  # leaves mid-conversation; its row is reset
            joiner = Talker(engine.open_session(Sampling(seed=3)), hello_pcm[SAMPLE_RATE:])  # same row, fresh
        if index % 4 == 0:
            await joiner.say(other)  # a step the main row sits out
        await main.say(*((joiner,) if index % 3 else (joiner, other)))
    for talker in (main, other, joiner):
        await talker.session.close()

    assert engine.active == 0
    assert len(main.audio) == len(reference.audio)
    assert all(np.array_equal(a, b) for a, b in zip(main.audio, reference.audio, strict=True))
    assert main.texts == reference.texts


async def test_a_freed_slot_answers_the_next_conversation_as_a_fresh_one(engine, hello_pcm, music_pcm):
    pcm = hello_pcm[:SAMPLE_RATE]
    fresh = await alone(engine, SEEDED, pcm)
    # Something else runs on slot 0 (and on slot 1) with other sampling and input, then leaves.
    first = Talker(engine.open_session(Sampling(temp=1.2, top_k=5, seed=99)), music_pcm)
    second = Talker(engine.open_session(), music_pcm)
    for _ in range(6):
        await first.say(second)
    await first.session.close()
    again = await alone(engine, SEEDED, pcm)  # slot 0 again, while slot 1 stays in its conversation
    await second.session.close()
    assert again.session.slot == 0
    assert all(np.array_equal(a, b) for a, b in zip(again.audio, fresh.audio, strict=True))
    assert again.texts == fresh.texts


async def test_slots_are_leased_lowest_first_and_every_one_is_a_row_of_the_same_model(engine):
    sessions = [engine.open_session() for _ in range(SLOTS)]
    try:
        assert [session.slot for session in sessions] == list(range(SLOTS))
        await sessions[1].close()
        refill = engine.open_session()
        assert refill.slot == 1
        sessions[1] = refill
        assert engine.active == SLOTS == engine.capacity
    finally:
        for session in sessions:
            await session.close()
    assert engine.active == 0
    # one Mimi and one LM, each streaming with a batch of SLOTS rows
    assert engine.model.lm_gen._streaming_state.batch_size == SLOTS
    assert engine.model.mimi._streaming_state.batch_size == SLOTS


async def test_engines_in_turn_over_one_loaded_checkpoint_each_start_fresh(engine, hello_pcm, music_pcm,
                                                                           monkeypatch):
    pcm = hello_pcm[:SAMPLE_RATE]
    reference = await alone(engine, SEEDED, pcm)  # the module's engine, on weights of its own
    weights = load_weights("tiny", device=DEVICE)
    first = load_engine(sessions=2, weights=weights, warmup_frames=1)
    talking = Talker(first.open_session(Sampling(seed=4)), music_pcm)
    for _ in range(5):
        await talking.say()
    first.close()  # mid-conversation

    def out_of_memory(self, frames):
        raise RuntimeError("CUDA out of memory (as if)")

    with monkeypatch.context() as patched:
        patched.setattr(BatchedMoshi, "warmup", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            load_engine(sessions=3, weights=weights)
    second = load_engine(sessions=SLOTS, weights=weights)
    try:
        assert second.model.mimi is weights.mimi and second.model.lm_gen.lm_model is weights.lm
        again = await alone(second, SEEDED, pcm)
    finally:
        second.close()
    assert len(again.audio) == len(reference.audio)
    assert all(np.array_equal(a, b) for a, b in zip(again.audio, reference.audio, strict=True))
    assert again.texts == reference.texts


async def test_a_shorter_context_is_every_slots_window_and_holds_its_kv_cache_in_proportion(hello_pcm):
    """`--context`: the LM attends to that many steps; each slot's KV cache holds that many."""
    window = 20  # steps: 1.6 s, of the tiny checkpoint's 100
    weights = load_weights("tiny", device=DEVICE, context=window)
    full = load_weights("tiny", device=DEVICE)
    assert (weights.context, full.context) == (window, 100)
    assert all(layer.self_attn.context == window for layer in weights.lm.transformer.layers)
    lm_slot, full_slot = counted_slot_bytes(None, weights.lm), counted_slot_bytes(None, full.lm)
    assert abs(lm_slot / full_slot - window / 100) < 0.02  # the KV cache is nearly all of it
    engine = load_engine(sessions=1, weights=weights, warmup_frames=1)
    try:
        assert engine.status()["context"] == window
        async with engine.session(Sampling(seed=3)) as session:
            audio, _ = await converse(session, hello_pcm[: 3 * SAMPLE_RATE])  # 37 steps: past the window
        assert audio.size == (3 * SAMPLE_RATE // FRAME_SIZE - 1) * FRAME_SIZE
    finally:
        engine.close()


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_mimis_cpu_elu_is_elu_and_leaves_its_input_alone(alpha):
    x = torch.linspace(-30, 30, 100_001).reshape(1, 1, -1)
    before = x.clone()
    torch.testing.assert_close(ExpELU(alpha)(x), torch.nn.functional.elu(x, alpha), atol=1e-7, rtol=1e-6)
    assert torch.equal(x, before)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(16, 4, 1920), (1, 4, 1920), (4, 32, 7), (4, 1920)])
def test_pointwise_conv_is_the_convolution(shape, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(shape[-2], 8, kernel_size=1, bias=bias)
    x = torch.randn(*shape)
    expected = conv(x)
    conv.__class__ = PointwiseConv1d
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_cpu_kernels_swap_mimis_elus_and_pointwise_convs_and_keep_what_it_computes(hello_pcm):
    mimi = load_weights("tiny", device="cpu").mimi  # fresh modules: engines swap theirs
    state = {name: tensor.clone() for name, tensor in mimi.state_dict().items()}
    frames = torch.from_numpy(hello_pcm[: 4 * FRAME_SIZE].copy()).reshape(4, 1, FRAME_SIZE)

    with torch.no_grad(), mimi.streaming(4):
        codes = mimi.encode(frames)

    # What the swapped modules compute is compared before quantization, and decoded from the
    # same codes: a latent a float rounding away from a codebook boundary would pick another
    # code on some CPU, and no test may hang on the last bits of a float.
    def latent_and_audio() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            with mimi.streaming(4):
                latent = mimi.encode_to_latent(frames, quantize=False)
            with mimi.streaming(4):
                return latent, mimi.decode(codes)

    latent, decoded = latent_and_audio()
    swapped = use_cpu_kernels(mimi)
    latent_swapped, decoded_swapped = latent_and_audio()

    kinds = [type(module) for module in mimi.modules()]
    assert torch.nn.ELU not in kinds and kinds.count(ExpELU) > 0
    assert not any(type(m) is torch.nn.Conv1d and m.kernel_size == (1,) for m in mimi.modules())
    assert swapped == kinds.count(ExpELU) + kinds.count(PointwiseConv1d) > kinds.count(ExpELU)
    assert use_cpu_kernels(mimi) == 0  # once is all
    assert mimi.state_dict().keys() == state.keys()
    assert all(torch.equal(tensor, state[name]) for name, tensor in mimi.state_dict().items())
    torch.testing.assert_close(latent_swapped, latent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded_swapped, decoded, atol=1e-4, rtol=1e-4)


# In a fresh process (where glibc's adaptive thresholds have seen nothing yet): a 16 MiB block
# allocated, freed and allocated again. With glibc's defaults the second one faults its pages in
# anew (477 faults here); kept, it reuses the first one's.
_REUSE = """
import resource, numpy as np
from moshi_engine.model.loading import keep_freed_memory
assert keep_freed_memory()
block = np.ones(2 << 20); del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = np.ones(2 << 20); del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_memory_kept_by_malloc_is_reused_without_faulting_its_pages_in_again():
    done = subprocess.run([sys.executable, "-c", _REUSE], capture_output=True, text=True, timeout=120, check=True)
    assert int(done.stdout.split()[-1]) == 0


def test_warm_cpu_steps_reuse_the_memory_they_free_instead_of_faulting_it_in_again(hello_pcm):
    engine = load_engine("tiny", device="cpu", sessions=16, warmup_frames=1, model_process=False)
    rows = [(row, hello_pcm[row * FRAME_SIZE : (row + 1) * FRAME_SIZE], 0.0) for row in range(16)]

    def page_faults_per_step(_) -> float:
        """Of this (the stepping) thread, per step: the median of five windows of ten warm steps,
        so that a one-off burst elsewhere in the process does not count."""
        for _ in range(20):
            engine.model._step(rows)
        windows = []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            for _ in range(10):
                engine.model._step(rows)
            windows.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 10)
        return float(np.median(windows))

    try:
        assert engine.model.run(page_faults_per_step) < 10  # glibc's defaults: 100 to 2,500
    finally:
        engine.close()


async def test_concurrent_conversations_over_api_chat_all_get_their_audio_and_text(engine, hello_pcm, music_pcm):
    speeches = [hello_pcm[: 2 * SAMPLE_RATE], music_pcm[: 2 * SAMPLE_RATE]]
    with serve_asgi(create_api(engine)) as base:
        url = websocket_url(base + "/api/chat")
        alone_answer = await exchange(url, speeches[0], Sampling(seed=5), realtime=False)

        async def client(index: int):
            await asyncio.sleep(index * 0.08 / SLOTS)  # each at its own phase of the frame
            return await exchange(url, speeches[index % 2], Sampling(seed=5 + index), tail_s=10.0)

        results = await asyncio.gather(*(client(index) for index in range(SLOTS)))
    expected_frames = speeches[0].size // FRAME_SIZE - 1
    for result in results:
        assert result.close_code == CloseCode.NORMAL
        assert result.pcm.size == expected_frames * FRAME_SIZE
        assert result.texts
    # the first client (slot 0, same seed and input as alone) heard exactly what it did alone
    assert np.array_equal(results[0].pcm, alone_answer.pcm) and results[0].texts == alone_answer.texts
    await until(lambda: engine.active == 0)
    status = engine.status()
    assert status["sessions"] == {"active": 0, "capacity": SLOTS}
    assert status["batch"]["step"]["count"] > 0 and status["batch"]["rows_per_step_mean"] >= 1


@pytest.mark.parametrize("ending", ["normal-close", "protocol-error", "abrupt-disconnect"])
async def test_after_a_close_an_error_or_an_abrupt_disconnect_the_slot_is_free_and_fresh(
    engine, ending, hello_pcm, music_pcm
):
    pcm = hello_pcm[:SAMPLE_RATE]
    with serve_asgi(create_api(engine)) as base:
        url = websocket_url(base + "/api/chat")
        fresh = await exchange(url, pcm, SEEDED, realtime=False)
        ws = await connect(url + "?seed=3&temp=1.3")
        assert await ws.recv() == HANDSHAKE
        encoder = OpusEncoder()
        for start in range(0, 10 * FRAME_SIZE, FRAME_SIZE):
            await ws.send(b"\x01" + encoder.encode(music_pcm[start : start + FRAME_SIZE]))
        await ws.recv()  # the conversation is under way
        if ending == "normal-close":
            await ws.close()
        elif ending == "protocol-error":
            await ws.send(b"\x01" + b"\x00" * 100)  # not Ogg Opus: closed with 1007
            await ws.wait_closed()
            assert ws.close_code == CloseCode.INVALID_PAYLOAD
        else:
            ws.transport.abort()  # no close frame: the TCP connection just dies
        await until(lambda: engine.active == 0)
        again = await exchange(url, pcm, SEEDED, realtime=False)
    assert np.array_equal(again.pcm, fresh.pcm) and again.texts == fresh.texts


GIB = 1024**3


@pytest.mark.parametrize(
    ("requested", "free_gib", "expected"),
    [
        (AUTO, 63.0, 32),  # an H100 after Moshiko's weights: (63 - 6 GiB of headroom) / 1.6 fits 35, capped
        (AUTO, 20.0, 8),  # (20 - 6) / 1.6
        (8, 63.0, 8),
    ],
)
def test_sessions_fit_free_gpu_memory_with_headroom(requested, free_gib, expected):
    assert fit_sessions(requested, free=int(free_gib * GIB), total=80 * GIB, per_slot=int(1.6 * GIB)) == expected


def test_sessions_that_do_not_fit_stop_with_the_number_that_would():
    with pytest.raises(CapacityError, match="40 conversation slots do not fit.*--sessions 35"):
        fit_sessions(40, free=63 * GIB, total=80 * GIB, per_slot=int(1.6 * GIB))
    with pytest.raises(CapacityError, match="not even one"):
        fit_sessions(AUTO, free=7 * GIB, total=80 * GIB, per_slot=int(1.6 * GIB))
