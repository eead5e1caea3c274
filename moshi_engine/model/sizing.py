"""How many conversation slots a GPU holds: plain arithmetic, shared by the engine (which
measures a slot's memory at load) and by app.py (which sizes Modal's concurrency at deploy
time, on a machine that may have no torch). Imports nothing heavy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)

AUTO = "auto"
# `sessions="auto"` on CPU: a small model (the tiny checkpoint) keeps this many
# conversations in real time on two cores (docs/BENCHMARKS.md); a full-size one is not
# real time on a CPU even alone, so it gets one.
AUTO_CPU_SESSIONS = 8
# On CUDA, auto leaves this much GPU memory free for activations, CUDA graphs and the
# allocator's slack, and stops at a batch whose step still fits the 80 ms frame (Moshiko's
# tick at batch 32 is reported at about 70 ms; at batch 64 it would not keep real time).
GPU_HEADROOM_BYTES = 2 * 1024**3
GPU_HEADROOM_FRACTION = 0.05
MAX_AUTO_SESSIONS = 32
GIB = 1024**3


class CapacityError(RuntimeError):
    """The conversation slots asked for do not fit in the device's memory."""


@dataclass(frozen=True)
class AutoShare:
    """`sessions="auto"` for one of several voices loaded in turn on one GPU: this voice takes
    one part in `voices` of the free memory left once `reserve_bytes` (the weights of the
    voices still to load) and the headroom are set aside. The voices after it, each taking its
    part of what is then left, end with equal memory for their slots. On a CPU it is auto."""

    voices: int = 1
    reserve_bytes: int = 0


def explicit_sessions(requested: int | str) -> int:
    """A slot count given as a number (or its string); ValueError otherwise."""
    try:
        sessions = int(requested)
    except ValueError:
        sessions = 0
    if sessions < 1:
        raise ValueError(f"sessions must be a number >= 1 or {AUTO!r}, got {requested!r}")
    return sessions


