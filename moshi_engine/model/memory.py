"""What one conversation slot's streaming state takes: Mimi's buffers and caches, the LM's KV
cache, LMGen's delays.

On CUDA the engine measures it (`slot_bytes`: the allocator's count before and after a slot's
state exists), to size `--sessions auto`. Anywhere, `counted_slot_bytes` counts the bytes of the
tensors that streaming state holds, on any device (the meta device too, where nothing is
allocated: that is how `sizing`'s constants for Moshiko were checked), so that the benchmark can
say what a slot costs on a CPU and what a shorter context saves.
"""

from __future__ import annotations

import dataclasses

import torch
from moshi.models import LMGen, LMModel, MimiModel
from moshi.modules.streaming import StreamingModule


def slot_bytes(mimi: MimiModel, lm: LMModel) -> int:
    """Device memory that one conversation slot's streaming state takes, measured by building
    one on CUDA."""
    device = lm.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    lm_gen = LMGen(lm)
    with mimi.streaming(1), lm_gen.streaming(1):
        torch.cuda.synchronize(device)
        used = torch.cuda.memory_allocated(device) - before
    return used


def counted_slot_bytes(mimi: MimiModel | None, lm: LMModel | None) -> int:
    """Bytes of streaming state one more slot adds, counted from the tensors the state holds
    (with 2 slots, less with 1: what does not grow with the batch is left out)."""
    counts = []
    for batch in (1, 2):
        total = 0
        if mimi is not None:
            with mimi.streaming(batch):
                total += streaming_state_bytes(mimi)
        if lm is not None:
            lm_gen = LMGen(lm)
            with lm_gen.streaming(batch):
                total += streaming_state_bytes(lm, lm_gen)
        counts.append(total)
    return counts[1] - counts[0]


def streaming_state_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of every tensor held by the streaming state of `modules` and their submodules, each
    storage counted once."""
    seen: set[tuple] = set()
    total = 0

    def visit(value: object, depth: int) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            meta = value.device.type == "meta"
            key = ("meta", id(value)) if meta else (value.device.type, value.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size() if meta else value.untyped_storage().nbytes()
        elif depth > 6 or isinstance(value, torch.nn.Module):
            return  # the modules themselves are the weights, not the state
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)
        elif dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
            for item in vars(value).values():
                visit(item, depth + 1)

    for module in modules:
        for part in module.modules():
            if isinstance(part, StreamingModule) and part._streaming_state is not None:
                visit(part._streaming_state, 0)
    return total
