"""The bytes on the wire: kind bytes, close codes and limits of the two websocket protocols.

- `/ws`, QuiLLMan's: the client sends raw Ogg Opus pages; the server sends
  `KIND_AUDIO` + Ogg Opus and `KIND_TEXT` + UTF-8 text. No handshake.
- `/api/chat`, moshi's reference server's: the server sends `KIND_HANDSHAKE`
  once the session is ready; then both sides prefix every message with a kind
  byte (the client only sends `KIND_AUDIO`).

Sampling parameters may ride on the URL query, in our names (`?seed=1&temp=0.7`) or in
those of moshi's own web client (`?text_temperature=0.7&text_seed=1...`); moshi's Python
server ignores them, ours applies them to the session. This module imports nothing of ours
but the vocabulary (`conversation.Sampling`, whose ranges it checks).
"""

from __future__ import annotations

import enum
import json
import math
from urllib.parse import urlencode, urlsplit

from ..conversation import Sampling

KIND_HANDSHAKE = 0
KIND_AUDIO = 1
KIND_TEXT = 2
KIND_METADATA = 4  # as moshi's Rust server numbers it: UTF-8 JSON (here, a waiting line's place)

HANDSHAKE = bytes([KIND_HANDSHAKE])
MAX_MESSAGE_BYTES = 64 * 1024


class Protocol(enum.StrEnum):
    QUILLMAN = "ws"
    MOSHI = "api/chat"

    @property
    def path(self) -> str:
        return "/" + self.value

    @classmethod
    def from_url(cls, url: str) -> Protocol:
        """The protocol a websocket URL's path names (`.../ws` or `.../api/chat`)."""
        path = urlsplit(url).path.rstrip("/")
        for protocol in cls:
            if path.endswith(protocol.path):
                return protocol
        raise ValueError(f"{url!r} names neither /ws nor /api/chat")


class CloseCode(enum.IntEnum):
    NORMAL = 1000  # the conversation ended, or its time limit was reached
    GOING_AWAY = 1001  # the server is shutting down
    UNSUPPORTED_DATA = 1003  # a text frame: this protocol is binary
    ABNORMAL = 1006  # never sent: what a side reads when the connection dropped without a close frame
    INVALID_PAYLOAD = 1007  # bytes that are not Opus, or an unknown kind byte
    POLICY_VIOLATION = 1008  # bad query parameters, or no audio for too long
    MESSAGE_TOO_BIG = 1009  # a message over MAX_MESSAGE_BYTES
    INTERNAL_ERROR = 1011  # the model or the server failed
    SERVICE_RESTART = 1012  # the server is restarting: connect again in a minute
    TRY_AGAIN_LATER = 1013  # every slot and the waiting line are taken, a wait timed out, or still loading
    # From a client: it gave this connection up to resume the conversation on another (a browser
    # cannot drop a websocket without a close frame); the conversation keeps its slot meanwhile.
    RECONNECTING = 4000


def time_limit_reason(max_session_s: float) -> str:
    """The close reason (with code 1000) of a conversation that reached its time limit: a
    client tells it from a normal end by this reason (the page does)."""
    return f"session time limit of {max_session_s:g} s reached"


def idle_reason(idle_s: float) -> str:
    """The close reason (with code 1008) of a conversation that heard no audio for `idle_s`."""
    return f"no audio received for {idle_s:g} s"


def lost_reason(grace_s: float) -> str:
    """The close reason (with code 1008) of a conversation whose connection stayed interrupted
    for its whole grace: no resume came."""
    return f"connection lost for {grace_s:g} s"


RESUMED_ELSEWHERE = "resumed on another connection"  # (code 1000) the visitor took it up on a new one


