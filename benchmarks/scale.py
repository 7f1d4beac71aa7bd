"""Per-step cost of DFlash at real model shapes, with random weights (issue 3, item 5).

SmolLM2 (135M) is launch-bound on an H200, so its numbers say little about the 8B-30B targets DFlash is published for.
This script builds random-weight targets with the **real shapes** directly on the GPU (bf16, `from_config`, no
download) and measures, per model:

- the bare verify forward of the target on a block of B=16 tokens, captured as a CUDA graph,
- the bare drafter forward (block embedding + drafter layers + target head on B-1 rows + argmax), graphed,
- a bare 1-token target forward, graphed (the AR step floor),
- our loop's steady-state step (`DFlashDecoder(cuda_graphs=True, verify_length="full")`, the whole block verified
  each step, as the projection at the published tau assumes): a fixed number of steps, stop tokens off; the random
  drafter accepts ~nothing, so tau ~ 1 and steps ~ tokens,
- optionally (`--hf-static MODEL`) HF's own static-cache compiled `generate` per token,

and the **projection** speedup = tau x t_AR_step / t_step at the published tau (docs/DFLASH.md). A projection, not a
measurement: it assumes the trained drafter reaches the published tau with these step costs.

Models (`--models`):
- `qwen3-8b`: Qwen3-8B (36 layers, hidden 4096, 32/8 heads of 128, intermediate 12288, vocab 151936, untied) with the
  Qwen3-8B-DFlash-b16 drafter shape (5 layers, target_layer_ids [1, 9, 17, 25, 33], mask 151669).
- `gemma4-26b-a4b`: transformers' `Gemma4ForCausalLM` with gemma-4-26B-A4B's text shapes (30 layers, hidden 2816,
  128 experts top-8 of width 704 + dense MLP 2112, 16 heads, 8 sliding / 2 global KV heads, head_dim 256 / 512, vocab
  262144, sliding window 1024, softcap 30) and the gemma-4-26B-A4B-it-DFlash drafter shape (5 layers, hidden 2816,
  intermediate 5632, 6 target layers [1, 6, 11, 17, 22, 27], mask 4, softcap 30; 4 causal sliding layers of window
  2048 + 1 full layer, each with its own mask in the loop).
- `qwen3.5-27b`: a hybrid target, transformers' `Qwen3_5ForCausalLM` with Qwen3.5-27B's published sizes (64 layers,
  3 gated delta-net linear-attention layers then 1 full, hidden 5120, MLP 17408, vocab 248320; heads assumed from
  transformers' defaults) and the Qwen3.5-27B-DFlash drafter shape (5 full layers, ids [1, 16, 31, 46, 61]). Needs
  transformers >= 5.25 (the loop keeps the linear-attention states per row through 5.25's cache methods); projected
  at Qwen3-8B's published tau, since none is published for Qwen3.5.
- `gemma4-dense-standin`: a dense Llama-style stand-in of equal *active* size (MLP width 2112 + 8 x 704 = 7744), used
  automatically when the installed transformers lacks Gemma4 or the Gemma4 run fails; always labelled as a stand-in.

Run on the GPU machine from the repository root:

    python benchmarks/scale.py --out scale_h200

`--tiny` shrinks every shape (and runs on CPU without graphs) to smoke-test the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dflash_hf.bench import (
    H200_PEAK_BANDWIDTH,
    StepIntervalTimer,
    bare_forward_costs,
    command_line,
    decoder_supports_compile,
    environment_info,
    forward_weight_bytes,
    make_decoder,
    param_count,
)

# Published tau (T=0, B=16), docs/DFLASH.md: Qwen3-8B transformers backend (GSM8K, MATH500, MT-Bench); gemma-4-26B-A4B
# z-lab model card at concurrency 1 (GSM8K, Math500, MT-Bench).
PUBLISHED_TAU = {
    "qwen3-8b": {"GSM8K": 6.5, "MATH500": 7.9, "chat (MT-Bench)": 3.7},
    "gemma4-26b-a4b": {"GSM8K": 7.7, "MATH500": 8.6, "chat (MT-Bench)": 4.3},
}
PUBLISHED_TAU["gemma4-dense-standin"] = PUBLISHED_TAU["gemma4-26b-a4b"]
# No tau is published for the Qwen3.5 drafters (docs/DFLASH.md): projected at Qwen3-8B's, and labelled so.
PUBLISHED_TAU["qwen3.5-27b"] = PUBLISHED_TAU["qwen3-8b"]

GEMMA_LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 5


def _shrink(tiny: bool, real: int, small: int) -> int:
    return small if tiny else real


def target_config(name: str, tiny: bool):
    """`(config, label)` of the random-weight target for `name`."""
    if name == "qwen3-8b":
        from transformers import Qwen3Config

        config = Qwen3Config(
            vocab_size=_shrink(tiny, 151936, 512), hidden_size=_shrink(tiny, 4096, 64),
            intermediate_size=_shrink(tiny, 12288, 192), num_hidden_layers=_shrink(tiny, 36, 8),
            num_attention_heads=_shrink(tiny, 32, 4), num_key_value_heads=_shrink(tiny, 8, 2),
            head_dim=_shrink(tiny, 128, 16), max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=_shrink(tiny, 151645, 2), pad_token_id=None,
        )
        return config, "Qwen3-8B shapes (random weights)"
    if name == "gemma4-26b-a4b":
        from transformers.models.gemma4 import Gemma4TextConfig  # ImportError -> dense stand-in

        layers = _shrink(tiny, 30, 12)
        config = Gemma4TextConfig(
            vocab_size=_shrink(tiny, 262144, 512), hidden_size=_shrink(tiny, 2816, 64),
            intermediate_size=_shrink(tiny, 2112, 48), moe_intermediate_size=_shrink(tiny, 704, 16),
            num_experts=_shrink(tiny, 128, 16), top_k_experts=_shrink(tiny, 8, 4), enable_moe_block=True,
            num_hidden_layers=layers, num_attention_heads=_shrink(tiny, 16, 4), num_key_value_heads=_shrink(tiny, 8, 2),
            num_global_key_value_heads=_shrink(tiny, 2, 1), head_dim=_shrink(tiny, 256, 16),
            global_head_dim=_shrink(tiny, 512, 32), sliding_window=_shrink(tiny, 1024, 32),
            final_logit_softcapping=30.0, attention_k_eq_v=True, hidden_size_per_layer_input=0,
            num_kv_shared_layers=0, use_double_wide_mlp=False, tie_word_embeddings=True,
            max_position_embeddings=_shrink(tiny, 262144, 4096), layer_types=GEMMA_LAYER_TYPES[:layers],
            bos_token_id=2, eos_token_id=1, pad_token_id=0,
        )
        return config, "gemma-4-26B-A4B text shapes, transformers Gemma4ForCausalLM (MoE, random weights)"
    if name == "gemma4-dense-standin":
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=_shrink(tiny, 262144, 512), hidden_size=_shrink(tiny, 2816, 64),
            intermediate_size=_shrink(tiny, 2112 + 8 * 704, 112), num_hidden_layers=_shrink(tiny, 30, 12),
            num_attention_heads=_shrink(tiny, 16, 4), num_key_value_heads=_shrink(tiny, 8, 2),
            head_dim=_shrink(tiny, 256, 16), max_position_embeddings=_shrink(tiny, 262144, 4096),
            tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        )
        return config, ("DENSE STAND-IN for gemma-4-26B-A4B: Llama layers of the same active size "
                        "(hidden 2816, MLP 2112 + 8x704 = 7744, 16/8 heads of 256), not Gemma4")
    if name == "qwen3.5-27b":
        from transformers import Qwen3_5TextConfig  # ImportError: the installed transformers has no Qwen3.5

        layers = _shrink(tiny, 64, 8)
        config = Qwen3_5TextConfig(
            vocab_size=_shrink(tiny, 248320, 512), hidden_size=_shrink(tiny, 5120, 64),
            intermediate_size=_shrink(tiny, 17408, 192), num_hidden_layers=layers,
            layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4),
            head_dim=_shrink(tiny, 256, 16), num_attention_heads=_shrink(tiny, 16, 4),
            num_key_value_heads=_shrink(tiny, 4, 2), linear_num_value_heads=_shrink(tiny, 32, 4),
            linear_num_key_heads=_shrink(tiny, 16, 2), linear_key_head_dim=_shrink(tiny, 128, 16),
            linear_value_head_dim=_shrink(tiny, 128, 16), max_position_embeddings=262144, tie_word_embeddings=False,
            eos_token_id=_shrink(tiny, 248044, 2), pad_token_id=_shrink(tiny, 248044, 0),
        )
        return config, ("Qwen3.5-27B shapes: 64 layers (3 gated delta-net linear-attention layers, then 1 full, "
                        "repeated), hidden 5120, MLP 17408, vocab 248320 (docs/DFLASH.md); attention and linear heads "
                        "taken from transformers' Qwen3.5 config defaults (assumed); random weights")
    raise ValueError(f"--models: unknown model {name!r}; choose from qwen3-8b, gemma4-26b-a4b, gemma4-dense-standin, "
                     "qwen3.5-27b.")


def drafter_config(name: str, target_cfg, tiny: bool):
    """`(DFlashConfig, note)` with the released drafter's shape for `name`."""
    from dflash_hf import DFlashConfig

    text = target_cfg.get_text_config() if hasattr(target_cfg, "get_text_config") else target_cfg
    if name == "qwen3.5-27b":
        ids = [1, 3, 4, 5, 6] if tiny else [1, 16, 31, 46, 61]
        config = DFlashConfig(
            hidden_size=text.hidden_size, intermediate_size=_shrink(tiny, 17408, 192),
            num_hidden_layers=_shrink(tiny, 5, 2), num_attention_heads=_shrink(tiny, 32, 4),
            num_key_value_heads=_shrink(tiny, 8, 2), head_dim=_shrink(tiny, 128, 16), vocab_size=text.vocab_size,
            rms_norm_eps=1e-6, rope_theta=1e7, max_position_embeddings=262144, block_size=16,
            num_target_layers=text.num_hidden_layers,
            dflash_config={"mask_token_id": _shrink(tiny, 248070, 5), "target_layer_ids": ids},
        )
        return config, ("Qwen3.5-27B-DFlash shape (5 layers, all full attention, mask 248070, target layers "
                        "1,16,31,46,61); drafter heads 32/8 x 128 assumed (not published); projected at Qwen3-8B's "
                        "published tau (none is published for Qwen3.5)")
    if name == "qwen3-8b":
        ids = [1, 3, 4, 5, 6] if tiny else [1, 9, 17, 25, 33]
        config = DFlashConfig(
            hidden_size=text.hidden_size, intermediate_size=_shrink(tiny, 12288, 192), num_hidden_layers=_shrink(tiny, 5, 2),
            num_attention_heads=_shrink(tiny, 32, 4), num_key_value_heads=_shrink(tiny, 8, 2), head_dim=_shrink(tiny, 128, 16),
            vocab_size=text.vocab_size, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
            block_size=16, num_target_layers=text.num_hidden_layers,
            dflash_config={"mask_token_id": _shrink(tiny, 151669, 5), "target_layer_ids": ids},
        )
        return config, "Qwen3-8B-DFlash-b16 shape (5 layers, all full attention)"
    ids = [1, 3, 5, 7, 9, 10] if tiny else [1, 6, 11, 17, 22, 27]
    layers = _shrink(tiny, 5, 2)
    config = DFlashConfig(
        hidden_size=text.hidden_size, intermediate_size=_shrink(tiny, 5632, 128), num_hidden_layers=layers,
        num_attention_heads=_shrink(tiny, 32, 4), num_key_value_heads=_shrink(tiny, 8, 2), head_dim=_shrink(tiny, 128, 16),
        vocab_size=text.vocab_size, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=262144,
        block_size=16, num_target_layers=text.num_hidden_layers, final_logit_softcapping=30.0,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"], sliding_window=_shrink(tiny, 2048, 16),
        dflash_config={"mask_token_id": 4, "target_layer_ids": ids},
    )
    return config, ("gemma-4-26B-A4B-it-DFlash shape (5 layers: 4 causal sliding W=2048 + 1 full, as released; hidden "
                    "2816, intermediate 5632, 6 target layers); heads 32/8 x 128 assumed (not published)")


