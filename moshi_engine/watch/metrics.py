"""What the server does, as Prometheus metrics (`GET /metrics`), and the end of each conversation.

    metrics = Metrics()                         # one registry per app, not the process's global
    metrics.watch("moshiko", engine)            # its slots, line, restarts, steps, queue waits
    clock = metrics.conversation("moshiko", "webrtc", conversation_id)
    clock.talking(); clock.heard(); clock.answered()   # as audio goes in and out
    clock.end("normal")                         # counted and logged once, with its figures
    body = metrics.exposition()                 # Prometheus' text format
    metrics.gather(store)                       # with every worker's (`watch.workers`), scale-out

Every family carries a `voice` label (the voice's short name; with one voice, its model's).
Buckets are set for 80 ms frames: a step must end well inside one, a frame is late by
multiples of one, and Moshi's first answer comes some frames after the first words.

Live figures (slots, the line, restarts, dropped frames, the model) are read from each
watched engine when scraped; the rest is observed as it happens. The batched step is timed
where it runs, in the model's own process too: its timings come back with each step's
outputs (`model.process`) and are observed here, in the server's process, as they arrive.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ..audio import FRAME_SIZE, SAMPLE_RATE
from ..timings import STEP
from .logs import conversation_context, log_fields
from .workers import FRESH_S, Merged, WorkerFigures

log = logging.getLogger("moshi_engine.conversations")
disable_created_metrics()  # no `_created` series beside each counter and histogram: Prometheus needs none

# The classic text format, which every Prometheus (2.x and 3.x) and Grafana agent reads; our
# names need none of 1.0.0's UTF-8.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
FRAME_S = FRAME_SIZE / SAMPLE_RATE
RECOVERY_BUCKETS = (0.08, 0.16, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# A conversation's lag is back to normal once an answer leaves at most this much later than the
# median of its last answers before the interruption (or NORMAL_LAG_S, if that is more).
NORMAL_LAG_S = 0.2
LAG_HISTORY = 25

# How a conversation ended, the `ending` label of moshi_conversations_total.
NORMAL = "normal"  # the visitor stopped (the stop button, a websocket closed cleanly)
LIMIT = "limit"  # the session limit
IDLE = "idle"  # no microphone audio for the idle limit
CLIENT_GONE = "client_gone"  # the connection dropped, or the visitor left the waiting line
ERROR = "error"  # the model, the server or the client's bytes failed
REFUSED = "refused"  # never started: no slot or place in line, a timed-out wait, still loading
RESTART = "restart"  # the server is restarting (a redeploy, a scale-down)
ENDINGS = (NORMAL, LIMIT, IDLE, CLIENT_GONE, ERROR, REFUSED, RESTART)

# How an interruption of a conversation's connection ended, the `outcome` label of
# moshi_interruptions_total: its connection came back, a new one took it up, or the grace ran out.
RECOVERED = "recovered"
RESUMED = "resumed"
LOST = "lost"
INTERRUPTION_OUTCOMES = (RECOVERED, RESUMED, LOST)

# Transports, the `transport` label: the page's WebRTC, and the two websocket protocols.
WEBRTC = "webrtc"
WS = "ws"  # QuiLLMan's /ws
API_CHAT = "api/chat"  # moshi's /api/chat (also the page's websocket path)

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.16, 0.24, 0.5, 1.0)
LAG_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.24, 0.32, 0.48, 0.64, 0.96, 1.28, 2.0, 5.0)
FIRST_AUDIO_BUCKETS = (0.08, 0.16, 0.24, 0.32, 0.48, 0.64, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
QUEUE_WAIT_BUCKETS = (0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)


class Metrics:
    """The app's metric families, in a registry of its own (two apps in one process, as in the
    tests, do not share figures)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.conversations = Counter(
            "moshi_conversations", "Conversations ended, by voice, transport and how they ended "
            "(normal, limit, idle, client_gone, error, refused, restart).",
            ["voice", "transport", "ending"], registry=registry)
        self.first_audio = Histogram(
            "moshi_first_audio_seconds", "From a conversation's first audio in to Moshi's first audio out.",
            ["voice", "transport"], buckets=FIRST_AUDIO_BUCKETS, registry=registry)
        self.step = Histogram(
            "moshi_step_seconds", "One batched step of the model (Mimi encode, LM step, Mimi decode of every row "
            "in it); real time needs it under 0.08 s.", ["voice"], buckets=STEP_BUCKETS, registry=registry)
        self.frame_lag = Histogram(
            "moshi_frame_lag_seconds", "How late each answer frame leaves against real time: against the "
            "moment the visitor's frame it answers was due on the visitor's clock (input dropped as stale, "
            "or lost in an outage, does not count against later frames).", ["voice", "transport"],
            buckets=LAG_BUCKETS, registry=registry)
        self.lag_recovery = Histogram(
            "moshi_lag_recovery_seconds", "After a conversation's connection came back (by itself or resumed), "
            "how long until its answers were as little behind as before the interruption.",
            ["voice", "transport"], buckets=RECOVERY_BUCKETS, registry=registry)
        self.queue_wait = Histogram(
            "moshi_queue_wait_seconds", "How long a conversation that got a slot waited for it (0: one was free).",
            ["voice"], buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.stale_input = Counter(
            "moshi_stale_input_frames", "Input frames dropped because they arrived too far behind real time "
            "(a backlog after an outage, a model slower than real time): Moshi answers what is said now.",
            ["voice", "transport"], registry=registry)
        self.interruptions = Counter(
            "moshi_interruptions", "Conversations whose connection went quiet (an outage, a handover), by how "
            "that ended: recovered (the same connection came back), resumed (a new one took it up), lost "
            "(the grace ran out).", ["voice", "transport", "outcome"], registry=registry)
        self.resumes = Counter(
            "moshi_resumes", "Resume attempts, by outcome: resumed, unknown (a wrong token), used (a token "
            "claimed already), expired (its conversation ended).", ["voice", "transport", "outcome"], registry=registry)
        self.input_packets = Counter(
            "moshi_input_packets", "The visitor's audio packets over WebRTC, by what became of them: received, "
            "lost (never arrived), recovered (rebuilt from the next packet's in-band FEC), concealed (lost "
            "and filled by the decoder), late (arrived after a later one, dropped).",
            ["voice", "outcome"], registry=registry)
        self._engines: dict[str, object] = {}
        registry.register(_LiveFigures(self._engines))
        self._workers: WorkerFigures | None = None

    def watch(self, voice: str, engine, as_it_happens: bool = True) -> Callable[[], None]:
        """Report `engine` (a `engine.MoshiEngine`) as `voice`: its live figures when scraped and,
        `as_it_happens`, each batched step and each wait for a slot. Returns what undoes it."""
        self._engines[voice] = engine
        stops = [engine.timings.observe(STEP, self.step.labels(voice).observe),
                 engine.observe_queue_wait(self.queue_wait.labels(voice).observe)] if as_it_happens else []

        def unwatch() -> None:
            for stop in stops:
                stop()
            if self._engines.get(voice) is engine:
                del self._engines[voice]

        return unwatch

    def conversation(self, voice: str | None, transport: str, conversation_id: str) -> ConversationClock:
        return ConversationClock(self, voice or "", transport, conversation_id)

    def gather(self, store: MutableMapping, fresh_s: float = FRESH_S) -> None:
        """Serve beside these figures every worker's that `watch.workers.publish` keeps fresh in
        `store`, with a `worker` label (the page of the scale-out layout)."""
        self._workers = WorkerFigures(store, fresh_s)

    def exposition(self) -> bytes:
        """Every family in Prometheus' text format (`CONTENT_TYPE`), the gathered workers' too."""
        return generate_latest(self.registry if self._workers is None else Merged(self.registry, self._workers))


class ConversationClock:
    """One conversation's times: when it got its slot, its first audio in and out, each answer
    frame against real time; at its end, counted once and logged once."""

    def __init__(self, metrics: Metrics | None, voice: str, transport: str, conversation_id: str) -> None:
        self.metrics = metrics
        self.voice = voice
        self.transport = transport
        self.id = conversation_id
        self.opened = time.monotonic()
        self.started: float | None = None  # when it got its slot
        self.first_in: float | None = None
        self.first_out: float | None = None
        self.frames_out = 0
        self.ending: str | None = None
        self.interrupted_at: float | None = None  # while its connection is interrupted
        self.interruptions = 0
        self.resumes = 0
        self.stale_frames = 0
        self._lag = None  # the frame lag's series, once the voice is known (the first answer)
        self._lags: deque[float] = deque(maxlen=LAG_HISTORY)  # the last answers' lags
        self._normal_lag = NORMAL_LAG_S
        self._back_at: float | None = None  # when its connection came back, until its lag is normal
        self.lag_recoveries: list[float] = []  # seconds from each return of its connection to normal lag

    def _log(self, message: str, *args, **kwargs) -> None:
        """A line about this conversation, from whichever task noticed (the transport's own, say)."""
        with conversation_context(self.id):
            log.info(message, *args, **kwargs)

    def talking(self) -> None:
        """It has its slot: the conversation proper starts."""
        if self.started is None:
            self.started = time.monotonic()

    def heard(self) -> None:
        """Audio of the visitor's went to Moshi."""
        if self.first_in is None:
            self.first_in = time.monotonic()

    def answered(self, due: float | None = None) -> None:
        """A frame of Moshi's voice left for the visitor; `due`: when the visitor's frame it
        answers was due (time.perf_counter(), `AudioOut.due`). Without it the lag is taken
        against a steady 80 ms stream from the first answer."""
        now = time.monotonic()
        if self.first_out is None:
            self.first_out = now
            if self.first_in is not None and self.metrics is not None:
                self.metrics.first_audio.labels(self.voice, self.transport).observe(now - self.first_in)
        else:
            lag = max(0.0, time.perf_counter() - due if due is not None
                      else now - (self.first_out + self.frames_out * FRAME_S))
            if self.metrics is not None:
                if self._lag is None:
                    self._lag = self.metrics.frame_lag.labels(self.voice, self.transport).observe
                self._lag(lag)
            self._follow_lag(now, lag)
        self.frames_out += 1

    def _follow_lag(self, now: float, lag: float) -> None:
        """Keep the conversation's usual lag, and time how soon it is back to it after its
        connection came back."""
        if self._back_at is not None and lag <= self._normal_lag:
            recovery = now - self._back_at
            self._back_at = None
            self.lag_recoveries.append(round(recovery, 3))
            if self.metrics is not None:
                self.metrics.lag_recovery.labels(self.voice, self.transport).observe(recovery)
            self._log("lag back to normal", extra=log_fields(transport=self.transport, after_s=round(recovery, 3),
                                                            lag_s=round(lag, 3)))
        if self.interrupted_at is None and self._back_at is None:
            self._lags.append(lag)

    def stale(self, frames: int) -> None:
        """`frames` input frames were dropped as too far behind real time."""
        self.stale_frames += frames
        if self.metrics is not None and frames:
            self.metrics.stale_input.labels(self.voice, self.transport).inc(frames)

    def interrupted(self) -> None:
        """Its connection went quiet: its grace runs from now."""
        if self.interrupted_at is None:
            self.interrupted_at = time.monotonic()
            self.interruptions += 1
            self._log("connection interrupted", extra=log_fields(transport=self.transport))

    def reconnected(self, outcome: str) -> None:
        """The interruption is over: RECOVERED or RESUMED (LOST: `end` says it). A resume while
        not interrupted (the visitor moved first) counts as one that was."""
        if outcome not in INTERRUPTION_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        if self.interrupted_at is None:
            if outcome != RESUMED:
                return
            self.interrupted()
        quiet_s = round(time.monotonic() - self.interrupted_at, 3)
        self.interrupted_at = None
        self._back_at = time.monotonic()
        if self._lags:
            self._normal_lag = max(NORMAL_LAG_S, 1.5 * sorted(self._lags)[len(self._lags) // 2])
        self.resumes += outcome == RESUMED
        if self.metrics is not None:
            self.metrics.interruptions.labels(self.voice, self.transport, outcome).inc()
        self._log("connection %s", outcome, extra=log_fields(transport=self.transport, interrupted_s=quiet_s))

    def resume_attempt(self, outcome: str) -> None:
        """A resume token was presented for this conversation's transport (see `door.resume`)."""
        if self.metrics is not None:
            self.metrics.resumes.labels(self.voice, self.transport, outcome).inc()

    def input_packets(self, counts: dict[str, int]) -> None:
        """The WebRTC audio packets of the visitor's, by outcome (received, lost, recovered, ...)."""
        if self.metrics is not None:
            for outcome, count in counts.items():
                if count:
                    self.metrics.input_packets.labels(self.voice, outcome).inc(count)

    @property
    def first_audio_s(self) -> float | None:
        if self.first_in is None or self.first_out is None:
            return None
        return self.first_out - self.first_in

    @property
    def talked_s(self) -> float | None:
        """How long it has had its slot, outages and handovers included (None before it got one)."""
        return time.monotonic() - self.started if self.started is not None else None

    def end(self, ending: str, reason: str = "", **figures: object) -> bool:
        """Count the conversation as ended so (one of ENDINGS) and log its one end line; only the
        first call counts. Returns whether this call did."""
        if self.ending is not None:
            return False
        if ending not in ENDINGS:
            raise ValueError(f"unknown ending {ending!r}")
        self.ending = ending
        if self.metrics is not None:
            self.metrics.conversations.labels(self.voice, self.transport, ending).inc()
            if self.interrupted_at is not None:  # it ended while interrupted: lost for good
                self.metrics.interruptions.labels(self.voice, self.transport, LOST).inc()
        now = time.monotonic()
        first_audio, talked = self.first_audio_s, self.talked_s
        fields = {
            "transport": self.transport,
            "voice": self.voice or None,
            "ending": ending,
            "duration_s": round(talked, 3) if talked is not None else 0.0,
            "waited_s": round((self.started or now) - self.opened, 3),
            "first_audio_s": round(first_audio, 3) if first_audio is not None else None,
            "frames_out": self.frames_out,
            **({"interruptions": self.interruptions, "resumes": self.resumes} if self.interruptions else {}),
            **({"stale_frames": self.stale_frames} if self.stale_frames else {}),
            **({"lag_recoveries_s": self.lag_recoveries} if self.lag_recoveries else {}),
            **figures,
            "reason": reason or None,
        }
        log.info("conversation refused" if ending == REFUSED else "conversation ended", extra=log_fields(**fields))
        return True


class _LiveFigures:
    """The watched engines' figures of the moment, read at each scrape."""

    def __init__(self, engines: dict[str, object]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        slots = GaugeMetricFamily("moshi_slots", "Conversation slots (batch rows) of the voice's model.",
                                  labels=["voice"])
        leased = GaugeMetricFamily("moshi_slots_leased", "Slots held by a conversation now.", labels=["voice"])
        waiting = GaugeMetricFamily("moshi_queue_waiting", "Visitors waiting in line for a slot now.",
                                    labels=["voice"])
        restarts = CounterMetricFamily("moshi_model_restarts", "Model processes that died and were replaced.",
                                       labels=["voice"])
        dropped = CounterMetricFamily("moshi_dropped_audio_frames", "Answer frames dropped because a "
                                      "client could not take them in time.", labels=["voice"])
        model = InfoMetricFamily("moshi_model", "The voice's model: its name, the weights' precision, the "
                                 "compute dtype and the device.", labels=["voice"])
        for voice, engine in list(self._engines.items()):
            slots.add_metric([voice], engine.capacity)
            leased.add_metric([voice], engine.active)
            waiting.add_metric([voice], engine.line.waiting)
            restarts.add_metric([voice], engine.model.restarts)
            dropped.add_metric([voice], engine.dropped_audio_frames)
            info = engine.info
            model.add_metric([voice], {"model": str(info.model), "weights": str(info.weights),
                                       "dtype": str(info.dtype), "device": str(info.device)})
        yield from (slots, leased, waiting, restarts, dropped, model)