class ConnectionClose(Exception):
    """Ends a connection with a close `code` and a short `reason` for the client."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(f"{int(code)}: {reason}")
        self.code = code
        self.reason = reason


class ProtocolError(ConnectionClose):
    """A client broke the protocol."""


def client_audio(protocol: Protocol, message: bytes) -> bytes:
    """The Ogg Opus bytes of a client message (possibly empty); ProtocolError otherwise."""
    if len(message) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            CloseCode.MESSAGE_TOO_BIG, f"message of {len(message)} bytes; the limit is {MAX_MESSAGE_BYTES}"
        )
    if protocol is Protocol.QUILLMAN or not message:
        return message
    if message[0] != KIND_AUDIO:
        raise ProtocolError(CloseCode.INVALID_PAYLOAD, f"unknown message kind {message[0]}; clients send 1 (audio)")
    return message[1:]


def client_message(protocol: Protocol, ogg: bytes) -> bytes:
    """What a client sends for Ogg Opus bytes."""
    return ogg if protocol is Protocol.QUILLMAN else bytes([KIND_AUDIO]) + ogg


def audio_message(ogg: bytes) -> bytes:
    return bytes([KIND_AUDIO]) + ogg


def text_message(text: str) -> bytes:
    return bytes([KIND_TEXT]) + text.encode("utf-8")


def metadata_message(data: dict) -> bytes:
    return bytes([KIND_METADATA]) + json.dumps(data, separators=(",", ":")).encode("utf-8")


def sampling_query(**params: float | int | None) -> str:
    """`?temp=...&seed=...` for the parameters that are set ('' if none); `queue=1` asks our
    server to say where the client stands while it waits for a slot."""
    present = {key: value for key, value in params.items() if value is not None}
    return "?" + urlencode(present) if present else ""


# URL parameter -> (Sampling field, type). Ours, then moshi's web client's (kyutai-labs/moshi,
# client/src/pages/Conversation: the sliders it appends to /api/chat, which moshi's Rust server reads).
SAMPLING_PARAMETERS = {
    "temp": ("temp", float),
    "temp_text": ("temp_text", float),
    "top_k": ("top_k", int),
    "top_k_text": ("top_k_text", int),
    "seed": ("seed", int),
    "audio_temperature": ("temp", float),
    "text_temperature": ("temp_text", float),
    "audio_topk": ("top_k", int),
    "text_topk": ("top_k_text", int),
    "text_seed": ("text_seed", int),
    "audio_seed": ("audio_seed", int),
}
# moshi's client sends these too; per-row sampling has no pad bias or repetition penalty, so they
# are accepted and not applied, once checked against the range moshi's client allows (type, low, high).
IGNORED_PARAMETERS = {
    "pad_mult": (float, -4.0, 4.0),
    "repetition_penalty": (float, 1.0, 2.0),
    "repetition_penalty_context": (int, 0, 200),
}


def parse_sampling_query(query: dict[str, str]) -> dict[str, float | int]:
    """Sampling overrides (Sampling's field names) from URL query parameters, in our names or
    moshi's web client's; ProtocolError (1008) naming the parameter for a value that is not a
    number of its type or is out of range. Other parameters are ignored, as moshi's server
    ignores them all (its client also sends `worker_auth_id` and `email`)."""
    parsed: dict[str, float | int] = {}
    for name, (field, kind) in SAMPLING_PARAMETERS.items():
        if name in query:
            value = _number(name, query[name], kind)
            try:
                Sampling().updated(**{field: value})  # its ranges, one parameter at a time
            except ValueError as error:
                raise ProtocolError(CloseCode.POLICY_VIOLATION, f"{name}={query[name]}: {error}") from None
            if field in parsed and parsed[field] != value:
                reason = f"{name}={query[name]} contradicts another parameter for the same setting"
                raise ProtocolError(CloseCode.POLICY_VIOLATION, reason)
            parsed[field] = value
    for name, (kind, low, high) in IGNORED_PARAMETERS.items():
        if name in query and not low <= _number(name, query[name], kind) <= high:
            reason = f"{name}={query[name]} is out of range: a {kind.__name__} in [{low:g}, {high:g}]"
            raise ProtocolError(CloseCode.POLICY_VIOLATION, reason)
    return parsed


def _number(name: str, raw: str, kind: type) -> float | int:
    try:
        value = kind(raw)
    except ValueError:
        raise ProtocolError(CloseCode.POLICY_VIOLATION, f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        raise ProtocolError(CloseCode.POLICY_VIOLATION, f"{name}={raw!r} is not a finite number")
    return value
