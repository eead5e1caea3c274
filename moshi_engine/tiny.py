"""Build the tiny offline checkpoint: real Moshi + Mimi architecture, random weights.

    python -m moshi_engine.tiny --out assets/tiny-moshi

The result has the on-disk layout of Kyutai's newer Hugging Face repos
(`config.json` naming the Moshi and Mimi safetensors, the Mimi config and the
sentencepiece tokenizer), so it loads through exactly the code that loads a
real checkpoint. It "speaks" noise and random word pieces, which is all the
tests and the offline demo need: every path runs for real on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from moshi.models import loaders
from safetensors.torch import save_file

from .audio import SAMPLE_RATE

log = logging.getLogger(__name__)

MOSHI_NAME = "model.safetensors"
MIMI_NAME = "mimi.safetensors"
MIMI_CONFIG_NAME = "mimi_config.json"
TOKENIZER_NAME = "tokenizer.model"
VOCAB_SIZE = 128

# Small enough to step in a few ms on a laptop CPU, large enough to keep every
# structural feature of the 7B model (delays, depformer, split quantizer).
MIMI_OVERRIDES = {
    "seanet": {"dimension": 64, "n_filters": 8},
    "quantizer": {"dimension": 32, "n_q": 8, "bins": 64, "input_dimension": 64, "output_dimension": 64},
    "transformer": {
        "d_model": 64, "num_heads": 2, "num_layers": 1, "dim_feedforward": 128,
        "input_dimension": 64, "output_dimensions": [64],
    },
}
LM_OVERRIDES = {
    "dim": 64, "card": 64, "num_heads": 2, "num_layers": 2, "hidden_scale": 2, "context": 100,
    "depformer_dim": 32, "depformer_dim_feedforward": 64, "depformer_num_heads": 2,
    "depformer_num_layers": 1,
}

# What the tokenizer learns its pieces from: the kind of words a voice chat hears.
CORPUS = """\
Hello, how are you doing today?
I am doing well, thank you for asking.
What would you like to talk about?
Tell me something interesting about the ocean.
The weather is lovely this morning, isn't it?
Could you say that again, a little slower please?
I think that is a great question.
Let me think about it for a second.
My name is Moshi and I love to chat.
Do you have any plans for the weekend?
We could go for a walk in the park.
That sounds like a wonderful idea.
Music makes everything better, don't you think?
What is your favourite kind of food?
I really enjoy fresh bread and cheese.
Sometimes the simplest things are the best.
Have you ever been to Paris in the spring?
The city is beautiful when the trees are in bloom.
Learning a new language takes time and patience.
Every conversation teaches me something new.
Yes, no, maybe, of course, absolutely, exactly.
One, two, three, four, five, six, seven, eight, nine, ten.
Good morning, good afternoon, good evening, good night.
Please, thank you, sorry, excuse me, you are welcome.
Speaking and listening at the same time is what full duplex means.
"""


def build(out: Path, seed: int = 42) -> Path:
    """Write a tiny random checkpoint directory to `out` and return it."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    piece_count = _train_tokenizer(out / TOKENIZER_NAME)

    mimi_config = copy.deepcopy(loaders._mimi_config)
    for section, values in MIMI_OVERRIDES.items():
        mimi_config[section].update(values)
    lm_config = dict(loaders._lm_kwargs) | LM_OVERRIDES
    lm_config["text_card"] = piece_count  # every sampled text id must detokenise
    assert lm_config["card"] == mimi_config["quantizer"]["bins"]

    mimi = loaders.get_mimi(None, mimi_config, device="cpu", num_codebooks=lm_config["dep_q"])
    audio = torch.from_numpy(_voice_like(60.0, seed))[None, None]
    _init_convolutions(mimi)
    _fit_codebooks(mimi, audio)
    _set_output_level(mimi, audio)
    lm = loaders.get_moshi_lm(None, lm_config, device="cpu", dtype=torch.float32)
    _save(mimi.state_dict(), out / MIMI_NAME)
    _save(lm.state_dict(), out / MOSHI_NAME)
    (out / MIMI_CONFIG_NAME).write_text(json.dumps(mimi_config, indent=2) + "\n")
    config = lm_config | {
        "moshi_name": MOSHI_NAME,
        "mimi_name": MIMI_NAME,
        "mimi_config_name": MIMI_CONFIG_NAME,
        "tokenizer_name": TOKENIZER_NAME,
        "model_id": {"name": "tiny-moshi", "weights": f"random, seed {seed}"},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("tiny checkpoint written to %s (%d text pieces)", out, piece_count)
    return out


def _init_convolutions(mimi) -> None:
    """Variance-preserving init of SEANet's convolutions, without biases.

    With PyTorch's default init every layer shrinks the signal and the biases
    take over, so the decoder's output would hardly depend on its codes.
    """
    for module in [*mimi.encoder.modules(), *mimi.decoder.modules()]:
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            mode = "fan_out" if isinstance(module, torch.nn.ConvTranspose1d) else "fan_in"
            torch.nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="linear")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def _fit_codebooks(mimi, audio: torch.Tensor) -> None:
    """Give Mimi's quantizer codebooks the k-means init that training would.

    Fresh codebooks are all zeros, so every frame would encode to code 0 and every
    code decode alike: the tiny model would neither hear its input nor vary its
    voice. moshi's own training path fits them on the first batches it sees.
    """
    quantizer = mimi.quantizer
    with torch.no_grad():
        latent = mimi.encode_to_latent(audio, quantize=False)
        quantizer.train()
        # Each residual layer initialises on the pass after the one before it did.
        for _ in range(mimi.total_codebooks + 1):
            quantizer(latent, mimi.frame_rate)
        quantizer.eval()


def _set_output_level(mimi, audio: torch.Tensor, level: float = 0.1) -> None:
    """Scale the decoder's last convolution so that decoded speech has RMS `level`."""
    last = [m for m in mimi.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
    with torch.no_grad():
        decoded = mimi.decode(mimi.encode(audio))
        last.weight *= level / decoded.pow(2).mean().sqrt()


def _voice_like(seconds: float, seed: int) -> np.ndarray:
    """Deterministic 24 kHz pcm with a voice's structure: harmonic syllables of varying
    pitch and loudness, noisy consonants, and pauses."""
    rng = np.random.RandomState(seed)
    pieces = []
    while sum(piece.size for piece in pieces) < seconds * SAMPLE_RATE:
        n = int(rng.uniform(0.08, 0.4) * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        kind = rng.choice(["vowel", "consonant", "pause"], p=[0.6, 0.25, 0.15])
        if kind == "vowel":
            f0 = rng.uniform(90, 280) * (1 + rng.uniform(-0.2, 0.2) * t / t[-1])
            phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
            piece = sum(rng.uniform(0.1, 1) / h * np.sin(h * phase) for h in range(1, 12))
        elif kind == "consonant":
            piece = rng.randn(n) * rng.uniform(0.05, 0.4)
        else:
            piece = rng.randn(n) * 0.002
        envelope = np.sin(np.pi * np.arange(n) / n) * rng.uniform(0.1, 0.6)
        pieces.append(piece * envelope)
    return np.concatenate(pieces).astype(np.float32)


def _train_tokenizer(path: Path) -> int:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="unigram",
        # Moshi's text stream reserves 0 (end of padding) and 3 (padding).
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