def build_model(config, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval()


def moe_bytes(model: torch.nn.Module, tokens: int) -> tuple[int, str]:
    """Weight bytes one forward over `tokens` tokens reads, counting experts by the expected number of distinct ones
    hit under uniform routing, E * (1 - (1 - k/E)^tokens) per layer (an estimate; dense models: exact)."""
    dense = forward_weight_bytes(model)
    expert_params = [(n, p) for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3]
    if not expert_params:
        return dense, "all weights"
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    experts, top_k = text.num_experts, text.top_k_experts
    all_expert_bytes = sum(p.numel() * p.element_size() for _, p in expert_params)
    hit = experts * (1 - (1 - top_k / experts) ** tokens)
    return int(dense - all_expert_bytes + all_expert_bytes * hit / experts), (
        f"non-expert weights + ~{hit:.0f}/{experts} experts per layer (uniform-routing estimate)")


@torch.no_grad()
def loop_step(target, drafter, *, batch: int, prompt_len: int, steps: int, graphs: bool, seed: int,
              compile: bool = False) -> dict[str, Any]:
    """Steady-state step of `DFlashDecoder` over `steps` new tokens (stop tokens off)."""
    device = next(target.parameters()).device
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(8, text.vocab_size, (batch, prompt_len), generator=gen).to(device)
    decoder, gen_kwargs = make_decoder(target, drafter, max_length=prompt_len + steps + 1, cuda_graphs=graphs,
                                       compile=compile if (compile or decoder_supports_compile()) else None,
                                       max_batch_size=batch, verify_length="full")
    t0 = time.perf_counter()
    decoder.generate(prompt, max_new_tokens=min(steps, 32), stop_token_ids=[], **gen_kwargs)  # captures graphs
    warmup_s = time.perf_counter() - t0
    timer = StepIntervalTimer()
    timer.attach(decoder)
    timer.new_run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = decoder.generate(prompt, max_new_tokens=steps, stop_token_ids=[], **gen_kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t0
    timer.detach()
    intervals = timer.intervals
    result = {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": steps, "steps": out.steps,
        "tau_measured": out.mean_acceptance_length, "time_total_s": total, "time_prefill_s": out.time_prefill,
        "time_draft_s": out.time_draft, "time_verify_s": out.time_verify, "warmup_s": warmup_s,
        "step_s_steady": statistics.median(intervals) if intervals else None,
        "step_s_mean": (total - out.time_prefill) / max(out.steps, 1),
        "steady_intervals": len(intervals), "graphs": graphs, "compile": compile,
    }
    del decoder
    return result


def best_generate_time(target, prompt: torch.LongTensor, max_new_tokens: int, kwargs: dict, runs: int = 2) -> float:
    """Best wall time in seconds of `runs` synchronised `target.generate(prompt, max_new_tokens=..., **kwargs)`."""
    device = prompt.device
    best = float("inf")
    for _ in range(runs):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        target.generate(prompt, max_new_tokens=max_new_tokens, **kwargs)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def hf_static_per_token(target, *, prompt_len: int, steps: int, seed: int) -> dict[str, Any]:
    """HF `generate(cache_implementation="static")` (compiled by transformers on CUDA): seconds per token from the
    difference of two lengths (prefill cancels); one cache size for both, so one compile."""
    device = next(target.parameters()).device
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(8, text.vocab_size, (1, prompt_len), generator=gen).to(device)
    short = 16
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None, pad_token_id=0,
                  cache_implementation="static", max_cache_len=prompt_len + short + steps + 1)
    t0 = time.perf_counter()
    target.generate(prompt, max_new_tokens=short + steps, **kwargs)  # compiles
    compile_s = time.perf_counter() - t0
    times = {n: best_generate_time(target, prompt, n, kwargs) for n in (short, short + steps)}
    return {"per_token_s": (times[short + steps] - times[short]) / steps, "first_call_s": compile_s,
            "times_s": {str(k): v for k, v in times.items()}}


@torch.no_grad()
def generate_per_step(target, drafter, *, batch: int, prompt_len: int, steps: int, seed: int,
                      native: bool = False) -> dict[str, Any]:
    """Seconds per verify step of `target.generate(assistant_model=drafter)`: the engine behind plain generate
    (`native=False`) or transformers' own route (`speculation_type="dflash"`, batch 1), from the difference of two
    lengths (prefill and warm-up cancel). The random drafter accepts ~nothing, so a step commits ~1 token per row."""
    device = next(target.parameters()).device
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(8, text.vocab_size, (batch, prompt_len), generator=gen).to(device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None, pad_token_id=0,
                  assistant_model=drafter,
                  **({"speculation_type": "dflash"} if native else {"dflash_verify_length": "full"}))
    short = 16
    t0 = time.perf_counter()
    target.generate(prompt, max_new_tokens=short + steps, **kwargs)  # the engine sizes itself, captures graphs
    first_call_s = time.perf_counter() - t0
    times, step_counts = {}, {}
    for n in (short, short + steps):
        times[n] = best_generate_time(target, prompt, n, kwargs)
        stats = getattr(drafter, "last_stats", None)
        # The native route keeps no statistics: at tau ~1 it verifies once per token after the first.
        step_counts[n] = stats.steps if (stats is not None and not native) else n - 1
    per_step = (times[short + steps] - times[short]) / max(step_counts[short + steps] - step_counts[short], 1)
    return {"per_step_s": per_step, "first_call_s": first_call_s, "times_s": {str(k): v for k, v in times.items()},
            "steps": {str(k): v for k, v in step_counts.items()}}


def measure_model(name: str, args, device, dtype) -> dict[str, Any]:
    config, label = target_config(name, args.tiny)
    t0 = time.perf_counter()
    target = build_model(config, device, dtype)
    build_s = time.perf_counter() - t0
    from dflash_hf import DFlashDraftModel

    dconfig, dnote = drafter_config(name, config, args.tiny)
    torch.manual_seed(args.seed)
    with torch.device(device):
        drafter = DFlashDraftModel(dconfig)
    drafter = drafter.to(device=device, dtype=dtype).eval()
    graphs = device.type == "cuda" and not args.no_graphs
    B = dconfig.block_size
    record: dict[str, Any] = {
        "model": name, "label": label, "drafter": dnote, "status": "ok",
        "target_params": param_count(target), "drafter_params": param_count(drafter), "build_s": build_s,
        "block_size": B, "target_layer_ids": dconfig.target_layer_ids, "published_tau": PUBLISHED_TAU[name],
        "per_batch": [],
    }
    verify_bytes, verify_note = moe_bytes(target, B)
    ar_bytes, ar_note = moe_bytes(target, 1)
    record["weight_bytes"] = {
        "verify_forward": verify_bytes, "verify_note": verify_note, "ar_forward": ar_bytes, "ar_note": ar_note,
        "drafter_forward": forward_weight_bytes(drafter, extra=target.get_output_embeddings()),
    }
    for batch in args.batch_sizes:
        capacity = args.prompt_len + args.steps + 1 + B
        entry: dict[str, Any] = {"batch": batch}
        bare = bare_forward_costs(target, drafter, batch=batch, capacity=capacity,
                                  context=args.prompt_len + args.steps // 2, graphs=graphs, iters=args.iters)
        entry["bare"] = bare
        entry["loop"] = loop_step(target, drafter, batch=batch, prompt_len=args.prompt_len, steps=args.steps,
                                  graphs=graphs, seed=args.seed, compile=False)
        t_verify, t_draft = bare["verify"]["median_s"], bare["draft"]["median_s"]
        t_ar = bare["ar_1tok"]["median_s"]
        t_step = entry["loop"]["step_s_steady"] or entry["loop"]["step_s_mean"]
        entry["t_ar_step_s"] = t_ar
        entry["t_step_s"] = t_step
        entry["t_floor_s"] = t_verify + t_draft
        entry["loop_overhead_ratio"] = t_step / (t_verify + t_draft)
        entry["verify_over_ar"] = t_verify / t_ar
        entry["bandwidth_Bps"] = {
            "verify": verify_bytes / t_verify, "ar_1tok": ar_bytes / t_ar,
            "draft": record["weight_bytes"]["drafter_forward"] / t_draft,
        }
        entry["projection"] = {
            task: {"speedup_vs_graphed_ar": tau * t_ar / t_step, "speedup_at_floor": tau * t_ar / (t_verify + t_draft),
                   "tokens_per_second": batch * tau / t_step}
            for task, tau in PUBLISHED_TAU[name].items()
        }
        if name in args.compile_models and batch in args.compile_batches:
            # DFlashDecoder's CUDA default: steady steps through torch.compile, then captured; and its own floor.
            try:
                entry["loop_compiled"] = loop_step(target, drafter, batch=batch, prompt_len=args.prompt_len,
                                                   steps=args.steps, graphs=graphs, seed=args.seed, compile=True)
                comp = bare_forward_costs(target, drafter, batch=batch, capacity=capacity,
                                          context=args.prompt_len + args.steps // 2, graphs=graphs, iters=args.iters,
                                          compile=True, parts=("verify", "draft"))
                entry["bare_compiled"] = comp
                c_step = entry["loop_compiled"]["step_s_steady"] or entry["loop_compiled"]["step_s_mean"]
                c_floor = comp["verify"]["median_s"] + comp["draft"]["median_s"]
                entry["t_step_compiled_s"] = c_step
                entry["loop_overhead_ratio_compiled"] = c_step / c_floor
                for task, tau in PUBLISHED_TAU[name].items():
                    entry["projection"][task]["speedup_vs_graphed_ar_compiled_loop"] = tau * t_ar / c_step
            except Exception as error:
                entry["loop_compiled"] = {"error": f"{type(error).__name__}: {error}"}
        if name in args.doors:
            entry["doors"] = {}
            for door, native in (("generate", False), ("native", True)):
                if native and batch != 1:
                    continue  # transformers' assisted loop takes one sequence
                try:
                    drafter.last_stats = None
                    entry["doors"][door] = generate_per_step(target, drafter, batch=batch, prompt_len=args.prompt_len,
                                                             steps=args.steps, seed=args.seed, native=native)
                except Exception as error:
                    entry["doors"][door] = {"error": f"{type(error).__name__}: {error}"}
        if name in args.hf_static and batch == 1:
            try:
                hf = hf_static_per_token(target, prompt_len=args.prompt_len, steps=args.steps, seed=args.seed)
                entry["hf_static"] = hf
                for task, tau in PUBLISHED_TAU[name].items():
                    entry["projection"][task]["speedup_vs_hf_static"] = tau * hf["per_token_s"] / t_step
            except Exception as error:  # keep the graphed numbers
                entry["hf_static"] = {"error": f"{type(error).__name__}: {error}"}
        record["per_batch"].append(entry)
    if device.type == "cuda":
        record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del target, drafter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def render_markdown(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = [f"# Scale benchmark `{payload['name']}`", "",
             f"- Command: `{payload['command']}`",
             f"- Hardware: {env.get('gpu_name', 'CPU')}; torch {env['torch']}, transformers {env['transformers']}, "
             f"dtype {env['dtype']}",
             f"- Random weights, real shapes; prompt {payload['settings']['prompt_len']} random tokens, "
             f"{payload['settings']['steps']} new tokens, stop tokens off, block 16. Times are medians; graphed = "
             "CUDA graph replays timed with CUDA events.",
             "- **Projection, not measurement**: speedup = tau x t_AR_step / t_step at the published tau "
             "(docs/DFLASH.md), t_AR_step = graphed 1-token forward (the fastest AR step; HF's compiled static "
             "generate is slower, see its column), t_step = our loop's measured steady-state step.", ""]
    mode = "graphed" if payload["settings"]["graphs"] else "eager"
    for rec in payload["models"]:
        lines.append(f"## {rec['model']}: {rec.get('label', '')}")
        lines.append("")
        if rec.get("status") != "ok":
            lines += [f"{rec['status']}: {rec.get('reason', '')}", ""]
            continue
        lines.append(f"- target {rec['target_params'] / 1e9:.2f}B params, drafter {rec['drafter_params'] / 1e9:.3f}B "
                     f"params ({rec['drafter']}); built in {rec['build_s']:.0f} s")
        wb = rec["weight_bytes"]
        lines.append(f"- weight bytes per forward: verify {wb['verify_forward'] / 1e9:.2f} GB ({wb['verify_note']}), "
                     f"AR {wb['ar_forward'] / 1e9:.2f} GB ({wb['ar_note']}), drafter+head "
                     f"{wb['drafter_forward'] / 1e9:.2f} GB")
        lines.append("")
        lines.append("| batch | verify B=16 (ms) | draft (ms) | floor (ms) | loop step, no compile (ms) | loop / floor | AR 1-tok (ms) | "
                     "verify / AR | HF static per token (ms) | verify BW TB/s | AR BW TB/s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for e in rec["per_batch"]:
            hf = e.get("hf_static") or {}
            hf_text = f"{1e3 * hf['per_token_s']:.2f}" if "per_token_s" in hf else (hf.get("error", "–")[:60] or "–")
            lines.append(
                f"| {e['batch']} | {1e3 * e['bare']['verify']['median_s']:.3f} | {1e3 * e['bare']['draft']['median_s']:.3f} | "
                f"{1e3 * e['t_floor_s']:.3f} | {1e3 * e['t_step_s']:.3f} | {e['loop_overhead_ratio']:.2f} | "
                f"{1e3 * e['t_ar_step_s']:.3f} | {e['verify_over_ar']:.2f} | {hf_text} | "
                f"{e['bandwidth_Bps']['verify'] / 1e12:.2f} | {e['bandwidth_Bps']['ar_1tok'] / 1e12:.2f} |"
            )
        lines.append("")
        tasks = list(rec["published_tau"])
        lines.append("| batch | " + " | ".join(f"{t} (tau {rec['published_tau'][t]})" for t in tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for e in rec["per_batch"]:
            cells = []
            for t in tasks:
                p = e["projection"][t]
                text = f"{p['speedup_vs_graphed_ar']:.2f}x vs {mode} AR (floor {p['speedup_at_floor']:.2f}x)"
                if "speedup_vs_graphed_ar_compiled_loop" in p:
                    text += f"; compiled loop {p['speedup_vs_graphed_ar_compiled_loop']:.2f}x"
                if "speedup_vs_hf_static" in p:
                    text += f"; {p['speedup_vs_hf_static']:.2f}x vs HF static"
                cells.append(text)
            lines.append(f"| {e['batch']} | " + " | ".join(cells) + " |")
        lines.append("")
        for e in rec["per_batch"]:
            lc = e.get("loop_compiled")
            if lc and "error" in lc:
                lines.append(f"- batch {e['batch']} compiled loop failed: {lc['error'][:200]}")
            elif lc:
                bc = e["bare_compiled"]
                lines.append(f"- batch {e['batch']} compiled (graphs + torch.compile): verify "
                             f"{1e3 * bc['verify']['median_s']:.3f} ms, draft {1e3 * bc['draft']['median_s']:.3f} ms, "
                             f"loop step {1e3 * e['t_step_compiled_s']:.3f} ms, loop / compiled floor "
                             f"{e['loop_overhead_ratio_compiled']:.2f}")
            for door, label in (("generate", "plain generate(assistant_model=drafter), the engine"),
                                ("native", "transformers' native route (speculation_type='dflash')")):
                d = (e.get("doors") or {}).get(door)
                if d and "error" in d:
                    lines.append(f"- batch {e['batch']} {label}: failed: {d['error'][:200]}")
                elif d:
                    lines.append(f"- batch {e['batch']} {label}: {1e3 * d['per_step_s']:.3f} ms per step = "
                                 f"{d['per_step_s'] / e['t_step_s']:.2f}x the loop step (first call "
                                 f"{d['first_call_s']:.1f} s)")
            for part in ("verify", "draft", "ar_1tok"):
                if "capture_error" in e["bare"][part]:
                    lines.append(f"- batch {e['batch']} {part}: CUDA graph capture failed, eager timing shown "
                                 f"({e['bare'][part]['capture_error'][:200]})")
        loop = rec["per_batch"][0]["loop"]
        lines.append(f"Loop run: {loop['steps']} steps for {loop['new_tokens']} tokens/row (measured tau "
                     f"{loop['tau_measured']:.2f}, random drafter), {loop['steady_intervals']} steady steps timed.")
        lines.append("")
    lines.append(f"H200 HBM peak {H200_PEAK_BANDWIDTH / 1e12:.1f} TB/s (measured device copy ~4.3 TB/s). "
                 f"Total wall time {payload.get('total_wall_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3-8b,gemma4-26b-a4b",
                        help="comma list of qwen3-8b, gemma4-26b-a4b, gemma4-dense-standin")
    parser.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,8")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=128, help="new tokens of the timed loop run (~ steps at tau 1)")
    parser.add_argument("--iters", type=int, default=50, help="graph replays per bare measurement")
    parser.add_argument("--hf-static", default="", help="comma list of models for which to time HF static generate")
    parser.add_argument("--compile-models", default="",
                        help="comma list of models for which to also time the compiled loop (graphs + torch.compile) "
                             "and a compiled floor; each costs compiles of the draft and verify steps")
    parser.add_argument("--compile-batches", default="1", help="batch sizes for --compile-models (default 1)")
    parser.add_argument("--doors", default="",
                        help="comma list of models for which to also time plain generate(assistant_model=drafter) "
                             "(the engine, every batch size) and transformers' native route (batch 1)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="shrink every shape (CPU smoke test of this script)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds; later models are skipped")
    parser.add_argument("--out", default="scale")
    parser.add_argument("--results-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.hf_static = [m.strip() for m in args.hf_static.split(",") if m.strip()]
    args.doors = [m.strip() for m in args.doors.split(",") if m.strip()]
    args.compile_models = [m.strip() for m in args.compile_models.split(",") if m.strip()]
    args.compile_batches = [int(b) for b in args.compile_batches.split(",") if b.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models + args.hf_static + args.compile_models + args.doors:
        if m not in PUBLISHED_TAU:
            parser.error(f"unknown model {m!r}; choose from {', '.join(PUBLISHED_TAU)}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    start = time.perf_counter()
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "name": args.out, "command": command_line(), "argv": sys.argv, "environment": environment_info(device, dtype),
        "settings": {"prompt_len": args.prompt_len, "steps": args.steps, "batch_sizes": args.batch_sizes,
                     "iters": args.iters, "tiny": args.tiny, "graphs": device.type == "cuda" and not args.no_graphs},
        "models": [],
    }
    json_path, md_path = results_dir / f"{args.out}.json", results_dir / f"{args.out}.md"

    def save():
        from dflash_hf.bench import _jsonable

        json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")

    queue = list(models)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(queue), desc="scale", unit="model", file=sys.stderr)
    while queue:
        name = queue.pop(0)
        bar.set_postfix_str(name)
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            payload["models"].append({"model": name, "status": "skipped", "reason": "time budget used up"})
            bar.update()
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            payload["models"].append(measure_model(name, args, device, dtype))
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            print(f"[scale] {name} failed: {reason}", file=sys.stderr)
            payload["models"].append({"model": name, "status": "error", "reason": reason})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if name == "gemma4-26b-a4b" and "gemma4-dense-standin" not in models:
                # Say so and fall back to the clearly labelled dense stand-in of equal active size.
                models.append("gemma4-dense-standin")
                queue.append("gemma4-dense-standin")
                bar.total += 1
        bar.update()
        save()
    bar.close()
    payload["total_wall_s"] = time.perf_counter() - start
    save()
    markdown = render_markdown(payload)
    md_path.write_text(markdown)
    print(markdown)
    print(f"JSON: {json_path}\nMarkdown: {md_path}\nCommand: {payload['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
