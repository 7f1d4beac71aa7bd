"""Memory over consecutive long generations with one `DFlashDecoder`: does anything grow from call to call?

Runs `--calls` generations of `--new-tokens` tokens each (EOS ignored, so every call does the full length) with the
decoder's defaults for the device (on CUDA: CUDA graphs + torch.compile), at each batch size, and records after every
call the CUDA memory allocated and reserved, the peak, and the process RSS. Growth = last call - first call.

    python benchmarks/memory_soak.py --target smollm2 --drafter bundled --calls 10 --new-tokens 1024 --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from pair import add_pair_arguments, load_pair

from dflash_hf import DFlashDecoder
from dflash_hf.prompts import build_prompts
from dflash_hf.training.data import encode_prompt


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--name", default="memory_soak")
    add_pair_arguments(parser)
    args = parser.parse_args()

    target, tokenizer, drafter, description, device, dtype = load_pair(args)
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in build_prompts(3, split="heldout")]
    cuda = device.type == "cuda"
    report = {"command": " ".join(["python", *sys.argv]), "drafter": description,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "dtype": str(dtype), "calls": args.calls, "new_tokens": args.new_tokens, "runs": []}
    width = max(len(p) for p in prompts)
    decoder = DFlashDecoder(target, drafter, max_length=width + args.new_tokens)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        ids = torch.full((batch, width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(rows):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        samples = []
        for call in range(args.calls):
            start = time.perf_counter()
            out = decoder.generate(ids, mask, max_new_tokens=args.new_tokens, stop_token_ids=[],
                                   pad_token_id=tokenizer.pad_token_id or 0)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            gc.collect()
            sample = {"call": call + 1, "seconds": round(seconds, 3), "tokens": out.num_new_tokens,
                      "tau": round(out.mean_acceptance_length, 3), "rss_mib": round(rss_mib(), 1)}
            if cuda:
                sample.update(allocated_mib=round(torch.cuda.memory_allocated() / 2**20, 1),
                              reserved_mib=round(torch.cuda.memory_reserved() / 2**20, 1),
                              peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1))
            samples.append(sample)
            print(json.dumps({"batch": batch, **sample}), file=sys.stderr, flush=True)
        # Call 1 pays for compilation and graph capture; growth is measured from call 2 on.
        keys = [k for k in ("allocated_mib", "reserved_mib", "peak_mib", "rss_mib") if k in samples[0]]
        growth = {k: round(samples[-1][k] - samples[min(1, len(samples) - 1)][k], 1) for k in keys}
        report["runs"].append({"batch": batch, "samples": samples, "growth_from_call_2": growth})

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Memory over {args.calls} consecutive {args.new_tokens}-token generations (`{args.name}`)", "",
             f"- Command: `{report['command']}`", f"- {report['device']}; torch {report['torch']}, transformers "
             f"{report['transformers']}, {dtype}; one `DFlashDecoder` (device defaults), EOS ignored", ""]
    for run in report["runs"]:
        lines += [f"## Batch {run['batch']}", "", "| call | s | tokens | tau | allocated MiB | reserved MiB | peak MiB |"
                  " RSS MiB |", "|---|---|---|---|---|---|---|---|"]
        for s in run["samples"]:
            lines.append(f"| {s['call']} | {s['seconds']} | {s['tokens']} | {s['tau']} | {s.get('allocated_mib', '–')} "
                         f"| {s.get('reserved_mib', '–')} | {s.get('peak_mib', '–')} | {s['rss_mib']} |")
        lines += ["", "Growth from call 2 to the last call: " +
                  ", ".join(f"{k} {v:+.1f}" for k, v in run["growth_from_call_2"].items()), ""]
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
