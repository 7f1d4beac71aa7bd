"""The engine against transformers' own greedy decoding, for every target family transformers ships that DFlash can
serve, with contexts longer than the target's sliding window (issue: target windows read as transformers reads them).

Then the released pairs' shapes through every door: Gemma-4 MoE with a 4-sliding + 1-full drafter, and hybrid
linear-attention targets (Qwen3-Next, Qwen3.5), which are refused with a clear error wherever they cannot be served
exactly.

Each family is a tiny random config of the real class with a small window (8) where the family has one, so that a
30-token prompt and 24 new tokens cross it. Windows come in three forms: `layer_types` (Gemma-2/3/4, Qwen2/3 with
`use_sliding_window`), a bare `sliding_window` that applies to every layer (Mistral, Phi-3, Starcoder2), and none.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from helpers import (
    VOCAB,
    OracleDrafter,
    assert_pipeline_matches_plain,
    greedy,
    left_pad,
    random_prompt,
    tiny_drafter,
)
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM

import dflash_hf
from dflash_hf.modeling.compat_dflash import recurrent_state_through_cache

WINDOW = 8
HIDDEN, HEADS, LAYERS = 32, 4, 4


def _common() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _layered(kinds: str) -> list[str]:
    """'ssf' -> sliding, sliding, full, repeated over the layers."""
    names = {"s": "sliding_attention", "f": "full_attention"}
    return [names[kinds[i % len(kinds)]] for i in range(LAYERS)]


# model_type -> extra config kwargs. Windows are WINDOW wherever the family has one.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, head_dim=HIDDEN // HEADS),
    "mistral": dict(sliding_window=WINDOW),
    "phi3": dict(sliding_window=WINDOW, pad_token_id=0),
    "starcoder2": dict(sliding_window=WINDOW),
    "gemma2": dict(sliding_window=WINDOW, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(sliding_window=WINDOW, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
                        layer_types=_layered("ssf")),
    # gemma-4-26B-A4B's text shape in small: MoE beside the dense MLP, keys = values on the global layers, global
    # layers with their own head size and KV heads, softcapping, scaled embeddings.
    "gemma4_text": dict(sliding_window=WINDOW, head_dim=HIDDEN // HEADS, global_head_dim=2 * HIDDEN // HEADS,
                        num_global_key_value_heads=1, attention_k_eq_v=True, enable_moe_block=True, num_experts=4,
                        top_k_experts=2, moe_intermediate_size=HIDDEN, hidden_size_per_layer_input=0,
                        final_logit_softcapping=30.0, layer_types=_layered("ssf")),
    # gemma-4-E2B-style: per-layer input embeddings and the last layers reusing earlier layers' keys/values.
    "gemma4_text/e2b": dict(sliding_window=WINDOW, head_dim=HIDDEN // HEADS, global_head_dim=2 * HIDDEN // HEADS,
                            hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=2,
                            layer_types=_layered("sf"), final_logit_softcapping=30.0),
    "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True),
    "olmo2": {},
    "cohere": dict(logit_scale=1.0),
}


def build_target(family: str, **overrides):
    """A tiny random target of `family` (a key of FAMILIES: a model_type, optionally '/variant')."""
    model_type = family.split("/")[0]
    try:
        config = AutoConfig.for_model(model_type, **{**_common(), **FAMILIES[family], **overrides})
    except (KeyError, ValueError):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    # Gemma-2 softcaps attention logits, which sdpa cannot do: transformers itself serves it eagerly.
    config._attn_implementation = "eager" if model_type.startswith("gemma") else "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharper, varied greedy paths, far from ties (as tests/helpers.tiny_target)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0 if ("embed" in name or "lm_head" in name) else 2.0)
    return model


def _engine_matches_hf(target, drafter, prompt_lengths=(30, 21), new=24):
    """Greedy engine output for a left-padded batch equals `target.generate` for each row alone."""
    prompts = [random_prompt(n, seed=n) for n in prompt_lengths]
    ids, mask = left_pad(prompts)
    out = dflash_hf.generate(target, drafter, ids, mask, max_new_tokens=new, stop_token_ids=[])
    for r, p in enumerate(prompts):
        expected = greedy(target, p, new, eos_token_id=None, min_new_tokens=new)[0, p.shape[1]:].tolist()
        assert out.new_tokens[r] == expected, f"row {r} (prompt {p.shape[1]} tokens)"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_is_exact_past_the_window(family):
    target = build_target(family)
    drafter = tiny_drafter(target, layers=2, block_size=8, layer_ids=[0, LAYERS - 1])
    _engine_matches_hf(target, drafter)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "gemma4_text", "gemma4_text/e2b"])
def test_engine_is_exact_past_the_window_with_accepted_blocks(family):
    """An oracle drafter makes whole blocks accepted, so the verify's window edge moves by several tokens a step."""
    target = build_target(family)
    with OracleDrafter.for_target(target, block_size=6, layer_ids=[0, LAYERS - 1]) as drafter:
        prompt = random_prompt(30, seed=3)
        out = dflash_hf.generate(target, drafter, prompt, max_new_tokens=24, stop_token_ids=[])
        expected = greedy(target, prompt, 24, eos_token_id=None, min_new_tokens=24)[0, 30:].tolist()
        assert out.new_tokens[0] == expected
        assert out.mean_acceptance_length > 2


