"""LMGen with sampling settings and a random generator of its own for every batch row.

moshi's `LMGen` samples the whole batch with one temperature and top-k and with
torch's global generator, so in a batch of conversations nobody's page settings
or seed would hold. `RowSamplingLMGen` keeps LMGen's step (delays, caches, exec
masks, CUDA graphs) and changes only how tokens are drawn:

- each row has its own `temp` / `top_k` (audio) and `temp_text` / `top_k_text`,
  and its own `torch.Generator` (or two, text and audio, when the conversation gives
  `text_seed` / `audio_seed` as moshi's web client does);
- a row draws its random numbers exactly as LMGen at batch 1 does from the
  global generator (one exponential draw of `min(top_k, card)` values for the
  text token, then one per audio codebook), so a row seeded with `s` gives the
  tokens that `torch.manual_seed(s)` and a batch-1 LMGen give;
- a row draws only on the steps it takes part in, so its tokens depend on its
  seed and its input alone, never on which other rows share its steps or when.

The noise is drawn before the step, outside any CUDA graph, into buffers that
the (graphed) depformer reads; values past a row's top-k are +inf, so those
candidates weigh nothing (LMGen's "probs / exponential noise, argmax").
"""

from __future__ import annotations

import torch
from moshi.models import LMGen, LMModel

from ..conversation import Sampling


def sample_rows(logits: torch.Tensor, temp: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token per row from `logits` [B, card]: greedy where `temp` [B] is 0, else LMGen's
    top-k sampling with the row's exponential `noise` [B, card] (+inf past its top-k)."""
    sampling = temp > 0
    probs = torch.softmax(logits / torch.where(sampling, temp, 1.0)[:, None], dim=-1)
    ranked, candidates = torch.topk(probs, probs.shape[-1], dim=-1)
    drawn = candidates.gather(-1, (ranked / noise).argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(sampling, drawn, logits.argmax(dim=-1))


def _seed(generator: torch.Generator, seed: int | None) -> None:
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)


class RowSamplingLMGen(LMGen):
    """LMGen over `batch_size` rows, each sampling with its own settings and generator.

    Call `configure_row(row, ...)` when a row starts a conversation and
    `draw_noise(rows)` before each `step` with the rows that take part in it.
    Always out of sync (`support_out_of_sync`): rows join, leave and reset at any step.
    """

    def __init__(self, lm_model: LMModel, batch_size: int, **lm_gen_kwargs) -> None:
        for name in ("temp", "temp_text", "top_k", "top_k_text", "use_sampling"):
            lm_gen_kwargs.pop(name, None)  # per row now
        # LMGen's own text sampling becomes an argmax (temp_text=0) over logits that the
        # hook below has already reduced to each row's sampled token.
        super().__init__(lm_model, temp_text=0.0, support_out_of_sync=True, **lm_gen_kwargs)
        if self.cfg_coef != 1.0:
            raise ValueError("classifier-free guidance is not supported with per-row sampling")
        self.on_text_logits_hook = self._sample_text
        device = lm_model.device
        self.batch_size = batch_size
        self.row_temp = torch.zeros(batch_size, device=device)
        self.row_temp_text = torch.zeros(batch_size, device=device)
        self.generators = [torch.Generator(device) for _ in range(batch_size)]
        self.audio_generators = [torch.Generator(device) for _ in range(batch_size)]  # with split seeds
        inf = float("inf")
        self.text_noise = torch.full((batch_size, lm_model.text_card), inf, device=device)
        self.audio_noise = torch.full((batch_size, lm_model.dep_q, lm_model.card), inf, device=device)
        # Per row, the views of the noise buffers that draw_noise() fills, in LMGen's order,
        # each with the generator it draws from (made once per conversation: a step then
        # costs one call per view, and never waits on the device).
        self.noise_views: list[list[tuple[torch.Tensor, torch.Generator]]] = [[] for _ in range(batch_size)]

    def configure_row(self, row: int, sampling: Sampling) -> None:
        """A new conversation on `row`: its sampling settings, and its generator seeded with
        `sampling.seed`; or, with `text_seed` / `audio_seed`, a text and an audio generator
        seeded with those (a fresh random seed for any that is None)."""
        lm = self.lm_model
        self.row_temp[row] = float(sampling.temp)
        self.row_temp_text[row] = float(sampling.temp_text)
        self.text_noise[row] = float("inf")
        self.audio_noise[row] = float("inf")
        text, audio = self.generators[row], self.audio_generators[row]
        if sampling.split_seeds:
            _seed(text, sampling.text_seed)
            _seed(audio, sampling.audio_seed)
        else:
            _seed(text, sampling.seed)
            audio = text  # one generator, drawn in LMGen's order: as LMGen at batch 1
        top_k, top_k_text = min(sampling.top_k, lm.card), min(sampling.top_k_text, lm.text_card)
        views = [(self.text_noise[row, :top_k_text], text)] if sampling.temp_text > 0 else []
        if sampling.temp > 0:
            views += [(self.audio_noise[row, codebook, :top_k], audio) for codebook in range(lm.dep_q)]
        self.noise_views[row] = views

    def draw_noise(self, rows: list[int]) -> None:
        """The exponential noise of this step for `rows`, in LMGen's order: text, then each
        audio codebook. Greedy rows (temperature 0) draw nothing, as in LMGen."""
        for row in rows:
            for noise, generator in self.noise_views[row]:
                noise.exponential_(1, generator=generator)

    def _sample_text(self, text_logits: torch.Tensor) -> None:
        """LMGen's text-logits hook, [B, 1, 1, text_card]: sample each row, then leave only
        the chosen token's logit standing, so LMGen's argmax picks it."""
        logits = text_logits[:, 0, 0]
        tokens = sample_rows(logits.float(), self.row_temp_text, self.text_noise)
        chosen = torch.full_like(logits, float("-inf"))
        chosen.scatter_(-1, tokens[:, None], 0.0)
        logits.copy_(chosen)

    def depformer_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        """The audio codebooks after `text_token` [B], each row sampled with its own settings:
        LMGen's depformer loop (one codebook at a time, each fed the previous token)."""
        lm = self.lm_model
        previous = text_token
        tokens = []
        with lm.depformer.streaming(text_token.shape[0]):
            for codebook in range(lm.dep_q):
                logits = lm.forward_depformer(codebook, previous[:, None, None], transformer_out)
                previous = sample_rows(logits[:, 0, 0].float(), self.row_temp, self.audio_noise[:, codebook])
                tokens.append(previous)
        return torch.stack(tokens, dim=1)
