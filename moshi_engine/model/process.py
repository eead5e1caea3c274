"""The batched model in a process of its own, so that the server's Python never waits on it.

In one process the stepping thread and the server's event loop share one interpreter
lock: every websocket message, Opus packet and session wake-up the loop handles is time
the step cannot run its Python (moshi's per-step work is hundreds of small torch calls,
each giving the lock up and waiting to get it back). Measured on a 2-core machine at 16
conversations, the step held the lock about half of the time and the loop the other
half. As in vLLM's engine-core process, the model runs in a child process (spawned, so
CUDA works there; its own interpreter, so nothing of the server's `__main__` runs there)
where one thread reads the server's messages between steps and steps, and the server keeps a
`ModelProcess`: the same slots interface as `batched.BatchedMoshi` (`lease`, `submit`,
`release`, `run`, `close`), over a pipe.

The server decides who holds which slot, so a lease is answered at once (BusyError when
none is free); the child is told in order: "lease slot s as conversation c", c's frames,
"release s". Each step's outputs come back in one message, tagged with the conversation,
so that a late output of a conversation that has ended is dropped, not handed to the
next one on its slot. A step's stage timings come with it, for `/status`.

If the child dies (the kernel's OOM killer, a crash in native code) or gives up on its model
(a CUDA error, or steps failing in a row: `child`, the child's side), every conversation
on it ends with an error, new ones are refused with the reason, and another child like it is
started and warmed up; once it is ready, conversations are admitted again. vLLM leaves that
to its orchestrator; here the server does it, so that a demo left running on a Space or a
Modal container comes back by itself. A child that dies soon after its start is started
again after a growing wait (`restart_delay`), not in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..conversation import BusyError, Sampling, SessionClosed
from ..timings import STEP, StageTimings
from ..watch.logs import current_format
from .batched import Delivery, Lease, StepOutput, deliver_to_loops
from .child import _CLOSE, _FAILED, _FRAME, _LEASE, _RELEASE, _RESULT, _RUN, _STEP
from .sizing import AutoShare

if TYPE_CHECKING:
    from .loading import EngineInfo

log = logging.getLogger(__name__)

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # where `import moshi_engine` works

START_TIMEOUT_S = 1800.0  # a first start downloads ~15 GB of weights
CLOSE_TIMEOUT_S = 30.0
RESTART_STABLE_S = 60.0  # a child that ran this long is restarted at once when it dies
RESTART_DELAYS_S = (1.0, 300.0)  # else the first wait before starting another, and the longest
RESTART_TRIES = 5  # replacements failing to start in a row, after which the model is lost for good


def restart_delay(lived_s: float, previous_s: float) -> float:
    """Seconds to wait before starting another child, after one that ran `lived_s` died when the
    wait before it was `previous_s` (0 for a first restart): none after a child that ran
    RESTART_STABLE_S, else twice the last wait, from RESTART_DELAYS_S[0] up to RESTART_DELAYS_S[1]."""
    first, longest = RESTART_DELAYS_S
    if lived_s >= RESTART_STABLE_S:
        return 0.0
    return min(max(2 * previous_s, first), longest)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What a child is started with; `run` starts one and returns it once it is ready."""

    model: str
    device: str
    sessions: int | str | AutoShare
    warmup_frames: int
    gather_ms: float
    context: int | None = None
    min_step_ms: float = 0.0

    def run(self, on_spawn: Callable[[subprocess.Popen], None] | None = None) -> tuple:
        """(process, connection, (info, default_sampling, capacity)) of a ready child, or raises
        what it raised while loading. `on_spawn` hears of the process as soon as it exists."""
        ours, theirs = socket.socketpair()
        path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-c", f"from moshi_engine.model.child import serve; serve({theirs.fileno()})"],
            pass_fds=[theirs.fileno()], env={**os.environ, "PYTHONPATH": path})
        theirs.close()
        conn = Connection(ours.detach())
        try:
            if on_spawn is not None:
                on_spawn(process)
            conn.send((self.model, self.device, self.sessions, self.warmup_frames, self.gather_ms, self.context,
                       self.min_step_ms,
                       logging.getLogger().getEffectiveLevel(), current_format()))
            if not conn.poll(START_TIMEOUT_S):
                raise TimeoutError(f"the model process did not start in {START_TIMEOUT_S:.0f} s")
            message = conn.recv()
        except BaseException as error:
            process.kill()
            process.wait()
            conn.close()
            if isinstance(error, (EOFError, OSError)):
                raise RuntimeError(f"the model process exited while loading (exit code {process.returncode})") from None
            raise
        if message[0] == _FAILED:
            process.wait(CLOSE_TIMEOUT_S)
            conn.close()
            raise message[1]
        log.info("model process %d serves %d slot(s)", process.pid, message[3])
        return process, conn, message[1:]


