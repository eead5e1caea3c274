"""The FastRTC handler's pieces: the recording's timeline, the ICE configuration, and the
handler itself driven as FastRTC drives it (receive / emit / shutdown) on the tiny model."""

from __future__ import annotations

import asyncio
import json
import wave

import numpy as np
import pytest
from fastrtc import AdditionalOutputs, CloseStream
from fastrtc.utils import Context, current_context

from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE, pcm_to_int16, rms
from moshi_engine.conversation import Sampling, SessionLimits
from moshi_engine.page import ice
from moshi_engine.page.conversation_log import ConversationLog
from moshi_engine.page.endings import LEFT_LINE_MESSAGE, STARTING_MESSAGE, Ending, ending_message
from moshi_engine.page.ice import browser_rtc_configuration, ice_source, server_rtc_configuration
from moshi_engine.page.recording import Recording
from moshi_engine.page.rtc import MoshiHandler
from moshi_engine.page.ui import sampling_from_inputs
from tests.conftest import converse

CHUNK = 960  # what FastRTC hands receive() at 24 kHz: 40 ms of int16 [1, n]


# ## Recording


def tone(samples: int, value: float) -> np.ndarray:
    return np.full(samples, value, dtype=np.float32)


def test_moshi_frame_starts_where_the_microphone_is_when_it_plays():
    recording = Recording()
    recording.add_person(tone(SAMPLE_RATE, 0.1))  # one second of the person
    assert recording.add_moshi(tone(FRAME_SIZE, 0.5)) == SAMPLE_RATE
    recording.add_person(tone(SAMPLE_RATE, 0.1))  # Moshi quiet for a while
    assert recording.add_moshi(tone(FRAME_SIZE, 0.5)) == 2 * SAMPLE_RATE


def test_moshi_frames_in_a_burst_play_back_to_back():
    recording = Recording()
    recording.add_person(tone(4800, 0.1))
    starts = [recording.add_moshi(tone(FRAME_SIZE, 0.5)) for _ in range(3)]
    assert starts == [4800, 4800 + FRAME_SIZE, 4800 + 2 * FRAME_SIZE]
    recording.add_person(tone(3 * FRAME_SIZE, 0.1))
    moshi = recording.stereo()[:, 1]
    assert not moshi[:4800].any() and (moshi[4800:] == pcm_to_int16(tone(1, 0.5))[0]).all()


def test_the_recording_ends_with_the_microphone_and_leaves_out_what_was_never_heard():
    recording = Recording()
    recording.add_person(tone(SAMPLE_RATE, 0.1))
    recording.add_moshi(tone(FRAME_SIZE, 0.5))  # queued for playback when the person hung up
    recording.add_person(tone(FRAME_SIZE // 2, 0.1))
    stereo = recording.stereo()
    assert stereo.shape == (SAMPLE_RATE + FRAME_SIZE // 2, 2)
    assert (stereo[SAMPLE_RATE:, 1] == pcm_to_int16(tone(1, 0.5))[0]).all()  # the half that played


def test_recording_wav_is_stereo_person_left_moshi_right(tmp_path, hello_pcm):
    recording = Recording()
    person = hello_pcm[:SAMPLE_RATE]
    for start in range(0, person.size, CHUNK):
        recording.add_person(person[start : start + CHUNK])
    moshi = tone(FRAME_SIZE, -0.25)
    recording.add_moshi(moshi)
    recording.add_person(np.zeros(FRAME_SIZE, dtype=np.float32))  # the person listens while Moshi speaks
    path = tmp_path / "talk.wav"
    recording.write_wav(path)

    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, SAMPLE_RATE)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    assert samples.shape[0] == SAMPLE_RATE + FRAME_SIZE
    np.testing.assert_array_equal(samples[:SAMPLE_RATE, 0], pcm_to_int16(person))
    assert not samples[SAMPLE_RATE:, 0].any()  # the person is quiet while Moshi speaks
    assert not samples[:SAMPLE_RATE, 1].any()  # Moshi's channel is silent before it spoke
    np.testing.assert_array_equal(samples[SAMPLE_RATE:, 1], pcm_to_int16(moshi))
    assert recording.person_rms == pytest.approx(rms(np.concatenate([person, np.zeros(FRAME_SIZE)])), rel=1e-4)


# ## ICE servers

TURN_ENV = {
    "TURN_URLS": "turn:turn.example.org:3478, turns:turn.example.org:5349",
    "TURN_USERNAME": "u",
    "TURN_CREDENTIAL": "p",
}
CLOUDFLARE_ENV = {"CLOUDFLARE_TURN_KEY_ID": "key-id", "CLOUDFLARE_TURN_KEY_API_TOKEN": "key-token"}
TWILIO_ENV = {"TWILIO_ACCOUNT_SID": "AC123", "TWILIO_AUTH_TOKEN": "tw-token"}
HF_ENV = {"HF_TOKEN": "hf_abc"}


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_gets_no_ice_servers_whatever_is_configured(host):
    env = {**TURN_ENV, **CLOUDFLARE_ENV, **TWILIO_ENV, **HF_ENV}
    assert ice_source(host, env) == "none"
    assert asyncio.run(browser_rtc_configuration(host, env)) == {}
    assert server_rtc_configuration(host) == {"iceServers": []}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "stun"),
        (HF_ENV, "hf"),
        ({**HF_ENV, **TWILIO_ENV}, "twilio"),
        ({**HF_ENV, **TWILIO_ENV, **CLOUDFLARE_ENV}, "cloudflare"),
        ({**HF_ENV, **TWILIO_ENV, **CLOUDFLARE_ENV, **TURN_ENV}, "turn"),
        ({"HF_TOKEN": "  "}, "stun"),  # blank values count as unset
    ],
)
def test_ice_source_prefers_explicit_turn_then_services_then_hf_token(env, expected):
    assert ice_source("0.0.0.0", env) == expected


