"""The batched model in a process of its own, so that the server's Python never waits on it.

In one process the stepping thread and the server's event loop share one interpreter
lock: every websocket message, Opus packet and session wake-up the loop handles is time
the step cannot run its Python (moshi's per-step work is hundreds of small torch calls,
each giving the lock up and waiting to get it back). Measured on a 2-core machine at 16
conversations, the step held the lock about half of the time and the loop the other
half. As in vLLM's engine-core process, the model runs in a child process (spawned, so
CUDA works there; its own interpreter, so nothing of the server's `__main__` runs there)
where one thread reads the server's messages between steps and steps, and the server keeps a
`ModelProcess`: the same slots interface as `model.BatchedMoshi` (`lease`, `submit`,
`release`, `run`, `close`), over a pipe.

The server decides who holds which slot, so a lease is answered at once (BusyError when
none is free); the child is told in order: "lease slot s as conversation c", c's frames,
"release s". Each step's outputs come back in one message, tagged with the conversation,
so that a late output of a conversation that has ended is dropped, not handed to the
next one on its slot. A step's stage timings come with it, for `/status`. If the child
dies, every conversation ends with an error and new ones are refused with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import signal
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

from .conversation import BusyError, Sampling, SessionClosed
from .model import BatchedMoshi, Delivery, Lease, StepOutput, deliver_to_loops
from .timings import STEP, StageTimings

if TYPE_CHECKING:
    from .engine import EngineInfo

log = logging.getLogger(__name__)

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # where `import moshi_engine` works

START_TIMEOUT_S = 1800.0  # a first start downloads ~15 GB of weights
CLOSE_TIMEOUT_S = 30.0

# Messages, as tuples whose first item says what they are. To the child:
_LEASE, _FRAME, _RELEASE, _RUN, _CLOSE = "lease", "frame", "release", "run", "close"
# ...and from it:
_READY, _FAILED, _STEP, _RESULT = "ready", "failed", "step", "result"


class ModelProcess:
    """A child process stepping N conversation slots of one Moshi; see the module's docstring.

    Start it with `ModelProcess.start(...)`; `info`, `default_sampling` and `capacity` are
    then what the child loaded.
    """

    def __init__(self, process: subprocess.Popen, conn: Connection, info: EngineInfo, default_sampling: Sampling,
                 capacity: int) -> None:
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
        self._stopped: str | None = None  # why the child is gone, once it is
        self.on_stop: Callable[[str], None] | None = None  # told why, from the reader thread
        self._reader = threading.Thread(target=self._read, name="moshi-model-process", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, model: str, device: str, sessions: int | str, warmup_frames: int,
              gather_ms: float) -> ModelProcess:
        """Start the child, which loads `model` on `device` with `sessions` slots and warms them
        up (`engine.load_slots`); returns once it is ready, or raises what it raised."""
        ours, theirs = socket.socketpair()
        path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-c", f"from moshi_engine.modelprocess import serve; serve({theirs.fileno()})"],
            pass_fds=[theirs.fileno()], env={**os.environ, "PYTHONPATH": path})
        theirs.close()
        conn = Connection(ours.detach())
        try:
            conn.send((model, device, sessions, warmup_frames, gather_ms, logging.getLogger().getEffectiveLevel()))
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
        _, info, default_sampling, capacity = message
        log.info("model process %d serves %d slot(s)", process.pid, capacity)
        return cls(process, conn, info, default_sampling, capacity)

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

    # ## The slots interface of model.BatchedMoshi, called from event loops

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

    def submit(self, lease: Lease, frame: np.ndarray) -> None:
        """Queue one FRAME_SIZE pcm frame of `lease`'s conversation; call it from the event loop
        that is to receive the outputs."""
        if lease.loop is None:
            lease.loop = asyncio.get_running_loop()
        if lease.released or self._slots[lease.slot] is not lease:
            raise SessionClosed("session is closed")
        # perf_counter is the system's monotonic clock: the child measures the wait from here.
        self._send((_FRAME, lease.ident, frame, time.perf_counter()))

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
        """Stop the child (its slots' conversations get no more outputs) and wait for it."""
        self._send((_CLOSE,))
        try:
            self._process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the model process did not stop in %.0f s; killing it", CLOSE_TIMEOUT_S)
            self._process.kill()
            self._process.wait()
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
        """The reader thread: hands each step's outputs to their conversations' loops."""
        while True:
            try:
                message = self._conn.recv()
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
            self._process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # its end of the pipe closed, yet it runs: end it
            self._process.kill()
            self._process.wait()
        self._stop(f"Moshi's model process stopped (exit code {self._process.returncode})")

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

    def _stop(self, reason: str) -> None:
        """The child is gone: end every conversation and job with `reason`, refuse new ones."""
        with self._lock:
            expected = self._stopped is None and self._process.returncode == 0
            self._stopped = reason
            leases = [lease for lease in self._slots if lease is not None]
            jobs, self._jobs = list(self._jobs.values()), {}
        if leases or not expected:
            log.error("%s; %d conversation(s) end", reason, len(leases))
        deliver_to_loops([(lease, RuntimeError(reason)) for lease in leases])
        for future in jobs:
            future.set_exception(RuntimeError(reason))
        if self.on_stop is not None:
            self.on_stop(reason)


def serve(fd: int) -> None:
    """The child, on its end `fd` of the socket pair: load and warm the slots as the first message
    says, then take messages until told to close (or until the server is gone: the pipe ends)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server closes us
    conn = Connection(fd)
    model, device, sessions, warmup_frames, gather_ms, log_level = conn.recv()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .engine import freeze_garbage_collector, load_slots

    try:
        batched, info, default_sampling = load_slots(model, device, sessions, warmup_frames, gather_ms, thread=False)
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
        conn.send((_FAILED, _picklable(error)))
        return

    def sink(items: list[tuple[Lease, StepOutput | BaseException]]) -> None:
        outputs = [(lease.ident, None, None, f"{type(out).__name__}: {out}") if isinstance(out, BaseException)
                   else (lease.ident, out.pcm, out.text, None) for lease, out in items]
        conn.send((_STEP, outputs, batched.timings.take_journal()))

    batched.timings.take_journal()  # from now on, every step's timings go to the parent
    batched.sink = sink
    leases: dict[int, Lease] = {}
    freeze_garbage_collector()
    conn.send((_READY, info, default_sampling, batched.capacity))
    try:
        # One thread does everything: it waits on the socket only while no step is due, reads
        # every message that has come, then steps. Frames only count at a step's start, so
        # reading them between steps delays nothing, and nothing else wants the interpreter.
        while True:
            due = batched.due_in()
            if due != 0:
                conn.poll(due)  # a message, or a gathering step falling due, wakes it
            while conn.poll(0):
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return  # the server is gone
                except Exception:  # noqa: BLE001 - a message that does not unpickle here: skip it
                    log.exception("a message from the server could not be read")
                    continue
                if message[0] == _CLOSE:
                    return
                try:
                    _handle(message, batched, leases, conn.send)
                except Exception:  # noqa: BLE001 - one bad message must not stop every conversation
                    log.exception("handling %r from the server failed", message[0])
            batched.step_when_due()
    finally:
        batched.close()
        conn.close()


def _handle(message: tuple, batched: BatchedMoshi, leases: dict[int, Lease], send: Callable[[tuple], None]) -> None:
    """One message from the server, in the child."""
    kind = message[0]
    if kind == _FRAME:
        lease = leases.get(message[1])
        if lease is not None:  # else it has ended since
            batched.submit(lease, message[2], message[3])
    elif kind == _LEASE:
        _, slot, ident, sampling = message
        leases[ident] = batched.lease(sampling, None, slot=slot, ident=ident)
    elif kind == _RELEASE:
        lease = leases.pop(message[1], None)
        if lease is not None:
            batched.release(lease)
    elif kind == _RUN:
        _, job, fn, args = message
        try:
            result = (_RESULT, job, True, batched.run(fn, *args))
        except Exception as error:  # noqa: BLE001 - handed to the caller
            result = (_RESULT, job, False, _picklable(error))
        try:
            send(result)
        except Exception as error:  # noqa: BLE001 - e.g. a result that does not pickle
            send((_RESULT, job, False, _picklable(error)))


def _picklable(error: BaseException) -> BaseException:
    """`error` itself if it pickles (our typed errors do), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