class ModelProcess:
    """A child process stepping N conversation slots of one Moshi; see the module's docstring.

    Start it with `ModelProcess.start(...)`; `info`, `default_sampling` and `capacity` are
    then what the child loaded. `stopped` says why conversations are refused while a child
    that died is replaced (None while one serves); `restarts` counts the replacements.
    """

    def __init__(self, launch: _Launch, process: subprocess.Popen, conn: Connection, info: EngineInfo,
                 default_sampling: Sampling, capacity: int) -> None:
        self.info = info
        self.default_sampling = default_sampling
        self.timings = StageTimings()
        self.rows_per_step: deque[int] = deque(maxlen=500)
        self._process = process
        self._conn = conn
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._slots: list[Lease | None] = [None] * capacity
        self._conversations: dict[int, Lease] = {}
        self._idents = itertools.count(1)
        self._jobs: dict[int, Future] = {}
        self._stopped: str | None = None  # why the child is gone, until another is ready
        self.on_stop: Callable[[str, bool], None] | None = None  # told why, and whether another starts
        self.on_restart: Callable[[], None] | None = None  # told when another child is ready
        self.on_lost: Callable[[str], None] | None = None  # told why, if none will be (RESTART_TRIES)
        self.restarts = 0
        self._launch = launch  # another child is started the same way, with as many slots
        self._started_at = time.monotonic()
        self._restart_delay_s = 0.0
        self._starting: subprocess.Popen | None = None  # a replacement child, while it loads
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, name="moshi-model-process", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, model: str, device: str, sessions: int | str | AutoShare, warmup_frames: int,
              gather_ms: float, context: int | None = None, min_step_ms: float = 0.0) -> ModelProcess:
        """Start the child, which loads `model` on `device` (with an attention window of `context`
        steps) with `sessions` slots and warms them up (`loading.load_slots`); returns once it is
        ready, or raises what it raised."""
        launch = _Launch(model, device, sessions, warmup_frames, gather_ms, context, min_step_ms)
        process, conn, (info, default_sampling, capacity) = launch.run()
        return cls(dataclasses.replace(launch, sessions=capacity), process, conn, info, default_sampling, capacity)

    @property
    def stopped(self) -> str | None:
        """Why conversations are refused (the child died and another is starting), else None."""
        return self._stopped

    @property
    def capacity(self) -> int:
        return len(self._slots)

    @property
    def active(self) -> int:
        with self._lock:
            return sum(lease is not None for lease in self._slots)

    @property
    def pid(self) -> int:
        return self._process.pid

    # ## The slots interface of batched.BatchedMoshi, called from event loops

    def lease(self, sampling: Sampling, deliver: Delivery) -> Lease:
        """The lowest free slot for a conversation sampling with `sampling` (BusyError if none)."""
        with self._lock:
            if self._stopped is not None:
                raise BusyError(self._stopped)
            for slot, holder in enumerate(self._slots):
                if holder is None:
                    lease = self._slots[slot] = Lease(slot, sampling, deliver, ident=next(self._idents))
                    self._conversations[lease.ident] = lease
                    # Under the lock: the child hears of a slot's release before of its next lease.
                    self._send((_LEASE, slot, lease.ident, sampling))
                    return lease
        raise BusyError(f"all {self.capacity} conversation slots are taken")

    def submit(self, lease: Lease, frame: np.ndarray, arrived: float | None = None) -> None:
        """Queue one FRAME_SIZE pcm frame of `lease`'s conversation; call it from the event loop
        that is to receive the outputs. `arrived`: when the frame was whole (time.perf_counter(),
        default now)."""
        if lease.loop is None:
            lease.loop = asyncio.get_running_loop()
        if lease.released or self._slots[lease.slot] is not lease:
            raise SessionClosed("session is closed")
        # perf_counter is the system's monotonic clock: the child measures the wait from here.
        self._send((_FRAME, lease.ident, frame, time.perf_counter() if arrived is None else arrived))

    def release(self, lease: Lease) -> None:
        """Free `lease`'s slot at once (its row is reset before anyone else's frame). Idempotent."""
        with self._lock:
            lease.released = True
            if self._slots[lease.slot] is not lease:
                return
            self._slots[lease.slot] = None
            del self._conversations[lease.ident]
            self._send((_RELEASE, lease.ident))

    def run(self, fn: Callable, *args):
        """Run fn(model, *args) in the child between its steps, `model` being its BatchedMoshi,
        and wait for the result; fn and args must pickle (a module's function)."""
        future: Future = Future()
        with self._lock:
            if self._stopped is not None:
                raise RuntimeError(self._stopped)
            job = next(self._idents)
            self._jobs[job] = future
        try:
            self._send((_RUN, job, fn, args))
        except Exception:  # e.g. a function that does not pickle: nothing was sent
            with self._lock:
                self._jobs.pop(job, None)
            raise
        return future.result()

    def close(self) -> None:
        """Stop the child (its slots' conversations get no more outputs) and wait for it; a
        replacement that is still loading is killed."""
        with self._lock:
            self._closing.set()  # from here on no replacement is installed: these are the last
            process, starting = self._process, self._starting
        self._send((_CLOSE,))
        if starting is not None:
            starting.kill()
        try:
            process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the model process did not stop in %.0f s; killing it", CLOSE_TIMEOUT_S)
            process.kill()
            process.wait()
        self._reader.join(CLOSE_TIMEOUT_S)
        self._conn.close()

    # ## Both ends of the pipe

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone; _read says why to everyone
                pass

    def _read(self) -> None:
        """The reader thread: hands each step's outputs to their conversations' loops and, when
        the child dies, ends its conversations and starts another."""
        while True:
            self._read_child()
            if self._closing.is_set() or not self._restart():
                return

    def _read_child(self) -> None:
        """Until the current child is gone; then end its conversations and jobs (`_stop`)."""
        conn, process = self._conn, self._process
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == _STEP:
                self._hand_on(message[1], message[2])
            elif message[0] == _RESULT:
                _, job, ok, value = message
                with self._lock:
                    future = self._jobs.pop(job)
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        try:
            process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # its end of the pipe closed, yet it runs: end it
            process.kill()
            process.wait()
        closing = self._closing.is_set()
        reason = f"Moshi's model process stopped (exit code {process.returncode})"
        if not closing:
            reason += "; it is restarting, try again in a minute"
        self._stop(reason, restarting=not closing, expected=closing and process.returncode == 0)

    def _restart(self) -> bool:
        """Start children like the one that died until one is ready (waiting `restart_delay`
        between tries) and serve its slots. False, everyone told why, if closed meanwhile or
        if RESTART_TRIES children in a row failed to start (then `on_lost` hears it too)."""
        self._restart_delay_s = restart_delay(time.monotonic() - self._started_at, self._restart_delay_s)
        failed = 0
        while not self._closing.wait(self._restart_delay_s):
            log.warning("starting another model process%s",
                        f" after {self._restart_delay_s:g} s" if self._restart_delay_s else "")
            try:
                process, conn, (_, _, capacity) = self._launch.run(on_spawn=self._spawned)
            except Exception as error:  # noqa: BLE001 - logged, and tried again
                if self._closing.is_set():
                    break  # killed by close() while it loaded
                failed += 1
                if failed >= RESTART_TRIES:  # a device gone bad, weights gone: no try will do better
                    reason = (f"Moshi's model process could not be restarted ({failed} tries, the last: "
                              f"{type(error).__name__}: {error})")
                    log.critical("%s; giving up", reason)
                    self._stop(reason, restarting=False, expected=False)
                    if self.on_lost is not None:
                        self.on_lost(reason)
                    return False
                self._restart_delay_s = restart_delay(0.0, self._restart_delay_s)
                log.error("the new model process failed to start (%s: %s); next try in %g s",
                          type(error).__name__, error, self._restart_delay_s)
                continue
            finally:
                with self._lock:
                    self._starting = None
            with self._send_lock, self._lock:
                serving = not self._closing.is_set()
                if serving:
                    old, self._conn, self._process = self._conn, conn, process
                    self._slots = [None] * capacity  # every lease of the old child has ended
                    self._conversations.clear()
                    self._stopped = None
                    self._started_at = time.monotonic()
                    self.restarts += 1
            if not serving:  # closed in the moment it became ready: it never served
                with contextlib.suppress(OSError):
                    conn.send((_CLOSE,))
                process.wait(CLOSE_TIMEOUT_S)
                conn.close()
                break
            old.close()
            log.warning("model process %d serves %d slot(s) again (restart %d)", process.pid, capacity,
                        self.restarts)
            if self.on_restart is not None:
                self.on_restart()
            return True
        self._stop("Moshi's model process was closed", restarting=False, expected=True)
        return False

    def _spawned(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._starting = process
        if self._closing.is_set():  # close() came before it could see this process
            process.kill()

    def _hand_on(self, outputs: list[tuple], journal: list[tuple[str, float]]) -> None:
        for stage, seconds in journal:
            self.timings.record(stage, seconds)
        if any(stage == STEP for stage, _ in journal):
            self.rows_per_step.append(len(outputs))
        items = []
        with self._lock:
            for ident, pcm, text, error in outputs:
                lease = self._conversations.get(ident)
                if lease is not None:  # else it ended while its frame was stepped
                    items.append((lease, StepOutput(pcm, text) if error is None else RuntimeError(error)))
        deliver_to_loops(items)

    def _stop(self, reason: str, restarting: bool, expected: bool) -> None:
        """The child is gone: end every conversation and job with `reason`, refuse new ones."""
        with self._lock:
            self._stopped = reason
            leases = [lease for lease in self._slots if lease is not None]
            jobs, self._jobs = list(self._jobs.values()), {}
        if leases or not expected:
            log.error("%s; %d conversation(s) end", reason, len(leases))
        deliver_to_loops([(lease, RuntimeError(reason)) for lease in leases])
        for future in jobs:
            future.set_exception(RuntimeError(reason))
        if self.on_stop is not None:
            self.on_stop(reason, restarting)