def test_a_half_set_turn_configuration_names_what_is_missing():
    with pytest.raises(ValueError, match="TURN_CREDENTIAL"):
        ice_source("0.0.0.0", {"TURN_URLS": "turn:x", "TURN_USERNAME": "u"})
    with pytest.raises(ValueError, match="CLOUDFLARE_TURN_KEY_API_TOKEN"):
        ice_source("example.org", {"CLOUDFLARE_TURN_KEY_ID": "k"})


def test_public_host_without_credentials_gets_public_stun_only():
    config = asyncio.run(browser_rtc_configuration("0.0.0.0", {}))
    assert config == {"iceServers": [{"urls": ["stun:stun.l.google.com:19302"]}]}
    assert server_rtc_configuration("0.0.0.0") == config


def test_stun_servers_can_be_chosen_or_left_out_for_a_network_without_internet():
    mine = {"MOSHI_STUN_URLS": "stun:stun.example.org:3478, stun:stun2.example.org:3478"}
    config = asyncio.run(browser_rtc_configuration("0.0.0.0", mine))
    assert config == {"iceServers": [{"urls": ["stun:stun.example.org:3478", "stun:stun2.example.org:3478"]}]}
    assert server_rtc_configuration("0.0.0.0", mine) == config
    # Set and empty: no STUN server to wait for, the host candidates only.
    assert ice_source("10.0.0.1", {"MOSHI_STUN_URLS": ""}) == "none"
    assert asyncio.run(browser_rtc_configuration("10.0.0.1", {"MOSHI_STUN_URLS": ""})) == {}
    assert server_rtc_configuration("10.0.0.1", {"MOSHI_STUN_URLS": " "}) == {"iceServers": []}
    # TURN still comes after whatever STUN is chosen.
    config = asyncio.run(browser_rtc_configuration("0.0.0.0", {**TURN_ENV, "MOSHI_STUN_URLS": ""}))
    assert [server["urls"] for server in config["iceServers"]] == [TURN_ENV["TURN_URLS"].replace(" ", "").split(",")]


def test_turn_urls_become_one_turn_server_with_its_credentials_after_stun():
    config = asyncio.run(browser_rtc_configuration("0.0.0.0", TURN_ENV))
    assert config["iceServers"][0]["urls"] == ["stun:stun.l.google.com:19302"]
    assert config["iceServers"][1] == {
        "urls": ["turn:turn.example.org:3478", "turns:turn.example.org:5349"],
        "username": "u",
        "credential": "p",
    }


