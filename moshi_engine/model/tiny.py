"""Build the tiny offline checkpoint: real Moshi + Mimi architecture, random weights.

    python -m moshi_engine.model.tiny --out assets/tiny-moshi

The result has the on-disk layout of Kyutai's newer Hugging Face repos
(`config.json` naming the Moshi and Mimi safetensors, the Mimi config and the
sentencepiece tokenizer), so it loads through exactly the code that loads a
real checkpoint. It "speaks" noise and random word pieces, which is all the
tests and the offline demo need: every path runs for real on a CPU.

The same bytes come out on any x86-64 CPU. Other CPUs take other kernels
(AVX-512, AVX2 or SSE paths in torch, oneDNN, MKL, numpy and libm), which round
the last bits of floating-point results differently. So the builder computes in
float64, fits the codebooks so that no decision hangs on those last bits, and
stores each weight rounded to STORED_BITS significant bits, far above them.
tests/test_checkpoint.py rebuilds under restricted instruction sets to prove it.
"""

from __future__ import annotations

import argparse
import contextlib
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

from ..audio import SAMPLE_RATE

log = logging.getLogger(__name__)

MOSHI_NAME = "model.safetensors"
MIMI_NAME = "mimi.safetensors"
MIMI_CONFIG_NAME = "mimi_config.json"
TOKENIZER_NAME = "tokenizer.model"
VOCAB_SIZE = 128
# Mimi runs over the builder's minute of speech this many 80 ms frames at a time: the
# whole minute at once takes gigabytes of fresh float64 buffers, and the page faults
# were half of a build's time.
CHUNK_FRAMES = 25
# Significant bits kept of every stored weight (float32 holds 24). Unrounded, builds
# under other instruction sets differ by at most ~1e-11 relative (2**-36, in the
# random inits); rounding at 2**-16 leaves odds of about 1e-5 that any byte differs.
STORED_BITS = 16

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

    with _float64_on_one_thread(), torch.no_grad():
        mimi = loaders.get_mimi(None, mimi_config, device="cpu", num_codebooks=lm_config["dep_q"])
        _init_convolutions(mimi)
        latent = _latent(mimi, torch.from_numpy(_voice_like(60.0, seed))[None, None])
        _fit_codebooks(mimi, latent)
        _set_output_level(mimi, mimi.quantizer.encode(latent))
        lm = loaders.get_moshi_lm(None, lm_config, device="cpu", dtype=torch.float64)
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


@contextlib.contextmanager
def _float64_on_one_thread():
    """float64 as the default dtype, so that modules initialise in float64 too; one thread,
    as these small tensors gain nothing from more (waiting OpenMP threads burn CPU)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


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


def _latent(mimi, pcm: torch.Tensor) -> torch.Tensor:
    """Mimi's unquantised latent of `pcm` [1, 1, samples], streamed as the engine streams."""
    whole = pcm[..., : pcm.shape[-1] // mimi.frame_size * mimi.frame_size]
    with mimi.streaming(1):
        chunks = whole.split(CHUNK_FRAMES * mimi.frame_size, dim=-1)
        return torch.cat([mimi.encode_to_latent(chunk, quantize=False) for chunk in chunks], dim=-1)


def _fit_codebooks(mimi, latent: torch.Tensor) -> None:
    """Fit Mimi's codebooks by residual k-means on the encoder's `latent` of some speech,
    as training initialises them.

    Fresh codebooks are all zeros, so every frame would encode to code 0 and every
    code decode alike: the tiny model would neither hear its input nor vary its
    voice. moshi's own training path (its k-means, then moving averages) leaves
    residuals of pure rounding noise where a code holds one frame, and the next
    codebook's k-means then splits ties by that noise, differently on every CPU.
    """
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        residual = rvq.input_proj(latent).transpose(1, 2).flatten(0, 1)  # [frames, dimension]
        for layer in rvq.vq.layers:
            codebook = layer._codebook
            centroids, codes = _kmeans(residual, codebook.codebook_size)
            # moshi decodes with embedding_sum / cluster_usage: so these centroids exactly.
            codebook.embedding_sum.copy_(centroids)
            codebook.cluster_usage.fill_(1.0)
            codebook._initialized.fill_(1.0)
            residual = residual - centroids[codes]


def _kmeans(samples: torch.Tensor, bins: int, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """`bins` centroids of `samples` [N, D], on the stored grid, and each sample's nearest.

    Made so that short of a genuine tie, a CPU's last-bit rounding does not decide
    which centroid a sample goes to: centroids start at distinct samples (equal ones
    would tie), and distances are computed directly, not through a matrix product
    whose cancellation buries small distances in rounding noise.
    """
    distinct = torch.unique(samples, dim=0)
    centroids = distinct[torch.randperm(len(distinct))[:bins]]
    for _ in range(iterations):
        codes = torch.cdist(samples, centroids, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
        counts = torch.bincount(codes, minlength=bins)[:, None]
        sums = torch.zeros_like(centroids).index_add_(0, codes, samples)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty one stays
    centroids = _on_grid(centroids)
    codes = torch.cdist(samples, centroids, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    return centroids, codes


def _set_output_level(mimi, codes: torch.Tensor, level: float = 0.1) -> None:
    """Scale the decoder's last convolution so that the speech `codes` decode at RMS `level`."""
    last = [m for m in mimi.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
    with mimi.streaming(1):
        decoded = torch.cat([mimi.decode(chunk) for chunk in codes.split(CHUNK_FRAMES, dim=-1)], dim=-1)
    last.weight *= level / decoded.pow(2).mean().sqrt()


def _voice_like(seconds: float, seed: int) -> np.ndarray:
    """Deterministic 24 kHz pcm (float64, on 16-bit PCM's grid) with a voice's structure:
    harmonic syllables of varying pitch and loudness, noisy consonants, and pauses."""
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
    # sin and log take other code paths on other CPUs (libm's FMA variants, numpy's
    # AVX-512 ones) and differ in the last bits; 16-bit samples are the same everywhere.
    return np.round(np.concatenate(pieces) * 2**15) / 2**15


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
    """Write `state` as float32 safetensors, every float rounded to STORED_BITS bits."""
    save_file({name: _rounded(tensor).contiguous() for name, tensor in state.items()}, str(path))


def _rounded(tensor: torch.Tensor) -> torch.Tensor:
    """A float `tensor` on the stored grid, in float32 (which holds it exactly)."""
    return _on_grid(tensor).float() if tensor.dtype.is_floating_point else tensor


def _on_grid(tensor: torch.Tensor, bits: int = STORED_BITS) -> torch.Tensor:
    """`tensor` in float64, each value rounded to `bits` significant bits (to nearest, ties
    to even). Integer arithmetic on the float64 bit pattern: exact on every CPU."""
    dropped = 53 - bits  # of float64's 53 significant bits
    pattern = tensor.double().view(torch.int64)
    # Sign and magnitude are separate fields, so adding rounds the magnitude for either
    # sign, and a carry out of the mantissa rightly bumps the exponent.
    half = (1 << (dropped - 1)) - 1 + ((pattern >> dropped) & 1)
    return ((pattern + half) & -(1 << dropped)).view(torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
