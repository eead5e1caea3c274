"""One Moshi instance: its own Mimi and LMGen streaming state, stepped on its own thread.

moshi keeps streaming state inside the modules, so an instance owns its module
objects outright and every call into them runs on the instance's single worker
thread: the asyncio loop never runs model compute, and steps, resets and
warm-ups of one instance are serialised in submission order.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import sentencepiece
import torch
from moshi.models import LMGen, LMModel, MimiModel

from .audio import FRAME_SIZE
from .conversation import Sampling
from .timings import LM_STEP, MIMI_DECODE, MIMI_ENCODE, StageTimings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """What one 80 ms step produced: a FRAME_SIZE pcm frame (None during the model's
    initial delay) and a text piece (None for padding)."""

    pcm: np.ndarray | None
    text: str | None


class MoshiInstance:
    """Mimi + LMGen of one conversation at a time, with the thread that runs them."""

    def __init__(
        self,
        index: int,
        mimi: MimiModel,
        lm: LMModel,
        tokenizer: sentencepiece.SentencePieceProcessor,
        timings: StageTimings,
        lm_gen_kwargs: dict | None = None,
    ) -> None:
        self.index = index
        self.device = lm.device
        self.mimi = mimi
        self.lm_gen = LMGen(lm, **(lm_gen_kwargs or {}))
        self.tokenizer = tokenizer
        self.timings = timings
        self._skip_ids = {lm.text_padding_token_id, lm.end_of_text_padding_id}
        self._first_frame = True
        self._warned_vocabulary = False
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"moshi-{index}",
            initializer=torch.set_grad_enabled,  # grad mode is per thread
            initargs=(False,),
        )
        self.run(self._start_streaming)

    def run(self, fn, *args):
        """Run fn(*args) on this instance's thread and wait for it (for setup code)."""
        return self.executor.submit(fn, *args).result()

    def _start_streaming(self) -> None:
        self.mimi.streaming_forever(1)
        self.lm_gen.streaming_forever(1)

    def warmup(self, frames: int = 4) -> None:
        """Step frames of silence so that lazy init, kernels and CUDA graphs happen now,
        not in a user's first seconds; then reset. Runs on the worker thread."""
        silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        self.reset()
        for _ in range(frames):
            self.step(silence, record=False)
        self._synchronize()
        self.reset()

    def begin(self, sampling: Sampling) -> None:
        """Start a conversation: fresh streaming state, this session's sampling and seed."""
        self.reset()
        gen = self.lm_gen
        audio_sampling_changed = (gen.temp, gen.top_k) != (sampling.temp, sampling.top_k)
        gen.temp, gen.top_k = float(sampling.temp), int(sampling.top_k)
        gen.temp_text, gen.top_k_text = float(sampling.temp_text), int(sampling.top_k_text)
        if audio_sampling_changed and self.device.type == "cuda":
            # The depformer's CUDA graph baked the previous temperature and top-k in:
            # capture it again on the next step.
            graphed_depth = gen._streaming_state.graphed_depth
            if graphed_depth is not None:
                graphed_depth.reset()
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)

    def reset(self) -> None:
        """Forget the conversation: the instance behaves as if freshly loaded."""
        self.mimi.reset_streaming()
        self.lm_gen.reset_streaming()
        self._first_frame = True

    def step(self, frame: np.ndarray, record: bool = True) -> StepOutput:
        """One 80 ms step: encode a FRAME_SIZE pcm frame, step the LM, decode its answer."""
        started = time.perf_counter()
        codes = self.mimi.encode(torch.from_numpy(frame).to(self.device)[None, None])
        if self._first_frame:
            # As moshi's server does: the first frame's codes carry the encoder's left
            # padding, so restart Mimi's streaming to apply it again on the next frame.
            self.mimi.reset_streaming()
            self._first_frame = False
        self._synchronize()
        encoded = time.perf_counter()
        tokens = self.lm_gen.step(codes)
        self._synchronize()
        stepped = time.perf_counter()
        pcm = text = None
        if tokens is not None:
            pcm = self.mimi.decode(tokens[:, 1:])[0, 0].float().cpu().numpy()
            text = self._detokenize(int(tokens[0, 0, 0].item()))
        decoded = time.perf_counter()
        if record:
            self.timings.record(MIMI_ENCODE, encoded - started)
            self.timings.record(LM_STEP, stepped - encoded)
            if tokens is not None:
                self.timings.record(MIMI_DECODE, decoded - stepped)
        return StepOutput(pcm, text)

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

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
