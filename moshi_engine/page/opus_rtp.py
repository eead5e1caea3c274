"""Opus over WebRTC that holds up under loss: in-band FEC both ways, and a receive buffer that
does not stall.

aiortc (under FastRTC) answers the browser's offer without `useinbandfec=1`, so Chrome and
Firefox send no FEC; its encoder runs without FEC; its decoder cannot use FEC (FFmpeg's libopus
decoder has no FEC call); and its audio jitter buffer stops at a lost packet until 16 packets
have piled up behind it, then goes on 300 ms late for the rest of the call (aiortc issue 543).

`use_fec_opus()` (idempotent, for every connection of this process) changes that:

- The answer's Opus carries `useinbandfec=1`: the browser adds to each packet a low-bitrate
  copy of the one before (Opus LBRR), and the server's encoder does the same for the browser
  (`fec`, with `EXPECTED_LOSS_PERCENT` expected loss, at a speech bitrate: FEC lives in Opus's
  SILK layer, which a 96 kb/s stream does not use).
- The receive buffer hands on each packet as soon as it is next in order; a missing one is
  waited for while at most `REORDER_PACKETS` later ones have arrived (40 ms), then given up.
  So it adds no delay at all without loss and 40 ms at most at a loss, and goes back to none.
- The decoder (libopus itself, the copy that PyAV ships) rebuilds the packet just lost from the
  next one's FEC data, and conceals (PLC) any before it, so the stream keeps its timing.

What became of the visitor's packets is counted per connection (`ReceiveCounts`): received,
lost, recovered by FEC, concealed, late; `receive_counts(pc)` finds a connection's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fractions
import glob
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 48_000  # RTP's Opus clock
CHANNELS = 2  # opus/48000/2, as aiortc decodes and encodes it
PACKET_SAMPLES = 960  # 20 ms, what browsers send
REORDER_PACKETS = 2  # later packets that may arrive before a missing one is given up
EXPECTED_LOSS_PERCENT = 10  # what the server's encoder protects against
SPEECH_BITRATE = 32_000  # b/s: Moshi's voice (24 kHz) at a rate where Opus uses SILK, and so FEC
_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)


# ## libopus, the copy PyAV ships (or the system's)


def _find_libopus() -> str:
    import av

    bundled = sorted(glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libopus*.so*")))
    if bundled:
        return bundled[0]
    for name in ("libopus.so.0", "libopus.so", "libopus.0.dylib"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    raise OSError("no libopus found: neither PyAV's own copy nor the system's (Debian: libopus0)")


_lib: ctypes.CDLL | None = None


def libopus() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(_find_libopus())
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_decode.restype = ctypes.c_int
        lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                    ctypes.POINTER(ctypes.c_int16), ctypes.c_int, ctypes.c_int]
        lib.opus_packet_has_lbrr.restype = ctypes.c_int
        lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
        lib.opus_packet_get_nb_samples.restype = ctypes.c_int
        lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
        _lib = lib
    return _lib


def has_fec(packet: bytes) -> bool:
    """Whether this Opus packet carries FEC data for the one before it (LBRR)."""
    return bool(packet) and libopus().opus_packet_has_lbrr(packet, len(packet)) == 1


class OpusPacketDecoder:
    """libopus's decoder, 48 kHz stereo int16: a packet, FEC for the one before, or concealment."""

    def __init__(self) -> None:
        error = ctypes.c_int()
        self._state = libopus().opus_decoder_create(SAMPLE_RATE, CHANNELS, ctypes.byref(error))
        if error.value != 0 or not self._state:
            raise RuntimeError(f"opus_decoder_create failed ({error.value})")
        self._pcm = np.zeros(SAMPLE_RATE // 50 * 6 * CHANNELS, dtype=np.int16)  # 120 ms, Opus's longest

    def _decode(self, data: bytes | None, samples: int, fec: bool) -> np.ndarray:
        pointer = self._pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_int16))
        got = libopus().opus_decode(self._state, data, len(data) if data else 0, pointer, samples, int(fec))
        if got < 0:
            raise ValueError(f"opus_decode failed ({got})")
        return self._pcm[: got * CHANNELS].copy()

    def decode(self, packet: bytes) -> np.ndarray:
        return self._decode(packet, len(self._pcm) // CHANNELS, fec=False)

    def recover(self, next_packet: bytes, samples: int = PACKET_SAMPLES) -> np.ndarray:
        """The lost packet before `next_packet`, from its FEC data (concealed where it has none)."""
        return self._decode(next_packet, samples, fec=True)

    def conceal(self, samples: int = PACKET_SAMPLES) -> np.ndarray:
        return self._decode(None, samples, fec=False)

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            libopus().opus_decoder_destroy(self._state)
            self._state = None


# ## What became of a connection's packets


@dataclasses.dataclass
class ReceiveCounts:
    received: int = 0
    lost: int = 0  # never arrived in time (each is then recovered or concealed)
    recovered: int = 0  # rebuilt from the next packet's FEC data
    concealed: int = 0  # filled by the decoder's concealment
    late: int = 0  # arrived after it had been given up: dropped

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @property
    def lost_share(self) -> float:
        """The share of the visitor's packets that did not arrive in time (0 to 1)."""
        expected = self.received + self.lost
        return self.lost / expected if expected else 0.0

    @property
    def concealed_share(self) -> float:
        """The share that the decoder had to make up (lost and not rebuilt from FEC)."""
        expected = self.received + self.lost
        return self.concealed / expected if expected else 0.0


# ## The receive buffer


class OpusBurst:
    """What the buffer hands the decoder at once: packets in order, each with how many packets
    were given up just before it. Quacks like aiortc's JitterFrame (`timestamp`: the last's)."""

    def __init__(self, packets: list[tuple[int, bytes, int]], counts: ReceiveCounts) -> None:
        self.packets = packets  # (lost before, payload, RTP timestamp)
        self.counts = counts
        self.data = packets[-1][1]
        self.timestamp = packets[-1][2]


def _seq_after(a: int, b: int) -> int:
    """How far sequence number a is after b (negative: before), modulo 2^16."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


class OpusJitterBuffer:
    """In order, without waiting: each packet goes on as soon as every one before it has gone or
    been given up; a missing packet is given up once REORDER_PACKETS later ones are here.
    `add(packet)` returns (False, OpusBurst | None), as aiortc's JitterBuffer does."""

    capacity = 16

    def __init__(self, reorder_packets: int = REORDER_PACKETS) -> None:
        self.reorder_packets = reorder_packets
        self.counts = ReceiveCounts()
        self._next: int | None = None  # the sequence number due next
        self._held: dict[int, Any] = {}

    def add(self, packet) -> tuple[bool, OpusBurst | None]:
        seq = packet.sequence_number
        if self._next is None:
            self._next = seq
        ahead = _seq_after(seq, self._next)
        if ahead < 0 or seq in self._held:
            self.counts.late += ahead < 0
            return False, None
        if ahead > 1000:  # the stream jumped (a new source): start again from here
            self._held.clear()
            self._next = seq
        self.counts.received += 1
        self._held[seq] = packet
        out: list[tuple[int, bytes, int]] = []
        lost = 0
        while self._held:
            if self._next in self._held:
                held = self._held.pop(self._next)
                out.append((lost, held._data, held.timestamp))
                lost = 0
                self._next = (self._next + 1) & 0xFFFF
            elif len(self._held) > self.reorder_packets:
                lost += 1  # give the missing one up
                self.counts.lost += 1
                self._next = (self._next + 1) & 0xFFFF
            else:
                break
        return False, (OpusBurst(out, self.counts) if out else None)

    def remove(self, count: int) -> None:  # aiortc's interface; nothing to trim here
        pass


# ## The decoder aiortc calls, and the encoder it sends with


class FecOpusDecoder:
    """aiortc's Decoder for Opus, with FEC and concealment for what the buffer gave up."""

    def __init__(self) -> None:
        self._opus = OpusPacketDecoder()

    def decode(self, burst) -> list:
        from av import AudioFrame

        if not isinstance(burst, OpusBurst):  # aiortc's own JitterFrame: one packet, nothing lost
            burst = OpusBurst([(0, burst.data, burst.timestamp)], ReceiveCounts())
        frames = []
        last_timestamp = burst.packets[-1][2]
        for lost, payload, timestamp in burst.packets:
            pieces = []
            try:
                for missing in range(lost, 0, -1):
                    if missing == 1 and has_fec(payload):
                        pieces.append(self._opus.recover(payload, self._samples(payload)))
                        burst.counts.recovered += 1
                    else:
                        pieces.append(self._opus.conceal(self._samples(payload)))
                        burst.counts.concealed += 1
                pieces.append(self._opus.decode(payload))
            except ValueError as error:  # a malformed packet costs its own audio, not the call
                log.debug("undecodable Opus packet: %s", error)
                continue
            pcm = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate = SAMPLE_RATE
            # aiortc mapped the last packet's timestamp (burst.timestamp); the others keep their distance.
            made_up = (len(pcm) - len(pieces[-1])) // CHANNELS
            frame.pts = burst.timestamp - ((last_timestamp - timestamp) & 0xFFFFFFFF) - made_up
            frame.time_base = _TIME_BASE
            frames.append(frame)
        return frames

    @staticmethod
    def _samples(payload: bytes) -> int:
        samples = libopus().opus_packet_get_nb_samples(payload, len(payload), SAMPLE_RATE)
        return samples if samples > 0 else PACKET_SAMPLES


def _fec_encoder_class():
    from aiortc.codecs.opus import OpusEncoder

    class FecOpusEncoder(OpusEncoder):
        """aiortc's Opus encoder with in-band FEC for an expected loss, at a speech bitrate."""

        def __init__(self) -> None:
            super().__init__()
            self.codec.bit_rate = SPEECH_BITRATE
            self.codec.options = {**self.codec.options, "fec": "1",
                                  "packet_loss": str(EXPECTED_LOSS_PERCENT)}

    return FecOpusEncoder


# ## Wiring it into aiortc


def _is_opus(codec) -> bool:
    return getattr(codec, "mimeType", "").lower() == "audio/opus"


def use_fec_opus() -> None:
    """For every WebRTC connection of this process from now on: `useinbandfec=1` in the answer,
    FEC in the server's encoder, the buffer and decoder above for the browser's audio."""
    import aiortc.codecs
    import aiortc.rtcrtpreceiver as receiver
    import aiortc.rtcrtpsender as sender

    if getattr(receiver, "_moshi_fec_opus", False):
        return
    libopus()  # fail here, at start, if there is none
    audio = aiortc.codecs.CODECS["audio"]
    for index, codec in enumerate(audio):
        if _is_opus(codec):
            audio[index] = dataclasses.replace(codec, parameters={**codec.parameters, "useinbandfec": 1})

    original_decoder: Callable = receiver.get_decoder
    original_encoder: Callable = sender.get_encoder
    original_buffer = receiver.JitterBuffer
    encoder_class = _fec_encoder_class()

    def get_decoder(codec):
        return FecOpusDecoder() if _is_opus(codec) else original_decoder(codec)

    def get_encoder(codec):
        return encoder_class() if _is_opus(codec) else original_encoder(codec)

    def jitter_buffer(capacity: int, prefetch: int = 0, is_video: bool = False):
        return original_buffer(capacity, prefetch, is_video) if is_video else OpusJitterBuffer()

    receiver.get_decoder = get_decoder
    sender.get_encoder = get_encoder
    receiver.JitterBuffer = jitter_buffer
    receiver._moshi_fec_opus = True


def receive_counts(pc) -> ReceiveCounts | None:
    """The counts of an aiortc RTCPeerConnection's audio receiver (None: it has none of ours)."""
    for transceiver in pc.getTransceivers() if pc is not None else ():
        if transceiver.kind != "audio":
            continue
        buffer = getattr(transceiver.receiver, "_RTCRtpReceiver__jitter_buffer", None)
        if isinstance(buffer, OpusJitterBuffer):
            return buffer.counts
    return None