def slots_that_fit(free: int, total: int, per_slot: int, share: AutoShare = AutoShare()) -> int:
    """Slots of `per_slot` bytes in `free` bytes of a `total`-byte GPU, keeping
    GPU_HEADROOM_BYTES + GPU_HEADROOM_FRACTION of the GPU free (no cap); for one voice of
    several, in its `share` of that memory."""
    headroom = GPU_HEADROOM_BYTES + GPU_HEADROOM_FRACTION * total
    return max(0, int((free - share.reserve_bytes - headroom) / share.voices // max(per_slot, 1)))


def fit_sessions(requested: int | str | AutoShare, free: int, total: int, per_slot: int) -> int:
    """Slots for `free` bytes of a `total`-byte GPU, `per_slot` bytes each, keeping
    GPU_HEADROOM_BYTES + GPU_HEADROOM_FRACTION of the GPU free: "auto" takes the most that
    fit (at most MAX_AUTO_SESSIONS), an `AutoShare` the most that fit its share; a number that
    does not fit raises CapacityError naming the number that would."""
    share = requested if isinstance(requested, AutoShare) else AutoShare()
    fits = slots_that_fit(free, total, per_slot, share)
    shared = f" (this voice's part: 1 of {share.voices}, {share.reserve_bytes / GIB:.1f} GiB set aside for the " \
             "voices after it)" if share.voices > 1 else ""
    log.info("GPU memory: %.1f GiB free of %.1f GiB%s; a conversation slot takes %.2f GiB; %d slot(s) fit",
             free / GIB, total / GIB, shared, per_slot / GIB, fits)
    if fits < 1:
        raise CapacityError(f"not even one conversation slot ({per_slot / GIB:.2f} GiB) fits in the "
                            f"{free / GIB:.1f} GiB of free GPU memory{shared}, headroom kept")
    if requested == AUTO or isinstance(requested, AutoShare):
        sessions = min(fits, MAX_AUTO_SESSIONS)
        log.info("sessions auto: %d conversation slot(s)", sessions)
        return sessions
    sessions = explicit_sessions(requested)
    if sessions > fits:
        raise CapacityError(
            f"{sessions} conversation slots do not fit in GPU memory ({free / GIB:.1f} GiB free, "
            f"{per_slot / GIB:.2f} GiB per slot, headroom kept): use --sessions {fits} or auto"
        )
    return sessions


# ## What Moshi takes on a GPU, before any GPU is there
#
# app.py sizes Modal's containers at deploy time, on a machine that may have no torch: from
# these counts of Moshi 7B (Moshiko, Moshika), moshi's default LM architecture, taken on the
# meta device (tests/model/test_sizing.py counts them again from moshi itself).
MOSHI_7B_PARAMETERS = 7_687_729_152
MOSHI_7B_LINEAR_PARAMETERS = 7_374_635_008  # in Linear layers: int8 in a quantized checkpoint
MOSHI_7B_LINEAR_ROWS = 1_948_928  # each with a float32 scale when quantized
MOSHI_7B_LAYERS = 32
MOSHI_7B_DIM = 4096
MOSHI_7B_CONTEXT = 3000  # steps of 80 ms: 240 s
KV_BYTES = 2  # keys and values in bfloat16 (float16 beside int8 layers: as many bytes)
MIMI_SLOT_BYTES = 16_481_166  # Mimi's streaming state per slot (float32 buffers and caches)
CUDA_CONTEXT_BYTES = 600_000_000  # the CUDA context and torch's own before any tensor


def moshi_7b_weights_bytes(quantized: bool = False) -> int:
    """Moshi 7B's weights on a GPU: bfloat16, or int8 Linear layers with a float32 scale per
    row (moshi's QLinear) and the rest in bfloat16."""
    if not quantized:
        return MOSHI_7B_PARAMETERS * 2
    rest = MOSHI_7B_PARAMETERS - MOSHI_7B_LINEAR_PARAMETERS
    return MOSHI_7B_LINEAR_PARAMETERS + 4 * MOSHI_7B_LINEAR_ROWS + 2 * rest


def moshi_7b_slot_bytes(context: int = MOSHI_7B_CONTEXT) -> int:
    """One conversation slot of Moshi 7B: its KV cache (keys and values of `context` steps in
    every layer) and Mimi's state."""
    return 2 * MOSHI_7B_LAYERS * MOSHI_7B_DIM * context * KV_BYTES + MIMI_SLOT_BYTES


def estimate_sessions(gpu_bytes: int, quantized: bool | list[bool] = False, context: int = MOSHI_7B_CONTEXT,
                      requested: int | str = AUTO) -> int:
    """What `--sessions auto` would find on a GPU of `gpu_bytes` for Moshi 7B (`fit_sessions`
    over the estimates above), per voice: `quantized` says it of each voice (one bool: one
    voice); with several, the least any voice gets. A number asked for is checked the same way."""
    kinds = quantized if isinstance(quantized, list) else [quantized]
    free = gpu_bytes - CUDA_CONTEXT_BYTES - sum(moshi_7b_weights_bytes(kind) for kind in kinds)
    if len(kinds) == 1:
        return fit_sessions(requested, free, gpu_bytes, moshi_7b_slot_bytes(context))
    # Each voice's part of the memory left after every voice's weights; a number asked for must fit it.
    share = AutoShare(voices=len(kinds))
    sessions = fit_sessions(share, free, gpu_bytes, moshi_7b_slot_bytes(context))
    if requested != AUTO and explicit_sessions(requested) > slots_that_fit(free, gpu_bytes,
                                                                           moshi_7b_slot_bytes(context), share):
        raise CapacityError(f"{requested} conversation slots for each of {len(kinds)} voices do not fit in "
                            f"{gpu_bytes / GIB:.0f} GiB of GPU memory: {sessions} would")
    return sessions if requested == AUTO else explicit_sessions(requested)


def estimate_fit(gpu_bytes: int, quantized: bool = False, context: int = MOSHI_7B_CONTEXT, voices: int = 1) -> int:
    """How many Moshi 7B slots the memory of a GPU of `gpu_bytes` holds, estimated (no cap), for
    each of `voices` voices of that precision."""
    free = gpu_bytes - CUDA_CONTEXT_BYTES - voices * moshi_7b_weights_bytes(quantized)
    return slots_that_fit(free, gpu_bytes, moshi_7b_slot_bytes(context), AutoShare(voices=voices))


# ## What a container needs beside its GPU
#
# Modal reserves 0.125 of a core and 128 MiB for a container unless told (`cpu=`, `memory=`);
# it may use more when its machine has some spare, but nothing guarantees that. Our web server's
# part of each conversation (WebRTC or the websocket, Opus both ways, the loops, the watching)
# does not depend on the model, which steps in a process of its own, so the bench measures it on
# CPU with the tiny model: the web server's own CPU and its peak memory at each capacity level
# (docs/BENCHMARKS.md: "Capacity" and "What watching costs", from
# docs/bench-results/cpu-tiny-watching-1.json): 10.7 % of a core with one WebRTC
# call and 51.6 % with 14 (3.1 % a call more), 2.7 % with one websocket conversation and 40.8 % with
# 32 (1.2 % more each); 691 MiB at its peak with one call and 722 with 14 (2.4 MiB a call), 556 and
# 563 MiB with 1 and 32 websockets. So, measured:
WEB_CORES_PER_CONVERSATION = {"webrtc": 0.031, "websocket": 0.012}
WEB_BASE_CORES = 0.08  # the event loop, uvicorn and Gradio's queue with the page mounted, at rest
WEB_BASE_BYTES = 700 * 1024**2  # the web server with the page mounted, during its first call
WEB_BYTES_PER_CONVERSATION = {"webrtc": 3 * 1024**2, "websocket": 1024**2}
# A reservation leaves room above what was measured: the page's own requests (its assets, status
# polls), bursts (many calls starting at once), another machine's slower cores.
HEADROOM = 1.25
# The web server is one Python process: whatever is reserved, its event loop runs on one core at
# a time, which carries one core's worth of conversations' web work (`one_process_conversations`).
ONE_PROCESS_CORES = 1.0
# Each voice's model process: the thread that steps its batch (on a GPU it launches the kernels
# and waits on them: a core at most), and its host memory (torch and CUDA's host side, the
# weights' file mapped while they load). Not measured here (no GPU; the tiny model's process on
# CPU holds about 700 MiB): an estimate, until the GPU bench measures it.
MODEL_CORES_PER_VOICE = 1.0
MODEL_HOST_BYTES_PER_VOICE = 4 * GIB
MIB = 1024**2


@dataclass(frozen=True)
class ContainerSize:
    """What to reserve for a container: cores (`cpu=`) and MiB (`memory=`)."""

    cores: float
    memory_mib: int


def _per_conversation(transport: str, relayed: bool) -> list[str]:
    if transport not in WEB_CORES_PER_CONVERSATION:
        raise ValueError(f"transport must be one of {', '.join(WEB_CORES_PER_CONVERSATION)}, got {transport!r}")
    return [transport, *(["websocket"] if relayed else [])]


def container_size(conversations: int, voices: int, transport: str = "webrtc", relayed: bool = False) -> ContainerSize:
    """A container serving `conversations` at once over `transport` ("webrtc": the page's calls;
    "websocket": `/api/chat`, as a scale-out worker serves the page's relays) with `voices` model
    processes (0: the page alone); `relayed`: each conversation also goes on over a websocket to
    a worker (the scale-out page). Cores with `HEADROOM`, in quarter cores; memory in steps of
    256 MiB; both rounded up."""
    ways = _per_conversation(transport, relayed)
    cores = HEADROOM * (WEB_BASE_CORES + conversations * sum(WEB_CORES_PER_CONVERSATION[way] for way in ways)
                        + voices * MODEL_CORES_PER_VOICE)
    memory = (WEB_BASE_BYTES + conversations * sum(WEB_BYTES_PER_CONVERSATION[way] for way in ways)
              + voices * MODEL_HOST_BYTES_PER_VOICE)
    return ContainerSize(cores=max(1.0, math.ceil(cores * 4) / 4), memory_mib=-(-memory // (256 * MIB)) * 256)


def one_process_conversations(transport: str = "webrtc", relayed: bool = False) -> int:
    """How many conversations' web work one web server process carries (`ONE_PROCESS_CORES`, as
    measured: no headroom)."""
    per = sum(WEB_CORES_PER_CONVERSATION[way] for way in _per_conversation(transport, relayed))
    return int((ONE_PROCESS_CORES - WEB_BASE_CORES) / per)


GPU_TABLE_GB = (16, 24, 48, 80, 141)


def slots_table(contexts: tuple[int, ...] = (MOSHI_7B_CONTEXT,), voices: int = 1) -> str:
    """README's table: how many Moshi 7B conversation slots each GPU size's memory holds,
    estimated, bf16 and q8 (`--sessions auto` takes at most MAX_AUTO_SESSIONS of them); with
    `voices`, the slots of each of that many voices sharing the GPU."""
    header = "| GPU memory | " + " | ".join(
        f"bf16, {context} steps | q8, {context} steps" for context in contexts) + " |"
    lines = [header, "| --- |" + " --- | --- |" * len(contexts)]
    for gigabytes in GPU_TABLE_GB:
        cells = []
        for context in contexts:
            for quantized in (False, True):
                cells.append(str(estimate_fit(gigabytes * 10**9, quantized, context, voices)))
        lines.append(f"| {gigabytes} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(slots_table((MOSHI_7B_CONTEXT, 1500)))
    print("\nEach of two voices (Moshiko and Moshika) on one GPU:\n")
    print(slots_table((MOSHI_7B_CONTEXT, 1500), voices=2))
