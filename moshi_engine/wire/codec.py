"""Streaming Ogg Opus: pcm in, Ogg pages out, and back.

Every transport of this package (websockets, the remote FastRTC mode) moves
audio as Ogg Opus pages, as QuiLLMan and moshi's reference server do. The
decoder checks each page's framing and CRC before sphn sees it, so bytes that
are not Ogg fail loudly with `OpusError` instead of being skipped or buffered
without end.

The encoder is libopus through PyAV, which encodes without holding the GIL;
sphn's writer holds it, for about 1.2 ms of every 80 ms frame. A server encodes
every conversation's answer on its event loop while the model's stepping thread
needs the interpreter too: at 12 conversations sphn's encoding was a quarter of
the server's interpreter time (py-spy), taken from the steps. Decoding stays
with sphn (0.1 ms a frame).
"""

from __future__ import annotations

import fractions
import secrets
import struct
import zlib

import av
import numpy as np
import sphn

from ..audio import SAMPLE_RATE

_CAPTURE = b"OggS"
_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, seq, crc, segments
_MAX_PAGE = _HEADER.size + 255 + 255 * 255
_GRANULE_RATE = 48_000  # Ogg Opus counts granule positions at 48 kHz whatever the input rate
# What the encoder aims at: libopus' own choice for 24 kHz mono speech (and sphn's), about
# 24 kbps, SILK+CELT hybrid; plenty for Mimi's audio, and light on a phone's uplink.
OPUS_BITRATE = 24_000
_VENDOR = b"moshi_engine"


class OpusError(ValueError):
    """Bytes that are not a valid Ogg Opus stream."""


_BIT_REVERSED = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def ogg_crc(data: bytes | bytearray) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, unreflected, init 0, no final xor).

    zlib computes the reflected CRC-32 of the same polynomial, in C: the Ogg CRC of `data` is
    the bit-reversal of the reflected CRC (init 0) of `data` with each byte bit-reversed, and
    zlib's init and final xor of 0xFFFFFFFF cancel against the CRC of as many zero bytes.
    """
    reflected = zlib.crc32(data.translate(_BIT_REVERSED)) ^ zlib.crc32(bytes(len(data)))
    return int(f"{reflected:032b}"[::-1], 2)


def _page_length(buffer: bytes | bytearray, start: int) -> int | None:
    """Length of the Ogg page at `start`, None if it is not complete yet; OpusError if malformed."""
    available = len(buffer) - start
    if available < _HEADER.size:
        if not _CAPTURE.startswith(bytes(buffer[start : start + 4])):
            raise OpusError("not an Ogg page: missing the 'OggS' capture pattern")
        return None
    capture, version, _, _, _, _, crc, segments = _HEADER.unpack_from(buffer, start)
    if capture != _CAPTURE:
        raise OpusError("not an Ogg page: missing the 'OggS' capture pattern")
    if version != 0:
        raise OpusError(f"unsupported Ogg version {version}")
    header_end = start + _HEADER.size + segments
    if len(buffer) < header_end:
        return None
    length = _HEADER.size + segments + sum(buffer[start + _HEADER.size : header_end])
    if available < length:
        return None
    page = bytearray(buffer[start : start + length])
    page[22:26] = b"\0\0\0\0"
    if ogg_crc(page) != crc:
        raise OpusError("corrupt Ogg page: checksum mismatch")
    return length


def ogg_page(packet: bytes, granule: int, serial: int, sequence: int, first: bool = False) -> bytes:
    """One Ogg page holding one whole packet (shorter than 65 025 bytes, as any Opus packet is)."""
    lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
    header = _HEADER.pack(_CAPTURE, 0, 0x02 if first else 0, granule, serial, sequence, 0, len(lacing))
    page = header + lacing + packet
    return page[:22] + struct.pack("<I", ogg_crc(page)) + page[26:]


class OpusEncoder:
    """pcm -> Ogg Opus pages, one stream per encoder: its first bytes carry the headers
    (OpusHead, OpusTags), then one page per 20 ms packet."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, bitrate: int = OPUS_BITRATE) -> None:
        self.sample_rate = sample_rate
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = sample_rate
        codec.format = "flt"
        codec.layout = "mono"
        codec.time_base = fractions.Fraction(1, sample_rate)
        codec.bit_rate = bitrate
        codec.options = {"application": "voip"}
        codec.open()
        self._codec = codec
        self._serial = secrets.randbits(32)
        self._sequence = 0
        self._granule = 0
        self._samples = 0
        opus_tags = b"OpusTags" + struct.pack("<I", len(_VENDOR)) + _VENDOR + struct.pack("<I", 0)
        # libopus' OpusHead as FFmpeg builds it: channels, pre-skip (its lookahead), input rate.
        self._pending = self._page(bytes(codec.extradata), first=True) + self._page(opus_tags)

    def _page(self, packet: bytes, first: bool = False) -> bytes:
        page = ogg_page(packet, self._granule, self._serial, self._sequence, first)
        self._sequence += 1
        return page

    def encode(self, pcm: np.ndarray) -> bytes:
        """Append pcm to the stream; returns the Ogg bytes completed so far (possibly empty:
        libopus takes 20 ms at a time)."""
        pcm = np.ascontiguousarray(pcm, dtype=np.float32).reshape(1, -1)
        pages = [self._pending]
        self._pending = b""
        if pcm.size:
            frame = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._samples
            self._samples += pcm.size
            for packet in self._codec.encode(frame):
                self._granule += packet.duration * _GRANULE_RATE // self.sample_rate
                pages.append(self._page(bytes(packet)))
        return b"".join(pages)


class OpusDecoder:
    """Ogg Opus bytes (in chunks of any size) -> pcm, checking every page first."""

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self.sample_rate = sample_rate
        self._reader = sphn.OpusStreamReader(sample_rate)
        self._pending = bytearray()

    def decode(self, data: bytes) -> np.ndarray:
        """Feed bytes; returns the pcm decoded so far (possibly empty). Raises OpusError."""
        self._pending += data
        start = 0
        while start < len(self._pending):
            length = _page_length(self._pending, start)
            if length is None:
                break
            start += length
        if len(self._pending) - start > _MAX_PAGE:
            raise OpusError("Ogg page larger than the format allows")
        pages = bytes(self._pending[:start])
        del self._pending[:start]
        if not pages:
            return np.zeros(0, dtype=np.float32)
        try:
            return self._reader.append_bytes(pages)
        except Exception as error:  # sphn reports bad streams as ValueError, Rust panics otherwise
            raise OpusError(f"invalid Opus stream: {error}") from error
