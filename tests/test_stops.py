"""Where responses end (dflash_hf.stops): the ids `target.generate` stops at, and cutting a row after the first."""

from __future__ import annotations

import torch
from helpers import greedy, random_prompt, tiny_chat_tokenizer, tiny_target

from dflash_hf.stops import cut_after_stop, target_stop_ids


def test_stop_ids_follow_generation_config_then_config_then_tokenizer():
    tokenizer = tiny_chat_tokenizer()
    model = tiny_target("llama", vocab=len(tokenizer), eos=2)
    model.generation_config.eos_token_id = [7, 9, 7]
    assert target_stop_ids(model, tokenizer) == [7, 9]  # a list, duplicates dropped, order kept
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = 5
    assert target_stop_ids(model, tokenizer) == [5]
    model.config.eos_token_id = None
    assert target_stop_ids(model, tokenizer) == [tokenizer.eos_token_id]
    assert target_stop_ids(model) == []  # nothing names one: no stop ids, not a guess


def test_every_command_stops_where_generate_stops():
    """The rule is generate's: a row cut with `target_stop_ids` equals `target.generate`'s own output, which ends at
    the first of those ids."""
    model = tiny_target("qwen3", layers=2, seed=5)
    prompt = random_prompt(6, seed=6)
    free = greedy(model, prompt, 24, eos_token_id=None)[0, 6:].tolist()
    model.generation_config.eos_token_id = [free[9], free[14]]
    stopped = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                             pad_token_id=0)[0, 6:].tolist()
    cut = cut_after_stop(free, set(target_stop_ids(model)))
    assert cut == stopped and cut[-1] in (free[9], free[14])
    assert all(t not in (free[9], free[14]) for t in cut[:-1])


def test_cut_after_stop():
    assert cut_after_stop([4, 5, 2, 6, 2], {2}) == [4, 5, 2]
    assert cut_after_stop([4, 5, 6], {2}) == [4, 5, 6]
    assert cut_after_stop([], {2}) == []
    assert cut_after_stop((3, 9, 8), {8, 9}) == [3, 9]
