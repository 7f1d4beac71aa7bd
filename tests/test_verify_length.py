"""The verify length (how many tokens a step verifies) never changes the output, and the adaptive choice is the one
its cost model says.

- Exactness: greedy output equals the target's own for every fixed length 1..B, for lengths drawn at random per step,
  on a plain target, the Gemma-4 pair's mixed drafter and a hybrid linear-attention target, with random and oracle
  drafters (whole blocks accepted, so every accept path runs).
- Sampling: with lengths drawn at random per step, the sampled tokens follow the target's distribution (chi-square
  against the exact marginals of tests/test_sampling.py).
- The choice: `AdaptiveVerifyLength` on fake cost tables and acceptance histories.
- The doors: plain `generate`, `pipeline` and the engine run the adaptive length by default; `dflash_verify_length`
  sets it per call; bad values get a clear error.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import (
    OracleDrafter,
    assert_pipeline_matches_plain,
    greedy,
    left_pad,
    random_prompt,
    tiny_drafter,
    tiny_target,
)
from test_sampling import NEW as SAMPLED_NEW
from test_sampling import P_THRESHOLD, PROMPT, SETTINGS, chi_square_p, exact_marginals
from test_target_families import released_pair

import dflash_hf
from dflash_hf.modeling.modeling_dflash import DFlashDraftCache
from dflash_hf.modeling.verify_length_dflash import (
    AdaptiveVerifyLength,
    FixedVerifyLength,
    VerifyLengthPolicy,
    default_verify_lengths,
    verify_length_policy,
)

BLOCK = 6


class RandomLengths(VerifyLengthPolicy):
    """Draws each step's length from its own seeded RNG: every length, in any order, within one run."""

    def __init__(self, block_size: int, seed: int = 0):
        super().__init__(range(1, block_size + 1))
        self.rng = random.Random(seed)

    def choose(self) -> int:
        return self.rng.choice(self.lengths)


def expected_rows(target, prompts, new):
    return [greedy(target, p, new, eos_token_id=None, min_new_tokens=new)[0, p.shape[1]:].tolist() for p in prompts]


@pytest.fixture(scope="module")
def qwen3():
    return tiny_target("qwen3")


# ----------------------------------------------------------------------------------------------------------------------
# Exactness under every verify length
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", range(1, BLOCK + 1))
def test_every_fixed_length_is_exact(qwen3, length):
    prompts = [random_prompt(n, seed=n) for n in (13, 7, 10)]
    ids, mask = left_pad(prompts)
    expected = expected_rows(qwen3, prompts, 21)
    drafter = tiny_drafter(qwen3, block_size=BLOCK)
    out = dflash_hf.generate(qwen3, drafter, ids, mask, max_new_tokens=21, stop_token_ids=[], verify_length=length)
    assert out.new_tokens == expected
    assert set(out.verify_lengths) == {length} and len(out.verify_lengths) == out.steps
    with OracleDrafter.for_target(qwen3, block_size=BLOCK, corrupt_every=4) as oracle:
        out = dflash_hf.generate(qwen3, oracle, prompts[0], max_new_tokens=21, stop_token_ids=[],
                                 verify_length=length)
    assert out.new_tokens == expected[:1]
    # Each step commits at most `length` tokens, and the oracle makes it commit more than one when it may.
    assert max(out.acceptance_lengths[0]) == min(length, 4)


