"""The tiny checkpoint and the loading paths that real checkpoints take."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from moshi.models import loaders

from moshi_engine import tiny
from moshi_engine.checkpoint import TINY_DIR, ModelUnavailableError, resolve_checkpoint
from moshi_engine.conversation import Sampling
from moshi_engine.engine import load_engine

from .conftest import DEVICE, converse


def test_builder_reproduces_the_committed_checkpoint_byte_for_byte(tmp_path):
    built = tiny.build(tmp_path / "tiny", seed=42)
    names = sorted(path.name for path in TINY_DIR.iterdir())
    assert names == sorted(path.name for path in built.iterdir())
    for name in names:
        assert (built / name).read_bytes() == (TINY_DIR / name).read_bytes(), name


def test_written_checkpoint_reloads_and_gives_identical_outputs_for_a_fixed_seed(tmp_path, hello_pcm):
    built = tiny.build(tmp_path / "tiny", seed=42)
    pcm = hello_pcm[: 24000 * 2]

    async def answer(model: str):
        engine = load_engine(model, device=DEVICE)
        try:
            async with engine.session(Sampling(seed=1234)) as session:
                return await converse(session, pcm)
        finally:
            engine.close()

    from_assets = asyncio.run(answer("tiny"))
    from_new_dir = asyncio.run(answer(str(built)))
    assert np.array_equal(from_assets[0], from_new_dir[0])
    assert from_assets[1] == from_new_dir[1]


def test_checkpoint_info_built_from_config_json_loads_the_directory():
    config = json.loads((TINY_DIR / "config.json").read_text())
    lm_config = {k: v for k, v in config.items() if not k.endswith("_name") and k != "model_id"}
    info = loaders.CheckpointInfo(
        moshi_weights=TINY_DIR / config["moshi_name"],
        mimi_weights=TINY_DIR / config["mimi_name"],
        tokenizer=TINY_DIR / config["tokenizer_name"],
        lm_config=lm_config,
        mimi_config=json.loads((TINY_DIR / config["mimi_config_name"]).read_text()),
    )
    mimi = info.get_mimi(device=DEVICE)
    lm = info.get_moshi(device=DEVICE, dtype=loaders.torch.float32)
    tokenizer = info.get_text_tokenizer()
    assert mimi.sample_rate == 24000 and mimi.frame_rate == 12.5
    assert mimi.num_codebooks == lm.dep_q == 8
    assert lm.text_card == tokenizer.get_piece_size() == config["text_card"]
    assert lm.card == config["card"] == 64
    # the engine's resolver yields the same files and configs
    resolved = resolve_checkpoint("tiny")
    assert resolved.lm_config == lm_config
    assert resolved.mimi_config == info.mimi_config
    assert resolved.moshi_weights == info.moshi_weights


@pytest.mark.parametrize("spec", ["/no/such/checkpoint", "./missing-dir", "not a repo id"])
def test_a_spec_that_names_nothing_is_refused_with_the_offline_alternative(spec):
    with pytest.raises(ModelUnavailableError, match="--model tiny"):
        resolve_checkpoint(spec)


def test_unreachable_hub_fails_fast_and_names_tiny(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="cannot reach the Hugging Face hub.*--model tiny"):
        resolve_checkpoint("kyutai/moshiko-pytorch-bf16")
    assert time.monotonic() - started < 5


def test_directory_missing_a_named_file_says_which(tmp_path):
    built = tiny.build(tmp_path / "tiny")
    (built / "mimi.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match="mimi.safetensors"):
        resolve_checkpoint(str(built))
