"""The training recipe on tiny real models: packed-mask exactness, data format, loss, tau, checkpoints."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import MASK_ID, VOCAB, greedy, random_prompt, tiny_chat_tokenizer, tiny_drafter, tiny_target
from safetensors import safe_open

from dflash_hf import DFlashConfig, DFlashDraftModel
from dflash_hf.modeling.generation_dflash import embed_block
from dflash_hf.training import (
    PackedDrafter,
    as_examples,
    count_parameters,
    default_gamma,
    evaluate_tau,
    generate_responses,
    layer_attention_masks,
    load_jsonl,
    make_data,
    new_drafter_config,
    pack_blocks,
    packed_loss,
    packed_visibility,
    pick_mask_token_id,
    sample_anchors,
    target_features,
    train_drafter,
)
from dflash_hf.training.data import ENGINES
from dflash_hf.training.head_loss import MAX_CHUNK_ROWS, default_chunk_rows
from dflash_hf.training.packed import default_blocks_per_group
from dflash_hf.training.recipe import WarmupCosine, budgeted_total_steps

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models are overhead-bound: a second intra-op thread only adds synchronisation, and on a busy 2-core
    # runner it makes these tests several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features_for_prefix(target, ids, a, layer_ids):
    return target_features(target, ids[None, :a], torch.ones(1, a, dtype=torch.long), layer_ids)


@pytest.mark.parametrize("blocks_per_group", [None, 1, 2], ids=["one-group", "groups-of-1", "groups-of-2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "layer_types,window",
    [(None, None), (["sliding_attention", "full_attention", "sliding_attention"], 6)],
    ids=["full", "sliding+full"],
)
def test_packed_forward_equals_separate_block_forwards(layer_types, window, attn, blocks_per_group):
    """Every block row of the packed forward equals the inference call for that block alone: the drafter over the
    features of positions < a (a fresh target forward of the prefix) with the inference-time mask, whatever the
    grouping of the blocks for attention and the attention implementation."""
    target = tiny_target("qwen3", layers=5)
    drafter = tiny_drafter(target, layers=3 if layer_types else 2, block_size=4, layer_types=layer_types,
                           sliding_window=window)
    drafter.config._attn_implementation = attn
    B = 4
    seqs = [random_prompt(22, seed=1)[0], random_prompt(13, seed=2)[0]]
    examples = as_examples([{"input_ids": s, "loss_mask": torch.arange(len(s)) >= 4} for s in seqs])
    # Anchors near the start, in the middle, past the window, and one whose block runs past the end.
    anchors = [torch.tensor([4, 9, 19, 20]), torch.tensor([5, 11])]
    batch = pack_blocks(examples, anchors, block_size=B, mask_token_id=MASK_ID, gamma=7.0)
    ids = drafter.config.target_layer_ids
    features = target_features(target, batch.input_ids, batch.attention_mask, ids)
    noise = embed_block(drafter, target, batch.block_ids)
    masks = layer_attention_masks(drafter.config, batch.anchors, batch.input_ids.shape[1], dtype=torch.float32,
                                  blocks_per_group=blocks_per_group)
    with torch.no_grad():
        packed = PackedDrafter(drafter)(noise, features, batch.position_ids, masks)
    assert drafter.config._attn_implementation == attn  # restored after the packed call
    for i, seq_anchors in enumerate(anchors):
        for j, a in enumerate(seq_anchors.tolist()):
            block = torch.full((1, B), MASK_ID)
            block[0, 0] = seqs[i][a]
            with torch.no_grad():
                alone = drafter(
                    noise_embeds=embed_block(drafter, target, block),
                    context_hidden_states=_features_for_prefix(target, seqs[i], a, ids),
                    position_ids=torch.arange(a + B)[None],
                ).last_hidden_state[0]
            torch.testing.assert_close(packed[i, j * B : (j + 1) * B], alone, atol=2e-5, rtol=1e-4)
    if layer_types and attn == "sdpa":
        # The per-layer masks matter: one full-attention mask for every layer gives different rows.
        full = packed_visibility(batch.anchors, batch.input_ids.shape[1], B, causal=False, window=None,
                                 blocks_per_group=blocks_per_group)
        with torch.no_grad():
            wrong = PackedDrafter(drafter)(noise, features, batch.position_ids, [full, full.clone(), full.clone()])
        assert (wrong - packed).abs().max() > 1e-3


def test_packed_visibility_matches_definition():
    """Brute-force check of the mask rule on a small case with a window and causal rows."""
    anchors = torch.tensor([[2, 5], [3, 0]])
    T, B, W = 7, 3, 4
    for causal in (False, True):
        for window in (None, W):
            visible = packed_visibility(anchors, T, B, causal=causal, window=window)
            assert visible.shape == (2, 1, 2 * B, T + 2 * B)
            for b in range(2):
                for qj in range(2):
                    for qk in range(B):
                        a = int(anchors[b, qj])
                        q_pos = a + qk
                        for t in range(T):
                            expect = t < a and (window is None or q_pos - t < window)
                            assert bool(visible[b, 0, qj * B + qk, t]) == expect
                        for kj in range(2):
                            for kk in range(B):
                                expect = kj == qj and (not causal or kk <= qk) and (window is None or abs(qk - kk) < window)
                                assert bool(visible[b, 0, qj * B + qk, T + kj * B + kk]) == expect


@pytest.mark.parametrize("causal,window", [(False, None), (True, 3)])
@pytest.mark.parametrize("blocks_per_group", [1, 2, 3])
def test_grouped_visibility_is_the_full_mask_cut_into_groups(blocks_per_group, causal, window):
    """Group n of sequence i holds query rows n*g*B .. of the one-group mask, over the context keys and the group's
    own block keys; every key the one-group mask shows a row lies inside the row's group."""
    anchors = torch.tensor([[2, 5, 6, 9, 11, 12], [3, 0, 4, 7, 8, 1]])
    T, B, g = 14, 3, blocks_per_group
    full = packed_visibility(anchors, T, B, causal=causal, window=window)
    grouped = packed_visibility(anchors, T, B, causal=causal, window=window, blocks_per_group=g)
    G, rows = 6 // g, g * B
    assert grouped.shape == (2 * G, 1, rows, T + rows)
    for i in range(2):
        for n in range(G):
            q = slice(n * rows, (n + 1) * rows)
            assert torch.equal(grouped[i * G + n, 0, :, :T], full[i, 0, q, :T])
            assert torch.equal(grouped[i * G + n, 0, :, T:], full[i, 0, q, T + n * rows : T + (n + 1) * rows])
    assert int(grouped.sum()) == int(full.sum())
    with pytest.raises(ValueError, match="blocks_per_group=4 must divide the 6 blocks"):
        packed_visibility(anchors, T, B, causal=causal, window=window, blocks_per_group=4)


