"""How many conversations a GPU holds, estimated before any GPU is there (app.py sizes Modal's
containers so): the counts of Moshi 7B behind the estimate, recounted from moshi itself on the
meta device, where nothing is allocated, and README's table, rendered from them."""

from __future__ import annotations

import pytest
import torch
from moshi.models import loaders
from moshi.utils.quantize import QLinear

from moshi_engine.model import sizing
from moshi_engine.model.memory import counted_slot_bytes
from tests.model.test_checkpoint import REPOSITORY


def test_moshi_7b_counts_are_moshis_own():
    lm = loaders.get_moshi_lm(None, dict(loaders._lm_kwargs), device="meta", dtype=torch.bfloat16)
    linear = [module for module in lm.modules() if isinstance(module, torch.nn.Linear)]
    assert sum(parameter.numel() for parameter in lm.parameters()) == sizing.MOSHI_7B_PARAMETERS
    assert sum(module.weight.numel() for module in linear) == sizing.MOSHI_7B_LINEAR_PARAMETERS
    assert sum(module.weight.shape[0] for module in linear) == sizing.MOSHI_7B_LINEAR_ROWS
    assert sizing.moshi_7b_weights_bytes() == 2 * sizing.MOSHI_7B_PARAMETERS  # 15.4 GB in bf16
    assert 7.9e9 < sizing.moshi_7b_weights_bytes(quantized=True) < 8.1e9


def test_a_quantized_moshi_7b_holds_the_bytes_the_estimate_says():
    config = dict(loaders._lm_kwargs) | {"quantize": True}
    lm = loaders.get_moshi_lm(None, config, device="meta", dtype=torch.bfloat16)
    assert any(isinstance(module, QLinear) for module in lm.modules())
    held = sum(tensor.numel() * tensor.element_size() for tensor in lm.state_dict().values())
    assert held == sizing.moshi_7b_weights_bytes(quantized=True)


def test_a_slot_holds_the_kv_cache_of_its_context_and_mimis_state():
    lm = loaders.get_moshi_lm(None, dict(loaders._lm_kwargs), device="meta", dtype=torch.bfloat16)
    mimi = loaders.get_mimi(None, device="cpu")
    for context in (sizing.MOSHI_7B_CONTEXT, 750):
        for layer in lm.transformer.layers:
            layer.self_attn.context = context
        counted = counted_slot_bytes(mimi, lm)
        assert abs(counted - sizing.moshi_7b_slot_bytes(context)) < 1e6, context  # all but ~1 kB of counters


def test_the_readme_table_is_the_estimate():
    table = sizing.slots_table((sizing.MOSHI_7B_CONTEXT, 1500))
    assert table in (REPOSITORY / "README.md").read_text()


def test_a_containers_cpu_and_memory_grow_with_its_conversations_its_voices_and_a_relay():
    one = sizing.container_size(10, voices=1)
    assert sizing.container_size(20, voices=1).cores > one.cores
    assert sizing.container_size(10, voices=2).cores >= one.cores + sizing.MODEL_CORES_PER_VOICE
    assert sizing.container_size(10, voices=2).memory_mib > one.memory_mib
    websocket = sizing.container_size(10, voices=1, transport="websocket")
    assert websocket.cores <= one.cores  # the websocket costs the server less than aiortc's WebRTC
    page = sizing.container_size(10, voices=0)
    assert sizing.container_size(10, voices=0, relayed=True).cores >= page.cores
    for size in (one, websocket, page):  # reservations in quarter cores and 256 MiB steps, at least a core
        assert size.cores >= 1 and (size.cores * 4).is_integer() and size.memory_mib % 256 == 0
    with pytest.raises(ValueError, match="webrtc, websocket"):
        sizing.container_size(1, voices=1, transport="carrier pigeon")
    # one web server process: fewer conversations when each is also relayed on
    assert sizing.one_process_conversations("websocket") > sizing.one_process_conversations() > \
        sizing.one_process_conversations(relayed=True) > 0
