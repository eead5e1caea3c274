"""Opus over WebRTC under loss (page/opus_rtp.py): the answer asks the browser for in-band FEC,
the server's encoder sends it, and the receive buffer and decoder rebuild lost packets from it
without adding delay. Real libopus, real aiortc peer connections, real speech."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.codecs import get_encoder
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket
from av import AudioFrame

from moshi_engine.page.opus_rtp import (
    PACKET_SAMPLES,
    FecOpusDecoder,
    OpusJitterBuffer,
    has_fec,
    use_fec_opus,
)

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


@pytest.fixture(scope="module", autouse=True)
def fec_opus():
    use_fec_opus()


def speech_packets(pcm_24k: np.ndarray, encoder=None) -> list[bytes]:
    """The speech as the server's WebRTC sender encodes it (or `encoder`): 48 kHz stereo s16, 20 ms packets."""
    import aiortc.rtcrtpsender

    encoder = encoder or aiortc.rtcrtpsender.get_encoder(OPUS)
    samples = (np.repeat(pcm_24k, 2) * 32767).astype(np.int16)
    packets = []
    for start in range(0, samples.size - PACKET_SAMPLES + 1, PACKET_SAMPLES):
        mono = samples[start : start + PACKET_SAMPLES]
        frame = AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = start
        payloads, _ = encoder.encode(frame)
        packets += payloads
    return packets


def rtp(seq: int, payload: bytes) -> RtpPacket:
    packet = RtpPacket(payload_type=111, sequence_number=seq & 0xFFFF, timestamp=(seq * PACKET_SAMPLES) & 0xFFFFFFFF)
    packet._data = payload
    return packet


def receive(packets: list[RtpPacket]) -> tuple[OpusJitterBuffer, list[AudioFrame], list[int]]:
    """Through the buffer and the decoder as aiortc's receiver does; also how many frames each add gave."""
    buffer, decoder = OpusJitterBuffer(), FecOpusDecoder()
    frames, released = [], []
    for packet in packets:
        _, burst = buffer.add(packet)
        got = decoder.decode(burst) if burst is not None else []
        released.append(len(got))
        frames += got
    return buffer, frames, released


def test_the_answer_asks_the_browser_for_fec():
    async def answer_sdp() -> str:
        browser, server = RTCPeerConnection(), RTCPeerConnection()
        try:
            browser.addTrack(AudioStreamTrack())
            await browser.setLocalDescription(await browser.createOffer())
            await server.setRemoteDescription(browser.localDescription)
            server.addTrack(AudioStreamTrack())
            await server.setLocalDescription(await server.createAnswer())
            return server.localDescription.sdp
        finally:
            await browser.close()
            await server.close()

    sdp = asyncio.run(answer_sdp())
    opus_type = next(line.split()[0].split(":")[1] for line in sdp.splitlines() if "opus/48000/2" in line)
    assert f"a=fmtp:{opus_type} useinbandfec=1" in sdp


def test_the_servers_encoder_sends_fec_with_moshis_voice(hello_pcm):
    packets = speech_packets(hello_pcm)
    assert len(packets) > 50
    assert sum(map(has_fec, packets)) > 0.6 * len(packets)  # all but the silences around the words
    plain = speech_packets(hello_pcm, get_encoder(OPUS))  # aiortc's own: 96 kb/s, no FEC at all
    assert not any(map(has_fec, plain))


def test_lost_packets_are_rebuilt_from_fec_and_the_stream_keeps_its_timing(hello_pcm):
    payloads = speech_packets(hello_pcm)
    rng = random.Random(5)
    dropped = {i for i in range(1, len(payloads)) if rng.random() < 0.05}
    dropped -= {i + 1 for i in dropped}  # single losses: each next packet carries the lost one's FEC
    buffer, frames, released = receive([rtp(i, p) for i, p in enumerate(payloads) if i not in dropped])

    counts = buffer.counts
    assert counts.lost == len(dropped) > 0
    with_fec = sum(has_fec(payloads[i + 1]) for i in dropped if i + 1 < len(payloads))
    assert counts.recovered == with_fec > 0 and counts.concealed == len(dropped) - with_fec
    # Every 20 ms is there, rebuilt or concealed where it was lost, except what trails the last packet.
    assert sum(frame.samples for frame in frames) == (len(payloads) - len(dropped) + counts.lost) * PACKET_SAMPLES


def test_the_buffer_adds_no_delay_and_waits_for_a_reordered_packet_only_briefly(hello_pcm):
    payloads = speech_packets(hello_pcm)[:20]
    # In order: each packet goes on as it arrives.
    _, _, released = receive([rtp(i, p) for i, p in enumerate(payloads)])
    assert released == [1] * 20
    # Two swapped: the later one waits for the earlier, then both go, nothing lost.
    order = [0, 1, 3, 2, *range(4, 20)]
    buffer, frames, released = receive([rtp(i, payloads[i]) for i in order])
    assert released[2:4] == [0, 2] and buffer.counts.lost == 0
    assert sum(frame.samples for frame in frames) == 20 * PACKET_SAMPLES
    # One that comes after two later ones were handed on was given up, then dropped as late.
    order = [0, 1, 3, 4, 5, 2, *range(6, 20)]
    buffer, _, released = receive([rtp(i, payloads[i]) for i in order])
    assert buffer.counts.lost == 1 and buffer.counts.late == 1 and buffer.counts.received == 19
    assert released[3] == 0 and released[4] == 3  # given up once two later packets waited behind it


def test_sequence_numbers_wrap_around(hello_pcm):
    payloads = speech_packets(hello_pcm)[:10]
    buffer, frames, _ = receive([rtp(0xFFFF - 4 + i, p) for i, p in enumerate(payloads)])
    assert buffer.counts.received == 10 and buffer.counts.lost == 0 and len(frames) == 10
