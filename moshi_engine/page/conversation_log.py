"""What happened to each browser connection of the page: its record, and its recording.

Records are kept by WebRTC id, bounded in number. A recording belongs to the
browser that had the conversation: the page binds a record to the browser's
identity cookie (`door.access.BrowserIdentity`) the first time that browser asks about
it, and the download route serves the file to that browser alone, under a random
download id; anyone else, or a guessed path, gets a 404. Recordings are deleted
`recording_ttl_s` (15 minutes) after their conversation, and with the directory
when the process stops.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..conversation import Sampling
from ..door.line import LinePosition
from ..door.resume import ResumeTokens
from .endings import Ending

log = logging.getLogger(__name__)

RECORDING_TTL_S = 15 * 60


class LiveConnection(Protocol):
    """A connection that is still in line or talking (`rtc.MoshiHandler`), as the log drains or
    stops it."""

    record: ConversationRecord | None

    async def end_for_restart(self, reason: str) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class ConversationRecord:
    """What happened to one browser connection, for the page to show."""

    webrtc_id: str
    started_at: float
    sampling: Sampling | None = None
    voice: str | None = None  # the voice picked, on a page that offers several
    line: LinePosition | None = None  # where it stands while waiting for a slot
    ending: Ending | None = None
    message: str | None = None
    transcript: str = ""
    recording: Path | None = None
    person_samples: int = 0
    person_rms: float = 0.0
    moshi_frames: int = 0
    text_pieces: int = 0
    owner: str | None = None  # the browser identity that had the conversation (first to ask)
    download_id: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    continues: str | None = None  # the id of the conversation this connection took up (a handover)
    resume_token: str | None = None  # what takes this conversation up on a new connection

    @property
    def ended(self) -> bool:
        return self.ending is not None

    @property
    def conversation_id(self) -> str:
        """The conversation's short id: in its log lines, its recording's name and the page's details
        (a connection that took a conversation up keeps that conversation's)."""
        return self.continues or self.webrtc_id[:8]


class ConversationLog:
    """The records of recent connections by WebRTC id, and the directory of their WAVs.

    Bounded: past `keep` records the oldest is forgotten and its recording deleted.
    Written and read on the server's event loop only.
    """

    def __init__(self, directory: str | Path | None = None, keep: int = 64,
                 recording_ttl_s: float = RECORDING_TTL_S) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="moshi-recordings-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.recording_ttl_s = recording_ttl_s
        self._records: OrderedDict[str, ConversationRecord] = OrderedDict()
        self.live: set[LiveConnection] = set()  # connections not yet finished, in line or talking
        # Each live conversation's resume token: a new connection of the same page takes it up
        # (a handover: the visitor's address changed, and aiortc cannot restart ICE).
        self.tokens: ResumeTokens = ResumeTokens()
        # The directory goes with the process (or with this log, if it goes first).
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.directory), True)

    def open(self, webrtc_id: str) -> ConversationRecord:
        record = ConversationRecord(webrtc_id=webrtc_id, started_at=time.time())
        self._records[webrtc_id] = record
        while len(self._records) > self.keep:
            _, old = self._records.popitem(last=False)
            self._delete_recording(old)
        return record

    def get(self, webrtc_id: str | None) -> ConversationRecord | None:
        return self._records.get(webrtc_id) if webrtc_id else None

    def claim(self, webrtc_id: str | None, browser: str | None) -> ConversationRecord | None:
        """The record of `webrtc_id` for the browser that asks about it: the first browser to ask
        owns it (only the page that made the connection knows its random id); others get None."""
        record = self.get(webrtc_id)
        if record is None or browser is None:
            return None
        if record.owner is None:
            record.owner = browser
        return record if record.owner == browser else None

    def recording_path(self, record: ConversationRecord) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(record.started_at))
        voice = f"{record.voice}-" if record.voice else ""
        return self.directory / f"moshi-conversation-{voice}{stamp}-{record.conversation_id}.wav"

    def saved(self, record: ConversationRecord, path: Path) -> None:
        """`path` holds `record`'s recording, until `recording_ttl_s` from now."""
        record.recording = path
        asyncio.get_running_loop().call_later(self.recording_ttl_s, self._delete_recording, record)

    def recording_for(self, download_id: str, browser: str | None) -> ConversationRecord | None:
        """The record whose recording `browser` may download under `download_id` (else None)."""
        for record in self._records.values():
            if record.download_id == download_id:
                found = record.recording is not None and record.recording.is_file()
                return record if found and browser is not None and record.owner == browser else None
        return None

    def _delete_recording(self, record: ConversationRecord) -> None:
        if record.recording is not None:
            record.recording.unlink(missing_ok=True)
            record.recording = None

    def records(self) -> list[ConversationRecord]:
        """The remembered records, oldest first."""
        return list(self._records.values())

    async def drain(self, reason: str) -> None:
        """End every live connection's conversation (or its wait) because the server is
        restarting: the page says so; every slot is released."""
        ending = [handler.end_for_restart(reason) for handler in list(self.live)]
        await asyncio.gather(*ending, return_exceptions=True)

    async def stop(self, record: ConversationRecord) -> bool:
        """The visitor stopped `record`'s conversation: end it now; False if it is not live."""
        for connection in list(self.live):
            if connection.record is record:
                await connection.stop()
                return True
        return False

    def close(self) -> None:
        """Delete every recording and the directory."""
        self._cleanup()

    def __len__(self) -> int:
        return len(self._records)