@pytest.mark.parametrize("pair", ["qwen3", "gemma4", "qwen3_5_text"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_lengths_per_step_are_exact(qwen3, pair, seed):
    if pair == "qwen3":
        target, drafter = qwen3, tiny_drafter(qwen3, block_size=BLOCK)
    else:
        target, drafter = released_pair(pair)
    block = drafter.config.block_size
    layer_ids = drafter.config.target_layer_ids
    prompts = [random_prompt(n, seed=n + seed) for n in (14, 9)]
    ids, mask = left_pad(prompts)
    expected = expected_rows(target, prompts, 19)
    out = dflash_hf.generate(target, drafter, ids, mask, max_new_tokens=19, stop_token_ids=[],
                             verify_length=RandomLengths(block, seed))
    assert out.new_tokens == expected
    assert len(set(out.verify_lengths)) > 2
    with OracleDrafter.for_target(target, block_size=block, layer_ids=layer_ids, corrupt_every=3) as oracle:
        # Oracle drafts follow the target's greedy path: partial and whole accepted blocks at every length. The
        # recurrent states of the hybrid target must then follow the accepted prefix whatever the length was.
        decoder = dflash_hf.DFlashDecoder(target, oracle, max_length=64, verify_length=RandomLengths(block, seed))
        out = decoder.generate(prompts[0], max_new_tokens=19, stop_token_ids=[])
    assert out.new_tokens == expected[:1]
    assert max(out.acceptance_lengths[0]) > 1


def test_stops_and_min_new_tokens_under_random_lengths(qwen3):
    prompt = random_prompt(11, seed=2)
    free = expected_rows(qwen3, [prompt], 30)[0]
    stop = free[9]
    want = greedy(qwen3, prompt, 30, eos_token_id=stop, min_new_tokens=4)[0, 11:].tolist()
    with OracleDrafter.for_target(qwen3, block_size=BLOCK) as oracle:
        out = dflash_hf.generate(qwen3, oracle, prompt, max_new_tokens=30, stop_token_ids=[stop], min_new_tokens=4,
                                 verify_length=RandomLengths(BLOCK, 5))
    assert out.new_tokens[0] == want


def test_the_drafter_context_holds_every_committed_row_whatever_the_lengths(qwen3):
    """Steps that skip the draft (length 1) still hand their context rows to the drafter: after a run with random
    lengths, the draft cache holds the same keys/values for every committed row as after a run of whole blocks."""
    drafter = tiny_drafter(qwen3, block_size=BLOCK)
    prompts = [random_prompt(n, seed=n) for n in (12, 7)]
    ids, mask = left_pad(prompts)
    caches = []
    for lengths in ("full", RandomLengths(BLOCK, 2)):
        decoder = dflash_hf.DFlashDecoder(qwen3, drafter, max_length=64, verify_length=lengths)
        out = decoder.generate(ids, mask, max_new_tokens=20, stop_token_ids=[])
        workspace = next(iter(decoder._workspaces.values()))
        caches.append((out, workspace))
    (full, a), (mixed, b) = caches
    assert full.new_tokens == mixed.new_tokens and 1 in mixed.verify_lengths
    assert torch.equal(a.length, b.length)
    for r in range(2):
        # Every row both runs have handed to the drafter (the last verify's rows wait for the next draft).
        rows = slice(int(a.pad[r]), int(min(a.ctx_base[r], b.ctx_base[r])))
        assert rows.stop - rows.start > 20
        for layer in a.draft_cache.keys:
            torch.testing.assert_close(b.draft_cache.keys[layer][r, :, rows], a.draft_cache.keys[layer][r, :, rows])
            torch.testing.assert_close(b.draft_cache.values[layer][r, :, rows],
                                       a.draft_cache.values[layer][r, :, rows])


def test_write_context_gives_the_keys_values_a_draft_writes(qwen3):
    """A step that verifies no draft takes its context row into the draft cache with `write_context`: the keys and
    values must be those a draft forward writes for the same row."""
    drafter = tiny_drafter(qwen3, block_size=BLOCK)
    features = torch.randn(2, 5, len(drafter.config.target_layer_ids) * drafter.config.hidden_size)
    noise = torch.randn(2, BLOCK, drafter.config.hidden_size)
    positions = torch.arange(5 + BLOCK)[None].expand(2, -1)
    with torch.no_grad():
        drafted = DFlashDraftCache()
        drafter(noise_embeds=noise, context_hidden_states=features, position_ids=positions, past_key_values=drafted)
        written = DFlashDraftCache()
        drafter.write_context(features, positions[:, :5], written)
    assert len(written.keys) == len(drafter.layers)
    for layer in range(len(drafter.layers)):
        torch.testing.assert_close(written.keys[layer], drafted.keys[layer][:, :, :5])
        torch.testing.assert_close(written.values[layer], drafted.values[layer][:, :, :5])


# ----------------------------------------------------------------------------------------------------------------------
# Sampling under random lengths
# ----------------------------------------------------------------------------------------------------------------------


def test_sampling_under_random_lengths_follows_the_target_distribution():
    target = tiny_target("qwen3", vocab=16, hidden=32, layers=3, seed=3)
    runs = 300
    torch.manual_seed(99)
    ids = PROMPT.expand(runs, -1)
    with OracleDrafter.for_target(target, block_size=4, layer_ids=[0, 1], mask_token_id=5) as oracle:
        out = dflash_hf.generate(target, oracle, ids, max_new_tokens=SAMPLED_NEW, stop_token_ids=[], do_sample=True,
                                 verify_length=RandomLengths(4, 3), **SETTINGS)
    assert len(set(out.verify_lengths)) > 1
    samples = torch.tensor(out.new_tokens)
    marginals = exact_marginals(target, SAMPLED_NEW)
    for position in range(SAMPLED_NEW):
        counts = torch.bincount(samples[:, position], minlength=16)
        p = chi_square_p(counts, marginals[position])
        assert p > P_THRESHOLD, (position, p, counts.tolist(), (marginals[position] * runs).round().tolist())


# ----------------------------------------------------------------------------------------------------------------------
# The choice, on fake cost tables
# ----------------------------------------------------------------------------------------------------------------------


def test_default_candidates():
    assert default_verify_lengths(16) == (1, 2, 4, 8, 16)
    assert default_verify_lengths(6) == (1, 2, 4, 6)
    assert default_verify_lengths(1) == (1,)


def test_prior_and_cost_table_decide_before_any_observation():
    policy = AdaptiveVerifyLength((1, 2, 4, 8, 16), prior=0.7)
    assert policy.choose() == 16  # no cost table yet: plain DFlash
    # A GPU at small batch: wide verifies cost little more than narrow ones.
    policy.set_costs({1: 1.0, 2: 1.2, 4: 1.3, 8: 1.5, 16: 2.0})
    assert policy.expected_tokens(1) == 1.0
    assert policy.expected_tokens(4) == pytest.approx(1 + 0.7 + 0.49 + 0.343)
    # E/cost: 1.0, 1.417, 1.949, 2.094, 1.661
    assert policy.choose() == 8
    # A CPU: a verify of 2 already costs 2.5 AR steps.
    policy.set_costs({1: 1.0, 2: 2.5, 4: 3.0, 8: 4.0, 16: 6.0})
    assert policy.choose() == 1


def test_a_run_of_autoregressive_steps_is_broken_to_look_at_acceptance_again():
    policy = AdaptiveVerifyLength((1, 2, 4, 8), prior=0.7, explore_every=5)
    policy.set_costs({1: 1.0, 2: 2.5, 4: 3.0, 8: 4.0})  # E/cost: 1.0, 0.68, 0.84, 0.79
    choices = [policy.choose() for _ in range(12)]
    assert choices == [1] * 5 + [4] + [1] * 5 + [4]
    # The drafter turned out good on this text: whole blocks accepted, and drafting wins from then on.
    for _ in range(10):
        policy.observe(4, [4])
    assert policy.choose() == 8


def test_acceptance_history_moves_the_choice():
    costs = {1: 1.0, 2: 1.2, 4: 1.3, 8: 1.5, 16: 2.0}
    accepting = AdaptiveVerifyLength((1, 2, 4, 8, 16))
    accepting.set_costs(costs)
    for _ in range(30):
        accepting.observe(16, [16, 16, 16])  # whole blocks accepted
    assert accepting.acceptance_rates()[0] > 0.95
    assert accepting.choose() == 16
    rejecting = AdaptiveVerifyLength((1, 2, 4, 8, 16))
    rejecting.set_costs(costs)
    for _ in range(30):
        rejecting.observe(16, [1, 1, 1])  # the first draft always rejected
    assert rejecting.acceptance_rates()[0] < 0.05
    assert rejecting.choose() == 1


def test_observations_are_censored_at_the_verified_length():
    policy = AdaptiveVerifyLength((1, 4, 8), prior=0.5, prior_weight=1.0, decay=1.0)
    policy.observe(4, [4, 2, 0])  # row 0 accepted its 3 drafts; row 1 accepted 1 of 3; row 2 was finished
    assert policy.tried[1:4] == [2.0, 2.0, 1.0] and policy.accepted[1:4] == [2.0, 1.0, 1.0]
    assert policy.tried[4:] == [0.0] * 4  # never tried: the prior stands
    policy.observe(1, [1, 1])  # an autoregressive step tries no draft
    assert policy.tried[1] == 2.0
    assert policy.acceptance_rates()[:4] == pytest.approx([2.5 / 3, 1.5 / 3, 1.5 / 2, 0.5])


@pytest.mark.parametrize("bad", [0, 7, -1, True, "fast", [], [0, 2], 2.5])
def test_bad_verify_lengths_are_refused_by_name(qwen3, bad):
    drafter = tiny_drafter(qwen3, block_size=BLOCK)
    with pytest.raises(ValueError, match="verify") as info:
        dflash_hf.DFlashDecoder(qwen3, drafter, verify_length=bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_a_drafter_without_write_context_drafts_every_step():
    class OldDrafter:  # only what verify_length_policy reads: whether it can take context rows without drafting
        pass

    assert verify_length_policy("auto", 16, can_skip_draft=False).lengths == (2, 4, 8, 16)
    assert verify_length_policy("full", 16, can_skip_draft=False).lengths == (16,)
    with pytest.raises(ValueError, match="write_context"):
        verify_length_policy(1, 16, can_skip_draft=hasattr(OldDrafter(), "write_context"))
    assert isinstance(verify_length_policy(None, 1, can_skip_draft=True), FixedVerifyLength)


# ----------------------------------------------------------------------------------------------------------------------
# The default through the doors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.adaptive
def test_auto_is_the_default_of_every_door(qwen3):
    drafter = tiny_drafter(qwen3, block_size=BLOCK)
    prompts = [random_prompt(n, seed=n) for n in (12, 8)]
    ids, mask = left_pad(prompts)
    expected = expected_rows(qwen3, prompts, 17)
    decoder = dflash_hf.DFlashDecoder(qwen3, drafter, max_length=64)
    out = decoder.generate(ids, mask, max_new_tokens=17, stop_token_ids=[])
    assert out.new_tokens == expected
    assert isinstance(decoder.verify_policy, AdaptiveVerifyLength)
    assert set(decoder.cost_tables()[2]) == {1, 2, 4, 6} and out.extra["calibration_s"] > 0
    again = decoder.generate(ids, mask, max_new_tokens=17, stop_token_ids=[])  # calibrated once per batch size
    assert again.new_tokens == expected and "calibration_s" not in again.extra

    plain = qwen3.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=17,
                           min_new_tokens=17, eos_token_id=None, pad_token_id=0)
    assert [plain[r, ids.shape[1]:].tolist() for r in range(2)] == expected
    engine = drafter._dflash_engine.engine
    assert isinstance(engine.verify_policy, AdaptiveVerifyLength)
    qwen3.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=17,
                   eos_token_id=None, pad_token_id=0, dflash_verify_length=2)
    assert drafter._dflash_engine.engine.verify_policy.lengths == (2,)

    assert_pipeline_matches_plain(qwen3, drafter, prompts, 9)


@pytest.mark.adaptive
def test_a_seed_draws_the_same_tokens_under_auto(qwen3):
    drafter = tiny_drafter(qwen3, block_size=BLOCK)
    prompt = random_prompt(10, seed=4).expand(3, -1)
    decoder = dflash_hf.DFlashDecoder(qwen3, drafter, max_length=64)
    greedy_first = decoder.generate(prompt, max_new_tokens=15, stop_token_ids=[])  # calibrates this batch size

    def seeded():
        return decoder.generate(prompt, max_new_tokens=15, stop_token_ids=[], do_sample=True, temperature=0.9,
                                generator=torch.Generator().manual_seed(11))

    first, second = seeded(), seeded()
    assert first.new_tokens == second.new_tokens
    assert set(first.verify_lengths) == {BLOCK}
    assert greedy_first.new_tokens == decoder.generate(prompt, max_new_tokens=15, stop_token_ids=[]).new_tokens