# ----------------------------------------------------------------------------------------------------------------------
# The released pairs' shapes through every door
# ----------------------------------------------------------------------------------------------------------------------

NATIVE = Version(transformers.__version__) >= Version("5.15.1")


def gemma4_pair():
    """gemma-4-26B-A4B-it + its DFlash drafter in small: the MoE target above, and a drafter of 4 causal sliding
    layers + 1 full layer reading 3 target layers, with the target's softcap and embedding scale."""
    target = build_target("gemma4_text")
    drafter = tiny_drafter(target, layers=5, block_size=6, layer_ids=[0, 1, 3],
                           layer_types=["sliding_attention"] * 4 + ["full_attention"], sliding_window=5,
                           final_logit_softcapping=30.0)
    return target, drafter


def test_gemma4_pair_through_every_door():
    target, drafter = gemma4_pair()
    prompts = [random_prompt(n, seed=n) for n in (26, 11, 19)]
    expected = [greedy(target, p, 14, eos_token_id=None)[0, p.shape[1]:].tolist() for p in prompts]
    ids, mask = left_pad(prompts)
    width = ids.shape[1]

    out = dflash_hf.generate(target, drafter, ids, mask, max_new_tokens=14, stop_token_ids=[])
    assert out.new_tokens == expected  # the engine, a left-padded batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to transformers' loop
        plain = target.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=14,
                                eos_token_id=None, pad_token_id=0)
    assert [plain[r, width:].tolist() for r in range(len(prompts))] == expected  # plain generate, same batch

    assert_pipeline_matches_plain(target, drafter, prompts, 14)

    if NATIVE:  # transformers' own route, one prompt at a time
        native = greedy(target, prompts[0], 14, assistant_model=drafter, speculation_type="dflash",
                        eos_token_id=None)
        assert native[0, prompts[0].shape[1]:].tolist() == expected[0]


