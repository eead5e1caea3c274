"""The engine: a loaded checkpoint as a pool of N Moshi instances that sessions lease.

    engine = load_engine("tiny", instances=2)        # or a HF repo id, or a directory
    async with engine.session(Sampling(seed=1)) as session:
        ...

A session leases one instance exclusively; when none is free, leasing fails
at once with BusyError, so a transport can tell the user right away.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from dataclasses import dataclass

import torch

from .checkpoint import DEFAULT_MODEL, ModelUnavailableError, resolve_checkpoint
from .conversation import BusyError, Sampling
from .model import MoshiInstance
from .session import MAX_OUTPUT_FRAMES, MAX_PENDING_FRAMES, MoshiSession
from .timings import StageTimings

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


class MoshiEngine:
    """N independent Moshi instances of one checkpoint, leased one per session."""

    def __init__(self, info: EngineInfo, instances: list[MoshiInstance], default_sampling: Sampling,
                 timings: StageTimings) -> None:
        self.info = info
        self.default_sampling = default_sampling
        self.timings = timings
        self.started_at = time.time()
        self._instances = instances
        self._free = list(reversed(instances))
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return len(self._instances)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._instances) - len(self._free)

    def open_session(
        self,
        sampling: Sampling | None = None,
        max_pending_frames: int = MAX_PENDING_FRAMES,
        max_output_frames: int = MAX_OUTPUT_FRAMES,
    ) -> MoshiSession:
        """Lease a free instance (BusyError if none) for a session; call `start()` next."""
        with self._lock:
            if not self._free:
                raise BusyError(f"all {self.capacity} Moshi instance(s) are in a conversation")
            instance = self._free.pop()
        return MoshiSession(instance, sampling or self.default_sampling, self._release,
                            max_pending_frames, max_output_frames)

    @contextlib.asynccontextmanager
    async def session(self, sampling: Sampling | None = None, **limits):
        """`async with engine.session(...) as s:` leases, starts, and always closes."""
        session = self.open_session(sampling, **limits)
        try:
            await session.start()
            yield session
        finally:
            await session.close()

    def _release(self, instance: MoshiInstance) -> None:
        with self._lock:
            if instance not in self._free:
                self._free.append(instance)

    def status(self) -> dict:
        return {
            "model": self.info.model,
            "device": self.info.device,
            "dtype": self.info.dtype,
            "parameters": self.info.parameters,
            "sessions": {"active": self.active, "capacity": self.capacity},
            "timings": self.timings.summary(),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def close(self) -> None:
        for instance in self._instances:
            instance.shutdown()


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
    process on the first step (on CUDA moshi compiles and graphs its steps), and a
    small model steps fastest on one intra-op thread.
    """
    torch.compiler.set_stance("force_eager" if device.type == "cpu" else "default")
    parameters = sum(p.numel() for module in modules for p in module.parameters())
    if device.type == "cpu" and parameters < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    return parameters


def load_engine(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    instances: int = 1,
    warmup_frames: int = WARMUP_FRAMES,
) -> MoshiEngine:
    """Load a checkpoint (HF repo id, checkpoint directory or `tiny`) as a warm engine.

    bf16 on CUDA, float32 on CPU. Each instance gets its own copy of the modules
    (streaming state lives in them) and is warmed up before this returns. Process-wide
    torch settings follow the device: torch.compile's stance, and on CPU a single
    intra-op thread for small models.
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
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

    lm_gen_config = dict(checkpoint.lm_gen_config)
    default_sampling = Sampling.from_config(lm_gen_config)
    lm_gen_kwargs = {k: v for k, v in lm_gen_config.items() if not hasattr(default_sampling, k)}
    timings = StageTimings()
    # Copies are taken before any instance starts streaming, from untouched modules.
    modules = [(mimi, lm)] + [(copy.deepcopy(mimi), copy.deepcopy(lm)) for _ in range(instances - 1)]
    pool = []
    for index, (instance_mimi, instance_lm) in enumerate(modules):
        instance = MoshiInstance(index, instance_mimi, instance_lm, tokenizer, timings, lm_gen_kwargs)
        instance.run(instance.warmup, warmup_frames)
        pool.append(instance)
    log.info("%d instance(s) warm after %.1f s", instances, time.perf_counter() - started)
    info = EngineInfo(
        model=model,
        device=str(torch_device),
        dtype=str(dtype).removeprefix("torch."),
        parameters=parameters,
    )
    return MoshiEngine(info, pool, default_sampling, timings)
