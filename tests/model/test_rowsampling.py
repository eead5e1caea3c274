"""Per-row sampling: each batch row samples as moshi's own LMGen would for it alone."""

from __future__ import annotations

import pytest
import torch
from moshi.models import LMGen

from moshi_engine.conversation import Sampling
from moshi_engine.model.checkpoint import resolve_checkpoint
from moshi_engine.model.rowsampling import RowSamplingLMGen
from tests.conftest import DEVICE

STEPS = 40


@pytest.fixture(scope="module")
def lm():
    with torch.no_grad():
        yield resolve_checkpoint("tiny").get_moshi(device=DEVICE, dtype=torch.float32)


@pytest.fixture(scope="module")
def codes(lm):
    """Mimi-like input codes: one [1, 8, 1] tensor per step."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, lm.card, (STEPS, 1, 8, 1), generator=generator).to(DEVICE)


def lmgen_tokens(lm, codes, sampling: Sampling) -> torch.Tensor:
    """What moshi's LMGen at batch 1 answers, seeded through torch's global generator."""
    lm_gen = LMGen(lm, temp=sampling.temp, top_k=sampling.top_k, temp_text=sampling.temp_text,
                   top_k_text=sampling.top_k_text)
    answered = []
    with torch.no_grad(), lm_gen.streaming(1):
        torch.manual_seed(sampling.seed)
        for step_codes in codes:
            tokens = lm_gen.step(step_codes)
            if tokens is not None:
                answered.append(tokens)
    return torch.cat(answered, dim=-1)


def row_tokens(lm, codes, batch: int, row: int, sampling: Sampling, others: Sampling,
               steps_of_others: set[int] = frozenset()) -> torch.Tensor:
    """What `row` of a RowSamplingLMGen answers; the other rows sample with `others` and
    step only at the step indices in `steps_of_others` (where `row` is masked)."""
    lm_gen = RowSamplingLMGen(lm, batch)
    answered = []
    everyone = list(range(batch))
    the_others = [other for other in everyone if other != row]
    with torch.no_grad(), lm_gen.streaming(batch):
        for other in the_others:
            lm_gen.configure_row(other, others)
        lm_gen.configure_row(row, sampling)
        for index, step_codes in enumerate(codes):
            if index in steps_of_others:  # a step of the others alone, with different input
                stepped = the_others
                lm_gen.draw_noise(stepped)
                mask = torch.tensor([r in stepped for r in everyone], device=lm.device)
                lm_gen.set_exec_mask(mask)
                lm_gen.step((step_codes.flip(1) + 1).remainder(lm.card).expand(batch, -1, -1).contiguous())
            lm_gen.draw_noise(everyone)
            lm_gen.set_exec_mask(torch.ones(batch, dtype=torch.bool, device=lm.device))
            tokens = lm_gen.step(step_codes.expand(batch, -1, -1).contiguous())
            if tokens[row, 0, 0] >= 0:
                answered.append(tokens[row : row + 1])
    return torch.cat(answered, dim=-1)


SAMPLINGS = [
    Sampling(seed=7),  # LMGen's defaults
    Sampling(temp=0.0, temp_text=0.0, seed=7),  # greedy
    Sampling(temp=1.2, top_k=5, temp_text=0.3, top_k_text=3, seed=123),
    Sampling(temp=0.5, top_k=1000, temp_text=1.0, top_k_text=1000, seed=2**40),  # top-k past the cards
]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["defaults", "greedy", "small-top-k", "top-k-past-card"])
def test_at_batch_one_a_row_gives_exactly_lmgens_tokens_for_the_same_seed(lm, codes, sampling):
    expected = lmgen_tokens(lm, codes, sampling)
    assert expected.shape == (1, 1 + lm.dep_q, STEPS - 1)
    assert torch.equal(row_tokens(lm, codes, 1, 0, sampling, sampling), expected)


def test_a_rows_tokens_do_not_depend_on_the_other_rows_settings_or_steps(lm, codes):
    sampling = Sampling(temp=0.9, top_k=20, temp_text=0.8, top_k_text=10, seed=5)
    quiet = row_tokens(lm, codes, 4, 2, sampling, Sampling(temp=0.0, temp_text=0.0, seed=1))
    busy = row_tokens(lm, codes, 4, 2, sampling, Sampling(temp=2.0, top_k=64, temp_text=2.0, top_k_text=50, seed=9),
                      steps_of_others={3, 4, 10, 25})
    assert torch.equal(quiet, busy)


def test_rows_with_different_seeds_answer_differently(lm, codes):
    first = row_tokens(lm, codes, 2, 0, Sampling(seed=1), Sampling(seed=1))
    second = row_tokens(lm, codes, 2, 0, Sampling(seed=2), Sampling(seed=1))
    assert not torch.equal(first, second)


def test_split_seeds_draw_the_text_and_the_audio_from_generators_of_their_own(lm):
    """moshi's web client seeds the text and the audio on their own (text_seed, audio_seed): the
    text token's noise is what a generator seeded with text_seed draws, the audio codebooks' what
    one seeded with audio_seed draws, in LMGen's order."""
    sampling = Sampling(temp=0.8, top_k=7, temp_text=0.7, top_k_text=5, text_seed=11, audio_seed=12)
    lm_gen = RowSamplingLMGen(lm, 2)
    lm_gen.configure_row(1, sampling)
    lm_gen.draw_noise([1])
    text_generator = torch.Generator(lm.device).manual_seed(11)
    audio_generator = torch.Generator(lm.device).manual_seed(12)
    expected_text = torch.empty(5, device=lm.device).exponential_(1, generator=text_generator)
    assert torch.equal(lm_gen.text_noise[1, :5], expected_text)
    for codebook in range(lm.dep_q):
        expected_audio = torch.empty(7, device=lm.device).exponential_(1, generator=audio_generator)
        assert torch.equal(lm_gen.audio_noise[1, codebook, :7], expected_audio)
    assert torch.isinf(lm_gen.text_noise[0]).all()  # the other row drew nothing


