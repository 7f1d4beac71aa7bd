"""Real tau of a SmolLM2 drafter on prompts of its training split against held-out prompts.

Tells memorisation from the rest: if a drafter decodes its own training prompts much better than held-out ones, it
overfits and needs more distinct data or regularisation; if not, the distance between the teacher-forced tau of
training (every anchor counted once) and real tau (decoding spends most of its steps where drafts fail) is not
overfitting. Greedy, the real batched decode loop (eager), stopping at the target's end of turn, as training's own
evaluation does. Runs on CPU (fp32) or GPU.

    python benchmarks/tau_train_vs_heldout.py --per-category 12 --out benchmarks/results/tau_train_vs_heldout_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dflash_hf import DFlashDraftModel
from dflash_hf.assets import load_smollm2
from dflash_hf.prompts import build_prompts
from dflash_hf.stops import target_stop_ids
from dflash_hf.training.data import encode_prompt, pad_token_id
from dflash_hf.training.recipe import evaluate_tau

BUNDLED = Path(__file__).resolve().parents[1] / "src/dflash_hf/data/drafters/SmolLM2-135M-Instruct-DFlash"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default=str(BUNDLED), help="drafter folder (default: the bundled one)")
    parser.add_argument("--per-category", type=int, default=12, help="prompts per category and split (default 12)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="prompt seed: 0 is the shipped drafter's training seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    target, tokenizer = load_smollm2(dtype=dtype, device=args.device, progress=False)
    drafter = DFlashDraftModel.from_pretrained(args.drafter, dtype=dtype).to(args.device).eval()
    stops, pad = target_stop_ids(target, tokenizer), pad_token_id(target, tokenizer)
    payload = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
               "settings": vars(args), "python": platform.python_version(), "torch": torch.__version__,
               "dtype": str(dtype), "splits": {}}
    for split in ("train", "heldout"):
        prompts = build_prompts(args.per_category, split=split, seed=args.seed, include_humaneval=False)
        items = [{"category": p["category"], "input_ids": encode_prompt(tokenizer, p["prompt"])} for p in prompts]
        started = time.perf_counter()
        report = evaluate_tau(target, drafter, items, max_new_tokens=args.max_new_tokens, stop_token_ids=stops,
                              pad_token_id=pad, backend="dflash", batch_size=len(items))
        report["wall_seconds"] = time.perf_counter() - started
        payload["splits"][split] = report
        print(f"{split}: tau {report['tau']:.3f} " + " ".join(f"{c} {t:.3f}" for c, t in report["per_category"].items()),
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    cats = sorted(payload["splits"]["train"]["per_category"])
    lines = ["# Real tau on training-split vs held-out prompts", "", f"- Command: `{payload['command']}`",
             f"- {args.per_category} prompts per category and split (seed {args.seed}), {args.max_new_tokens} new "
             f"tokens, greedy, stop at end of turn; {args.device}, {dtype}; Python {payload['python']}, torch "
             f"{payload['torch']}", "",
             "| prompts | all | " + " | ".join(cats) + " | steps | tokens |", "|---|---|" + "---|" * (len(cats) + 2)]
    for split, report in payload["splits"].items():
        lines.append(f"| {split} | {report['tau']:.3f} | " + " | ".join(f"{report['per_category'][c]:.3f}" for c in cats)
                     + f" | {report['steps']} | {report['tokens']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
