"""Streaming Ogg Opus: round trips of real speech, and garbage refused with OpusError."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import sphn

from moshi_engine.audio import FRAME_SIZE, SAMPLE_RATE, rms
from moshi_engine.wire.codec import OpusDecoder, OpusEncoder, OpusError, ogg_crc


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


def test_checksums_match_pages_written_by_another_implementation():
    # sphn (Rust's ogg crate) writes these pages; their CRC fields are the reference.
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    stream = b"".join(writer.append_pcm(np.full(FRAME_SIZE, 0.1 * i, dtype=np.float32)) for i in range(5))
    pages = list(_pages(stream))
    assert len(pages) >= 4
    for page in pages:
        blank = page[:22] + b"\0\0\0\0" + page[26:]
        assert ogg_crc(blank) == struct.unpack_from("<I", page, 22)[0]


def test_the_stream_is_standard_ogg_opus_that_moshis_reader_plays(hello_pcm):
    pcm = hello_pcm[: 25 * FRAME_SIZE]
    stream = b"".join(encode_frames(pcm))
    pages = list(_pages(stream))
    head, tags, audio = pages[0], pages[1], pages[2:]
    assert head[5] == 0x02 and all(page[5] == 0 for page in pages[1:])  # beginning of stream first, once
    assert _packet(head)[:8] == b"OpusHead" and _packet(head)[9] == 1  # mono
    assert struct.unpack_from("<I", _packet(head), 12)[0] == SAMPLE_RATE
    pre_skip = struct.unpack_from("<H", _packet(head), 10)[0]
    assert _packet(tags)[:8] == b"OpusTags"
    assert [struct.unpack_from("<I", page, 18)[0] for page in pages] == list(range(len(pages)))  # sequence
    granules = [struct.unpack_from("<q", page, 6)[0] for page in audio]
    assert granules == sorted(granules) and granules[-1] - pre_skip <= pcm.size * 2 <= granules[-1]
    # the reader moshi's own client uses plays it, the same length and the same speech
    played = sphn.OpusStreamReader(SAMPLE_RATE).append_bytes(stream)
    assert played.size == pcm.size
    best = max(np.corrcoef(pcm[: pcm.size - lag], played[lag:])[0, 1] for lag in range(0, 400, 4))
    assert best > 0.8


def test_pcm_in_pieces_of_any_size_is_encoded_once_20_ms_are_in(hello_pcm):
    encoder = OpusEncoder()
    headers = encoder.encode(np.zeros(0, dtype=np.float32))
    assert [page[:4] for page in _pages(headers)] == [b"OggS", b"OggS"]  # the headers alone
    assert encoder.encode(hello_pcm[:300]) == b""  # less than one 20 ms packet
    pages = list(_pages(encoder.encode(hello_pcm[300:1000])))
    assert len(pages) == 2  # 1000 samples: two 480-sample packets, 40 held for the next


def _pages(stream: bytes):
    start = 0
    while start < len(stream):
        segments = stream[start + 26]
        length = 27 + segments + sum(stream[start + 27 : start + 27 + segments])
        yield stream[start : start + length]
        start += length


def _packet(page: bytes) -> bytes:
    return page[27 + page[26] :]
