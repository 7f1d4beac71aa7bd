"""Quick GPU probe: DFlashDecoder compiled vs compiled + freeze_weights on a random-weight SmolLM2-shaped target
(per-step cost does not depend on the weights' values). Prints ms per step and greedy agreement."""
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dflash_hf import DFlashDecoder
from dflash_hf.bench import build_random_drafter

torch.manual_seed(0)
config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
target = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
drafter = build_random_drafter(target, 5, block_size=16).to("cuda", torch.bfloat16)
prompt = torch.randint(3, 49152, (1, 200), device="cuda")
for batch in [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]:
    ids = prompt.expand(batch, -1).contiguous()
    for name, d, freeze in (("ar", None, False), ("ar", None, True), ("dflash", drafter, False), ("dflash", drafter, True)):
        torch._dynamo.reset()
        dec = DFlashDecoder(target, d, max_length=200 + 256 + 16, freeze_weights=freeze)
        t0 = time.perf_counter()
        dec.generate(ids, max_new_tokens=256, stop_token_ids=[])
        warm = time.perf_counter() - t0
        best = None
        for _ in range(3):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            out = dec.generate(ids, max_new_tokens=256, stop_token_ids=[])
            torch.cuda.synchronize(); dt = time.perf_counter() - t0
            best = dt if best is None or dt < best else best
        ms_step = 1e3 * (best - out.time_prefill) / max(out.steps, 1)
        print(f"batch {batch} {name:6s} freeze={freeze!s:5s} warm-up {warm:5.1f} s  {ms_step:.3f} ms/step  "
              f"verify {1e3 * out.time_verify / max(out.steps, 1):.3f}  draft {1e3 * out.time_draft / max(out.steps, 1):.3f}  "
              f"steps {out.steps}  failures {dec.compile_failures}  mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
              flush=True)
        if name == "ar":
            ref = out.new_tokens if not freeze else ref
            if freeze:
                agree = sum(a == b for a, b in zip(out.new_tokens[0], ref[0]))
                print(f"  frozen vs unfrozen greedy tokens, row 0: {agree}/{len(ref[0])} equal", flush=True)
