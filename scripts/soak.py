#!/usr/bin/env python
"""Soak test: N DFlash generate calls back to back on tiny random models, every output checked against the target's
own greedy decoding, and resident memory (RSS) compared between the start and the end.

Calls alternate between the two routes: plain `target.generate(ids, assistant_model=drafter)` (batch 1) and the
batched loop `dflash_hf.generate(target, drafter, ids, attention_mask)` (left-padded batches of 1-4 rows), with random
prompt lengths and `max_new_tokens`. Exit status 0 when every output matched and RSS grew less than the allowed
margin, 1 otherwise.

    python scripts/soak.py --calls 500 --seed 0 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config  # noqa: E402

import dflash_hf  # noqa: E402
from dflash_hf import DFlashConfig, DFlashDraftModel  # noqa: E402

VOCAB = 96


def rss_mib() -> float:
    """Current resident set size in MiB (psutil when available, else /proc, else the peak from `resource`)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_models(seed: int, device: str):
    """A tiny random Qwen3 target (6 layers, untied, rescaled for varied greedy paths) and a drafter that fits it."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    target = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in target.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0 if ("embed" in name or "lm_head" in name) else 2.0)
    draft_config = DFlashConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, rms_norm_eps=1e-6,
                                max_position_embeddings=512, block_size=6, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0, dflash_config={"mask_token_id": 5, "target_layer_ids": [1, 3]})
    drafter = DFlashDraftModel(draft_config).eval()
    return target.to(device), drafter.to(device)


@torch.no_grad()
def reference(target, prompt: torch.LongTensor, max_new_tokens: int) -> list[int]:
    """The target's own greedy new tokens for one unpadded prompt `[1, n]` (EOS disabled: fixed length)."""
    out = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def one_call(index: int, rng: random.Random, target, drafter, device: str) -> str | None:
    """Run call `index`; return a description of the mismatch, or None when the output is right."""
    max_new = rng.randint(1, 16)
    if index % 2 == 0:
        length = rng.randint(1, 32)
        prompt = torch.tensor([[rng.randrange(6, VOCAB) for _ in range(length)]], device=device)
        got = target.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=drafter,
                              do_sample=False, max_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
        got = got[0, length:].tolist()
        want = reference(target, prompt, max_new)
        return None if got == want else f"call {index} (plain, prompt {length}, new {max_new}): {got} != {want}"
    batch = rng.randint(1, 3)
    lengths = [rng.randint(1, 32) for _ in range(batch)]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    rows = []
    for r, n in enumerate(lengths):
        row = [rng.randrange(6, VOCAB) for _ in range(n)]
        rows.append(torch.tensor([row], device=device))
        ids[r, width - n:] = rows[-1][0]
        mask[r, width - n:] = 1
    out = dflash_hf.generate(target, drafter, ids, mask, max_new_tokens=max_new, stop_token_ids=[])
    for r in range(batch):
        want = reference(target, rows[r], max_new)
        if out.new_tokens[r] != want:
            return (f"call {index} (batched, batch {batch}, row {r}, prompt {lengths[r]}, new {max_new}): "
                    f"{out.new_tokens[r]} != {want}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="generate calls to run (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models and of the random call shapes")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=None,
                        help="allowed RSS growth from after the warm-up to the end (default: 64 MiB + 0.05 MiB/call)")
    parser.add_argument("--warmup", type=int, default=4, help="calls run before the starting RSS is taken")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")
    torch.set_num_threads(args.threads)
    allowed = args.max_rss_growth_mib if args.max_rss_growth_mib is not None else 64 + 0.05 * args.calls

    target, drafter = build_models(args.seed, args.device)
    rng = random.Random(args.seed)
    # Warm-up: first calls allocate allocator pools, lazy imports, etc.; they are checked but not part of the RSS base.
    failures = [f for i in range(args.warmup) if (f := one_call(-1 - i, rng, target, drafter, args.device))]
    gc.collect()
    rss_start = rss_mib()
    t0 = time.perf_counter()
    for i in tqdm(range(args.calls), desc="soak", unit="call", file=sys.stderr, mininterval=1.0):
        failure = one_call(i, rng, target, drafter, args.device)
        if failure:
            failures.append(failure)
    gc.collect()
    rss_end = rss_mib()
    elapsed = time.perf_counter() - t0
    growth = rss_end - rss_start
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in target.modules())
    print(f"calls: {args.calls} in {elapsed:.1f}s ({args.calls / elapsed:.1f}/s), mismatches: {len(failures)}")
    print(f"rss_start_mib: {rss_start:.1f}  rss_end_mib: {rss_end:.1f}  growth_mib: {growth:.1f}  "
          f"allowed_mib: {allowed:.1f}")
    print(f"hooks_left: {hooks}")
    for failure in failures[:10]:
        print("MISMATCH", failure)
    ok = not failures and growth <= allowed and hooks == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
