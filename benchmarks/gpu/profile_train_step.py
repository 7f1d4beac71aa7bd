"""Where the time of one drafter training step goes, and how fast make-data can generate, on random weights with the
real SmolLM2-135M shapes (no checkpoint needed, so it runs before any weights are on the machine).

    python benchmarks/gpu/profile_train_step.py [--configs 16x96,32x96] [--variants dense,grouped] [--gen-batches 512]

Prints one JSON line per measurement: per-phase milliseconds of a training step (pack on CPU, copy, target
features, block embedding, masks, drafter forward, loss, backward, optimizer), and HF static-cache generation
tokens/s at the given batch sizes (random weights never stop early, the worst case).

Variants of the step: `grouped` is the recipe (attention over groups of 128 query rows, the head loss a chunk of
rows at a time); `dense` is the recipe before them (every block row over all block keys under one mask, all logits
at once), kept here to measure what the two changes bring.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from dflash_hf.modeling.generation_dflash import embed_block
from dflash_hf.modeling.modeling_dflash import DFlashDraftModel
from dflash_hf.training.packed import PackedDrafter, layer_attention_masks
from dflash_hf.training.recipe import (
    new_drafter_config,
    pack_blocks,
    packed_loss,
    sample_anchors,
    target_features,
)


def smollm2_shaped(device: str) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)


def fake_examples(n: int, prompt: int, response: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        r = int(torch.randint(response // 2, response + 1, (1,), generator=g))
        ids = torch.randint(100, 49000, (prompt + r,), generator=g)
        mask = torch.zeros(prompt + r, dtype=torch.bool)
        mask[prompt:] = True
        out.append({"input_ids": ids, "loss_mask": mask, "category": "x"})
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


VARIANTS = {"grouped": {}, "dense": {"one_group": True, "chunk_rows": 1 << 40}, "compiled": {"compile": True}}


def profile_step(target, layers: int, batch: int, anchors: int, steps: int, device: str, variant: str) -> dict:
    one_group, chunk_rows = VARIANTS[variant].get("one_group", False), VARIANTS[variant].get("chunk_rows")
    compile = VARIANTS[variant].get("compile", False)
    config = new_drafter_config(target, num_layers=layers, mask_token_id=16)
    config._attn_implementation = "sdpa"
    drafter = DFlashDraftModel(config).to(device=device, dtype=torch.float32).train()
    packed = PackedDrafter(drafter)
    if compile:
        packed = torch.compile(packed, dynamic=False)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-4, betas=(0.9, 0.95))
    lm_head = target.get_output_embeddings()
    examples = fake_examples(batch * (steps + 4), 120, 220, seed=0)
    phases = {k: 0.0 for k in ("pack", "copy", "features", "embed", "masks", "forward", "loss", "backward", "optim")}
    timed = 0
    warm = 3 if compile else 2  # compiled: the first calls compile
    compile_s = 0.0
    for step in range(steps + warm):
        chosen = examples[step * batch : (step + 1) * batch]
        marks = [time.perf_counter()]

        def mark():
            sync(device)
            marks.append(time.perf_counter())

        picks = [sample_anchors(e["loss_mask"], anchors, torch.Generator().manual_seed(step * 1000 + i))
                 for i, e in enumerate(chosen)]
        cpu = pack_blocks(chosen, picks, block_size=16, mask_token_id=16, gamma=7.0, pad_token_id=2,
                          pad_to=64 if compile else 16)
        mark()
        batch_t = cpu.to(device)
        mark()
        features = target_features(target, batch_t.input_ids, None, config.target_layer_ids)  # as the recipe
        mark()
        with torch.no_grad():
            noise = embed_block(drafter, target, batch_t.block_ids)
        mark()
        masks = layer_attention_masks(config, batch_t.anchors, batch_t.input_ids.shape[1], dtype=torch.bfloat16,
                                      blocks_per_group=batch_t.anchors.shape[1] if one_group else None)
        mark()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=True):
            hidden = packed(noise, features, batch_t.position_ids, masks)
            mark()
            loss, _ = packed_loss(drafter, hidden, batch_t, lm_head, chunk_rows=chunk_rows, compile=compile)
        mark()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        mark()
        if step < warm:
            compile_s += marks[-1] - marks[0]
        if step >= warm:  # the first steps warm up kernels and the allocator (and compile)
            timed += 1
            for key, a, b in zip(phases, marks[:-1], marks[1:]):
                phases[key] += (b - a) * 1000
    ms = {k: round(v / timed, 2) for k, v in phases.items()}
    total = sum(ms.values())
    return {"what": "train_step", "variant": variant, "layers": layers, "batch": batch, "anchors": anchors,
            "drafted_rows": batch * anchors * 16, "ms": ms, "total_ms": round(total, 1),
            "steps_per_s": round(1000 / total, 2), "warmup_s": round(compile_s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}


def profile_generation(target, batch: int, width: int, new_tokens: int, device: str) -> dict:
    ids = torch.randint(100, 49000, (batch, width), device=device)
    mask = torch.ones_like(ids)
    mask[: batch // 2, : width // 3] = 0  # left padding on half the rows
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=2, eos_token_id=None,
                              cache_implementation="static")
    if hasattr(config, "max_cache_len"):
        config.max_cache_len = width + new_tokens
    out = {"what": "generate_static", "batch": batch, "width": width, "new_tokens": new_tokens}
    for label in ("first_s", "second_s"):
        sync(device)
        start = time.perf_counter()
        target.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        sync(device)
        out[label] = round(time.perf_counter() - start, 2)
    out["tok_s"] = round(batch * new_tokens / out["second_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="16x96,32x96,64x96", help="batch x anchors of the training steps")
    parser.add_argument("--variants", default="grouped", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gen-batches", default="512,1024")
    parser.add_argument("--gen-new-tokens", type=int, default=128)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = smollm2_shaped(device)
    for spec in filter(None, args.configs.split(",")):
        batch, anchors = (int(x) for x in spec.split("x"))
        for variant in filter(None, args.variants.split(",")):
            torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
            print(json.dumps(profile_step(target, args.layers, batch, anchors, args.steps, device, variant)),
                  flush=True)
    for batch in filter(None, args.gen_batches.split(",")):
        print(json.dumps(profile_generation(target, int(batch), 192, args.gen_new_tokens, device)), flush=True)


if __name__ == "__main__":
    main()