def test_default_chunk_rows_bounds_the_logits_and_the_padding():
    assert default_chunk_rows(49152) == 5461  # SmolLM2: ~1 GiB of fp32 logits a chunk
    assert default_chunk_rows(151936) == 1766  # Qwen3
    assert default_chunk_rows(96) == MAX_CHUNK_ROWS  # a tiny vocabulary: the row cap


def test_default_blocks_per_group_fills_128_rows():
    assert default_blocks_per_group(96, 16) == 8
    assert default_blocks_per_group(90, 16) == 6  # the largest divisor of 90 that fits 128 rows
    assert default_blocks_per_group(37, 16) == 1
    assert default_blocks_per_group(3, 4) == 3


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain-head", "softcapped-head"])
def test_chunked_head_loss_equals_one_cross_entropy(softcap):
    """The loss and the drafter's gradients of the chunked head loss equal one cross-entropy over all logits."""
    target = tiny_target("qwen3", layers=5).requires_grad_(False)  # frozen, as in train_drafter
    extra = {"final_logit_softcapping": softcap} if softcap else {}
    drafter = tiny_drafter(target, layers=2, block_size=4, **extra).train()
    B = 4
    seqs = [random_prompt(22, seed=1)[0], random_prompt(15, seed=2)[0]]
    examples = as_examples([{"input_ids": s, "loss_mask": torch.arange(len(s)) >= 4} for s in seqs])
    batch = pack_blocks(examples, [torch.tensor([4, 9, 13, 17]), torch.tensor([5, 11])], block_size=B,
                        mask_token_id=MASK_ID, gamma=2.0)
    features = target_features(target, batch.input_ids, batch.attention_mask, drafter.config.target_layer_ids)
    noise = embed_block(drafter, target, batch.block_ids)
    masks = layer_attention_masks(drafter.config, batch.anchors, batch.input_ids.shape[1], dtype=torch.float32)
    lm_head = target.get_output_embeddings()

    def loss_and_grads(chunk_rows):
        drafter.zero_grad()
        hidden = PackedDrafter(drafter)(noise, features, batch.position_ids, masks)
        if chunk_rows is None:  # the reference: every logit at once, plain cross-entropy
            rows = hidden.view(2, 4, B, -1)[:, :, 1:][batch.labels != -100]
            ce = torch.nn.functional.cross_entropy(drafter.compute_logits(rows, lm_head).float(),
                                                   batch.labels[batch.labels != -100], reduction="none")
            w = batch.weights[batch.labels != -100]
            loss, rows_trained = (ce * w).sum() / w.sum(), len(rows)
        else:
            loss, stats = packed_loss(drafter, hidden, batch, lm_head, chunk_rows=chunk_rows)
            rows_trained = stats["rows"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in drafter.parameters()], rows_trained

    ref_loss, ref_grads, n = loss_and_grads(None)
    assert n > 5  # several chunks below
    for chunk_rows in (1, 5, 10_000):
        loss, grads, _ = loss_and_grads(chunk_rows)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)
    target.lm_head.requires_grad_(True)
    with pytest.raises(ValueError, match="LM head must be frozen"):
        loss_and_grads(5)


