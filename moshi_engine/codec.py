"""Streaming Ogg Opus over sphn 0.2: pcm in, Ogg pages out, and back.

Every transport of this package (websockets, the remote FastRTC mode) moves
audio as Ogg Opus pages, as QuiLLMan and moshi's reference server do. The
decoder checks each page's framing and CRC before sphn sees it, so bytes that
are not Ogg fail loudly with `OpusError` instead of being skipped or buffered
without end.
"""

from __future__ import annotations

import struct

import numpy as np
import sphn

from .audio import SAMPLE_RATE

_CAPTURE = b"OggS"
_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, seq, crc, segments
_MAX_PAGE = _HEADER.size + 255 + 255 * 255


class OpusError(ValueError):
    """Bytes that are not a valid Ogg Opus stream."""


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
        table.append(crc & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def ogg_crc(data: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, unreflected, init 0)."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


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


class OpusEncoder:
    """pcm -> Ogg Opus pages, one stream per encoder (its first pages carry the headers)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self.sample_rate = sample_rate
        self._writer = sphn.OpusStreamWriter(sample_rate)

    def encode(self, pcm: np.ndarray) -> bytes:
        """Append pcm to the stream; returns the Ogg bytes completed so far (possibly empty)."""
        return self._writer.append_pcm(np.ascontiguousarray(pcm, dtype=np.float32))


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