class CredentialCalls:
    """Stands in for fastrtc's credential fetchers (network calls) and records how they were called."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    async def cloudflare(self, **kwargs):
        self.calls.append(("cloudflare", kwargs))
        return {"iceServers": [{"urls": ["turn:cf"], "username": "x", "credential": "y"}]}

    def twilio(self, **kwargs):
        self.calls.append(("twilio", kwargs))
        return {"iceServers": [{"urls": ["turn:tw"]}], "iceTransportPolicy": "relay"}


@pytest.fixture
def credentials(monkeypatch) -> CredentialCalls:
    fake = CredentialCalls()
    monkeypatch.setattr(ice, "get_cloudflare_turn_credentials_async", fake.cloudflare)
    monkeypatch.setattr(ice, "get_twilio_turn_credentials", fake.twilio)
    return fake


def test_cloudflare_keys_are_used_even_when_an_hf_token_is_set(credentials):
    config = asyncio.run(browser_rtc_configuration("0.0.0.0", {**HF_ENV, **CLOUDFLARE_ENV}))
    assert config["iceServers"][0]["urls"] == ["turn:cf"]
    # fastrtc prefers HF_TOKEN from the environment unless given an empty hf_token
    assert credentials.calls == [
        ("cloudflare", {"turn_key_id": "key-id", "turn_key_api_token": "key-token", "hf_token": ""})
    ]


def test_hf_token_gets_cloudflare_credentials_through_fastrtc(credentials):
    asyncio.run(browser_rtc_configuration("0.0.0.0", HF_ENV))
    assert credentials.calls == [("cloudflare", {"hf_token": "hf_abc"})]


def test_twilio_credentials_come_from_the_twilio_variables(credentials):
    config = asyncio.run(browser_rtc_configuration("0.0.0.0", TWILIO_ENV))
    assert config["iceTransportPolicy"] == "relay"
    assert credentials.calls == [("twilio", {"twilio_sid": "AC123", "twilio_token": "tw-token"})]


def test_a_failed_credential_fetch_falls_back_to_stun(monkeypatch):
    async def unreachable(**kwargs):
        raise ConnectionError("no route to turn.fastrtc.org")

    monkeypatch.setattr(ice, "get_cloudflare_turn_credentials_async", unreachable)
    config = asyncio.run(browser_rtc_configuration("0.0.0.0", HF_ENV))
    assert config == {"iceServers": [{"urls": ["stun:stun.l.google.com:19302"]}]}


# ## The handler, driven as FastRTC drives it


@pytest.fixture
def conversations(tmp_path) -> ConversationLog:
    return ConversationLog(tmp_path / "recordings")


def connection(handler: MoshiHandler, webrtc_id: str, page_inputs: list | None = None) -> MoshiHandler:
    """A per-connection copy, set up as FastRTC sets one up before start_up()."""
    current_context.set(Context(webrtc_id=webrtc_id))
    copy = handler.copy()
    if page_inputs is not None:  # what the page's tick event sends: its WebRTC value, then the inputs
        copy.set_args([webrtc_id, *page_inputs])
    return copy


async def talk(handler: MoshiHandler, pcm: np.ndarray) -> tuple[list, list[str]]:
    """Feed pcm as FastRTC does (40 ms int16 chunks) at the pace of a live call, where
    Moshi's answer to one 80 ms frame comes while the next is recorded, then one frame
    of silence while Moshi finishes: returns the audio emitted (one frame per frame of
    pcm) and the transcripts emitted."""
    samples = pcm_to_int16(pcm).reshape(1, -1)
    frames = samples.shape[1] // FRAME_SIZE
    samples = np.concatenate([samples[:, : frames * FRAME_SIZE], np.zeros((1, FRAME_SIZE), np.int16)], axis=1)
    audio, transcripts = [], []
    for index in range(frames + 1):
        for start in range(index * FRAME_SIZE, (index + 1) * FRAME_SIZE, CHUNK):
            await handler.receive((SAMPLE_RATE, samples[:, start : start + CHUNK]))
        while len(audio) < index:  # Moshi's first step answers nothing
            out = await asyncio.wait_for(handler.emit(), timeout=30)
            if isinstance(out, AdditionalOutputs):
                transcripts.append(out.args[0])
            else:
                assert not isinstance(out, CloseStream), out.msg
                audio.append(out)
    return audio, transcripts


async def wait_for(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_handler_answers_microphone_audio_with_24khz_frames_and_a_growing_transcript(
    tiny_engine, conversations, hello_pcm
):
    handler = connection(MoshiHandler(tiny_engine.acquire, conversations), "talk")
    await handler.start_up()
    audio, transcripts = await talk(handler, hello_pcm[: 3 * SAMPLE_RATE])
    await handler.shutdown()

    for rate, frame in audio:
        assert rate == SAMPLE_RATE and frame.dtype == np.float32 and frame.shape == (1, FRAME_SIZE)
    assert rms(np.concatenate([frame[0] for _, frame in audio])) > 0.01
    assert transcripts and transcripts[-1]
    assert all(later.startswith(earlier) for earlier, later in zip(transcripts, transcripts[1:], strict=False))


async def test_the_pages_sampling_settings_reach_the_model(tiny_engine, conversations, hello_pcm):
    pcm = hello_pcm[: 2 * SAMPLE_RATE]
    inputs = [1.1, 40, 0.9, 7, 1234]  # audio temp, audio top-k, text temp, text top-k, seed
    handler = connection(
        MoshiHandler(tiny_engine.acquire, conversations, sampling_from_args=sampling_from_inputs), "seeded", inputs
    )
    await handler.start_up()
    audio, _ = await talk(handler, pcm)
    await handler.shutdown()
    assert handler.record.sampling == Sampling(temp=1.1, top_k=40, temp_text=0.9, top_k_text=7, seed=1234)

    async with tiny_engine.session(Sampling(temp=1.1, top_k=40, temp_text=0.9, top_k_text=7, seed=1234)) as session:
        direct, _ = await converse(session, pcm)
    # the same frames from the handler as from a session opened directly with those settings
    np.testing.assert_array_equal(np.concatenate([frame[0] for _, frame in audio])[: direct.size], direct)


async def test_stopping_releases_the_slot_and_files_a_recording_of_both_sides(
    single_engine, conversations, hello_pcm
):
    handler = connection(MoshiHandler(single_engine.acquire, conversations), "stop")
    await handler.start_up()
    assert single_engine.active == 1
    pcm = hello_pcm[: 2 * SAMPLE_RATE]
    audio, _ = await talk(handler, pcm)
    await handler.shutdown()  # what FastRTC calls when the connection closes

    assert single_engine.active == 0
    record = conversations.get("stop")
    assert record.ending is Ending.STOPPED and record.recording.exists()
    with wave.open(str(record.recording), "rb") as wav:
        assert wav.getnchannels() == 2 and wav.getframerate() == SAMPLE_RATE
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    # left: every microphone sample; right: Moshi's answer to frame k plays during frame k + 2
    assert samples.shape[0] == record.person_samples == pcm.size + FRAME_SIZE  # + the silent frame
    assert record.person_rms > 0.01
    sent = pcm_to_int16(pcm).astype(np.int32)  # to float and back to int16: within one step
    assert np.abs(samples[: pcm.size, 0] - sent).max() <= 1
    played = pcm_to_int16(np.concatenate([frame[0] for _, frame in audio]))
    assert record.moshi_frames == len(audio) == pcm.size // FRAME_SIZE
    assert not samples[: 2 * FRAME_SIZE, 1].any()
    np.testing.assert_array_equal(samples[2 * FRAME_SIZE :, 1], played[: samples.shape[0] - 2 * FRAME_SIZE])


async def test_an_ending_is_filed_only_once_the_recording_is_saved(single_engine, conversations, hello_pcm,
                                                                   monkeypatch):
    handler = connection(MoshiHandler(single_engine.acquire, conversations), "filed")
    await handler.start_up()
    await talk(handler, hello_pcm[:SAMPLE_RATE])
    ended_while_writing = []
    write_wav = Recording.write_wav

    def watched_write(recording, path):
        ended_while_writing.append(conversations.get("filed").ended)
        write_wav(recording, path)

    monkeypatch.setattr(Recording, "write_wav", watched_write)
    await handler.shutdown()
    # the page shows an ending once: had it seen this one while the WAV was written, the
    # conversation would have had no download link
    assert ended_while_writing == [False]
    record = conversations.get("filed")
    assert record.ended and record.recording.exists()


async def test_a_visitor_in_line_hears_its_place_starts_by_itself_and_stop_leaves_the_line(
    single_engine, conversations, hello_pcm
):
    held = await single_engine.acquire()  # someone else's conversation holds the only slot
    waiting = connection(MoshiHandler(single_engine.acquire, conversations), "in-line")
    starting = asyncio.create_task(waiting.start_up())
    await wait_for(lambda: conversations.get("in-line") and conversations.get("in-line").line)
    assert conversations.get("in-line").line.position == 1 and single_engine.line.waiting == 1
    await held.close()  # the slot frees up: the visitor's conversation starts by itself
    await asyncio.wait_for(starting, timeout=5)
    assert single_engine.active == 1 and conversations.get("in-line").line is None
    audio, _ = await talk(waiting, hello_pcm[:SAMPLE_RATE])
    assert audio
    await waiting.shutdown()

    held = await single_engine.acquire()
    leaving = connection(MoshiHandler(single_engine.acquire, conversations), "leaves")
    starting = asyncio.create_task(leaving.start_up())
    await wait_for(lambda: single_engine.line.waiting == 1)
    await leaving.shutdown()  # Stop while in line
    await asyncio.wait_for(starting, timeout=5)
    record = conversations.get("leaves")
    assert single_engine.line.waiting == 0 and single_engine.active == 1  # only the held slot
    assert record.ending is Ending.STOPPED and record.message == LEFT_LINE_MESSAGE and record.line is None
    await held.close()
    assert single_engine.active == 0


async def test_a_restart_ends_live_and_waiting_visitors_with_its_message(single_engine, conversations, hello_pcm):
    talking = connection(MoshiHandler(single_engine.acquire, conversations), "talking")
    await talking.start_up()
    await talk(talking, hello_pcm[: SAMPLE_RATE // 2])
    waiting = connection(MoshiHandler(single_engine.acquire, conversations), "waiting")
    starting = asyncio.create_task(waiting.start_up())
    await wait_for(lambda: single_engine.line.waiting == 1)
    await conversations.drain("the server is restarting")
    await asyncio.wait_for(starting, timeout=5)
    for handler in (talking, waiting):
        out = await asyncio.wait_for(handler.emit(), timeout=5)
        assert isinstance(out, CloseStream) and out.msg == ending_message(Ending.RESTART)
        await handler.shutdown()
    assert single_engine.active == 0 and single_engine.line.waiting == 0 and not conversations.live


async def test_busy_backend_with_no_room_in_line_closes_the_stream_with_the_busy_message(
    single_engine, conversations, monkeypatch
):
    monkeypatch.setattr(single_engine.line, "places", 0)  # --queue 0: refuse at once
    held = single_engine.open_session()
    try:
        handler = connection(MoshiHandler(single_engine.acquire, conversations), "busy")
        await handler.start_up()
        out = await asyncio.wait_for(handler.emit(), timeout=5)
        assert isinstance(out, CloseStream)
        assert out.msg == ending_message(Ending.BUSY)
        record = conversations.get("busy")
        assert record.ending is Ending.BUSY and record.recording is None
        assert single_engine.active == 1  # only the session held here
        await handler.shutdown()
    finally:
        await held.close()
    assert single_engine.active == 0


async def test_time_limit_ends_the_conversation_and_says_so(single_engine, conversations, hello_pcm):
    limits = SessionLimits(max_session_s=1.0)
    handler = connection(MoshiHandler(single_engine.acquire, conversations, limits=limits), "limit")
    await handler.start_up()
    samples = pcm_to_int16(hello_pcm).reshape(1, -1)
    outputs = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(20):
        for index, start in enumerate(range(0, samples.shape[1], CHUNK)):  # real time: the limit runs on the clock
            await handler.receive((SAMPLE_RATE, samples[:, start : start + CHUNK]))
            await asyncio.sleep(max(0.0, began + (index + 1) * CHUNK / SAMPLE_RATE - loop.time()))
            if handler.record.ended:
                break
        while not isinstance(out := await handler.emit(), CloseStream):
            outputs.append(out)
    assert out.msg.startswith("Time is up: a conversation lasts at most 1 s.")
    assert single_engine.active == 0
    record = conversations.get("limit")
    assert record.ending is Ending.TIME_LIMIT
    assert 0 < record.person_samples <= 1.5 * SAMPLE_RATE  # heard until the limit, not beyond
    await handler.shutdown()


async def test_a_silent_microphone_ends_the_conversation_after_the_idle_time(single_engine, conversations):
    limits = SessionLimits(idle_s=0.3)
    handler = connection(MoshiHandler(single_engine.acquire, conversations, limits=limits), "idle")
    await handler.start_up()
    out = await asyncio.wait_for(handler.emit(), timeout=5)
    assert isinstance(out, CloseStream) and "no microphone audio arrived for 0.3 s" in out.msg
    await wait_for(lambda: single_engine.active == 0)
    await handler.shutdown()


async def test_emit_waits_for_moshi_instead_of_returning_nothing(single_engine, conversations):
    handler = connection(MoshiHandler(single_engine.acquire, conversations), "wait")
    await handler.start_up()
    # no microphone audio yet, so nothing to say: emit must wait, not return None in a loop
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(handler.emit(), timeout=0.3)
    await handler.shutdown()
    assert single_engine.active == 0


class ChannelMessages:
    """The server's end of the data channel: what the handler tells the page."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, message: str) -> None:
        self.sent.append(json.loads(message))


