"""N conversations on one Moshi: one Mimi and one LMGen streaming with batch size N,
stepped by one thread.

Each batch row is a slot. A conversation leases a slot and owns that row of every
streaming state (Mimi's convolution buffers and transformer caches, the LM's KV
cache, LMGen's delay buffer, its own sampling settings and random generator)
until it releases it. Rows join and leave at any step: a leased row is reset
alone (a masked reset) before its first frame, and a step runs every row whose
next frame is ready while the others are masked, left exactly as they were.

The stepping thread is the only one that touches the modules. Its loop, as in
Kyutai's batched servers: take the rows to reset and one ready frame per row,
reset those rows, step, hand each row's output to its conversation. It waits on
a condition variable when there is nothing to do, and steps as soon as any row
has a frame: with the batch shape fixed (CUDA graphs need it), a step costs the
same whoever is in it, so waiting to gather more rows would only add latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import sentencepiece
import torch
from moshi.models import LMModel, MimiModel

from ..audio import FRAME_SIZE
from ..conversation import BusyError, Sampling, SessionClosed
from ..timings import LM_STEP, MIMI_DECODE, MIMI_ENCODE, STEP, STEP_WAIT, StageTimings
from .cpukernels import use_cpu_kernels
from .rowsampling import RowSamplingLMGen

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one row: a FRAME_SIZE pcm frame (None during the
    model's initial delay) and a text piece (None for padding)."""

    pcm: np.ndarray | None
    text: str | None


Delivery = Callable[[StepOutput | BaseException], None]
# What the stepping thread hands on after each step: every stepped row's lease and its output.
Sink = Callable[[list[tuple["Lease", StepOutput | BaseException]]], None]


@dataclass(eq=False)
class Lease:
    """A conversation's hold on one slot, from `BatchedMoshi.lease` to `release`.

    `deliver` is called on `loop` (the loop that submits its frames), once per frame
    the conversation submitted, with that frame's StepOutput, or with the exception if
    its step failed. `ident` names the conversation across a process boundary
    (`process`).
    """

    slot: int
    sampling: Sampling
    deliver: Delivery | None
    loop: asyncio.AbstractEventLoop | None = None
    released: bool = False
    ident: int = 0


@dataclass(eq=False)
class _Slot:
    lease: Lease | None = None
    frames: deque[tuple[np.ndarray, float]] = field(default_factory=deque)  # (pcm, time it arrived)
    needs_reset: bool = True
    first_frame: bool = True