def test_split_seeds_make_a_conversation_reproducible(lm, codes):
    sampling = Sampling(temp=0.9, top_k=20, temp_text=0.8, top_k_text=10, text_seed=3, audio_seed=4)
    first = row_tokens(lm, codes, 2, 1, sampling, Sampling(seed=1))
    again = row_tokens(lm, codes, 2, 1, sampling, Sampling(seed=2))
    other_audio = row_tokens(lm, codes, 2, 1, sampling.updated(audio_seed=5), Sampling(seed=1))
    assert torch.equal(first, again)
    assert not torch.equal(first[:, 1:], other_audio[:, 1:])


def test_a_seed_and_split_seeds_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        Sampling(seed=1, text_seed=2)


def test_an_8_bit_row_is_lmgens_greedy_and_its_own_whatever_the_other_rows_do(codes):
    """The int8 layers give float16 logits, whose exact ties LMGen's top-k and the per-row
    ranking may order differently: sampled, a seed may draw another of the tied (equally likely)
    tokens than LMGen would; greedy, the tokens are LMGen's; and a row's own draws never depend
    on its neighbours."""
    with torch.no_grad():
        lm_q8 = resolve_checkpoint("tiny-q8").get_moshi(device=DEVICE, dtype=torch.float32)
    greedy = Sampling(temp=0.0, temp_text=0.0, seed=5)
    assert torch.equal(row_tokens(lm_q8, codes, 1, 0, greedy, greedy), lmgen_tokens(lm_q8, codes, greedy))
    sampling = Sampling(temp=0.9, top_k=20, temp_text=0.8, top_k_text=10, seed=5)
    quiet = row_tokens(lm_q8, codes, 4, 2, sampling, Sampling(temp=0.0, temp_text=0.0, seed=1))
    busy = row_tokens(lm_q8, codes, 4, 2, sampling, Sampling(temp=2.0, top_k=64, temp_text=2.0, seed=9),
                      steps_of_others={3, 10, 25})
    assert torch.equal(quiet, busy)