async def test_a_slow_start_tells_the_page_that_moshi_is_starting(single_engine, conversations):
    unblock = asyncio.Event()

    async def open_slowly(sampling, on_position):
        """A session whose start takes its time, as a remote worker starting from cold does."""
        session = await single_engine.acquire(sampling, on_position)
        ready = session.start

        async def start() -> None:
            await unblock.wait()
            await ready()

        session.start = start
        return session

    handler = connection(MoshiHandler(open_slowly, conversations, slow_start_s=0.2), "slow")
    channel = ChannelMessages()
    handler.set_channel(channel)
    starting = asyncio.create_task(handler.start_up())
    await wait_for(lambda: channel.sent)
    unblock.set()
    await asyncio.wait_for(starting, timeout=10)
    assert channel.sent == [{"type": "warning", "data": STARTING_MESSAGE}]
    assert single_engine.active == 1 and not handler.record.ended  # slow, but started
    await handler.shutdown()
    assert single_engine.active == 0


async def test_invalid_sampling_settings_end_with_a_message_and_lease_nothing(single_engine, conversations):
    handler = connection(
        MoshiHandler(single_engine.acquire, conversations, sampling_from_args=sampling_from_inputs),
        "invalid",
        [0.8, 0, 0.7, 25, -1],  # audio top-k 0
    )
    await handler.start_up()
    out = await asyncio.wait_for(handler.emit(), timeout=5)
    assert isinstance(out, CloseStream) and "invalid sampling settings" in out.msg and "top_k" in out.msg
    assert conversations.get("invalid").ending is Ending.ERROR
    assert single_engine.active == 0
    await handler.shutdown()


