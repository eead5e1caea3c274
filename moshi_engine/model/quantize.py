"""8-bit Moshi, made as Kyutai makes theirs, from a checkpoint directory and offline.

    python -m moshi_engine.model.quantize assets/tiny-moshi --out assets/tiny-moshi-q8

Kyutai's q8 repos (`kyutai/moshiko-pytorch-q8`, `kyutai/moshika-pytorch-q8`) come from their
`scripts/export_quantized.py` (kyutai-labs/moshi): load the LM, replace every Linear layer by
moshi's `QLinear` (`moshi.utils.quantize.replace_linear_with_qlinear`: bitsandbytes' LLM.int8
row-wise quantization, int8 weights `weight` and each row's float32 absmax `weight_scb`), save
its state dict as `model.q8.safetensors`, and write a `config.json` that names it, says
`"quantize": true`, and points at the unquantized repo's Mimi and tokenizer. This does the same
for a local checkpoint directory; the new config names the source's Mimi, Mimi config and
tokenizer by relative path. moshi's loaders then build the LM with QLinear layers before loading
the file (`loaders.get_moshi_lm`), through every path this package loads checkpoints by.

The output is the same bytes on every CPU: the quantization is a maximum, one division and one
rounding per weight, each exactly rounded by IEEE arithmetic whatever the instruction set
(`tests/model/test_checkpoint.py` rebuilds it under others).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from moshi.utils.quantize import QLinear, replace_linear_with_qlinear
from safetensors.torch import save_file

from .checkpoint import CONFIG_NAME, checkpoint_from_directory

log = logging.getLogger(__name__)

Q8_SUFFIX = ".q8"  # model.safetensors -> model.q8.safetensors, as in Kyutai's q8 repos
NAMED_FILES = ("mimi_name", "mimi_config_name", "tokenizer_name")


def quantize_checkpoint(source: Path, out: Path) -> Path:
    """Write the 8-bit twin of the checkpoint directory `source` into `out`: its LM quantized
    (`model.q8.safetensors`) and a `config.json` with `"quantize": true`. Returns `out`."""
    source, out = Path(source), Path(out)
    config = json.loads((source / CONFIG_NAME).read_text())
    if config.get("quantize"):
        raise ValueError(f"{source} is quantized already")
    info = checkpoint_from_directory(source)
    with torch.no_grad():
        # float32 on the CPU: the weights reach QLinear's float16 cast unrounded by another dtype
        lm = info.get_moshi(device="cpu", dtype=torch.float32)
        replace_linear_with_qlinear(lm)
    layers = sum(isinstance(module, QLinear) for module in lm.modules())
    out.mkdir(parents=True, exist_ok=True)
    stem, dot, extension = config["moshi_name"].rpartition(".")
    moshi_name = f"{stem}{Q8_SUFFIX}{dot}{extension}"
    save_file({name: tensor.contiguous() for name, tensor in lm.state_dict().items()}, out / moshi_name)
    config["moshi_name"] = moshi_name
    config["quantize"] = True
    for key in NAMED_FILES:
        if config.get(key):
            config[key] = os.path.relpath(source / config[key], out)
    model_id = config.get("model_id") or {}
    config["model_id"] = {**model_id, "name": f"{model_id.get('name', source.name)}-q8",
                          "quantized": "int8 (LLM.int8 row-wise, moshi's QLinear)"}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    log.info("quantized %d Linear layers of %s into %s", layers, source, out / moshi_name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moshi_engine.model.quantize",
                                     description="Quantize a checkpoint's LM to 8 bits, as Kyutai's q8 repos.")
    parser.add_argument("source", type=Path, help="checkpoint directory (config.json and the files it names)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    quantize_checkpoint(args.source, args.out)


if __name__ == "__main__":
    main()
