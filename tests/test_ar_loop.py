"""`DFlashDecoder(target, None)`: the batched loop without a drafter, one token per row per step through the same
static caches (and, on CUDA, graphs). It is what `dflash-hf make-data` generates training data with and the loop's own
AR baseline, so it must be the target's own greedy output for every row of a left-padded batch, and a sample of the
target's distribution when sampling."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import greedy, random_prompt, tiny_target
from test_on_step import left_pad
from test_sampling import NEW as SAMPLED_NEW
from test_sampling import P_THRESHOLD, PROMPT, SETTINGS, VOCAB, chi_square_p, exact_marginals

import dflash_hf
from dflash_hf import DFlashDecoder

NEW = 16


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma3"])
def test_greedy_rows_equal_each_rows_own_greedy_output(family):
    target = tiny_target(family, layers=3, hidden=32, seed=5)
    prompts = [random_prompt(n, seed=s)[0] for n, s in ((9, 1), (2, 2), (5, 3))]
    ids, mask = left_pad(prompts)
    alone = [greedy(target, p[None], NEW, eos_token_id=None, pad_token_id=0)[0, p.numel():].tolist() for p in prompts]
    stop = alone[1][4]  # row 1 stops early at its 5th token (or earlier, if that token came before)

    decoder = DFlashDecoder(target, None, max_length=9 + NEW)
    out = decoder.generate(ids, mask, max_new_tokens=NEW, stop_token_ids=[stop])
    for r, want in enumerate(alone):
        cut = want.index(stop) + 1 if stop in want else NEW
        assert out.new_tokens[r] == want[:cut], r
        assert out.acceptance_lengths[r] == [1] * (cut - 1)  # one token a step after the prefill's first
    assert out.steps == max(len(t) for t in out.new_tokens) - 1
    assert out.time_draft == pytest.approx(0.0, abs=1e-3)
    # The decoder keeps its workspace: a second call with another batch size gives the same rows.
    again = decoder.generate(ids[:1], mask[:1], max_new_tokens=NEW, stop_token_ids=[])
    assert again.new_tokens[0] == alone[0]


def test_sampled_rows_follow_the_target_distribution():
    """300 rows of one prompt sampled in one batch: per position, a chi-square test against the exact marginal
    (the same test and threshold as the drafter's speculative sampling in test_sampling.py)."""
    target = tiny_target("qwen3", vocab=VOCAB, hidden=32, layers=3, seed=3)
    runs = 300
    torch.manual_seed(1234)
    out = dflash_hf.generate(target, None, PROMPT.expand(runs, -1), do_sample=True, max_new_tokens=SAMPLED_NEW,
                             stop_token_ids=[], **SETTINGS)
    samples = torch.tensor(out.new_tokens)
    assert samples.shape == (runs, SAMPLED_NEW)
    marginals = exact_marginals(target, SAMPLED_NEW)
    for position in range(SAMPLED_NEW):
        counts = torch.bincount(samples[:, position], minlength=VOCAB)
        p = chi_square_p(counts, marginals[position])
        assert p > P_THRESHOLD, (position, p, counts.tolist(), (marginals[position] * runs).round().tolist())


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_ar_loop_equals_greedy():
    """compile=True (the CUDA default) compiles the verify forward only: there is no draft step to compile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    target = tiny_target("qwen3", layers=3, hidden=32, seed=5)
    prompt = random_prompt(7, seed=6)
    want = greedy(target, prompt, NEW, eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    decoder = DFlashDecoder(target, None, max_length=7 + NEW, cuda_graphs=False, compile=True)
    out = decoder.generate(prompt, max_new_tokens=NEW, stop_token_ids=[])
    assert out.new_tokens == [want]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert decoder.compile_failures == []


def test_evicting_sampling_workspaces_keeps_the_greedy_ones():
    target = tiny_target("qwen3", layers=2, hidden=32)
    decoder = DFlashDecoder(target, None, max_length=32)
    prompt = PROMPT[:, :4]
    decoder.generate(prompt, max_new_tokens=3)
    for temperature in (0.5, 0.7, 0.9):
        decoder.generate(prompt, max_new_tokens=3, do_sample=True, temperature=temperature)
    assert decoder.evict_sampling_workspaces(keep=1) == 2
    kept = list(decoder._workspaces)
    assert [key[1].do_sample for key in kept] == [False, True] and kept[1][1].temperature == 0.9
