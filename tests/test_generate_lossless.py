"""Plain `target.generate(ids, assistant_model=drafter)` is token-identical to `target.generate(ids)` (greedy, fp32).

Random tiny drafters exercise the reject path (tau == 1); `OracleDrafter` (tests/helpers.py) drafts the target's own
continuation, so multi-token acceptance, EOS and `max_new_tokens` inside a block and the bonus after a fully
accepted block are exercised too.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import (
    OracleDrafter,
    StopAfterToken,
    first_new_token_after,
    greedy,
    random_prompt,
    tiny_drafter,
    tiny_target,
    tiny_tokenizer,
)
from transformers import StoppingCriteriaList, TextIteratorStreamer, TextStreamer

BLOCK = 8  # the block size of the `oracle` fixture (conftest.py)


def check_stats(drafter, out, prompt):
    """tau per verify step, bonus included: 1 <= tau <= B, summing to the tokens generated after the first."""
    taus = drafter.last_stats.acceptance_lengths
    assert all(1 <= t <= drafter.config.block_size for t in taus)
    assert sum(taus) == out.shape[1] - prompt.shape[1] - 1
    return taus


@pytest.mark.parametrize("length, new, seed", [(1, 20, 0), (7, 33, 1), (23, 17, 2)])
def test_random_drafter_is_lossless(target, length, new, seed):
    drafter = tiny_drafter(target, block_size=BLOCK, seed=seed)
    prompt = random_prompt(length, seed=seed)
    expected = greedy(target, prompt, new)
    out = greedy(target, prompt, new, assistant_model=drafter)
    assert torch.equal(out, expected)
    check_stats(drafter, out, prompt)


@pytest.mark.parametrize("corrupt_every", [0, 3])
def test_oracle_multi_token_acceptance_and_max_new_tokens_inside_a_block(target, corrupt_every):
    prompt = random_prompt(9, seed=3)
    new = 30  # 1 from prefill + 29: with B=8 the last block is cut by the max_new_tokens budget
    expected = greedy(target, prompt, new)
    with OracleDrafter.for_target(target, block_size=BLOCK, corrupt_every=corrupt_every) as drafter:
        out = greedy(target, prompt, new, assistant_model=drafter)
    assert torch.equal(out, expected)
    taus = check_stats(drafter, out, prompt)
    if corrupt_every == 0:
        assert taus[:3] == [BLOCK] * 3  # full blocks: B-1 drafts accepted + bonus
        assert taus[-1] == 29 - 3 * BLOCK  # max_new_tokens reached inside the last block
    else:
        assert max(taus) == corrupt_every and taus.count(corrupt_every) >= len(taus) - 1  # partial acceptance


def test_eos_inside_a_block(target, oracle):
    prompt = random_prompt(8, seed=5)
    free = greedy(target, prompt, 40, eos_token_id=None)[0, 8:].tolist()
    position, eos = first_new_token_after(free, 4, block=BLOCK)
    expected = greedy(target, prompt, 40, eos_token_id=eos)
    assert expected.shape[1] == 8 + position + 1 and expected[0, -1] == eos  # plain greedy stops there
    out = greedy(target, prompt, 40, eos_token_id=eos, assistant_model=oracle)
    assert torch.equal(out, expected)
    taus = check_stats(oracle, out, prompt)
    assert taus[-1] > 1  # the EOS was committed together with accepted drafts, mid-block


def test_eos_list_and_pad(target, oracle):
    prompt = random_prompt(8, seed=6)
    free = greedy(target, prompt, 40, eos_token_id=None)[0, 8:].tolist()
    _, eos_a = first_new_token_after(free, 6)
    kw = dict(eos_token_id=[97 % target.config.vocab_size, eos_a], pad_token_id=0)
    expected = greedy(target, prompt, 40, **kw)
    assert torch.equal(greedy(target, prompt, 40, assistant_model=oracle, **kw), expected)


def test_min_new_tokens(target, oracle):
    prompt = random_prompt(8, seed=7)
    free = greedy(target, prompt, 40, eos_token_id=None)[0, 8:].tolist()
    _, eos = first_new_token_after(free, 1)
    kw = dict(eos_token_id=eos, min_new_tokens=12)
    expected = greedy(target, prompt, 30, **kw)
    assert expected.shape[1] - 8 >= 12
    assert torch.equal(greedy(target, prompt, 30, assistant_model=oracle, **kw), expected)
    drafter = tiny_drafter(target, block_size=BLOCK)
    assert torch.equal(greedy(target, prompt, 30, assistant_model=drafter, **kw), expected)


def test_logits_processor_repetition_penalty(target, oracle):
    prompt = random_prompt(8, seed=8)
    kw = dict(repetition_penalty=1.8, no_repeat_ngram_size=3)
    expected = greedy(target, prompt, 30, **kw)
    assert not torch.equal(expected, greedy(target, prompt, 30))  # the processors change the output
    assert torch.equal(greedy(target, prompt, 30, assistant_model=oracle, **kw), expected)
    drafter = tiny_drafter(target, block_size=BLOCK)
    assert torch.equal(greedy(target, prompt, 30, assistant_model=drafter, **kw), expected)



def test_custom_stopping_criterion_inside_a_block(target, oracle):
    prompt = random_prompt(8, seed=9)
    free = greedy(target, prompt, 40, eos_token_id=None)[0, 8:].tolist()
    position, token = first_new_token_after(free, 5, block=BLOCK)
    criteria = StoppingCriteriaList([StopAfterToken(token, 8)])
    expected = greedy(target, prompt, 40, stopping_criteria=criteria)
    assert expected.shape[1] == 8 + position + 1
    out = greedy(target, prompt, 40, stopping_criteria=criteria, assistant_model=oracle)
    assert torch.equal(out, expected)
    assert oracle.last_stats.acceptance_lengths[-1] > 1


@pytest.mark.parametrize("mask_is", ["a generated token", "the eos id"])
def test_mask_id_equal_to_real_token_or_eos(target, mask_is):
    prompt = random_prompt(8, seed=11)
    free = greedy(target, prompt, 40, eos_token_id=None)[0, 8:].tolist()
    position, eos = first_new_token_after(free, 6)
    # docs/DFLASH.md, "Stops and the mask id": a stop scan over mask-filled slots, or stripping mask ids by value.
    mask = free[2] if mask_is == "a generated token" else eos
    expected = greedy(target, prompt, 40, eos_token_id=eos)
    for drafter in (OracleDrafter.for_target(target, block_size=BLOCK, mask_token_id=mask),
                    tiny_drafter(target, block_size=BLOCK, mask_token_id=mask)):
        out = greedy(target, prompt, 40, eos_token_id=eos, assistant_model=drafter)
        assert torch.equal(out, expected)
        assert (out[0, 8:] == mask).any()  # the mask id really occurs in the output and survived
        if isinstance(drafter, OracleDrafter):
            drafter.close()


def test_return_dict_in_generate_scores_and_logits(target, oracle):
    prompt = random_prompt(8, seed=12)
    kw = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, repetition_penalty=1.3)
    expected = greedy(target, prompt, 20, **kw)
    out = greedy(target, prompt, 20, assistant_model=oracle, **kw)
    assert torch.equal(out.sequences, expected.sequences)
    new = expected.sequences.shape[1] - 8
    assert len(out.scores) == len(out.logits) == len(expected.scores) == new
    for a, b in zip(out.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(out.logits, expected.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _stream_text(target, prompt, tokenizer, **kw):
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=greedy, args=(target, prompt, 25), kwargs=dict(streamer=streamer, **kw))
    thread.start()
    chunks = list(streamer)
    thread.join()
    return "".join(chunks)


def test_streamers(target, oracle, capsys):
    tokenizer = tiny_tokenizer()
    prompt = random_prompt(8, seed=13)
    expected_ids = greedy(target, prompt, 25)
    expected_text = tokenizer.decode(expected_ids[0, 8:])

    assert _stream_text(target, prompt, tokenizer) == expected_text  # the baseline streams the same text
    assert _stream_text(target, prompt, tokenizer, assistant_model=oracle) == expected_text
    assert max(oracle.last_stats.acceptance_lengths) > 1  # chunks of several tokens were streamed

    capsys.readouterr()
    greedy(target, prompt, 25, streamer=TextStreamer(tokenizer, skip_prompt=True))
    plain = capsys.readouterr().out
    greedy(target, prompt, 25, streamer=TextStreamer(tokenizer, skip_prompt=True), assistant_model=oracle)
    assert capsys.readouterr().out == plain
    assert plain.strip() == expected_text.strip()


def test_spec_generate_zlab_signature(target, oracle):
    prompt = random_prompt(8, seed=14)
    free = greedy(target, prompt, 40, eos_token_id=None)
    position, stop = first_new_token_after(free[0, 8:].tolist(), 5)
    out = oracle.spec_generate(target=target, input_ids=prompt, max_new_tokens=40, temperature=0.0,
                               stop_token_ids=[stop])
    assert torch.equal(out, free[:, : 8 + position + 1])  # trimmed after the first stop token, inclusive
    # No stop ids: runs to max_new_tokens even through the target's EOS id (z-lab semantics).
    out = oracle.spec_generate(target=target, input_ids=prompt, max_new_tokens=40, temperature=0.0,
                               stop_token_ids=None)
    assert torch.equal(out, free)
    torch.manual_seed(0)
    sampled = oracle.spec_generate(target=target, input_ids=prompt, max_new_tokens=10, temperature=0.7,
                                   stop_token_ids=None)
    assert sampled.shape == (1, 18) and torch.equal(sampled[:, :8], prompt)


def test_stats_are_per_call(target, oracle):
    prompt = random_prompt(8, seed=15)
    greedy(target, prompt, 20, assistant_model=oracle, eos_token_id=None)
    first = oracle.last_stats
    out = greedy(target, prompt[:, :5], 7, assistant_model=oracle)
    assert oracle.last_stats is not first
    check_stats(oracle, out, prompt[:, :5])
    assert sum(first.acceptance_lengths) == 19


def test_other_assistants_keep_stock_behaviour(target, monkeypatch):
    """A normal small causal LM as assistant and prompt lookup give exactly what transformers gives without our
    integration installed (obtained by temporarily restoring the original `generate`)."""
    from transformers.generation.utils import GenerationMixin

    text = target.config.get_text_config()
    family = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}.get(type(target).__name__, "gemma3")
    assistant = tiny_target(family, layers=2, hidden=text.hidden_size, seed=5)
    prompt = random_prompt(8, seed=16)
    runs = {
        "assistant": lambda: greedy(target, prompt, 20, assistant_model=assistant),
        "prompt lookup": lambda: greedy(target, prompt, 20, prompt_lookup_num_tokens=3),
    }
    with monkeypatch.context() as patch:
        patch.setattr(GenerationMixin, "generate", GenerationMixin.generate.__wrapped__)
        stock = {name: run() for name, run in runs.items()}
    calls = []
    handle = assistant.register_forward_hook(lambda *a: calls.append(1))
    try:
        for name, run in runs.items():
            assert torch.equal(run(), stock[name]), name
    finally:
        handle.remove()
    assert calls  # the stock AssistedCandidateGenerator drove the assistant
    assert "_get_candidate_generator" not in target.__dict__
