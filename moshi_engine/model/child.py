"""The model process's side of `process`: load and warm the slots, then read the server's
messages between steps and step, until told to close, or until the model is broken.

A step that fails ends the conversations in it (their rows are reset) and the process goes on.
But a CUDA error leaves the device's context unusable, and steps that keep failing will not
do better: then this process exits (EXIT_BROKEN), and the server starts a fresh one.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection

from ..watch.logs import configure_logging
from .batched import BatchedMoshi, Lease, StepOutput
from .loading import freeze_garbage_collector, load_slots

log = logging.getLogger(__name__)

FAILED_STEPS_TO_EXIT = 3  # steps failing in a row after which a process gives up on its model
EXIT_BROKEN = 3  # its exit code then

# Messages, as tuples whose first item says what they are. To the child:
_LEASE, _FRAME, _RELEASE, _RUN, _CLOSE = "lease", "frame", "release", "run", "close"
# ...and from it:
_READY, _FAILED, _STEP, _RESULT = "ready", "failed", "step", "result"


def serve(fd: int) -> None:
    """The child, on its end `fd` of the socket pair: load and warm the slots as the first message
    says, then take messages until told to close (or until the server is gone: the pipe ends)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server closes us
    conn = Connection(fd)
    model, device, sessions, warmup_frames, gather_ms, context, min_step_ms, log_level, log_format = conn.recv()
    configure_logging(log_format, log_level)  # as the server logs: text, or JSON lines
    try:
        batched, info, default_sampling = load_slots(model, device, sessions, warmup_frames, gather_ms, thread=False,
                                                     context=context, min_step_ms=min_step_ms)
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
        conn.send((_FAILED, _picklable(error)))
        return

    failed_steps: list[BaseException] = []  # the errors of the last steps, while they fail in a row

    def sink(items: list[tuple[Lease, StepOutput | BaseException]]) -> None:
        outputs = [(lease.ident, None, None, f"{type(out).__name__}: {out}") if isinstance(out, BaseException)
                   else (lease.ident, out.pcm, out.text, None) for lease, out in items]
        conn.send((_STEP, outputs, batched.timings.take_journal()))
        errors = [out for _, out in items if isinstance(out, BaseException)]
        if errors and len(errors) == len(items):
            failed_steps.append(errors[0])
        elif items:
            failed_steps.clear()

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
            if failed_steps and (_is_cuda_error(failed_steps[-1]) or len(failed_steps) >= FAILED_STEPS_TO_EXIT):
                # A CUDA error leaves the device's context unusable, and no later step would do better:
                # exit, and the server starts a fresh process.
                log.error("giving up on this model after %d failed step(s) in a row (last: %s); exiting",
                          len(failed_steps), failed_steps[-1])
                conn.close()  # the server hears of it at once,
                os._exit(EXIT_BROKEN)  # and nothing more runs on a device that may not answer
    finally:
        batched.close()
        conn.close()


def _is_cuda_error(error: BaseException) -> bool:
    """Whether `error` comes from the CUDA runtime (an illegal memory access, a device-side
    assertion, a launch failure), after which the process's CUDA context cannot be trusted."""
    import torch

    return isinstance(error, torch.AcceleratorError) or str(error).startswith("CUDA error")


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
