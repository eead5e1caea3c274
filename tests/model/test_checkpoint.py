"""The tiny checkpoint and the loading paths that real checkpoints take."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from moshi.models import LMGen, loaders
from moshi.utils.quantize import QLinear
from safetensors.torch import load_file

from moshi_engine.conversation import Sampling
from moshi_engine.engine import load_engine
from moshi_engine.model import quantize, tiny
from moshi_engine.model.checkpoint import TINY_DIR, TINY_Q8, TINY_Q8_DIR, ModelUnavailableError, resolve_checkpoint
from moshi_engine.model.loading import load_weights, restore_int8_scales
from tests.conftest import DEVICE, PROXY_VARIABLES, converse

REPOSITORY = Path(__file__).resolve().parents[2]
# Other x86-64 CPUs, as far as each library's own switch can make this one behave like
# them: torch's kernels (ATen), oneDNN, MKL (MKL_CBWR: its vendor-neutral path), numpy
# and glibc's libm (FMA or not). Features a CPU lacks are ignored. The core count needs
# no switch: the builder computes on one thread.
OTHER_CPUS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "NPY_DISABLE_CPU_FEATURES": "AVX512F,AVX512CD,AVX512_SKX,AVX512_CLX,AVX512_CNL,AVX512_ICL,AVX512_SPR",
    },
    "sse4-without-fma": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_CBWR": "COMPATIBLE",
        "NPY_DISABLE_CPU_FEATURES": "AVX512F,AVX512CD,AVX512_SKX,AVX512_CLX,AVX512_CNL,AVX512_ICL,AVX512_SPR,"
        "AVX2,FMA3,F16C,AVX",
        "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA,-AVX",
    },
}
THIS_CPU = "this-cpu"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The builder's output in this process, for the tests that only read it."""
    return tiny.build(tmp_path_factory.mktemp("built") / "tiny-moshi")


# A build elsewhere: the tiny checkpoint into `out`, then the committed one quantized into
# `out`-q8, in one interpreter (its imports are most of a build's time).
BUILD = """
import sys
from pathlib import Path
from moshi_engine.model import tiny
from moshi_engine.model.checkpoint import TINY_DIR
from moshi_engine.model.quantize import quantize_checkpoint
out = Path(sys.argv[1])
tiny.build(out)
quantize_checkpoint(TINY_DIR, out.with_name(out.name + "-q8"))
"""


@pytest.fixture(scope="module")
def built_elsewhere(tmp_path_factory):
    """Builds in child processes, on this CPU as it is and as it behaves restricted to
    OTHER_CPUS' instruction sets; all started at once, so they share the cores. Each builds the
    tiny checkpoint into DIR and quantizes the committed one into DIR-q8."""
    root = tmp_path_factory.mktemp("built-elsewhere")
    builds = {}
    for name, restrictions in {THIS_CPU: {}, **OTHER_CPUS}.items():
        command = [sys.executable, "-c", BUILD, str(root / name)]
        env = os.environ | restrictions
        process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stderr=subprocess.PIPE, text=True)
        builds[name] = (process, root / name)
    yield builds
    for process, _ in builds.values():
        process.kill()
        process.communicate()


def _assert_same_quantized(built: Path) -> None:
    """`built` is the committed tiny-q8: the same int8 weights and scales, the same config, and
    its Mimi, Mimi config and tokenizer the same files (named by their own relative paths)."""
    assert (built / "model.q8.safetensors").read_bytes() == (TINY_Q8_DIR / "model.q8.safetensors").read_bytes()
    ours, committed = (json.loads((where / "config.json").read_text()) for where in (built, TINY_Q8_DIR))
    for key in quantize.NAMED_FILES:
        assert (built / ours.pop(key)).resolve() == (TINY_Q8_DIR / committed.pop(key)).resolve(), key
    assert ours == committed


def _finished(build: tuple[subprocess.Popen, Path]) -> Path:
    process, out = build
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return out


def _assert_same_files(built: Path, reference: Path) -> None:
    names = sorted(path.name for path in reference.iterdir())
    assert sorted(path.name for path in built.iterdir()) == names
    for name in names:
        assert (built / name).read_bytes() == (reference / name).read_bytes(), name


def test_builder_reproduces_the_committed_checkpoint_byte_for_byte(built):
    _assert_same_files(built, TINY_DIR)


def test_builder_is_deterministic(built, built_elsewhere):
    _assert_same_files(_finished(built_elsewhere[THIS_CPU]), built)


@pytest.mark.parametrize("cpu", OTHER_CPUS)
def test_builder_writes_the_committed_bytes_on_other_instruction_sets(built_elsewhere, cpu):
    _assert_same_files(_finished(built_elsewhere[cpu]), TINY_DIR)


