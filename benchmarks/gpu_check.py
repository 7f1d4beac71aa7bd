"""GPU correctness + per-step timing check of the batched loop on SmolLM2-135M-Instruct (untrained drafter).

Run on the GPU machine from the repo root:  python benchmarks/gpu_check.py --gguf /tmp/smollm2.gguf --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dflash_hf
from dflash_hf import DFlashConfig, DFlashDecoder, DFlashDraftModel

from short_prompts import PROMPTS


def load_smollm2(gguf: str, dtype, device):
    import os

    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = q.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(q.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(q.state_dict())
    return model.to(device=device, dtype=dtype).eval(), tok


def random_drafter(target, layers=4, block=16, dtype=torch.float32):
    text = target.config
    torch.manual_seed(0)
    config = DFlashConfig(
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        head_dim=text.hidden_size // text.num_attention_heads, vocab_size=text.vocab_size, rope_theta=100000.0,
        max_position_embeddings=text.max_position_embeddings, block_size=block, rms_norm_eps=1e-5,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
        dflash_config={"mask_token_id": 0, "target_layer_ids": [1, 10, 18, 27]},
    )
    return DFlashDraftModel(config).to(device=target.device, dtype=dtype).eval()


def batch_inputs(tok, prompts, device):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def reference(target, ids, mask, n):
    rows = []
    for r in range(ids.shape[0]):
        real = ids[r][mask[r].bool()][None]
        out = target.generate(real, attention_mask=torch.ones_like(real), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=None)
        rows.append(out[0, real.shape[1]:].tolist())
    return rows


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--compile", type=int, default=1)
    args = ap.parse_args()
    device = torch.device("cuda")
    results = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        target, tok = load_smollm2(args.gguf, dtype, device)
        drafter = random_drafter(target, dtype=dtype)
        ids, mask = batch_inputs(tok, PROMPTS[:4], device)
        ref = reference(target, ids, mask, args.new)
        decoder = DFlashDecoder(target, drafter, max_length=ids.shape[1] + args.new + 16, compile=bool(args.compile))
        out = decoder.generate(ids, mask, max_new_tokens=args.new)
        div = [first_divergence(r, o) for r, o in zip(ref, out.new_tokens)]
        # plain generate integration, batch 1
        real = ids[0][mask[0].bool()][None]
        g = target.generate(real, attention_mask=torch.ones_like(real), assistant_model=drafter, do_sample=False,
                            max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None)
        div_generate = first_divergence(ref[0], g[0, real.shape[1]:].tolist())
        results[dtype_name] = {"batched_first_divergence": div, "generate_first_divergence": div_generate,
                               "tau": out.mean_acceptance_length}
        results[dtype_name]["compile"] = bool(args.compile)
        print(dtype_name, "batched divergence", div, "generate divergence", div_generate, flush=True)

        if dtype_name == "bf16":
            for batch in (1, 8):
                ids_b, mask_b = batch_inputs(tok, PROMPTS[:batch], device)
                dec = DFlashDecoder(target, drafter, max_length=ids_b.shape[1] + 256 + 16, compile=bool(args.compile))
                dec.generate(ids_b, mask_b, max_new_tokens=32)  # capture graphs
                best = None
                for _ in range(3):
                    o = dec.generate(ids_b, mask_b, max_new_tokens=256)
                    if best is None or o.time_total < best.time_total:
                        best = o
                step_ms = 1e3 * (best.time_total - best.time_prefill) / best.steps
                row = {"batch": batch, "tokens_per_s": best.tokens_per_second, "steps": best.steps,
                       "tau": best.mean_acceptance_length, "step_ms": step_ms,
                       "draft_ms": 1e3 * best.time_draft / best.steps, "verify_ms": 1e3 * best.time_verify / best.steps,
                       "prefill_ms": 1e3 * best.time_prefill}
                results[f"bf16_batch{batch}"] = row
                print(row, flush=True)
        del target, drafter
        torch.cuda.empty_cache()
    with open(f"{args.out}/gpu_check_compile{args.compile}.json", "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