async def test_stop_while_the_page_has_not_sent_its_settings_leases_nothing(single_engine, conversations):
    handler = connection(
        MoshiHandler(single_engine.acquire, conversations, sampling_from_args=sampling_from_inputs), "early"
    )
    starting = asyncio.create_task(handler.start_up())  # waits for the page's inputs
    await wait_for(lambda: handler.record is not None)
    await handler.shutdown()
    await asyncio.wait_for(starting, timeout=5)
    assert single_engine.active == 0
    assert conversations.get("early").ending is Ending.STOPPED


def test_the_log_forgets_old_conversations_and_deletes_their_recordings(tmp_path):
    log = ConversationLog(tmp_path, keep=2)
    first = log.open("id0")
    path = first.recording = log.recording_path(first)
    path.write_bytes(b"RIFF")
    log.open("id1")
    log.open("id2")
    assert log.get("id0") is None and log.get("id1") is not None and len(log) == 2
    assert not path.exists() and first.recording is None


async def test_a_recording_is_its_browsers_alone_and_deleted_after_its_time(tmp_path):
    log = ConversationLog(tmp_path / "recordings", recording_ttl_s=0.2)
    record = log.open("webrtc-id")
    assert log.claim("webrtc-id", "browser-a") is record  # the page that made the connection asks first
    assert log.claim("webrtc-id", "browser-b") is None  # another browser learns nothing of it
    path = log.recording_path(record)
    path.write_bytes(b"RIFF")
    log.saved(record, path)
    assert log.recording_for(record.download_id, "browser-a") is record
    assert log.recording_for(record.download_id, "browser-b") is None
    assert log.recording_for(record.download_id, None) is None
    assert log.recording_for("guessed", "browser-a") is None
    await wait_for(lambda: not path.exists())  # 0.2 s after the conversation
    assert log.recording_for(record.download_id, "browser-a") is None
    log.close()
    assert not (tmp_path / "recordings").exists()
