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
from pathlib import Path

import sentencepiece
import torch
from moshi.models import LMModel, MimiModel
from moshi.utils.quantize import QLinear
from safetensors import safe_open

from ..conversation import Sampling
from ..timings import StageTimings
from .batched import BatchedMoshi
from .checkpoint import DEFAULT_MODEL, ModelUnavailableError, resolve_checkpoint
from .memory import slot_bytes
from .sizing import AUTO, AUTO_CPU_SESSIONS, AutoShare, explicit_sessions, fit_sessions

log = logging.getLogger(__name__)

WARMUP_FRAMES = 4
# Below this size, one CPU thread per step beats torch's intra-op pool: splitting a
# 64-wide matmul across threads costs more than it saves (the tiny checkpoint steps
# in 13.5 ms on one thread, 21 ms on two, on this project's 2-core machines).
SMALL_MODEL_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class EngineInfo:
    """What the slots serve: the model, where, in which dtype (activations and, unless
    quantized, weights), the weights' own precision (`int8` for a quantized checkpoint), the
    LM's attention window in steps (80 ms each), and the parameter count."""

    model: str
    device: str
    dtype: str
    parameters: int
    weights: str = ""
    context: int = 0



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


def choose_sessions(requested: int | str | AutoShare, device: torch.device, mimi: MimiModel, lm: LMModel,
                    parameters: int) -> int:
    """How many slots to allocate: `requested`, or for "auto" the most that fit the free GPU
    memory with headroom (see `fit_sessions`; an `AutoShare`: one voice's part of it); on CPU,
    "auto" (and an `AutoShare`) is AUTO_CPU_SESSIONS for a small model and 1 for a full-size one."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return fit_sessions(requested, free, total, slot_bytes(mimi, lm))
    if requested == AUTO or isinstance(requested, AutoShare):
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
    quantized: bool = False  # int8 Linear layers (moshi's QLinear): a checkpoint whose config says `quantize`
    context: int = 0  # the LM's attention window, in steps

    @property
    def precision(self) -> str:
        """The weights' precision: `int8` when quantized, else the dtype."""
        return "int8" if self.quantized else str(self.dtype).removeprefix("torch.")


def load_weights(model: str = DEFAULT_MODEL, device: str = "auto", context: int | None = None) -> Weights:
    """Load a checkpoint (HF repo id, checkpoint directory, `tiny` or `tiny-q8`): bf16 on CUDA,
    float32 on CPU, with the process-wide torch settings for that device (see `configure_torch`).

    A checkpoint whose config says `quantize` (Kyutai's q8 repos) loads with int8 Linear layers.
    `context` is the LM's attention window in steps (default: the checkpoint's; Moshiko's is
    3000 steps, 240 s): each slot's KV cache holds that many steps, so a shorter window fits
    more conversations in the same memory, and Moshi attends to that much of the past alone.
    """
    if context is not None and context < 1:
        raise ValueError(f"context must be a number of steps >= 1, got {context}")
    torch_device = pick_device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    checkpoint = resolve_checkpoint(model)
    if checkpoint.model_type != "moshi":
        raise ModelUnavailableError(f"{model} is a {checkpoint.model_type!r} checkpoint; this app serves Moshi")
    started = time.perf_counter()
    mimi = checkpoint.get_mimi(device=torch_device)
    overrides = {"context": context} if context is not None else {}
    lm = checkpoint.get_moshi(device=torch_device, dtype=dtype, lm_kwargs_overrides=overrides)
    quantized = bool((checkpoint.lm_config or {}).get("quantize"))
    if quantized and checkpoint.moshi_weights is not None:  # random-q8 has no file: its scales were made here
        restore_int8_scales(lm, checkpoint.moshi_weights, torch_device)
    tokenizer = checkpoint.get_text_tokenizer()
    window = lm_context(lm)
    log.info("loaded %s on %s (%s%s, context %d steps) in %.1f s", model, torch_device, dtype,
             ", int8 weights" if quantized else "", window, time.perf_counter() - started)
    parameters = configure_torch(torch_device, lm, mimi)
    return Weights(model, torch_device, dtype, mimi, lm, tokenizer, dict(checkpoint.lm_gen_config), parameters,
                   quantized, window)


