"""Long prompts: a prompt that ends right at the tiny target's position limit works in both routes, and
`DFlashConfig.draft_window` bounds the drafter's context cache in the plain-generate route (output unchanged)."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy, random_prompt, tiny_drafter, tiny_target

import dflash_hf
from dflash_hf import DFlashDecoder
from dflash_hf.modeling import integration_dflash
from dflash_hf.modeling.modeling_dflash import DFlashDraftCache

NEW = 12


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", layers=4, hidden=32)


def test_prompt_ending_at_the_position_limit_both_routes(target):
    limit = target.config.max_position_embeddings  # 512
    prompt = random_prompt(limit - NEW, seed=41)
    drafter = tiny_drafter(target, layer_ids=[0, 2], block_size=4)
    reference = greedy(target, prompt, NEW, eos_token_id=None, pad_token_id=0)
    assert reference.shape[1] == limit
    assert torch.equal(greedy(target, prompt, NEW, assistant_model=drafter, eos_token_id=None, pad_token_id=0),
                       reference)
    out = dflash_hf.generate(target, drafter, prompt, max_new_tokens=NEW)
    assert torch.equal(out.sequences, reference)
    # One token more than the limit is refused by the batched loop, naming both numbers.
    with pytest.raises(ValueError, match=rf"{limit + 1} exceeds the target's max_position_embeddings {limit}"):
        dflash_hf.generate(target, drafter, prompt, max_new_tokens=NEW + 1)


@pytest.mark.parametrize("window", [4, 16])
def test_draft_window_bounds_the_draft_cache(target, window, monkeypatch):
    """The stock assisted loop (the fallback of plain generate; here forced by asking for per-token logits) keeps only
    the newest `draft_window` context rows in the draft cache; the batched engine masks the older ones instead. Both
    give the target's own output: the window changes what the drafter sees, never the output."""
    drafter = tiny_drafter(target, layer_ids=[0, 2], block_size=4, draft_window=window)
    assert drafter.config.draft_window == window
    caches = []
    make = drafter.make_draft_cache
    drafter.make_draft_cache = lambda: caches.append(make()) or caches[-1]  # observe the cache the call uses
    prompt = random_prompt(40, seed=42)
    reference = greedy(target, prompt, 20, eos_token_id=None, pad_token_id=0)
    monkeypatch.setattr(integration_dflash, "_warned", set())
    try:
        with pytest.warns(UserWarning, match="output_logits"):
            got = greedy(target, prompt, 20, assistant_model=drafter, eos_token_id=None, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True).sequences
    finally:
        del drafter.make_draft_cache
    assert torch.equal(got, reference)
    unbounded = tiny_drafter(target, layer_ids=[0, 2], block_size=4)
    decoder = DFlashDecoder(target, drafter, max_length=64)
    assert torch.equal(decoder.generate(prompt, max_new_tokens=20, stop_token_ids=[]).sequences, reference)
    (workspace,) = decoder._workspaces.values()
    visible_context = (workspace._draft_mask(0, torch.float32)[0, 0, :, : workspace.capacity] == 0).sum(-1)
    assert (visible_context == window).all()  # 60 context rows by now, `window` of them seen
    seen_all = DFlashDecoder(target, unbounded, max_length=64).generate(prompt, max_new_tokens=20, stop_token_ids=[])
    assert torch.equal(seen_all.sequences, reference)
    (cache,) = caches
    assert cache.window == window and cache.keys
    assert all(k.shape[-2] <= window for k in cache.keys) and all(v.shape[-2] <= window for v in cache.values)
    assert cache.offset > 0  # rows were actually dropped: the prompt alone is longer than the window
    assert cache.get_seq_length() == cache.offset + cache.keys[0].shape[-2] >= 40


def test_draft_cache_window_unit():
    cache = DFlashDraftCache(window=5)
    for step in range(10):
        k = torch.full((1, 2, 3, 4), float(step))
        cache.update(k, k.clone(), 0)
        cache.crop(cache.get_seq_length() - 1)  # keep all but the newest row, as after a draft call
        assert cache.keys[0].shape[-2] <= 5
    assert cache.get_seq_length() == 10 * 2
    assert cache.keys[0][0, 0, -1, 0] == 9.0  # the newest kept row is from the last update
    unbounded = DFlashDraftCache()
    for step in range(10):
        unbounded.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    assert unbounded.keys[0].shape[-2] == 30


def test_batched_prefill_computes_only_the_last_logits(target):
    """The prefill needs the last position's logits only; computing all of them cost 2.4 GB at an 8,000-token
    prompt on the H200 (benchmarks/results/long_context_h200.md). Verify forwards still score every block row."""
    drafter = tiny_drafter(target, layer_ids=[0, 2], block_size=4)
    shapes = []
    handle = target.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        prompt = random_prompt(60, seed=5)
        out = dflash_hf.generate(target, drafter, prompt, max_new_tokens=8)
    finally:
        handle.remove()
    vocab = target.config.vocab_size
    assert shapes[0] == (1, 1, vocab)
    assert len(shapes) > 1 and all(shape == (1, 4, vocab) for shape in shapes[1:])
    assert torch.equal(out.sequences, greedy(target, prompt, 8, eos_token_id=None, pad_token_id=0))
