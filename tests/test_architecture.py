"""The drafter forward against an independent, written-out re-computation of docs/DFLASH.md ("Drafter forward", "Draft cache")

The reference below reads the weights by their released names, builds RoPE from `rope_theta` itself, writes eager
attention with explicit masks over absolute positions, and keeps its own context-only K/V cache. Nothing of the
implementation under test is reused.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MASK_ID, OracleDrafter, greedy, random_prompt, tiny_drafter, tiny_target

from dflash_hf import DFlashDraftModel
from dflash_hf.modeling import integration_dflash
from dflash_hf.modeling.generation_dflash import embed_block
from dflash_hf.modeling.modeling_dflash import DFlashDraftCache, build_block_attention_mask

# ----------------------------------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    """x `[n, heads, hd]` at absolute `positions` `[n]` (rotate-half convention)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = positions.double()[:, None] * inv_freq[None]  # [n, hd/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class ReferenceDrafter:
    """Batch-1 DFlash drafter written out from the spec, with its own context-only cache keyed by absolute position."""

    def __init__(self, drafter: DFlashDraftModel, theta: float):
        self.w = {k: v.detach().double() for k, v in drafter.state_dict().items()}
        c = drafter.config
        self.layers, self.heads, self.kv_heads, self.hd = c.num_hidden_layers, c.num_attention_heads, \
            c.num_key_value_heads, c.head_dim
        self.eps, self.theta = c.rms_norm_eps, theta
        self.causal = [c.layer_is_causal(i) for i in range(self.layers)]
        self.window = [c.layer_window(i) for i in range(self.layers)]
        self.keys = [torch.zeros(0, self.kv_heads, self.hd, dtype=torch.float64) for _ in range(self.layers)]
        self.values = [torch.zeros(0, self.kv_heads, self.hd, dtype=torch.float64) for _ in range(self.layers)]
        self.key_pos = torch.zeros(0, dtype=torch.long)

    def visible(self, layer, q_pos, k_pos):
        qp, kp = q_pos[:, None], k_pos[None, :]
        ok = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
        if self.causal[layer]:
            ok &= kp <= qp
        if self.window[layer] is not None:
            ok &= (qp - kp) < self.window[layer]
            if not self.causal[layer]:
                ok &= (kp - qp) < self.window[layer]
        return ok

    def __call__(self, noise, features, ctx_pos, start):
        """noise `[B, H]`, features `[n_ctx, k*H]` at absolute `ctx_pos`; block at `start ...`. Returns `[B, H]`."""
        w, B = self.w, noise.shape[0]
        ctx = rms_norm(features.double() @ w["fc.weight"].T, w["hidden_norm.weight"], self.eps)
        h = noise.double()
        block_pos = torch.arange(start, start + B)
        new_keys, new_values = [], []
        for i in range(self.layers):
            p = f"layers.{i}."
            x = rms_norm(h, w[p + "input_layernorm.weight"], self.eps)
            q = rms_norm((x @ w[p + "self_attn.q_proj.weight"].T).view(B, self.heads, self.hd),
                         w[p + "self_attn.q_norm.weight"], self.eps)
            # The same k/v projections (and k_norm) serve context and block.
            kc, kb = [rms_norm((y @ w[p + "self_attn.k_proj.weight"].T).view(len(y), self.kv_heads, self.hd),
                               w[p + "self_attn.k_norm.weight"], self.eps) for y in (ctx, x)]
            vc, vb = [(y @ w[p + "self_attn.v_proj.weight"].T).view(len(y), self.kv_heads, self.hd) for y in (ctx, x)]
            q = rope(q, block_pos, self.theta)
            kc, kb = rope(kc, ctx_pos, self.theta), rope(kb, block_pos, self.theta)
            keys = torch.cat([self.keys[i], kc, kb])
            values = torch.cat([self.values[i], vc, vb])
            key_pos = torch.cat([self.key_pos, ctx_pos, block_pos])
            mask = self.visible(i, block_pos, key_pos)
            out = torch.empty(B, self.heads, self.hd, dtype=torch.float64)
            group = self.heads // self.kv_heads
            for head in range(self.heads):
                scores = q[:, head] @ keys[:, head // group].T / math.sqrt(self.hd)
                scores = scores.masked_fill(~mask, float("-inf"))
                out[:, head] = scores.softmax(-1) @ values[:, head // group]
            h = h + out.reshape(B, -1) @ w[p + "self_attn.o_proj.weight"].T
            y = rms_norm(h, w[p + "post_attention_layernorm.weight"], self.eps)
            gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
            h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
            new_keys.append(kc)
            new_values.append(vc)
        # Only the context rows are kept (block K/V never enter the cache).
        for i in range(self.layers):
            self.keys[i] = torch.cat([self.keys[i], new_keys[i]])
            self.values[i] = torch.cat([self.values[i], new_values[i]])
        self.key_pos = torch.cat([self.key_pos, ctx_pos])
        return rms_norm(h, w["norm.weight"], self.eps)


# Call pattern of a generation: prompt of 7 rows, then 3 accepted rows, then 1, then 5.
CALLS = [(0, 7), (7, 3), (10, 1), (11, 5)]


def run_calls(drafter, reference, block, hidden, n_ids, seed=0):
    """Drive the drafter like generate does (cache, crop to start) and compare every call with the reference."""
    g = torch.Generator().manual_seed(seed)
    cache = drafter.make_draft_cache()
    for first, n_ctx in CALLS:
        start = first + n_ctx
        noise = torch.randn(1, block, hidden, generator=g)
        feats = torch.randn(1, n_ctx, n_ids * hidden, generator=g)
        positions = torch.arange(first, start + block)[None]
        with torch.no_grad():
            out = drafter(noise_embeds=noise, context_hidden_states=feats, position_ids=positions,
                          past_key_values=cache).last_hidden_state
        assert cache.get_seq_length() == start + block  # context + block appended ...
        cache.crop(start)
        assert cache.get_seq_length() == start  # ... and the block rows cropped: context only, one row per token
        expected = reference(noise[0], feats[0], torch.arange(first, start), start)
        torch.testing.assert_close(out[0].double(), expected, rtol=1e-4, atol=1e-4)


LAYOUTS = {
    "all-full": dict(layer_types=None, sliding_window=None),
    "sliding-causal+full": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                sliding_window=5),
    "sliding-bidirectional (is_causal=False)": dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=5, is_causal=False),
    "all-causal (is_causal=True)": dict(layer_types=None, sliding_window=None, is_causal=True),
}


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", layers=6, hidden=64)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_matches_written_out_reference(target, layout, attn):
    kw = dict(LAYOUTS[layout])
    layers = 3 if kw["layer_types"] else 2
    drafter = tiny_drafter(target, layers=layers, block_size=8, layer_ids=[0, 2, 4], rope_theta=5000.0, **kw)
    drafter.config._attn_implementation = attn
    with torch.no_grad():  # non-trivial norm weights so a skipped norm would show
        for p in drafter.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    run_calls(drafter, ReferenceDrafter(drafter, theta=5000.0), block=8, hidden=64, n_ids=3)


