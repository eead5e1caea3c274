"""FastRTC adapter: each browser WebRTC connection is one Moshi conversation.

FastRTC calls `MoshiHandler.copy()` once per connection, so every browser
session gets its own handler bound to its own `Conversation`, opened from a
factory: `engine.acquire` for a slot of the local engine, or a remote session over
the Opus websocket. The handler never knows which one it drives.

    microphone --WebRTC--> receive() --> conversation.send_pcm()   (int16 -> pcm, 24 kHz)
    speaker   <--WebRTC--  emit()    <-- conversation.receive()    (AudioOut; TextOut -> transcript)

It also keeps both sides of the conversation for the recording (`Recording`)
and writes what happened to each connection into a `conversation_log.ConversationLog` that
the page reads: how it ended, the message to show, the transcript and the WAV.
Endings become the one message a person sees in `endings.ending_message`.

A handover (the visitor's address changed; aiortc cannot restart ICE): each started
conversation has a resume token (`door.resume`, in the page's `ConversationLog`); a new
connection whose inputs carry it takes the conversation up from the old one (`_take_up`), and
the old one lets go of it (`_hand_over`). A connection that closes while its path was quiet
keeps its slot for the rest of the grace, for that.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastrtc import AdditionalOutputs, AsyncStreamHandler, CloseStream
from fastrtc.utils import create_message, current_context

from ..audio import SAMPLE_RATE, int16_to_pcm
from ..conversation import (
    INTERRUPTED_AFTER_S,
    AudioOut,
    BusyError,
    Conversation,
    Sampling,
    ServerRestarting,
    SessionLimits,
    TextOut,
)
from ..door.line import LinePosition
from ..door.resume import EXPIRED, ResumeRefused
from ..watch.logs import conversation_context
from ..watch.metrics import (
    CLIENT_GONE,
    ERROR,
    IDLE,
    LIMIT,
    NORMAL,
    RECOVERED,
    REFUSED,
    RESTART,
    RESUMED,
    WEBRTC,
    ConversationClock,
    Metrics,
)
from .conversation_log import ConversationLog, ConversationRecord
from .endings import LEFT_LINE_MESSAGE, STARTING_MESSAGE, Ending, duration_words, ending_for, ending_message
from .opus_rtp import ReceiveCounts, receive_counts
from .recording import Recording

log = logging.getLogger(__name__)

# ## The handler

# How each ending is counted (`metrics.ENDINGS`); a visitor who stopped before talking left.
ENDING_LABELS = {
    Ending.STOPPED: NORMAL,
    Ending.BUSY: REFUSED,
    Ending.LINE_TIMEOUT: REFUSED,
    Ending.TIME_LIMIT: LIMIT,
    Ending.IDLE: IDLE,
    Ending.RESTART: RESTART,
    Ending.LOST: CLIENT_GONE,
    Ending.ERROR: ERROR,
}

PositionCallback = Callable[[LinePosition], None]
# A conversation for a sampling, leased once a slot is free (the local engine's `acquire`,
# which waits in line), or one whose `start()` waits (a remote server's line); with a page's
# voice picker, called with `voice=` the name picked too.
OpenConversation = Callable[..., Awaitable[Conversation]]


class MoshiHandler(AsyncStreamHandler):
    """One browser connection bound to one Conversation, from start-up to shutdown.

    `await open_conversation(sampling, on_position)` returns an unstarted Conversation
    (a local `MoshiSession`, a remote session...), waiting in line while every slot is
    taken and telling `on_position` where it stands; it raises BusyError when there is no
    room, and `start()` may wait or raise it too (a remote server's line). Stop leaves the
    line. `sampling_from_args(inputs)` turns the page's inputs (the values
    after the WebRTC component's) into a Sampling; without it the backend's default
    sampling is used and the page's inputs are never waited for. With `voice_from_args`,
    the voice it reads from them goes to `open_conversation(..., voice=...)`.

    The conversation ends, and is closed (its slot released and reset) when the
    connection stops (`shutdown`), after `limits.max_session_s`, after `limits.idle_s`
    without microphone audio, or on an error; then the page gets `CloseStream(message)`.

    Its id is the first 8 characters of the WebRTC connection's (as in the recording's name):
    every line logged about it carries that id, and its end is counted in `metrics` (as the
    voice picked, or `voice` on a page of one) and logged once.
    """

    def __init__(
        self,
        open_conversation: OpenConversation,
        conversations: ConversationLog,
        *,
        sampling_from_args: Callable[[list[Any]], Sampling | None] | None = None,
        voice_from_args: Callable[[list[Any]], str | None] | None = None,
        limits: SessionLimits = SessionLimits(),
        args_timeout_s: float = 10.0,
        slow_start_s: float = 3.0,
        metrics: Metrics | None = None,
        voice: str = "",
        peer_connection: Callable[[str], Any | None] | None = None,
        resume_from_args: Callable[[list[Any]], str | None] | None = None,
    ) -> None:
        # input_sample_rate: FastRTC resamples the microphone to 24 kHz mono int16 itself
        # (StreamHandlerBase.resample), so receive() gets Mimi's rate.
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE, input_sample_rate=SAMPLE_RATE)
        self.open_conversation = open_conversation
        self.conversations = conversations
        self.sampling_from_args = sampling_from_args
        self.voice_from_args = voice_from_args
        self.limits = limits
        self.args_timeout_s = args_timeout_s
        self.slow_start_s = slow_start_s
        self.metrics = metrics
        self.voice = voice
        # FastRTC's peer connection (aiortc) by WebRTC id, while it has it: the visitor's packets
        # by outcome are counted on it (opus_rtp.receive_counts), and a handover closes the old one.
        self.peer_connection = peer_connection
        # The resume token among the page's inputs: this connection takes up that conversation.
        self.resume_from_args = resume_from_args
        self._resume_token: str | None = None
        self._handed_over = asyncio.Event()  # a newer connection took this one's conversation up
        self._closing_old: asyncio.Future | None = None  # the connection this one took over, closing
        self._deadline: float | None = None  # the session limit, on the event loop's clock
        self._packets: ReceiveCounts | None = None
        self.clock: ConversationClock | None = None
        self.record: ConversationRecord | None = None
        self.recording = Recording()
        self._conversation: Conversation | None = None
        self._pieces: list[str] = []
        self._ending: Ending | None = None
        self._close_sent = False
        self._last_heard = 0.0
        self._started = asyncio.Event()  # start_up is over, whatever its outcome
        self._stopped = asyncio.Event()  # FastRTC shut the connection down
        self._watchdog: asyncio.Task | None = None
        self._finishing: asyncio.Task | None = None
        self._opening: asyncio.Task | None = None  # waiting in line, or starting

    def copy(self) -> MoshiHandler:
        return MoshiHandler(
            self.open_conversation,
            self.conversations,
            sampling_from_args=self.sampling_from_args,
            voice_from_args=self.voice_from_args,
            limits=self.limits,
            args_timeout_s=self.args_timeout_s,
            slow_start_s=self.slow_start_s,
            metrics=self.metrics,
            voice=self.voice,
            peer_connection=self.peer_connection,
            resume_from_args=self.resume_from_args,
        )

    @property
    def transcript(self) -> str:
        return "".join(self._pieces).strip()

    @property
    def conversation_id(self) -> str:
        """The conversation's id, in its log lines, its recording's name and the page's details."""
        return self.record.conversation_id if self.record else "?"

    def refusal(self) -> str | None:
        """Why this connection's conversation cannot be taken up by another (`door.resume`)."""
        if self._conversation is None or self._ending is not None or self._handed_over.is_set():
            return "that conversation has ended; start a new one"
        return None

    async def start_up(self) -> None:
        """Open and start this connection's conversation with the page's sampling, in line while
        every slot is taken."""
        context = current_context.get()
        self.record = self.conversations.open(context.webrtc_id if context else uuid.uuid4().hex)
        self.clock = ConversationClock(self.metrics, self.voice, WEBRTC, self.record.conversation_id)
        if self.peer_connection is not None:  # kept: FastRTC forgets the connection once it closes
            self._packets = receive_counts(self.peer_connection(self.record.webrtc_id))
        self.conversations.live.add(self)
        with conversation_context(self.record.conversation_id):
            await self._start_up()

    async def _start_up(self) -> None:
        try:
            sampling = await self._sampling()
            self.record.sampling = sampling
            if self._ending is not None:  # stopped while waiting for the page
                return
            if self._resume_token:
                self._take_up(self._resume_token)
                return
            conversation = await self._unless_stopped(self._open(sampling))
            if conversation is None:  # stopped while waiting in line: it left the line
                return
        except Exception as error:
            busy = isinstance(error, (BusyError, ServerRestarting))  # expected; anything else deserves its traceback
            log.log(logging.INFO if busy else logging.ERROR, "the conversation could not start: %r", error,
                    exc_info=not busy)
            self._end(*ending_for(error))
        else:
            self._conversation = conversation
            if self._ending is not None:  # stopped while starting: _finish missed it
                await conversation.close()
            else:
                self._last_heard = asyncio.get_running_loop().time()
                self._deadline = self._last_heard + self.limits.max_session_s
                self.clock.talking()
                self.record.resume_token = self.conversations.tokens.issue(self)
                self._watchdog = asyncio.create_task(self._watch(), name=f"moshi-rtc-watch-{self.record.webrtc_id}")
                voice = f" on voice {self.record.voice}" if self.record.voice else ""
                log.info("conversation started%s (%s)", voice, sampling)
        finally:
            self._started.set()

    def _take_up(self, token: str) -> None:
        """This new connection carries on the conversation of an older one of the page's, whose
        path went dead (a handover): its slot, Moshi's state, its clock, recording, transcript and
        session limit. A wrong, used or expired token ends this connection with the reason and
        touches no conversation."""
        tokens = self.conversations.tokens
        try:
            old, _ = tokens.claim(token)
        except ResumeRefused as refused:
            self.clock.resume_attempt(refused.outcome)
            log.info("resume refused: %s", refused.reason)
            self._end(Ending.LOST if refused.outcome == EXPIRED else Ending.ERROR, refused.reason)
            return
        tokens.retire(old)  # its next token goes: this connection holds the conversation now
        conversation = old._hand_over()
        self._conversation, self.clock, self._deadline = conversation, old.clock, old._deadline
        self.recording, self._pieces = old.recording, old._pieces
        self.record.continues = old.record.conversation_id
        self.record.sampling, self.record.voice = old.record.sampling, old.record.voice
        self.record.resume_token = tokens.issue(self)
        self.clock.resume_attempt(RESUMED)
        self.clock.reconnected(RESUMED)
        self._last_heard = asyncio.get_running_loop().time()
        self._watchdog = asyncio.create_task(self._watch(), name=f"moshi-rtc-watch-{self.record.webrtc_id}")
        with conversation_context(self.record.conversation_id):
            log.info("conversation taken up by a new WebRTC connection (%s)", self.record.webrtc_id[:8])
        self._close_old(old.record.webrtc_id)

    def _close_old(self, webrtc_id: str) -> None:
        """Close the old connection's side here: its path is dead, and FastRTC would hold it (and
        the page's transcript event, which reads its outputs and lets no newer one start) until
        its consent checks give up."""
        pc = self.peer_connection(webrtc_id) if self.peer_connection is not None else None
        if pc is not None:
            closing = asyncio.ensure_future(pc.close())  # FastRTC's "closed" listener cleans up the rest
            self._closing_old = closing  # held until done

    def _hand_over(self) -> Conversation:
        """A newer connection takes this one's conversation: stop reading and watching it, and
        let this connection's end touch it no more."""
        self._handed_over.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.conversations.live.discard(self)
        conversation, self._conversation = self._conversation, None
        return conversation

    async def _open(self, sampling: Sampling | None) -> Conversation:
        """A started conversation: in line until a slot is free, then started (its slot goes
        back if starting fails)."""
        if self.voice_from_args is None:
            conversation = await self.open_conversation(sampling, self._in_line)
        else:
            conversation = await self.open_conversation(sampling, self._in_line, voice=self.record.voice)
        try:
            await self._start(conversation)
        except BaseException:
            await conversation.close()
            raise
        self.record.line = None
        return conversation

    def _in_line(self, position: LinePosition) -> None:
        self.record.line = position  # the page shows it with `line_message`

    async def _unless_stopped(self, opening: Awaitable[Conversation]) -> Conversation | None:
        """`opening`'s conversation, or None if the connection stops first (its lease, if one
        came in the same instant, goes back)."""
        task = self._opening = asyncio.ensure_future(opening)
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            self._opening = None
        if not self._stopped.is_set():
            if task.cancelled():  # the server is restarting: end_for_restart has said so
                return None
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled() and task.exception() is None:
            await task.result().close()
        return None

    async def _start(self, conversation: Conversation) -> None:
        """Start the conversation; when that takes a while (a remote worker starting
        from cold), tell the page so that silence does not look like a hang."""
        starting = asyncio.ensure_future(conversation.start())
        done, _ = await asyncio.wait({starting}, timeout=self.slow_start_s)
        if not done and self.record.line is None:  # waiting in a remote line is not a cold start
            await self.send_message(create_message("warning", STARTING_MESSAGE))
        await starting

    async def _sampling(self) -> Sampling | None:
        if self.sampling_from_args is None:
            return None
        # Asks the page for its inputs over the data channel; FastRTC stores the answer
        # in latest_args as ["__webrtc_value__", webrtc_id, *inputs]. A shutdown meanwhile
        # ends the wait.
        answered = asyncio.ensure_future(self.wait_for_args())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({answered, stopped}, timeout=self.args_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            answered.cancel()
            stopped.cancel()
        if self._ending is not None:
            return None
        if not self.args_set.is_set():
            log.warning("the page sent no sampling settings in %.0f s; using the defaults", self.args_timeout_s)
            return None
        try:
            inputs = list(self.latest_args[2:])
            if self.resume_from_args is not None:
                self._resume_token = self.resume_from_args(inputs)
            if self.voice_from_args is not None:
                self.record.voice = self.voice_from_args(inputs)
                self.clock.voice = self.record.voice or self.voice
            return self.sampling_from_args(inputs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid sampling settings: {error}") from error

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        """A chunk of microphone audio, int16 [1, n] at 24 kHz; dropped unless live."""
        conversation = self._conversation
        if conversation is None or self._ending is not None:
            return
        pcm = int16_to_pcm(frame[1])
        self._last_heard = asyncio.get_running_loop().time()
        if self.clock.interrupted_at is not None:
            self.clock.reconnected(RECOVERED)  # its connection came back by itself
        self.recording.add_person(pcm)
        self.clock.heard()
        try:
            await conversation.send_pcm(pcm)  # waits while the model is behind
        except Exception as error:  # SessionClosed after _end(); else the backend ended it
            if self._ending is None:
                with conversation_context(self.conversation_id):
                    log.info("sending audio failed: %r", error)
                    self._end(*ending_for(error))

    async def emit(self):
        """Moshi's next 80 ms frame `(24000, float32 [1, 1920])`, or the transcript so far
        as AdditionalOutputs, or CloseStream(message) once the conversation has ended.

        FastRTC calls emit() in a loop with no pause in between (tracks.py,
        player_worker_decode, bounded by a 60 s timeout), so returning None when nothing
        is ready would spin the event loop. emit() therefore awaits the conversation's
        next output (every 80 ms of microphone audio answers one frame), and after the
        end waits for the connection to shut down before returning None.
        """
        await self._started.wait()
        while self._ending is None and self._conversation is not None:
            try:
                out = await self._next_output(self._conversation)
            except Exception as error:  # SessionClosed after _end(); else the backend ended it
                if self._ending is None:
                    self._end(*ending_for(error))
                break
            if out is None:  # handed over: a newer connection reads the conversation now
                break
            if isinstance(out, AudioOut):
                self.recording.add_moshi(out.pcm)
                self.clock.answered(out.due)
                return SAMPLE_RATE, out.pcm.reshape(1, -1)
            if isinstance(out, TextOut):
                self._pieces.append(out.text)
                return AdditionalOutputs(self.transcript)
        if self._handed_over.is_set():
            return await self._idle_until_stopped()
        if self._ending is None:  # start_up failed before deciding why: it always ends first
            self._end(Ending.ERROR, "the conversation did not start")
        if not self._close_sent and self._ending is not Ending.STOPPED:
            self._close_sent = True
            await self._finished()
            return CloseStream(self.record.message if self.record else "Conversation ended.")
        return await self._idle_until_stopped()

    async def _next_output(self, conversation: Conversation):
        """The conversation's next output, or None once a newer connection took it up."""
        if self._handed_over.is_set():
            return None
        receiving = asyncio.ensure_future(conversation.receive())
        handed_over = asyncio.ensure_future(self._handed_over.wait())
        try:
            await asyncio.wait({receiving, handed_over}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            handed_over.cancel()
        if receiving.done():
            return receiving.result()
        receiving.cancel()  # a queue's get: nothing is taken from it
        await asyncio.gather(receiving, return_exceptions=True)
        return None

    async def _idle_until_stopped(self) -> None:
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout=30)
        except TimeoutError:
            pass
        return None

    async def end_for_restart(self, reason: str) -> None:
        """The server is restarting: end now, telling the page (also while in line)."""
        if self._opening is not None:
            self._opening.cancel()  # in line: leave it
        await asyncio.shield(self._end(Ending.RESTART, reason))

    async def shutdown(self) -> None:
        """FastRTC closed the connection (stop button, tab closed, time limit, failure). One whose
        path had gone quiet keeps its slot for the rest of the grace, for a new connection to take
        it up (a closed tab sends audio to its last moment: it ends at once)."""
        if self.clock is not None and self.clock.interrupted_at is not None and self._ending is None \
                and self._conversation is not None and not self._handed_over.is_set():
            self._stopped.set()
            return  # the watchdog ends it as lost when the grace runs out
        await self.stop()

    async def stop(self) -> None:
        """End this connection's conversation now (or leave the line): the visitor stopped it
        (the page says so, `ui.WEBRTC_ROUTES["stop"]`), or its connection closed."""
        self._stopped.set()
        if self._handed_over.is_set():
            return
        self._end(Ending.STOPPED)
        await self._finished()

    @property
    def _webrtc_id(self) -> str:
        return self.record.webrtc_id if self.record else "?"

    async def _watch(self) -> None:
        """End the conversation at the session limit; mark it interrupted when no audio
        came for INTERRUPTED_AFTER_S (a browser sends its microphone's frames, silent or not,
        every 20 ms while its connection works), and end it when the connection stayed
        lost for the reconnect grace (an outage that did not end, a browser that vanished)."""
        loop = asyncio.get_running_loop()
        deadline = self._deadline if self._deadline is not None else loop.time() + self.limits.max_session_s
        while True:
            now = loop.time()
            if now >= deadline:
                self._end(Ending.TIME_LIMIT)
                return
            quiet_since = self._last_heard
            if now >= quiet_since + INTERRUPTED_AFTER_S:
                self.clock.interrupted()
            lost_at = quiet_since + INTERRUPTED_AFTER_S + self.limits.reconnect_grace_s
            if now >= lost_at:
                self._end(Ending.LOST)
                return
            if now >= quiet_since + self.limits.idle_s:
                self._end(Ending.IDLE)
                return
            # While interrupted, look again soon: the connection may come back, and then go quiet again.
            wake = quiet_since + INTERRUPTED_AFTER_S if self.clock.interrupted_at is None else min(
                lost_at, now + INTERRUPTED_AFTER_S)
            await asyncio.sleep(max(0.0, min(deadline, wake, quiet_since + self.limits.idle_s) - now) + 0.001)

    def _end(self, ending: Ending, detail: str = "") -> asyncio.Task:
        """Decide how the conversation ends (the first caller wins) and start finishing."""
        if self._finishing is None:
            self._ending = ending
            with conversation_context(self.conversation_id):  # the finishing task's lines carry the id
                self._finishing = asyncio.create_task(self._finish(ending, detail),
                                                      name=f"moshi-rtc-end-{self._webrtc_id}")
        return self._finishing

    async def _finished(self) -> None:
        if self._finishing is not None:
            await asyncio.shield(self._finishing)

    async def _finish(self, ending: Ending, detail: str) -> None:
        """Close the conversation (release and reset its slot), then file the record
        and the recording. Runs once; also runs to the end if its caller is cancelled."""
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        if self._conversation is not None:
            try:
                await self._conversation.close()
            except Exception:
                log.exception("closing the conversation failed")
        self.conversations.live.discard(self)
        self.conversations.tokens.retire(self)
        record = self.record
        if record is None:  # shut down before start-up began
            return
        if ending is Ending.STOPPED and self.clock.started is not None:
            # How long it lasted, outages and handovers included (its recording has their silence left out).
            detail = duration_words(round(self.clock.talked_s))
        message = ending_message(ending, self.limits, detail)
        label = ENDING_LABELS[ending]
        if ending is Ending.STOPPED and (record.line is not None or self.clock.started is None):
            label = CLIENT_GONE  # it left before talking: in line, or before its conversation started
        if ending is Ending.STOPPED and record.line is not None:
            message = LEFT_LINE_MESSAGE
        record.line = None
        record.transcript = self.transcript
        record.text_pieces = len(self._pieces)
        record.person_samples = self.recording.person_samples
        record.person_rms = self.recording.person_rms
        record.moshi_frames = self.recording.moshi_frames
        if self.recording.samples:
            path = self.conversations.recording_path(record)
            try:
                await asyncio.to_thread(self.recording.write_wav, path)
                self.conversations.saved(record, path)
            except OSError:
                log.exception("writing the recording failed")
        # Last: the page shows an ending once (the first time it sees one), so whatever it
        # shows with it, the recording's link above all, must be filed by then.
        record.message = message
        record.ending = ending
        packets = {}
        if self._packets is not None:
            self.clock.input_packets(self._packets.as_dict())
            packets = {"packets": self._packets.received + self._packets.lost,
                       "lost_share": round(self._packets.lost_share, 4),
                       "concealed_share": round(self._packets.concealed_share, 4)}
        self.clock.end(label, detail or ending.value, heard_s=round(record.person_samples / SAMPLE_RATE, 3),
                       text_pieces=record.text_pieces, recording=record.recording.name if record.recording else None,
                       **packets)