def test_pack_blocks_layout_labels_and_weights():
    ids = torch.arange(10, 22)  # 12 tokens
    loss_mask = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    examples = as_examples([{"input_ids": ids, "loss_mask": loss_mask}, {"input_ids": ids[:7], "loss_mask": loss_mask[:7]}])
    B, gamma = 4, 7.0
    batch = pack_blocks(examples, [torch.tensor([4, 9]), torch.tensor([5])], block_size=B, mask_token_id=3,
                        gamma=gamma, pad_token_id=0)
    assert batch.block_ids.tolist() == [[14, 3, 3, 3, 19, 3, 3, 3], [15, 3, 3, 3, 10, 3, 3, 3]]
    assert batch.block_valid.tolist() == [[True, True], [True, False]]
    T = batch.input_ids.shape[1]
    assert T == 16  # padded to a multiple of 16
    assert batch.position_ids[0].tolist() == list(range(T)) + [4, 5, 6, 7, 9, 10, 11, 12]
    assert batch.position_ids[1, T:].tolist() == [5, 6, 7, 8, 0, 1, 2, 3]
    # Row k of the block at a is trained on token a + k while it exists and is a response token.
    assert batch.labels[0].tolist() == [[15, 16, 17], [20, 21, -100]]
    assert batch.labels[1].tolist() == [[16, -100, -100], [-100, -100, -100]]
    decay = [math.exp(-(k - 1) / gamma) for k in (1, 2, 3)]
    torch.testing.assert_close(batch.weights[0, 0], torch.tensor(decay))
    assert batch.weights[0, 1, 2] == 0 and batch.weights[1, 1].sum() == 0
    assert batch.attention_mask[1].tolist() == [1] * 7 + [0] * 9
    assert default_gamma(16) == 7.0 and default_gamma(8) == 4.0


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma3"])
def test_right_padded_target_features_need_no_mask(arch):
    """The training loop runs the target without the padding mask: pack_blocks pads on the right, so under causal
    attention (sliding or not) no real position sees a pad and the features of real positions are unchanged."""
    target = tiny_target(arch, layers=4)
    g = torch.Generator().manual_seed(3)
    examples = as_examples([{"input_ids": torch.randint(6, 90, (n,), generator=g), "loss_mask": [0] * 3 + [1] * (n - 3)}
                            for n in (40, 23, 9)])
    batch = pack_blocks(examples, [torch.tensor([5]), torch.tensor([4]), torch.tensor([3])], block_size=4,
                        mask_token_id=3, gamma=7.0, pad_token_id=0)
    with_mask = target_features(target, batch.input_ids, batch.attention_mask, [1, 3])
    without = target_features(target, batch.input_ids, None, [1, 3])
    real = batch.attention_mask.bool()
    assert not real.all()  # the batch is padded
    torch.testing.assert_close(without[real], with_mask[real])


