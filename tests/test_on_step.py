"""`on_step`: the batched loop streams every row of a batch, step by step, with the tokens it committed."""

from __future__ import annotations

import pytest
from helpers import OracleDrafter, greedy, left_pad, random_prompt, tiny_drafter, tiny_target

import dflash_hf

NEW = 14


def check_chunks(calls: list[list[list[int]]], out, rows: int) -> None:
    assert all(len(call) == rows for call in calls)
    assert all(len(chunk) == 1 for chunk in calls[0])  # after the prefill: each row's first token
    assert len(calls) == out.steps + 1
    for r in range(rows):
        assert [t for call in calls for t in call[r]] == out.new_tokens[r]
        # One chunk per verify step while the row runs (its acceptance length), then nothing.
        assert [len(call[r]) for call in calls[1:] if call[r]] == out.acceptance_lengths[r]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_on_step_streams_each_row_of_a_left_padded_batch(arch):
    target = tiny_target(arch, layers=4, hidden=32, seed=3)
    drafter = tiny_drafter(target, layer_ids=[0, 2], block_size=4)
    prompts = [random_prompt(n, seed=s)[0] for n, s in ((7, 1), (3, 2), (5, 3))]
    ids, mask = left_pad(prompts)
    calls = []
    out = dflash_hf.generate(target, drafter, ids, mask, max_new_tokens=NEW, stop_token_ids=[2], on_step=calls.append)
    check_chunks(calls, out, rows=3)
    for r, prompt in enumerate(prompts):  # and what streamed is each row's own greedy answer
        alone = greedy(target, prompt[None], NEW, eos_token_id=2, pad_token_id=0)[0, prompt.numel():].tolist()
        assert out.new_tokens[r] == alone


def test_on_step_chunks_of_several_tokens():
    """With a drafter that guesses right, a step commits several tokens per row, streamed as one chunk."""
    target = tiny_target("qwen3", layers=4, hidden=32, seed=3)
    prompt = random_prompt(6, seed=8)
    with OracleDrafter.for_target(target, block_size=4, corrupt_every=3) as drafter:
        calls = []
        out = dflash_hf.generate(target, drafter, prompt, max_new_tokens=NEW, stop_token_ids=[], on_step=calls.append)
    check_chunks(calls, out, rows=1)
    assert max(len(call[0]) for call in calls) == 3  # rows 1, 2 accepted, row 3 corrupted, then the bonus
    assert out.new_tokens[0] == greedy(target, prompt, NEW, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
