"""Loading the slots: a checkpoint's weights on a device, and N warm conversation slots over them.

    weights = load_weights("tiny", device="cpu")      # or a HF repo id, or a directory
    slots, info, sampling = load_slots(weights=weights, sessions=4)

`load_slots` is what both ways of stepping start from: the engine's thread (`engine.load_engine`
with `model_process=False`) and the model process's child (`child.serve`). It picks the
device and its dtype, sets torch's process-wide knobs for it, sizes the slots (`sizing`), and
warms them up.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from dataclasses import dataclass

import sentencepiece
import torch
from moshi.models import LMGen, LMModel, MimiModel

from ..conversation import Sampling
from ..timings import StageTimings
from .batched import BatchedMoshi
from .checkpoint import DEFAULT_MODEL, ModelUnavailableError, resolve_checkpoint
from .sizing import AUTO, AUTO_CPU_SESSIONS, explicit_sessions, fit_sessions

log = logging.getLogger(__name__)

WARMUP_FRAMES = 4
# Below this size, one CPU thread per step beats torch's intra-op pool: splitting a
# 64-wide matmul across threads costs more than it saves (the tiny checkpoint steps
# in 13.5 ms on one thread, 21 ms on two, on this project's 2-core machines).
SMALL_MODEL_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class EngineInfo:
    model: str
    device: str
    dtype: str
    parameters: int



def freeze_garbage_collector() -> None:
    """Keep the garbage collector's full collections out of conversations.

    A full (generation 2) collection scans every tracked object, and a loaded model with
    its libraries holds hundreds of thousands that never die: each collection then stalls
    every thread holding the GIL for 100-200 ms, in the middle of everybody's frames
    (measured here: a 200 ms stall two seconds into a conversation, and a backlog after it).
    Frozen objects are left out of every later collection. Call it again once the app
    around the engine is built.
    """
    gc.collect()
    gc.freeze()


def pick_device(device: str = "auto") -> torch.device:
    """`auto` is cuda when available, else cpu; anything else is taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return chosen


def configure_torch(device: torch.device, *modules: torch.nn.Module) -> int:
    """Set torch's process-wide knobs for serving these modules on `device`; returns
    their parameter count.

    On CPU torch.compile gains nothing for these step sizes and costs seconds per
    process on the first step (on CUDA moshi compiles and graphs its steps), a small
    model steps fastest on one intra-op thread, and malloc keeps what a step frees
    (`keep_freed_memory`).
    """
    torch.compiler.set_stance("force_eager" if device.type == "cpu" else "default")
    parameters = sum(p.numel() for module in modules for p in module.parameters())
    if device.type == "cpu":
        keep_freed_memory()
        if parameters < SMALL_MODEL_PARAMETERS:
            torch.set_num_threads(1)
    return parameters


# glibc's mallopt options (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a step frees for the next step, instead of giving
    it back to the kernel; False where the C library is not glibc.

    A batched CPU step allocates and frees hundreds of tensors of up to a megabyte (Mimi's
    activations at the waveform's rate, for every row). By default glibc serves the larger
    ones with fresh mappings or trims its heaps once they are freed, and every step faults
    the same pages in again: 100 to 2,500 page faults a step at 16 slots here, and steps up
    to a third slower. Below a 32 MiB mapping threshold and a 128 MiB trim threshold the
    memory stays with the process and is reused (a handful of faults a step).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # 32 MiB is the largest mapping threshold every 64-bit glibc accepts.
    kept = [mallopt(option, value) for option, value in ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 128 << 20))]
    return all(kept)


def slot_bytes(mimi: MimiModel, lm: LMModel) -> int:
    """Device memory that one conversation slot's streaming state takes (Mimi's buffers and
    caches, the LM's KV cache, LMGen's delay buffer), measured by building one on CUDA."""
    device = lm.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    lm_gen = LMGen(lm)
    with mimi.streaming(1), lm_gen.streaming(1):
        torch.cuda.synchronize(device)
        used = torch.cuda.memory_allocated(device) - before
    return used


def choose_sessions(requested: int | str, device: torch.device, mimi: MimiModel, lm: LMModel,
                    parameters: int) -> int:
    """How many slots to allocate: `requested`, or for "auto" the most that fit the free GPU
    memory with headroom (see `fit_sessions`); on CPU, "auto" is AUTO_CPU_SESSIONS for a
    small model and 1 for a full-size one."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return fit_sessions(requested, free, total, slot_bytes(mimi, lm))
    if requested == AUTO:
        return AUTO_CPU_SESSIONS if parameters < SMALL_MODEL_PARAMETERS else 1
    return explicit_sessions(requested)


@dataclass(frozen=True)
class Weights:
    """A loaded checkpoint: Mimi, the LM and the tokenizer on their device, which successive
    engines can serve in turn (one at a time: close one before loading the next)."""

    model: str
    device: torch.device
    dtype: torch.dtype
    mimi: MimiModel
    lm: LMModel
    tokenizer: sentencepiece.SentencePieceProcessor
    lm_gen_config: dict
    parameters: int


def load_weights(model: str = DEFAULT_MODEL, device: str = "auto") -> Weights:
    """Load a checkpoint (HF repo id, checkpoint directory or `tiny`): bf16 on CUDA, float32
    on CPU, with the process-wide torch settings for that device (see `configure_torch`)."""
    torch_device = pick_device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    checkpoint = resolve_checkpoint(model)
    if checkpoint.model_type != "moshi":
        raise ModelUnavailableError(f"{model} is a {checkpoint.model_type!r} checkpoint; this app serves Moshi")
    started = time.perf_counter()
    mimi = checkpoint.get_mimi(device=torch_device)
    lm = checkpoint.get_moshi(device=torch_device, dtype=dtype)
    tokenizer = checkpoint.get_text_tokenizer()
    log.info("loaded %s on %s (%s) in %.1f s", model, torch_device, dtype, time.perf_counter() - started)
    parameters = configure_torch(torch_device, lm, mimi)
    return Weights(model, torch_device, dtype, mimi, lm, tokenizer, dict(checkpoint.lm_gen_config), parameters)


def load_slots(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    sessions: int | str = AUTO,
    warmup_frames: int = WARMUP_FRAMES,
    gather_ms: float = 0.0,
    weights: Weights | None = None,
    thread: bool = True,
) -> tuple[BatchedMoshi, EngineInfo, Sampling]:
    """Warm batched slots over `weights` (or over the checkpoint `model` loaded on `device`),
    what they serve, and the checkpoint's default sampling; see `load_engine`. `thread=False`:
    the caller steps them (`BatchedMoshi.step_when_due`)."""
    started = time.perf_counter()
    if weights is None:
        weights = load_weights(model, device)
    slots = choose_sessions(sessions, weights.device, weights.mimi, weights.lm, weights.parameters)
    default_sampling = Sampling.from_config(weights.lm_gen_config)
    lm_gen_kwargs = {k: v for k, v in weights.lm_gen_config.items() if not hasattr(default_sampling, k)}
    batched = BatchedMoshi(weights.mimi, weights.lm, weights.tokenizer, slots, StageTimings(), lm_gen_kwargs,
                           gather_ms, thread)
    try:
        batched.warmup(warmup_frames)
    except BaseException:
        batched.close()  # the weights stay usable by another engine
        raise
    log.info("%d conversation slot(s) warm after %.1f s", slots, time.perf_counter() - started)
    info = EngineInfo(
        model=weights.model,
        device=str(weights.device),
        dtype=str(weights.dtype).removeprefix("torch."),
        parameters=weights.parameters,
    )
    return batched, info, default_sampling