def test_time_budget_plan_and_schedule():
    # 20 steps took 2 s, the rest go at 0.1 s a step: 97% of a 10 s budget leaves 7.7 s -> 77 more steps.
    assert budgeted_total_steps(1000, 20, 2.0, 10.0, per_step=0.1) == 97
    # Slow first steps do not count against the later ones: 4 s for 20 steps, then 0.1 s each -> 57 more.
    assert budgeted_total_steps(1000, 20, 4.0, 10.0, per_step=0.1) == 77
    assert budgeted_total_steps(50, 20, 2.0, 100.0, per_step=0.1) == 50  # never more than planned
    assert budgeted_total_steps(1000, 20, 20.0, 10.0, per_step=0.1) == 20  # already over: stop now
    schedule = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.0)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(0.5) and schedule(100) == pytest.approx(0.0)
    schedule.total_steps = 50  # re-planned: the decay completes at the new end
    assert schedule(50) == pytest.approx(0.0) and schedule(30) == pytest.approx(0.5)


def test_time_budget_stops_training_and_still_saves(tmp_path):
    target = tiny_target("qwen3", layers=3)
    drafter = tiny_drafter(target, layers=1, block_size=4, layer_ids=[1, 2])
    data = [torch.randint(6, 90, (30,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with pytest.raises(ValueError, match="time_budget=0"):
        train_drafter(target, drafter, data, max_steps=5, time_budget=0, progress=False)
    result = train_drafter(target, drafter, data, max_steps=50, batch_size=2, num_anchors=4, time_budget=1e-9,
                           output_dir=tmp_path / "run", progress=False, plot=False)
    assert result.steps == 1 and result.extra["stopped_by_time_budget"] and result.extra["total_steps"] == 1
    assert (tmp_path / "run" / "drafter" / "model.safetensors").is_file()
    roomy = train_drafter(target, drafter, data, max_steps=35, batch_size=2, num_anchors=4, time_budget=1e6,
                          progress=False)
    assert roomy.steps == 35 and "stopped_by_time_budget" not in roomy.extra
    assert roomy.extra["calibration_seconds_per_step"] > 0


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_step_follows_the_eager_one():
    """compile=True (torch.compile of the packed forward and the head loss, context padded to a multiple of 64) takes
    the same steps as the eager recipe: the same losses and weights, up to the compiler's reordering of sums."""
    target = tiny_target("qwen3", layers=3).requires_grad_(False)
    data = [torch.randint(6, 90, (int(n),), generator=torch.Generator().manual_seed(i))
            for i, n in enumerate(torch.randint(20, 40, (8,), generator=torch.Generator().manual_seed(0)))]
    runs = {}
    for compile in (False, True):
        drafter = tiny_drafter(target, layers=2, block_size=4, layer_ids=[1, 2]).train()
        result = train_drafter(target, drafter, data, max_steps=4, batch_size=4, num_anchors=6, lr=3e-3, log_every=1,
                               compile=compile, progress=False, plot=False)
        runs[compile] = (result, drafter)
    (eager, eager_drafter), (compiled, compiled_drafter) = runs[False], runs[True]
    assert compiled.extra["compile"] and not eager.extra["compile"]
    losses = [[h["loss"] for h in r.history] for r in (eager, compiled)]
    assert len(losses[0]) == 4 and losses[0][0] != losses[0][-1]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(eager_drafter.parameters(), compiled_drafter.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
def test_attention_that_cannot_take_the_packed_mask_is_refused_before_training(attn):
    target = tiny_target("qwen3", layers=3)
    drafter = tiny_drafter(target, layers=1, block_size=4, layer_ids=[1, 2])
    drafter.config._attn_implementation = attn
    data = [torch.randint(6, 90, (30,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with pytest.raises(ValueError, match=f"attn_implementation='{attn}', which cannot apply the packed block mask"):
        train_drafter(target, drafter, data, max_steps=1, batch_size=2, num_anchors=4, progress=False, plot=False)
    assert drafter.config._attn_implementation == attn


def test_sample_anchors_only_on_response_positions():
    loss_mask = torch.tensor([0] * 5 + [1] * 20 + [0, 0])
    g = torch.Generator().manual_seed(0)
    picks = [sample_anchors(loss_mask, 6, g) for _ in range(3)]
    for a in picks:
        assert a.numel() == 6 and len(set(a.tolist())) == 6 and a.tolist() == sorted(a.tolist())
        assert all(5 <= x <= 23 for x in a.tolist())  # a and a + 1 are both response tokens
    assert picks[0].tolist() != picks[1].tolist()  # re-drawn on every call (every epoch)
    assert sample_anchors(loss_mask, 100, g).tolist() == list(range(5, 24))


def test_dataset_validation_errors():
    with pytest.raises(ValueError, match="loss_mask has 3 entries but input_ids has 4"):
        as_examples([{"input_ids": [1, 2, 3, 4], "loss_mask": [0, 1, 1]}])
    with pytest.raises(ValueError, match="no usable sequence"):
        as_examples([{"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 0, 1]}, [7]])
    with pytest.raises(FileNotFoundError, match="make-data"):
        as_examples("/nonexistent/data.jsonl")


def test_new_drafter_config_follows_target_and_picks_a_safe_mask_id():
    tokenizer = tiny_chat_tokenizer()
    target = tiny_target("llama", layers=8, vocab=len(tokenizer), eos=2)
    config = new_drafter_config(target, num_layers=2, block_size=8, tokenizer=tokenizer)
    assert config.target_layer_ids == [1, 2, 3, 4, 5]  # spread rule, 5 ids over 8 layers
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (64, 4, 2, 16)
    assert config.vocab_size == len(tokenizer) and config.block_size == 8
    # Every row is a real token: the pick is the unused special token, never pad/eos/bos/unk or a template token.
    assert config.mask_token_id == tokenizer.convert_tokens_to_ids("<|spare|>") == 4
    # A padded embedding table has spare rows: the first one past the tokenizer is used (as Qwen3's 151669).
    padded = tiny_target("llama", layers=8, vocab=len(tokenizer) + 6)
    assert pick_mask_token_id(tokenizer, padded) == len(tokenizer)
    with pytest.raises(ValueError, match="target_layer_ids"):
        new_drafter_config(target, target_layer_ids=[1, 8], mask_token_id=4)
    with pytest.raises(ValueError, match="mask_token_id or a tokenizer"):
        new_drafter_config(target)
    drafter = DFlashDraftModel(config)
    assert count_parameters(config) == sum(p.numel() for p in drafter.parameters())


def test_new_drafter_config_saves_rope_theta_at_the_top_level(tmp_path):
    """RoPE must survive a save on any transformers version and a load on any other: 4.57 and z-lab's schema read
    only the top-level rope_theta (5.x alone would write null there)."""
    target = tiny_target("llama", layers=6)
    target.config.rope_theta = 12345.0
    if isinstance(getattr(target.config, "rope_parameters", None), dict):
        target.config.rope_parameters["rope_theta"] = 12345.0
    config = new_drafter_config(target, num_layers=1, mask_token_id=MASK_ID)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_theta"] == 12345.0
    drafter = DFlashDraftModel(DFlashConfig.from_pretrained(tmp_path))
    expected = 1.0 / 12345.0 ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(drafter.rotary_emb.inv_freq.float(), expected)


def test_smollm2_drafter_size_budget():
    """Parameter count of the SmolLM2 drafter shapes (hidden 576, 9/3 heads of 64, MLP 1536), checked against the
    per-tensor shapes of the released layout, and the <= 40 MB bf16 budget for up to 5 layers."""
    H, inter, q, kv, hd = 576, 1536, 9 * 64, 3 * 64, 64
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * inter + 2 * H + 2 * hd
    for layers in (3, 4, 5):
        config = DFlashConfig(hidden_size=H, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=9,
                              num_key_value_heads=3, head_dim=hd, vocab_size=49152, block_size=16,
                              dflash_config={"mask_token_id": 16, "target_layer_ids": [1, 8, 14, 20, 27]})
        expected = 5 * H * H + 2 * H + layers * per_layer
        assert count_parameters(config) == expected
        assert expected * 2 <= 40_000_000, (layers, expected)


def arithmetic_sequences(n: int, length: int, seed: int) -> torch.Tensor:
    """`[n, length]` token sequences `s, s+d, s+2d, ...` (mod the non-special range 6..95), d in {1, 2, 3}."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB - 6, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % (VOCAB - 6) + 6


@pytest.fixture(scope="module")
def tiny_run():
    """A tiny target that has learnt a rule (continue an arithmetic sequence), its own greedy answers to 40 prompts,
    4 held-out prompts and an untrained drafter. A random target's continuations follow no pattern a drafter could
    learn from 40 examples; a trained one has structure, as real LMs do, that carries over to unseen prompts."""
    target = tiny_target("qwen3", layers=4)
    target.train()
    optimizer = torch.optim.AdamW(target.parameters(), lr=3e-3)
    for step in range(40):
        batch = arithmetic_sequences(16, 40, seed=step)
        loss = target(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    target.eval().requires_grad_(False)
    assert loss.item() < 0.5  # the target follows the rule
    prompts = arithmetic_sequences(44, 8, seed=10_000).tolist()
    responses = generate_responses(target, prompts[:40], max_new_tokens=40, batch_size=20, pad_token_id=0,
                                   stop_token_ids=[2], progress=False)
    data = [{"input_ids": p + r, "loss_mask": [0] * len(p) + [1] * len(r)} for p, r in zip(prompts, responses)]
    # Prompts of different lengths, so the batched evaluation pads.
    held_out = [{"category": "math" if i % 2 else "code", "input_ids": p[: 8 - i]} for i, p in enumerate(prompts[40:])]
    drafter = tiny_drafter(target, layers=2, block_size=8, layer_ids=[1, 2])
    untrained = evaluate_tau(target, drafter, held_out, max_new_tokens=40, stop_token_ids=[2], backend="hf")
    return target, data, held_out, drafter, untrained


def test_training_lowers_loss_and_raises_tau(tiny_run, tmp_path):
    target, data, held_out, drafter, untrained = tiny_run
    result = train_drafter(target, drafter, data, max_steps=150, batch_size=4, num_anchors=16, lr=5e-3,
                           eval_set=held_out, eval_every=75, eval_max_new_tokens=40, eval_backend="hf",
                           stop_token_ids=[2], output_dir=tmp_path / "run", progress=False, log_every=25, seed=0)
    losses = [h["loss"] for h in result.history]
    assert result.steps == 150 and len(losses) == 6
    assert losses[-1] < 0.3 * losses[0], losses
    assert [e["step"] for e in result.evals] == [0, 75, 150]
    assert result.evals[0]["tau"] == pytest.approx(untrained["tau"])
    assert untrained["tau"] < 1.2  # an untrained drafter almost never guesses right
    final = result.final_eval
    assert set(final["per_category"]) == {"code", "math"}
    # Observed: about 3.7 after training, from 1.0; the margin leaves room for platform numerics.
    assert final["tau"] > untrained["tau"] + 1.0, (untrained["tau"], [e["tau"] for e in result.evals], losses)
    # The saved (bf16) drafter, reloaded, keeps most of it, measured by the stock HF loop and by the batched loop.
    saved = DFlashDraftModel.from_pretrained(tmp_path / "run" / "drafter", dtype=torch.float32)
    reloaded = evaluate_tau(target, saved, held_out, max_new_tokens=40, stop_token_ids=[2], backend="hf")
    assert reloaded["tau"] > untrained["tau"] + 1.0
    batched = evaluate_tau(target, saved, held_out, max_new_tokens=40, stop_token_ids=[2], backend="dflash")
    assert batched["backend"] == "dflash" and batched["tau"] > untrained["tau"] + 1.0

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final_tau"] == pytest.approx(final["tau"])
    assert metrics["untrained_tau"] == pytest.approx(untrained["tau"])
    assert metrics["final_tau_per_category"].keys() == {"code", "math"}
    assert len(metrics["history"]) == 6
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "run" / "curves.png").exists()
    else:
        assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_checkpoint_keeps_the_released_layout(tmp_path):
    target = tiny_target("llama", layers=6)
    drafter = tiny_drafter(target, layers=2, block_size=4)
    sequences = [random_prompt(30, seed=s)[0] for s in range(4)]  # in-memory token ids: loss after the first token
    train_drafter(target, drafter, sequences, max_steps=2, batch_size=2, num_anchors=4, output_dir=tmp_path,
                  progress=False, plot=False)
    folder = tmp_path / "drafter"
    with safe_open(folder / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        dtypes = {handle.get_tensor(k).dtype for k in keys}
    per_layer = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight"}
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {f"layers.{i}.{k}" for i in range(2) for k in per_layer}
    assert keys == expected  # no embedding, no head, no mask row, no prefix
    assert dtypes == {torch.bfloat16}
    config = json.loads((folder / "config.json").read_text())
    assert config["dflash_config"]["mask_token_id"] == MASK_ID
    assert config["dflash_config"]["target_layer_ids"] == drafter.config.target_layer_ids
    assert config["block_size"] == 4
    loaded = DFlashDraftModel.from_pretrained(folder, dtype=torch.bfloat16)
    reference = drafter.to(torch.bfloat16)
    for name, tensor in reference.state_dict().items():
        if name in expected:
            assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("engine", ENGINES)
def test_make_data_writes_the_targets_own_answers(engine, tmp_path):
    """Every generation engine; the static ones fill the last batch (1 prompt of 3 rows) with copies, hf-static pads
    every batch to the longest prompt of the set, the loop only to the batch's own (a narrower second batch), and
    each must still give each prompt its own answer."""
    tokenizer = tiny_chat_tokenizer()
    target = tiny_target("qwen3", layers=3, vocab=len(tokenizer), eos=2)
    prompts = [{"category": "math", "prompt": "What is 2+2?"}, {"category": "chat", "prompt": "Hello"},
               {"category": "code", "prompt": "def f(x): return x"}, "a plain string prompt"]
    summary = make_data(target, tokenizer, prompts, max_new_tokens=10, batch_size=3, out_path=tmp_path / "d.jsonl",
                        progress=False, engine=engine)
    records = load_jsonl(tmp_path / "d.jsonl")
    assert summary["records"] == len(records) == 4
    assert [r["category"] for r in records] == ["math", "chat", "code", "unknown"]
    for prompt, record in zip(prompts, records):
        text = prompt if isinstance(prompt, str) else prompt["prompt"]
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        prompt_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert record["prompt"] == text
        assert record["input_ids"][:n] == prompt_ids
        assert record["loss_mask"] == [0] * n + [1] * (len(record["input_ids"]) - n)
        response = record["input_ids"][n:]
        assert 1 <= len(response) <= 10
        assert 2 not in response[:-1]  # cut right after the first stop token
        # Batched, left-padded generation gives each prompt the target's own greedy answer.
        alone = greedy(target, torch.tensor([prompt_ids]), 10, eos_token_id=2, pad_token_id=0)[0, n:].tolist()
        cut = alone.index(2) + 1 if 2 in alone else len(alone)
        assert response == alone[:cut]
        assert record["response"] == tokenizer.decode(response, skip_special_tokens=True)
    assert summary["response_tokens"] == sum(sum(r["loss_mask"]) for r in records)
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.chat_template = None
        make_data(target, tokenizer, ["x"], 4, 1, tmp_path / "e.jsonl", progress=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_target_with_autocast_as_on_gpu(attn, tmp_path):
    """The GPU configuration on CPU: bf16 target, fp32 drafter weights, bf16 autocast, evaluation with a bf16 copy
    of the drafter (the training copy stays fp32)."""
    target = tiny_target("qwen3", layers=4, dtype=torch.bfloat16)
    drafter = tiny_drafter(target, layers=1, block_size=4, layer_ids=[1, 2], attn_implementation=attn)
    assert drafter.config._attn_implementation == attn  # eager takes the additive bf16 mask, sdpa the boolean one
    sequences = [random_prompt(24, seed=s)[0] for s in range(4)]
    held_out = [{"category": "chat", "input_ids": random_prompt(6, seed=99)[0].tolist()}]
    result = train_drafter(target, drafter, sequences, max_steps=3, batch_size=2, num_anchors=4, autocast=True,
                           eval_set=held_out, eval_max_new_tokens=8, eval_backend="dflash", output_dir=tmp_path,
                           progress=False, plot=False, log_every=1)
    assert all(math.isfinite(h["loss"]) for h in result.history) and len(result.history) == 3
    assert next(drafter.parameters()).dtype == torch.float32
    assert all(1.0 <= e["tau"] <= 4.0 for e in result.evals)
    hf = evaluate_tau(target, drafter, held_out, max_new_tokens=8, backend="hf")
    assert hf["steps"] > 0