def test_gemma4_pair_samples_the_target_distribution():
    """Sampling through the engine on the Gemma-4 pair: the first new token's empirical distribution over many
    batched rows matches the target's softmax (chi-square)."""
    target, drafter = gemma4_pair()
    prompt = random_prompt(9, seed=4)
    with torch.no_grad():
        probs = torch.softmax(target(prompt).logits[0, -1].double() / 1.5, -1)
    rows = 600
    out = dflash_hf.generate(target, drafter, prompt.expand(rows, -1), max_new_tokens=1, stop_token_ids=[],
                             do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([r[0] for r in out.new_tokens]), minlength=probs.numel()).double()
    keep = probs * rows >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([probs[keep], probs[~keep].sum()[None]]) * rows
    chi2 = float(((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum())
    dof = int(keep.sum())
    assert chi2 < dof + 4 * (2 * dof) ** 0.5 + 10, (chi2, dof)


# ----------------------------------------------------------------------------------------------------------------------
# Hybrid targets (gated delta-net linear attention with recurrent state): on the engine from transformers 5.25,
# refused by name before
# ----------------------------------------------------------------------------------------------------------------------

HYBRID_TYPES = ["qwen3_next", "qwen3_5_text"]
HYBRID = dict(layer_types=["linear_attention", "full_attention"] * 2, linear_num_value_heads=4,
              linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
              head_dim=HIDDEN // HEADS)


def hybrid_target(model_type: str):
    try:
        config = AutoConfig.for_model(model_type, **{**_common(), **HYBRID})
    except (KeyError, ValueError):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # as build_target, and a slow decay: a wrong recurrent state must change the output
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(8.0 if ("embed" in name or "lm_head" in name) else 2.0)
            elif name.endswith("A_log"):
                p.fill_(-4.0)
    return model


def hybrid_pair(model_type: str):
    target = hybrid_target(model_type)
    if not recurrent_state_through_cache():
        return target, None
    return target, tiny_drafter(target, layers=2, block_size=6, layer_ids=[0, 3])


def released_pair(name: str):
    """`(target, drafter)` of a released pair's shape: "gemma4", or a hybrid model type (skips the test where this
    transformers cannot serve it)."""
    if name == "gemma4":
        return gemma4_pair()
    target, drafter = hybrid_pair(name)
    if drafter is None:
        pytest.skip("hybrid targets need transformers >= 5.25")
    return target, drafter


@pytest.mark.parametrize("model_type", HYBRID_TYPES)
def test_hybrid_target_engine_keeps_the_state_of_the_accepted_prefix(model_type):
    """After a run with partial and full acceptances, the engine's per-row linear-attention states equal the states
    of a plain forward over the tokens the row committed (all but the last, which is the next anchor)."""
    target = hybrid_target(model_type)
    if not recurrent_state_through_cache():
        with pytest.raises(ValueError, match=r"transformers>=5.25"):
            dflash_hf.generate(target, tiny_drafter(target, layer_ids=[0, 3]), random_prompt(5), max_new_tokens=4)
        return
    prompt = random_prompt(12, seed=1)
    expected = greedy(target, prompt, 23, eos_token_id=None)[0, 12:].tolist()
    for corrupt_every in (0, 3):  # whole blocks accepted; acceptance cut at every third row
        with OracleDrafter.for_target(target, block_size=6, layer_ids=[0, 3], corrupt_every=corrupt_every) as drafter:
            decoder = dflash_hf.DFlashDecoder(target, drafter, max_length=40, cuda_graphs=False, compile=False)
            out = decoder.generate(prompt, max_new_tokens=23, stop_token_ids=[])
            assert out.new_tokens[0] == expected
            assert max(out.acceptance_lengths[0]) > 2
        cache = next(iter(decoder._workspaces.values())).target_cache
        fed = torch.tensor([prompt[0].tolist() + expected[:-1]])
        with torch.no_grad():
            reference = target(fed, use_cache=True).past_key_values
        linear = [i for i, kind in enumerate(target.config.layer_types) if kind == "linear_attention"]
        for i in linear:
            torch.testing.assert_close(cache.recurrent_states[i], reference.layers[i].recurrent_states[0],
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.conv_states[i], reference.layers[i].conv_states[0], rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("model_type", HYBRID_TYPES)
def test_hybrid_target_through_every_door(model_type):
    target, drafter = hybrid_pair(model_type)
    prompts = [random_prompt(n, seed=n) for n in (14, 9, 11)]
    expected = [greedy(target, p, 13, eos_token_id=None)[0, p.shape[1]:].tolist() for p in prompts]
    if drafter is None:  # transformers < 5.25: every door refuses by name
        drafter = tiny_drafter(target, layers=2, block_size=6, layer_ids=[0, 3])
        with pytest.raises(ValueError, match=r"transformers>=5.25"):
            greedy(target, prompts[0], 13, assistant_model=drafter, eos_token_id=None)
        return
    ids, mask = left_pad(prompts)
    width = ids.shape[1]
    assert dflash_hf.generate(target, drafter, ids, mask, max_new_tokens=13, stop_token_ids=[]).new_tokens == expected
    assert dflash_hf.generate(target, None, ids, mask, max_new_tokens=13, stop_token_ids=[]).new_tokens == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engine, not a fallback
        plain = target.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=13,
                                eos_token_id=None, pad_token_id=0)
    assert [plain[r, width:].tolist() for r in range(len(prompts))] == expected
    assert_pipeline_matches_plain(target, drafter, prompts, 13)
    native = greedy(target, prompts[0], 13, assistant_model=drafter, speculation_type="dflash", eos_token_id=None)
    assert native[0, prompts[0].shape[1]:].tolist() == expected[0]


def test_hybrid_target_sampling_runs_on_the_engine():
    target, drafter = hybrid_pair("qwen3_5_text")
    if drafter is None:
        pytest.skip("hybrid targets need transformers >= 5.25")
    out = dflash_hf.generate(target, drafter, random_prompt(8).expand(4, -1), max_new_tokens=12, stop_token_ids=[],
                             do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(3))
    assert all(len(row) == 12 for row in out.new_tokens)


@pytest.mark.parametrize("pair", ["gemma4", "qwen3_5_text", "qwen3_next"])
def test_released_pair_shapes_stop_at_eos_inside_a_block(pair):
    """EOS in the middle of an accepted block ends the row there, as transformers does (oracle drafter, so that
    whole blocks are accepted and the stop falls inside one)."""
    if pair == "gemma4":
        target, _ = gemma4_pair()
    else:
        target = hybrid_target(pair)
        if not recurrent_state_through_cache():
            pytest.skip("hybrid targets need transformers >= 5.25")
    prompt = random_prompt(10, seed=8)
    free = greedy(target, prompt, 16, eos_token_id=None)[0, 10:].tolist()
    stop = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i])  # first new token after the 4th
    expected = greedy(target, prompt, 16, eos_token_id=stop, pad_token_id=0)[0, 10:].tolist()
    assert expected[-1] == stop and len(expected) < 16
    layer_ids = [0, 1, 3] if pair == "gemma4" else [0, 3]
    with OracleDrafter.for_target(target, block_size=6, layer_ids=layer_ids) as drafter:
        out = dflash_hf.generate(target, drafter, prompt, max_new_tokens=16, stop_token_ids=[stop])
        assert out.new_tokens[0] == expected
        assert max(out.acceptance_lengths[0]) > 2


@pytest.mark.parametrize("verify_length", ["full", 1])
@pytest.mark.parametrize("pair", ["gemma4", "qwen3_5_text"])
def test_graph_capture_restores_everything_a_step_writes(pair, verify_length, monkeypatch):
    """On CUDA the graphs are captured after warm-up steps run on the live state, which is then restored from a
    snapshot (`_step_state`). Every tensor a step writes must be in that snapshot, or the warm-up would advance the
    generation: checked here on the first steady step of a run, against every tensor the workspace holds."""
    from dflash_hf.modeling import decoding_dflash

    target, drafter = released_pair(pair)
    seen = []
    replay = decoding_dflash._Workspace._replay_step

    def checked_replay(workspace, *args):
        held = {id(t): t for t in vars(workspace).values() if torch.is_tensor(t)}
        for cache in (workspace.target_cache, workspace.draft_cache):
            for buffers in (cache.keys, cache.values, cache.conv_states, cache.recurrent_states):
                held.update({id(t): t for t in buffers.values()})
        before = {key: t.clone() for key, t in held.items()}
        result = replay(workspace, *args)
        written = {key for key, t in held.items() if not torch.equal(t, before[key])}
        seen.append((written, {id(t) for t in workspace._step_state()}))
        return result

    monkeypatch.setattr(decoding_dflash._Workspace, "_replay_step", checked_replay)
    decoder = dflash_hf.DFlashDecoder(target, drafter, max_length=40, cuda_graphs=False, compile=False,
                                      verify_length=verify_length)
    decoder.generate(random_prompt(9), max_new_tokens=20, stop_token_ids=[])
    assert seen, "no steady step ran"
    for written, restored in seen:
        assert written and written <= restored