def test_reference_detects_wrong_positions(target):
    """Power check of the comparison: the same inputs at positions shifted inside the context (block positions
    restarted at 0) give a different result, so RoPE at true positions is really tested above."""
    drafter = tiny_drafter(target, layers=2, block_size=8, layer_ids=[0, 2, 4])
    g = torch.Generator().manual_seed(0)
    noise, feats = torch.randn(1, 8, 64, generator=g), torch.randn(1, 7, 192, generator=g)
    true_pos = torch.arange(0, 15)[None]
    wrong_pos = torch.cat([torch.arange(0, 7), torch.arange(0, 8)])[None]
    with torch.no_grad():
        a = drafter(noise_embeds=noise, context_hidden_states=feats, position_ids=true_pos).last_hidden_state
        b = drafter(noise_embeds=noise, context_hidden_states=feats, position_ids=wrong_pos).last_hidden_state
    assert (a - b).abs().max() > 1e-3


def test_sdpa_and_eager_agree_with_padding(target):
    """Both attention implementations, a batch of two with left-padded context keys, sliding and full layers."""
    kw = LAYOUTS["sliding-causal+full"]
    outs = {}
    g = torch.Generator().manual_seed(3)
    noise, feats = torch.randn(2, 8, 64, generator=g), torch.randn(2, 6, 128, generator=g)
    positions = torch.stack([torch.arange(0, 14), torch.cat([torch.zeros(2, dtype=torch.long), torch.arange(0, 12)])])
    key_mask = torch.ones(2, 14, dtype=torch.long)
    key_mask[1, :2] = 0  # row 1: two padding context rows
    for attn in ("eager", "sdpa"):
        drafter = tiny_drafter(target, layers=3, block_size=8, **kw)
        drafter.config._attn_implementation = attn
        with torch.no_grad():
            outs[attn] = drafter(noise_embeds=noise, context_hidden_states=feats, position_ids=positions,
                                 attention_mask=key_mask).last_hidden_state
        # The padded row equals that row alone without its padding.
        with torch.no_grad():
            alone = drafter(noise_embeds=noise[1:], context_hidden_states=feats[1:, 2:],
                            position_ids=torch.arange(0, 12)[None]).last_hidden_state
        torch.testing.assert_close(outs[attn][1:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["eager"], outs["sdpa"], rtol=1e-5, atol=1e-5)


def test_block_attention_mask_pattern():
    # 3 cached/context keys, 4 block queries; window 3, causal.
    mask = build_block_attention_mask(4, 7, causal=True, window=3, key_padding=None, dtype=torch.float32,
                                      device=torch.device("cpu"))
    visible = (mask[0, 0] == 0).int().tolist()
    assert visible == [
        [0, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1],
    ]
    assert build_block_attention_mask(4, 7, causal=False, window=None, key_padding=None, dtype=torch.float32,
                                      device=torch.device("cpu")) is None


def test_reference_and_native_call_conventions_agree(target):
    drafter = tiny_drafter(target, layers=2, block_size=8)
    g = torch.Generator().manual_seed(1)
    noise, feats = torch.randn(1, 8, 64, generator=g), torch.randn(1, 5, 128, generator=g)
    positions = torch.arange(0, 13)[None]
    with torch.no_grad():
        cache_a, cache_b, cache_c = (drafter.make_draft_cache() for _ in range(3))
        native = drafter(noise_embeds=noise, context_hidden_states=feats, position_ids=positions,
                         attention_mask=torch.ones(1, 13), past_key_values=cache_a)
        # 5.24 names the cache argument `cache`.
        native_cache_kw = drafter(noise, feats, positions, cache=cache_b)
        reference = drafter(noise_embedding=noise, target_hidden=feats, position_ids=positions,
                            past_key_values=cache_c, use_cache=True)
    assert torch.is_tensor(reference) and reference.shape == (1, 8, 64)
    assert native.last_hidden_state.shape == (1, 8, 64)
    torch.testing.assert_close(native.last_hidden_state, reference)
    torch.testing.assert_close(native_cache_kw.last_hidden_state, reference)
    assert cache_a.get_seq_length() == cache_b.get_seq_length() == cache_c.get_seq_length() == 13
    with pytest.raises(ValueError, match="noise_embeds"):
        drafter(context_hidden_states=feats)


def test_rope_theta_is_honoured(target):
    drafter = tiny_drafter(target, rope_theta=123456.0)
    x = torch.randn(1, 3, 16)
    positions = torch.tensor([[0, 5, 1000]])
    cos, sin = drafter.rotary_emb(x, positions)
    inv_freq = 1.0 / (123456.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    angles = positions[0].double()[:, None] * inv_freq
    torch.testing.assert_close(cos[0].double(), torch.cat([angles.cos()] * 2, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(sin[0].double(), torch.cat([angles.sin()] * 2, -1), rtol=0, atol=1e-4)


def test_yarn_rope_scaling_is_honoured(target):
    """Qwen3.6 drafters use YaRN: same cos/sin as a Qwen3 model with that rope_scaling, not plain RoPE."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    drafter = tiny_drafter(target, rope_theta=1e6, rope_scaling=yarn)
    qwen = Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=1e6, rope_scaling=dict(yarn),
                       max_position_embeddings=512)
    plain = tiny_drafter(target, rope_theta=1e6)
    x, positions = torch.randn(1, 4, 16), torch.tensor([[0, 7, 200, 511]])
    cos, sin = drafter.rotary_emb(x, positions)
    ref_cos, ref_sin = Qwen3RotaryEmbedding(config=qwen)(x, positions)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    # YaRN's attention temperature 0.1 ln(factor) + 1 scales cos/sin, and the frequencies differ from plain RoPE.
    assert drafter.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert not torch.allclose(cos, plain.rotary_emb(x, positions)[0])


def test_compute_logits_multiplier_and_softcap(target):
    head = target.get_output_embeddings()
    h = torch.randn(1, 3, 64) * 10
    raw = h @ head.weight.T
    plain = tiny_drafter(target)
    torch.testing.assert_close(plain.compute_logits(h, head), raw)
    capped = tiny_drafter(target, output_multiplier=0.5, final_logit_softcapping=30.0)
    torch.testing.assert_close(capped.compute_logits(h, head), 30.0 * torch.tanh(raw * 0.5 / 30.0))
    assert capped.compute_logits(h, head).abs().max() < 30.0


def test_embedding_scale_applied_exactly_once():
    """Gemma scales its embedding module by sqrt(H); ref-v2 instead scales the raw row by input_embedding_scale."""
    gemma = tiny_target("gemma3", layers=3, hidden=64)
    ids = torch.tensor([[7, MASK_ID, MASK_ID]])
    raw = gemma.get_input_embeddings().weight[ids]
    expected = raw * math.sqrt(64)
    from_module = embed_block(tiny_drafter(gemma, layer_ids=[0, 1]), gemma, ids)
    from_config = embed_block(tiny_drafter(gemma, layer_ids=[0, 1], input_embedding_scale=math.sqrt(64)), gemma, ids)
    torch.testing.assert_close(from_module, expected, rtol=1e-3, atol=1e-3)  # gemma casts its scale to the dtype
    torch.testing.assert_close(from_config, expected, rtol=1e-3, atol=1e-3)
    qwen = tiny_target("qwen3", layers=3, hidden=64)
    scaled = embed_block(tiny_drafter(qwen, layer_ids=[0, 1], input_embedding_scale=2.0), qwen, ids)
    torch.testing.assert_close(scaled, 2.0 * qwen.get_input_embeddings().weight[ids])


class NormedEmbedding(torch.nn.Embedding):
    """An embedding module with a norm inside, as MuseGlimmer / MuseSpark targets have."""

    def __init__(self, weight):
        super().__init__(*weight.shape)
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.embed_norm = torch.nn.LayerNorm(weight.shape[1], elementwise_affine=False)

    def forward(self, input_ids):
        return self.embed_norm(super().forward(input_ids))


def test_embedding_norm_inside_the_module_is_bypassed():
    target = tiny_target("qwen3", layers=3, hidden=64)
    raw = target.get_input_embeddings().weight
    target.set_input_embeddings(NormedEmbedding(raw))
    norm = target.get_input_embeddings().embed_norm
    ids = torch.tensor([[7, MASK_ID]])
    out = embed_block(tiny_drafter(target, layer_ids=[0, 1]), target, ids)
    torch.testing.assert_close(out, raw[ids])  # the plain rows, as transformers' native generator uses
    assert target.get_input_embeddings().embed_norm is norm  # put back
    assert not torch.allclose(target.get_input_embeddings()(ids), raw[ids])


def test_draft_cache_window_keeps_newest_rows():
    cache = DFlashDraftCache(window=4)
    k = torch.arange(10.0).view(1, 1, 10, 1)
    cache.update(k, k.clone(), 0)
    cache.crop(7)  # keep 7 absolute rows, of which the newest 4
    assert cache.keys[0].flatten().tolist() == [3.0, 4.0, 5.0, 6.0]
    assert cache.get_seq_length() == 7  # absolute length, as positions continue from there


class RecordingOracle(OracleDrafter):
    """Instrumented oracle drafter: records what generate hands it on every call (a subclass, not a mock). The
    oracle makes several drafts per step acceptable, so context chunks longer than one row occur."""

    def forward(self, noise_embeds=None, context_hidden_states=None, position_ids=None, *args, **kwargs):
        cache = kwargs.get("past_key_values") or kwargs.get("cache")
        self.calls.append(dict(cache_len=cache.get_seq_length(), positions=position_ids[0].tolist(),
                               features=context_hidden_states.clone(), anchor=noise_embeds[0, 0].clone()))
        return super().forward(noise_embeds, context_hidden_states, position_ids, *args, **kwargs)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_generate_feeds_committed_rows_at_true_positions(family, monkeypatch):
    """Inside generate: the draft cache holds exactly the context rows (length == start - n_ctx before a call, i.e.
    == start after the previous crop), positions are [context ; block] at their absolute values, the features are
    the target's decoder-layer outputs `hs[i + 1]` of the committed tokens, and block row 0 is the last one."""
    monkeypatch.setattr(integration_dflash, "_warned", set())
    target = tiny_target(family, layers=6)
    ids = [1, 3]
    block = 6
    prompt = random_prompt(9, seed=4)
    with RecordingOracle.for_target(target, layer_ids=ids, block_size=block, corrupt_every=4) as drafter:
        drafter.calls = []
        # Per-token logits force the stock assisted loop, whose candidate generator this test is about.
        with pytest.warns(UserWarning, match="output_logits"):
            out = greedy(target, prompt, 25, assistant_model=drafter, return_dict_in_generate=True,
                         output_logits=True).sequences
    assert torch.equal(out, greedy(target, prompt, 25))
    calls = drafter.calls
    assert len(calls) == len(drafter.last_stats.acceptance_lengths)
    assert max(c["features"].shape[1] for c in calls[1:]) > 1  # multi-token acceptance happened
    with torch.no_grad():
        # hs[i + 1] of a plain full forward: HF's own hidden-state tuple, independent of our hooks.
        hs = target(out, output_hidden_states=True).hidden_states
        full = torch.cat([hs[i + 1][0] for i in ids], dim=-1)  # [seq, 2H]
    embeddings = embed_block(drafter, target, out)[0]
    start_prev = 0
    for call in calls:
        n_ctx = call["features"].shape[1]
        start = call["positions"][n_ctx]
        assert call["cache_len"] == start_prev == start - n_ctx
        assert call["positions"] == list(range(start - n_ctx, start + block))
        torch.testing.assert_close(call["features"][0], full[start - n_ctx : start], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(call["anchor"], embeddings[start])
        start_prev = start


@pytest.mark.parametrize("corrupt_every", [0, 3])
def test_zlab_reference_loop_with_transformers_cache(corrupt_every):
    """z-lab's own loop (docs/DFLASH.md, "z-lab's reference loop") written out: the reference call convention (`target_hidden=`,
    `noise_embedding=`, `is_causal=False`, a tensor back) with transformers' DynamicCache as the draft cache, sliced
    positions `[cache_len : start + B]`, crop to `start` after each call. Greedy output equals the target's."""
    from transformers import DynamicCache

    target = tiny_target("qwen3", layers=6)
    ids, block, new = [1, 3], 6, 24
    prompt = random_prompt(7, seed=8)
    expected = greedy(target, prompt, new, eos_token_id=None)[0].tolist()
    head, embed = target.get_output_embeddings(), target.get_input_embeddings()

    def verify(tokens):
        positions = torch.arange(len(tokens))[None]  # explicit, so the oracle's pre-hook sees them
        out = target(torch.tensor([tokens]), position_ids=positions, output_hidden_states=True)
        return out.logits[0], torch.cat([out.hidden_states[i + 1][0] for i in ids], dim=-1)

    with OracleDrafter.for_target(target, layer_ids=ids, block_size=block, corrupt_every=corrupt_every) as drafter, \
            torch.no_grad():
        n = prompt.shape[1]
        logits, features = verify(prompt[0].tolist())
        committed = prompt[0].tolist() + [int(logits[-1].argmax())]
        start, context, cache, taus = n, features, DynamicCache(), []
        while len(committed) < n + new:
            block_ids = torch.tensor([[committed[start]] + [drafter.config.mask_token_id] * (block - 1)])
            positions = torch.arange(cache.get_seq_length(), start + block)[None]
            hidden = drafter(target_hidden=context[None], noise_embedding=embed(block_ids), position_ids=positions,
                             past_key_values=cache, use_cache=True, is_causal=False)
            assert torch.is_tensor(hidden) and hidden.shape == (1, block, 64)
            cache.crop(start - cache.get_seq_length())  # negative: works on 4.57 and 5.x alike
            assert cache.get_seq_length() == start
            drafts = head(hidden[:, 1 - block :]).argmax(-1)[0].tolist()
            candidate = [committed[start]] + drafts
            logits, features = verify(committed[:start] + candidate)
            choice = logits[start : start + block].argmax(-1).tolist()
            acc = 0
            while acc < block - 1 and candidate[acc + 1] == choice[acc]:
                acc += 1
            committed = committed[:start] + candidate[: acc + 1] + [choice[acc]]
            context = features[start : start + acc + 1]
            start += acc + 1
            taus.append(acc + 1)
    assert committed[: n + new] == expected
    assert max(taus) == (block if corrupt_every == 0 else corrupt_every)
