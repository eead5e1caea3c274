"""moshi's own reference server (`moshi/server.py`), served over any checkpoint we can load.

Used to prove interoperability and as the baseline of the benchmark. The
module's source is executed without its last statement: `moshi/server.py`
ends with an unguarded `with torch.no_grad(): main()`, so importing it would
parse our argv and start downloading weights.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import torch

from ..audio import FRAME_SIZE
from ..model.checkpoint import resolve_checkpoint
from ..model.loading import configure_torch, pick_device


def reference_server_module() -> types.ModuleType:
    """`moshi.server` with everything but the trailing call to main()."""
    origin = importlib.util.find_spec("moshi.server").origin
    tree = ast.parse(Path(origin).read_text(), origin)
    last = tree.body[-1]
    if not (isinstance(last, ast.With) and "main()" in ast.unparse(last)):
        raise RuntimeError(f"{origin} no longer ends with the call to main(); check this loader")
    tree.body = tree.body[:-1]
    name = "moshi_engine._moshi_server"
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__file__ = origin
    module.__package__ = "moshi"  # its relative imports are moshi's
    sys.modules[name] = module  # dataclasses look their module up while the source runs
    try:
        exec(compile(tree, origin, "exec"), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def reference_app(model: str = "tiny", device: str = "auto", warmup_frames: int = 4):
    """An aiohttp Application serving moshi's `/api/chat` handler over `model`.

    Its handler runs the model inside the event loop, as upstream does, so serve
    it from a thread whose grad mode is off (`torch.set_grad_enabled(False)`).
    """
    from aiohttp import web

    torch_device = pick_device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    checkpoint = resolve_checkpoint(model)
    mimi = checkpoint.get_mimi(device=torch_device)
    lm = checkpoint.get_moshi(device=torch_device, dtype=dtype)
    configure_torch(torch_device, mimi, lm)  # the same process settings as our engine's
    module = reference_server_module()
    state = module.ServerState(
        checkpoint.model_type,
        mimi,
        checkpoint.get_text_tokenizer(),
        lm,
        1.0,
        torch_device,
        **checkpoint.lm_gen_config,
    )
    # ServerState.warmup() synchronises CUDA unconditionally; this is its loop, for any device.
    with torch.no_grad():
        for _ in range(warmup_frames):
            codes = state.mimi.encode(torch.zeros(1, 1, FRAME_SIZE, device=torch_device))
            tokens = state.lm_gen.step(codes)
            if tokens is not None:
                state.mimi.decode(tokens[:, 1:])
    app = web.Application()
    app.router.add_get("/api/chat", state.handle_chat)
    app["state"] = state
    return app