@pytest.mark.parametrize("cpu", [THIS_CPU, *OTHER_CPUS])
def test_the_8_bit_twin_is_the_committed_bytes_on_every_instruction_set(built_elsewhere, cpu):
    out = _finished(built_elsewhere[cpu])
    _assert_same_quantized(out.with_name(out.name + "-q8"))


def test_the_8_bit_checkpoint_loads_int8_layers_with_float32_scales_in_any_dtype():
    info = resolve_checkpoint(TINY_Q8)
    assert info.lm_config["quantize"] is True and info.moshi_weights.name == "model.q8.safetensors"
    assert info.mimi_weights.resolve() == (TINY_DIR / tiny.MIMI_NAME).resolve()  # the unquantized one's
    stored = load_file(info.moshi_weights)
    assert any(tensor.dtype == torch.int8 for tensor in stored.values())
    weights = load_weights(TINY_Q8, device="cpu")
    assert weights.precision == "int8" and weights.quantized
    in_bfloat16 = info.get_moshi(device="cpu", dtype=torch.bfloat16)  # the dtype CUDA loads it in
    restore_int8_scales(in_bfloat16, info.moshi_weights, torch.device("cpu"))
    for lm in (weights.lm, in_bfloat16):
        layers = [module for module in lm.modules() if isinstance(module, QLinear)]
        assert len(layers) == sum(name.endswith(".weight_scb") for name in stored)
        assert all(layer.weight.dtype == torch.int8 and layer.weight_scb.dtype == torch.float32 for layer in layers)
        scales = {name: tensor for name, tensor in lm.state_dict().items() if name.endswith("_scb")}
        assert scales and all(torch.equal(scales[name], stored[name]) for name in scales)  # as stored, to the bit


def test_moshis_loader_alone_breaks_an_8_bit_checkpoint_in_bfloat16():
    """Why restore_int8_scales exists: moshi 0.2.13 casts the scales with the rest."""
    lm = resolve_checkpoint(TINY_Q8).get_moshi(device="cpu", dtype=torch.bfloat16)
    lm_gen = LMGen(lm)
    with torch.no_grad(), lm_gen.streaming(1), pytest.raises(RuntimeError, match="weight_scb"):
        lm_gen.step(torch.zeros(1, 8, 1, dtype=torch.long))


def test_committed_weights_keep_only_the_builders_significant_bits():
    unused_bits = 24 - tiny.STORED_BITS  # of float32's 24 significant bits
    for name in (tiny.MIMI_NAME, tiny.MOSHI_NAME):
        for key, tensor in load_file(TINY_DIR / name).items():
            assert tensor.dtype == torch.float32, key
            assert not (tensor.view(torch.int32) & ((1 << unused_bits) - 1)).any(), key


def test_built_checkpoint_has_the_committed_architecture_tokenizer_and_files(built):
    """What holds however a CPU rounds: the same configs, tokenizer, files and tensors."""
    ours, committed = resolve_checkpoint(str(built)), resolve_checkpoint("tiny")
    assert sorted(path.name for path in built.iterdir()) == sorted(path.name for path in TINY_DIR.iterdir())
    assert ours.lm_config == committed.lm_config
    assert ours.mimi_config == committed.mimi_config
    assert ours.tokenizer.read_bytes() == committed.tokenizer.read_bytes()
    for name in (tiny.MIMI_NAME, tiny.MOSHI_NAME):
        shapes = {key: (t.dtype, t.shape) for key, t in load_file(built / name).items()}
        assert shapes == {key: (t.dtype, t.shape) for key, t in load_file(TINY_DIR / name).items()}, name
    # moshi's loaders load state dicts strictly: every name and shape in place
    assert ours.get_mimi().num_codebooks == committed.get_mimi().num_codebooks
    assert ours.get_moshi(dtype=torch.float32).text_card == committed.lm_config["text_card"]


def test_engine_tests_run_on_the_committed_checkpoint():
    assert TINY_DIR == REPOSITORY / "assets" / "tiny-moshi"
    info = resolve_checkpoint("tiny")
    assert {info.moshi_weights, info.mimi_weights, info.tokenizer} == {
        TINY_DIR / tiny.MOSHI_NAME, TINY_DIR / tiny.MIMI_NAME, TINY_DIR / tiny.TOKENIZER_NAME
    }


def test_written_checkpoint_reloads_and_gives_identical_outputs_for_a_fixed_seed(built, hello_pcm):
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
    for name in PROXY_VARIABLES:  # with a proxy the check defers to the hub client's retries
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="cannot reach the Hugging Face hub.*--model tiny"):
        resolve_checkpoint("kyutai/moshiko-pytorch-bf16")
    assert time.monotonic() - started < 5


def test_directory_missing_a_named_file_says_which(tmp_path):
    incomplete = shutil.copytree(TINY_DIR, tmp_path / "tiny")
    (incomplete / "mimi.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match="mimi.safetensors"):
        resolve_checkpoint(str(incomplete))
