"""Streaming Ogg Opus: round trips of real speech, and garbage refused with OpusError."""

from __future__ import annotations

import numpy as np
import pytest

from moshi_engine.audio import FRAME_SIZE, rms
from moshi_engine.codec import OpusDecoder, OpusEncoder, OpusError


def encode_frames(pcm: np.ndarray) -> list[bytes]:
    encoder = OpusEncoder()
    return [encoder.encode(pcm[i : i + FRAME_SIZE]) for i in range(0, pcm.size, FRAME_SIZE)]


def test_round_trip_of_speech_keeps_length_and_energy(hello_pcm):
    pcm = hello_pcm[: (hello_pcm.size // FRAME_SIZE) * FRAME_SIZE]
    decoder = OpusDecoder()
    decoded = np.concatenate([decoder.decode(page) for page in encode_frames(pcm)])
    assert decoded.dtype == np.float32
    assert abs(decoded.size - pcm.size) <= FRAME_SIZE
    n = min(decoded.size, pcm.size)
    assert rms(decoded[:n]) / rms(pcm[:n]) > 0.8
    # it is the same speech, not merely as loud: strongly correlated once aligned
    best = max(np.corrcoef(pcm[: n - lag], decoded[lag:n])[0, 1] for lag in range(0, 400, 4))
    assert best > 0.8


def test_pages_split_anywhere_decode_the_same(hello_pcm):
    stream = b"".join(encode_frames(hello_pcm[: 40 * FRAME_SIZE]))
    whole = OpusDecoder().decode(stream)
    decoder = OpusDecoder()
    pieces = [decoder.decode(stream[i : i + 77]) for i in range(0, len(stream), 77)]
    assert np.array_equal(np.concatenate(pieces), whole)


@pytest.mark.parametrize("garbage", [b"hello, not opus", bytes(range(256)), b"\x00" * 64, b"OggS\x01" + b"\x00" * 40])
def test_garbage_bytes_raise_opus_error(garbage):
    with pytest.raises(OpusError):
        OpusDecoder().decode(garbage)


def test_a_corrupted_page_in_a_good_stream_raises_opus_error(hello_pcm):
    pages = encode_frames(hello_pcm[: 10 * FRAME_SIZE])
    decoder = OpusDecoder()
    decoder.decode(pages[0])
    corrupted = bytearray(pages[3])
    corrupted[-5] ^= 0xFF
    with pytest.raises(OpusError, match="checksum"):
        decoder.decode(bytes(corrupted))


def test_endless_bytes_without_a_page_boundary_are_refused():
    decoder = OpusDecoder()
    header = b"OggS\x00\x02" + b"\x00" * 20 + b"\xff" + b"\xff" * 255  # claims a 65 kB page
    decoder.decode(header)
    with pytest.raises(OpusError):
        for _ in range(300):
            decoder.decode(b"\x00" * 1000)
