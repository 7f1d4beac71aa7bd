"""Memory and acceptance against context length, with and without a drafter `draft_window`.

For each context length L the prompt is one user turn (offline prose from `dflash_hf.prompts.offline_passages`, then
"Summarise the text above.") cut so that the chat-formatted prompt is exactly L tokens. Each length runs:

- `ar`: the target's own greedy `generate` (the reference tokens);
- `generate`: `target.generate(assistant_model=drafter)`, the drafter's context cache unbounded;
- `generate_window`: the same with `drafter.config.draft_window = W` (the draft cache keeps the last W context rows);
- `loop`: the batched `DFlashDecoder` (static caches sized to the request, CUDA graphs on GPU, no compile).

Reported per run: tau, peak memory above the weights (CUDA), the draft cache's bytes at the end of the call (the
generate routes), and whether the tokens equal `ar`.

    python benchmarks/long_context.py --target smollm2 --drafter bundled --lengths 512,1024,2048,4096,8000 \\
        --window 512 --new-tokens 128 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from pair import add_pair_arguments, load_pair

from dflash_hf import DFlashDecoder
from dflash_hf.prompts import offline_passages
from dflash_hf.stops import target_stop_ids
from dflash_hf.training.data import encode_prompt

QUESTION = "\n\nSummarise the text above in three sentences."


def prompt_of_length(tokenizer, length: int) -> list[int]:
    """Chat-formatted prompt ids of exactly `length` tokens (prose cut at a token boundary, then the question)."""
    frame = len(encode_prompt(tokenizer, QUESTION.strip()))
    prose_ids: list[int] = []
    for _, passage in offline_passages():
        prose_ids.extend(tokenizer(passage + "\n\n", add_special_tokens=False)["input_ids"])
        if len(prose_ids) > length:
            break
    for budget in range(length - frame, 0, -1):  # re-tokenising at the cut can merge tokens: search down
        ids = encode_prompt(tokenizer, tokenizer.decode(prose_ids[:budget]) + QUESTION)
        if len(ids) <= length:
            return ids
    raise ValueError(f"cannot build a prompt of {length} tokens")


def draft_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))


def run_loop(target, drafter, ids, mask, new_tokens: int, pad_token_id: int):
    """One batched-loop generation with caches sized to this request (freed on return)."""
    decoder = DFlashDecoder(target, drafter, max_length=ids.shape[1] + new_tokens, compile=False)
    return decoder.generate(ids, mask, max_new_tokens=new_tokens, stop_token_ids=[], pad_token_id=pad_token_id)


def measure(device, fn):
    """(result, seconds, peak bytes above the memory in use before the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return result, seconds, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8000")
    parser.add_argument("--window", type=int, default=512, help="draft_window of the windowed run")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--name", default="long_context")
    add_pair_arguments(parser)
    args = parser.parse_args()

    target, tokenizer, drafter, description, device, dtype = load_pair(args)
    stops = target_stop_ids(target, tokenizer)
    limit = int(target.config.max_position_embeddings)
    lengths = [int(x) for x in args.lengths.split(",")]
    too_long = [n for n in lengths if n + args.new_tokens > limit]
    if too_long:
        raise SystemExit(f"--lengths {too_long} + --new-tokens {args.new_tokens} exceed the target's "
                         f"max_position_embeddings {limit}; use shorter lengths.")
    weights = sum(p.numel() * p.element_size() for p in (*target.parameters(), *drafter.parameters()))
    rows = []
    caches = []
    make_cache = drafter.make_draft_cache
    drafter.make_draft_cache = lambda: caches.append(make_cache()) or caches[-1]  # keep the call's cache to weigh it
    try:
        for length in lengths:
            ids = torch.tensor([prompt_of_length(tokenizer, length)], device=device)
            mask = torch.ones_like(ids)
            common = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=tokenizer.pad_token_id or 0)
            with torch.no_grad():
                ar, ar_s, ar_peak = measure(device, lambda: target.generate(ids, attention_mask=mask, **common))
            reference = ar[0, ids.shape[1]:].tolist()
            rows.append(dict(length=ids.shape[1], route="ar", tau=1.0, seconds=ar_s, peak_bytes=ar_peak,
                             draft_cache_bytes=None, equal_to_ar=True))
            for route, window in (("generate", None), ("generate_window", args.window)):
                drafter.config.draft_window = window
                caches.clear()
                with torch.no_grad():
                    out, seconds, peak = measure(device, lambda: target.generate(
                        ids, attention_mask=mask, assistant_model=drafter, **common))
                rows.append(dict(length=ids.shape[1], route=route, window=window,
                                 tau=drafter.last_stats.mean_acceptance_length, seconds=seconds, peak_bytes=peak,
                                 draft_cache_bytes=draft_cache_bytes(caches[-1]),
                                 equal_to_ar=out[0, ids.shape[1]:].tolist() == reference))
            drafter.config.draft_window = None
            out, seconds, peak = measure(device, lambda: run_loop(target, drafter, ids, mask, args.new_tokens,
                                                                  common["pad_token_id"]))
            rows.append(dict(length=ids.shape[1], route="loop", tau=out.mean_acceptance_length, seconds=seconds,
                             peak_bytes=peak, draft_cache_bytes=None, equal_to_ar=out.new_tokens[0] == reference))
            for row in rows[-4:]:
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        del drafter.make_draft_cache
        drafter.config.draft_window = None

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"command": " ".join(["python", *sys.argv]), "device": torch.cuda.get_device_name() if device.type == "cuda"
            else platform.processor() or "cpu", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "dtype": str(dtype), "target": args.target,
            "drafter": description, "new_tokens": args.new_tokens, "window": args.window, "weights_bytes": weights,
            "stop_tokens_ignored": stops}
    (out_dir / f"{args.name}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    mib = lambda b: "–" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    lines = [f"# Long context: memory and tau against context length (`{args.name}`)", "",
             f"- Command: `{info['command']}`", f"- {info['device']}; torch {info['torch']}, transformers "
             f"{info['transformers']}, {dtype}; weights {weights / 2**20:.0f} MiB (target + drafter)",
             f"- {args.new_tokens} new tokens per run, greedy, EOS ignored; prompt = offline prose + a summary request, "
             "chat template", "",
             "| context | route | draft_window | tau | peak MiB above weights | draft cache MiB | tok/s | tokens = AR |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['length']} | `{row['route']}` | {row.get('window') or '–'} | {row['tau']:.2f} | "
                     f"{mib(row['peak_bytes'])} | {mib(row['draft_cache_bytes'])} | "
                     f"{args.new_tokens / row['seconds']:.0f} | {row['equal_to_ar']} |")
    lines += ["", "Peak MiB = `max_memory_allocated` during the call minus the memory in use before it (caches, "
              "activations, logits). Draft cache MiB = the drafter's context K/V at the end of a `generate` call; "
              "with `draft_window` it stops growing at the window. bf16 token mismatches against AR come from "
              "near-tied logits (see smollm2_h200_b.md); exactness is tested in fp32."]
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for route in ("ar", "generate", "generate_window", "loop"):
            pts = [r for r in rows if r["route"] == route]
            if pts and pts[0]["peak_bytes"] is not None:
                left.plot([r["length"] for r in pts], [r["peak_bytes"] / 2**20 for r in pts], marker="o", label=route)
            right.plot([r["length"] for r in pts], [r["tau"] for r in pts], marker="o", label=route)
        left.set(xlabel="context tokens", ylabel="peak MiB above weights", title="memory")
        right.set(xlabel="context tokens", ylabel="tau", title="acceptance length")
        left.legend()
        right.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{args.name}.png", dpi=110)
    except ImportError:
        pass
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