def lm_context(lm: LMModel) -> int:
    """The LM's attention window in steps (its transformer layers' `context`)."""
    return int(lm.transformer.layers[0].self_attn.context or 0)


def restore_int8_scales(lm: LMModel, weights_file: Path, device: torch.device) -> None:
    """Put the int8 layers' float32 scales back, as the checkpoint stores them.

    moshi 0.2.13's loader casts every floating tensor of the file to the model's dtype, the
    scales (`weight_scb`) of its QLinear layers too; in bfloat16 (on CUDA) QLinear then refuses
    to run ("Expected `weight_scb` to have type float"), and the scales would have lost 16 bits
    anyway. Only the scales are read again (a few MB of Moshiko's 8 GB file), and loaded through
    the LM's own state-dict hooks, so a file in any of moshi's layouts maps onto its layers.
    """
    with safe_open(str(weights_file), framework="pt", device=str(device)) as weights:
        scales = {name: weights.get_tensor(name) for name in weights.keys() if name.endswith("_scb")}
    if not scales:
        raise ModelUnavailableError(f"{weights_file} is said to be quantized but holds no int8 scales")
    result = lm.load_state_dict(scales, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelUnavailableError(f"{weights_file}: int8 scales that match no layer: {result.unexpected_keys[:3]}")
    for module in lm.modules():
        if isinstance(module, QLinear) and module.weight_scb.dtype != torch.float32:
            raise ModelUnavailableError(f"{weights_file}: an int8 layer's scales are {module.weight_scb.dtype}")


def load_slots(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    sessions: int | str | AutoShare = AUTO,
    warmup_frames: int = WARMUP_FRAMES,
    gather_ms: float = 0.0,
    weights: Weights | None = None,
    thread: bool = True,
    context: int | None = None,
    min_step_ms: float = 0.0,
) -> tuple[BatchedMoshi, EngineInfo, Sampling]:
    """Warm batched slots over `weights` (or over the checkpoint `model` loaded on `device`
    with `context`, see `load_weights`), what they serve, and the checkpoint's default
    sampling; see `load_engine`. `thread=False`: the caller steps them
    (`BatchedMoshi.step_when_due`)."""
    started = time.perf_counter()
    if weights is None:
        weights = load_weights(model, device, context)
    slots = choose_sessions(sessions, weights.device, weights.mimi, weights.lm, weights.parameters)
    default_sampling = Sampling.from_config(weights.lm_gen_config)
    lm_gen_kwargs = {k: v for k, v in weights.lm_gen_config.items() if not hasattr(default_sampling, k)}
    batched = BatchedMoshi(weights.mimi, weights.lm, weights.tokenizer, slots, StageTimings(), lm_gen_kwargs,
                           gather_ms, thread, min_step_ms)
    try:
        batched.warmup(warmup_frames)
    except BaseException as error:
        batched.close()  # the weights stay usable by another engine
        if weights.quantized and weights.device.type == "cuda" and isinstance(error, Exception):
            # moshi graphs the steps on CUDA; bitsandbytes' int8 kernels are meant to be captured
            # (no host synchronisation on this path), but a failure here most likely comes from them.
            raise RuntimeError(f"warming up the 8-bit model on {weights.device} failed ({error}); "
                               "NO_CUDA_GRAPH=1 steps it without CUDA graphs") from error
        raise
    log.info("%d conversation slot(s) warm after %.1f s", slots, time.perf_counter() - started)
    info = EngineInfo(
        model=weights.model,
        device=str(weights.device),
        dtype=str(weights.dtype).removeprefix("torch."),
        parameters=weights.parameters,
        weights=weights.precision,
        context=weights.context,
    )
    return batched, info, default_sampling
