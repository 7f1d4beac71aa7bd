"""Property test: over random tiny target/drafter configurations, DFlash output equals the target's greedy output.

Random target depth (4-8), head / KV-head layouts, drafter depth (1-3), block size (2-16), valid `target_layer_ids`,
and sliding/full mixes of drafter layers (`layer_types` + `sliding_window`). Plain `generate(assistant_model=)` and
the batched loop must always be greedy-equal.
"""

from __future__ import annotations

import pytest
import torch
from helpers import greedy, random_prompt, tiny_target

import dflash_hf
from dflash_hf import DFlashConfig, DFlashDraftModel

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HIDDEN = 32
HEAD_LAYOUTS = [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2)]  # (attention heads, KV heads)


@st.composite
def configurations(draw):
    depth = draw(st.integers(4, 8))
    heads, kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    n_ids = draw(st.integers(1, min(4, depth)))
    ids = sorted(draw(st.lists(st.integers(0, depth - 1), min_size=n_ids, max_size=n_ids, unique=True)))
    draft_layers = draw(st.integers(1, 3))
    kinds = draw(st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=draft_layers,
                          max_size=draft_layers))
    return dict(
        family=draw(st.sampled_from(["qwen3", "llama"])),
        depth=depth,
        heads=heads,
        kv_heads=kv_heads,
        ids=ids,
        draft_layers=draft_layers,
        draft_heads=draw(st.sampled_from(HEAD_LAYOUTS)),
        layer_types=kinds if "sliding_attention" in kinds else draw(st.sampled_from([None, kinds])),
        sliding_window=draw(st.integers(2, 8)),
        block_size=draw(st.integers(2, 16)),
        prompt_len=draw(st.integers(1, 24)),
        max_new=draw(st.integers(1, 20)),
        seed=draw(st.integers(0, 2**16)),
    )


def build(c):
    target = tiny_target(c["family"], layers=c["depth"], hidden=HIDDEN, heads=c["heads"], seed=c["seed"])
    # tiny_target derives KV heads as heads // 2; rebuild the attention layout the draw asked for.
    if target.config.num_key_value_heads != c["kv_heads"]:
        target.config.num_key_value_heads = c["kv_heads"]
        target = type(target)(target.config).eval()
        torch.manual_seed(c["seed"])
        with torch.no_grad():
            for name, p in target.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02 * (8.0 if ("embed" in name or "lm_head" in name) else 2.0))
    return target, build_drafter(c)


def build_drafter(c):
    """A random drafter with the drawn depth, heads, block size, ids and layer kinds (hidden size of the target)."""
    heads, kv_heads = c["draft_heads"]
    torch.manual_seed(c["seed"] + 1)
    layer_types = c["layer_types"]
    config = DFlashConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=c["draft_layers"],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=HIDDEN // heads, vocab_size=96,
        rms_norm_eps=1e-6, max_position_embeddings=512, block_size=c["block_size"], layer_types=layer_types,
        sliding_window=c["sliding_window"] if layer_types else None, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        dflash_config={"mask_token_id": 5, "target_layer_ids": c["ids"]},
    )
    return DFlashDraftModel(config).eval()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(configurations())
def test_greedy_equality_over_random_configurations(c):
    target, drafter = build(c)
    prompt = random_prompt(c["prompt_len"], seed=c["seed"])
    # EOS off: a fixed number of new tokens, so every draft/verify step up to the end is exercised.
    reference = greedy(target, prompt, c["max_new"], eos_token_id=None, pad_token_id=0)
    got = greedy(target, prompt, c["max_new"], assistant_model=drafter, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, reference), c
    assert drafter.last_stats is not None
    assert all(1 <= a <= c["block_size"] for a in drafter.last_stats.acceptance_lengths)

    out = dflash_hf.generate(target, drafter, prompt, max_new_tokens=c["max_new"], stop_token_ids=[])
    assert torch.equal(out.sequences, reference), c
    assert sum(out.acceptance_lengths[0]) + 1 == c["max_new"] or c["max_new"] == 1