class BatchedMoshi:
    """Mimi + LMGen with `slots` batch rows, one conversation per row, and the thread that steps them.

    `gather_ms` > 0 makes a step wait up to that long after its first frame arrived for
    the other conversations' frames (fewer, fuller steps: less compute, more latency);
    0, the default, steps as soon as any frame is ready (see the module's docstring).
    `min_step_ms` makes every step last at least that long (the LM's part waits out the rest):
    for tests and the benchmark, a tiny model that takes as long as a real one on a loaded GPU.
    `sink` receives each step's outputs on the stepping thread; by default each goes to
    its lease's `deliver` on the lease's event loop (`deliver_to_loops`). With
    `thread=False` no thread is started: the caller steps with `step_when_due`, from the
    one thread that touches the modules (the model process does, between its messages).
    """

    def __init__(
        self,
        mimi: MimiModel,
        lm: LMModel,
        tokenizer: sentencepiece.SentencePieceProcessor,
        slots: int,
        timings: StageTimings,
        lm_gen_kwargs: dict | None = None,
        gather_ms: float = 0.0,
        thread: bool = True,
        min_step_ms: float = 0.0,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.device = lm.device
        if self.device.type == "cpu":
            use_cpu_kernels(mimi)
        self.mimi = mimi
        self.lm_gen = RowSamplingLMGen(lm, slots, **(lm_gen_kwargs or {}))
        self.tokenizer = tokenizer
        self.timings = timings
        self.gather_s = gather_ms / 1000.0
        self.min_step_s = min_step_ms / 1000.0
        self.sink: Sink = deliver_to_loops
        self.rows_per_step: deque[int] = deque(maxlen=500)
        self.restarts = 0  # as `ModelProcess.restarts`: this one steps in this process, and never restarts
        self._skip_ids = {lm.text_padding_token_id, lm.end_of_text_padding_id}
        self._warned_vocabulary = False
        self._slots = [_Slot() for _ in range(slots)]
        self._jobs: deque[tuple[Callable, tuple, Future]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        # All N rows exist from the start: CUDA graphs are captured for this batch shape.
        # The modules stream until close(), which frees the rows for the next engine.
        self._streaming = contextlib.ExitStack()
        try:
            self._streaming.enter_context(self.mimi.streaming(slots))
            self._streaming.enter_context(self.lm_gen.streaming(slots))
        except BaseException:  # out of memory, say: leave the modules as they were
            self._streaming.close()
            raise
        self._thread = threading.Thread(target=self._run, name="moshi-step", daemon=True) if thread else None
        if self._thread is not None:
            self._thread.start()

    @property
    def capacity(self) -> int:
        return len(self._slots)

    @property
    def active(self) -> int:
        with self._cond:
            return sum(slot.lease is not None for slot in self._slots)

    @property
    def stopped(self) -> str | None:
        """Why no conversation can lease a slot now, else None (as `ModelProcess.stopped`)."""
        return "Moshi is shutting down" if self._closing else None

    # ## Leases: called from the event loop

    def lease(self, sampling: Sampling, deliver: Delivery | None, slot: int | None = None, ident: int = 0) -> Lease:
        """The lowest free slot (or slot `slot`) for a conversation sampling with `sampling`
        (BusyError if none). Its row is reset, and configured for `sampling`, before its first
        frame is stepped. Thread-safe."""
        with self._cond:
            if self._closing:
                raise BusyError("Moshi is shutting down")
            for index in range(self.capacity) if slot is None else [slot]:
                chosen = self._slots[index]
                if chosen.lease is None:
                    chosen.lease = Lease(index, sampling, deliver, ident=ident)
                    chosen.needs_reset = True
                    return chosen.lease
        raise BusyError(f"all {self.capacity} conversation slots are taken" if slot is None
                        else f"slot {slot} is taken")

    def submit(self, lease: Lease, frame: np.ndarray, arrived: float | None = None) -> None:
        """Queue one FRAME_SIZE pcm frame of `lease`'s conversation for stepping; call it
        from the event loop that is to receive the outputs (with the default sink).
        `arrived`: when the frame was whole (time.perf_counter(), default now)."""
        if lease.loop is None and self.sink is deliver_to_loops:
            lease.loop = asyncio.get_running_loop()
        with self._cond:
            slot = self._slots[lease.slot]
            if slot.lease is not lease:
                raise SessionClosed("session is closed")
            slot.frames.append((frame, time.perf_counter() if arrived is None else arrived))
            self._cond.notify()

    def release(self, lease: Lease) -> None:
        """Free `lease`'s slot at once; its queued frames are dropped and its row is reset
        before anyone else's frame is stepped on it. Idempotent."""
        with self._cond:
            lease.released = True
            slot = self._slots[lease.slot]
            if slot.lease is lease:
                slot.lease = None
                slot.frames.clear()
                slot.needs_reset = True
                self._cond.notify()

    def run(self, fn: Callable, *args):
        """Run fn(self, *args) on the stepping thread between steps and wait for its result
        (set-up code, warm-up, tests); without a thread, here and now."""
        if self._thread is None:
            with torch.no_grad():
                return fn(self, *args)
        future: Future = Future()
        with self._cond:
            self._jobs.append((fn, args, future))
            self._cond.notify()
        return future.result()

    def close(self) -> None:
        """Stop stepping and end the modules' streaming: another BatchedMoshi may then serve
        the same Mimi and LM. Leases still held get no more outputs."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self._streaming.close()

    # ## The stepping thread

    def _run(self) -> None:
        while self.step_when_due(wait=True):
            pass

    def step_when_due(self, wait: bool = False) -> bool:
        """Run what is due: jobs, row resets, and a step of the ready frames. With `wait`,
        first wait until something is due; without, return at once if nothing is. False once
        closing. The stepping thread's loop; a caller that steps without one (`thread=False`)
        calls it itself."""
        with self._cond:
            while (due := self._due_in()) != 0:
                if not wait:
                    return not self._closing
                self._cond.wait(due)
            if self._closing:
                for _, _, future in self._jobs:
                    future.cancel()
                return False
            jobs, self._jobs = list(self._jobs), deque()
            resets = self._take_resets()
            batch = self._take_frames()
        with torch.no_grad():  # grad mode is per thread: whichever thread steps, none is recorded
            for fn, args, future in jobs:
                try:
                    future.set_result(fn(self, *args))
                except BaseException as error:  # noqa: B036 - handed to the waiting caller
                    future.set_exception(error)
            try:
                if resets:
                    self._reset_rows(resets)
                if batch:
                    self._deliver(batch, self._step([(lease.slot, frame, arrived) for lease, frame, arrived in batch]))
            except Exception as error:
                log.exception("a batched step failed; the rows in it are reset")
                with self._cond:
                    for lease, _, _ in batch:
                        self._slots[lease.slot].needs_reset = True
                self._deliver(batch, [error] * len(batch))
        return True

    def due_in(self) -> float | None:
        """Seconds until `step_when_due` has something to do (0: now), None while nothing is
        pending. Thread-safe."""
        with self._cond:
            return self._due_in()

    def _due_in(self) -> float | None:
        """Under the lock. A ready frame is due at once, or with `gather_s` > 0 once every
        conversation has its frame ready or the oldest has waited `gather_s`."""
        if self._closing or self._jobs:
            return 0.0
        arrivals = [slot.frames[0][1] for slot in self._slots if slot.lease is not None and slot.frames]
        if arrivals:
            leased = sum(slot.lease is not None for slot in self._slots)
            if self.gather_s <= 0 or len(arrivals) == leased:
                return 0.0
            return max(0.0, min(arrivals) + self.gather_s - time.perf_counter())
        return 0.0 if any(slot.needs_reset for slot in self._slots) else None

    def _take_resets(self) -> list[tuple[int, Sampling | None]]:
        resets = []
        for index, slot in enumerate(self._slots):
            if slot.needs_reset:
                slot.needs_reset = False
                resets.append((index, slot.lease.sampling if slot.lease is not None else None))
        return resets

    def _take_frames(self) -> list[tuple[Lease, np.ndarray, float]]:
        return [(slot.lease, *slot.frames.popleft()) for slot in self._slots if slot.lease is not None and slot.frames]

    def _row_mask(self, rows: list[int]) -> torch.Tensor:
        mask = torch.zeros(self.capacity, dtype=torch.bool)
        mask[rows] = True
        return mask.to(self.device)

    def _reset_rows(self, resets: list[tuple[int, Sampling | None]]) -> None:
        """Fresh streaming state for these rows alone, and their conversations' sampling."""
        mask = self._row_mask([row for row, _ in resets])
        self.mimi.reset_streaming(mask)
        self.lm_gen.reset_streaming(mask)
        for row, sampling in resets:
            self._slots[row].first_frame = True
            if sampling is not None:
                self.lm_gen.configure_row(row, sampling)

    def _step(self, batch: list[tuple[int, np.ndarray, float]]) -> list[StepOutput]:
        """One 80 ms step of the rows in `batch`, (row, pcm frame, time it arrived) each;
        the other rows are masked. Returns each row's output, in order."""
        started = time.perf_counter()
        pcm = np.zeros((self.capacity, 1, FRAME_SIZE), dtype=np.float32)
        rows = []
        for row, frame, arrived in batch:
            self.timings.record(STEP_WAIT, started - arrived)
            pcm[row, 0] = frame
            rows.append(row)
        mask = self._row_mask(rows)
        self.mimi.set_exec_mask(mask)
        codes = self.mimi.encode(torch.from_numpy(pcm).to(self.device))
        first = [row for row in rows if self._slots[row].first_frame]
        if first:
            # As moshi's server does: a conversation's first frame carries the encoder's
            # left padding, so Mimi restarts that row to apply it again on the next frame.
            self.mimi.reset_streaming(self._row_mask(first))
            for row in first:
                self._slots[row].first_frame = False
        self._synchronize()
        encoded = time.perf_counter()
        self.lm_gen.draw_noise(rows)
        self.lm_gen.set_exec_mask(mask)
        tokens = self.lm_gen.step(codes)  # [N, 1 + dep_q, 1]; -2 for masked rows and the initial delay
        text_tokens = tokens[:, 0, 0].cpu().tolist()
        if self.min_step_s > 0 and (rest := started + self.min_step_s - time.perf_counter()) > 0:
            time.sleep(rest)  # as a real LM step would take, on a GPU busy with a full batch
        stepped = time.perf_counter()
        speaking = [row for row in rows if text_tokens[row] >= 0]
        decoded_pcm = None
        if speaking:
            self.mimi.set_exec_mask(self._row_mask(speaking))
            decoded_pcm = self.mimi.decode(tokens[:, 1:].clamp(min=0)).float().cpu().numpy()
        decoded = time.perf_counter()
        self.timings.record(MIMI_ENCODE, encoded - started)
        self.timings.record(LM_STEP, stepped - encoded)
        if speaking:
            self.timings.record(MIMI_DECODE, decoded - stepped)
        self.timings.record(STEP, decoded - started)
        self.rows_per_step.append(len(rows))
        return [
            StepOutput(decoded_pcm[row, 0], self._detokenize(text_tokens[row]))
            if text_tokens[row] >= 0 else StepOutput(None, None)
            for row in rows
        ]

    def _deliver(self, batch: list[tuple[Lease, np.ndarray, float]], outputs: list) -> None:
        try:
            self.sink([(lease, out) for (lease, _, _), out in zip(batch, outputs, strict=True)])
        except Exception:
            log.exception("handing on a step's outputs failed")

    def _detokenize(self, token: int) -> str | None:
        if token in self._skip_ids:
            return None
        try:
            if self.tokenizer.is_control(token) or self.tokenizer.is_unknown(token):
                return None
            return self.tokenizer.id_to_piece(token).replace("▁", " ")
        except IndexError:
            # A checkpoint whose text_card exceeds its tokenizer: never end a session over it.
            if not self._warned_vocabulary:
                log.warning("text token %d is outside the tokenizer's vocabulary; such tokens are skipped", token)
                self._warned_vocabulary = True
            return None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self, frames: int = 4) -> None:
        """Step every row through frames of silence so that lazy init, kernels and CUDA
        graphs happen now, not in a user's first seconds; then reset every row."""

        def warm(_: BatchedMoshi) -> None:
            rows = list(range(self.capacity))
            self._reset_rows([(row, Sampling()) for row in rows])
            silence = np.zeros(FRAME_SIZE, dtype=np.float32)
            for _ in range(frames):
                self._step([(row, silence, time.perf_counter()) for row in rows])
            self._synchronize()
            self._reset_rows([(row, None) for row in rows])
            self.timings.clear()
            self.rows_per_step.clear()

        self.run(warm)


def deliver_to_loops(items: list[tuple[Lease, StepOutput | BaseException]]) -> None:
    """Hand each output to its lease's `deliver` on the lease's event loop: one wake-up per
    loop and step (callable from any thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for lease, out in items:
        by_loop.setdefault(lease.loop, []).append((lease, out))
    for loop, loop_items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver_all, loop_items)
        except RuntimeError:  # that loop is closed: its conversations are gone
            pass


def _deliver_all(items: list[tuple[Lease, StepOutput | BaseException]]) -> None:
    for lease, out in items:
        if not lease.released:
            lease.deliver(out)
