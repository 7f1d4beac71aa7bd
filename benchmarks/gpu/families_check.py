"""Losslessness on CUDA for every target family the CPU tests cover, the released pairs' shapes included.

The CPU tests (tests/test_target_families.py) run the engine eagerly. On CUDA the engine's default is to capture the
draft and verify steps as CUDA graphs (and optionally compile them), and hybrid linear-attention targets keep their
per-token recurrent states inside those graphs. This script runs the same tiny random models on the GPU in fp32 and
checks, per family:

- greedy, left-padded batch of 2 past the window: the engine with CUDA graphs and the adaptive verify length (and,
  for the released pairs' shapes and Llama, with graphs + torch.compile), and with fixed verify lengths 1, 2 and
  B-1 (a pair of graphs each), equals transformers' own greedy `generate` for each row alone;
- plain `target.generate(..., assistant_model=drafter)` (the engine behind it) equals the same;
- an oracle drafter (whole blocks accepted, and acceptance cut every third row) with graphs off equals the same: the
  accept paths on the GPU's kernels (hybrid targets: the selection of the accepted prefix's states);
- sampling with a `generator` twice gives the same tokens, and the caller's global CUDA RNG is untouched.

    python3 benchmarks/gpu/families_check.py --out $OUT   (needs pytest importable: tests/ builders use it)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402
from helpers import OracleDrafter, left_pad, random_prompt, tiny_drafter  # noqa: E402
from test_target_families import (  # noqa: E402
    FAMILIES,
    HYBRID_TYPES,
    LAYERS,
    build_target,
    gemma4_pair,
    hybrid_target,
)

import dflash_hf  # noqa: E402


@torch.no_grad()
def target_greedy(target, prompt: torch.Tensor, new: int) -> list[int]:
    out = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def first_divergence(got: list[list[int]], expected: list[list[int]]) -> list[int | None]:
    marks = []
    for g, e in zip(got, expected):
        marks.append(next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), None if len(g) == len(e) else
                          min(len(g), len(e))))
    return marks


# torch.compile costs tens of seconds per model: compiled runs only for these cases (the released pairs' shapes).
COMPILED_CASES = ("llama", "gemma-4 pair", "qwen3_5_text", "qwen3_next")


def check_case(name: str, target, drafter, layer_ids: list[int], block: int, device, new: int = 24) -> dict:
    target = target.to(device)
    drafter = drafter.to(device)
    prompts = [random_prompt(n, seed=n).to(device) for n in (30, 21)]
    expected = [target_greedy(target, p, new) for p in prompts]
    ids, mask = (t.to(device) for t in left_pad([p.cpu() for p in prompts]))
    record: dict = {"case": name, "checks": {}}

    def put(check: str, got: list[list[int]], extra: dict | None = None):
        marks = first_divergence(got, expected)
        record["checks"][check] = {"exact": all(m is None for m in marks), "first_divergence": marks, **(extra or {})}

    on_cuda = device.type == "cuda"
    for compile_ in ((False, True) if on_cuda and name.startswith(COMPILED_CASES) else (False,)):
        label = "engine graphs+compile, auto length" if compile_ else "engine graphs, auto length"
        try:
            decoder = dflash_hf.DFlashDecoder(target, drafter, max_length=128, cuda_graphs=on_cuda, compile=compile_)
            out = decoder.generate(ids, mask, max_new_tokens=new, stop_token_ids=[])
            put(label, out.new_tokens, {"tau": round(out.mean_acceptance_length, 3),
                                        "lengths": sorted(set(out.verify_lengths))})
        except Exception as error:
            record["checks"][label] = {"error": f"{type(error).__name__}: {error}"}
    if on_cuda:  # every verify length is its own pair of graphs
        label = "engine graphs, fixed lengths 1, 2, B-1"
        try:
            got, exact = {}, True
            for length in (1, 2, block - 1):
                out = dflash_hf.DFlashDecoder(target, drafter, max_length=128, cuda_graphs=True, compile=False,
                                              verify_length=length).generate(ids, mask, max_new_tokens=new,
                                                                             stop_token_ids=[])
                got[length] = first_divergence(out.new_tokens, expected)
                exact = exact and all(m is None for m in got[length])
            record["checks"][label] = {"exact": exact, "first_divergence": got}
        except Exception as error:
            record["checks"][label] = {"error": f"{type(error).__name__}: {error}"}
    try:
        plain = target.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=new,
                                eos_token_id=None, pad_token_id=0)
        put("generate(assistant_model=)", [plain[r, ids.shape[1]:].tolist() for r in range(len(prompts))])
    except Exception as error:
        record["checks"]["generate(assistant_model=)"] = {"error": f"{type(error).__name__}: {error}"}
    for corrupt_every in (0, 3):
        label = f"oracle drafter, cut every {corrupt_every}" if corrupt_every else "oracle drafter, whole blocks"
        try:
            with OracleDrafter.for_target(target.cpu(), block_size=block, layer_ids=layer_ids,
                                          corrupt_every=corrupt_every) as oracle:
                target.to(device)
                oracle.to(device)
                oracle.__dict__["_reference"].to(device)
                out = dflash_hf.DFlashDecoder(target, oracle, max_length=128, cuda_graphs=False, compile=False,
                                              verify_length="full").generate(ids, mask, max_new_tokens=new, stop_token_ids=[])
                put(label, out.new_tokens, {"tau": round(out.mean_acceptance_length, 3)})
        except Exception as error:
            target.to(device)
            record["checks"][label] = {"error": f"{type(error).__name__}: {error}"}
    try:
        rng_state = (lambda: torch.cuda.get_rng_state(device)) if on_cuda else torch.get_rng_state
        before = rng_state()
        runs = [dflash_hf.generate(target, drafter, ids, mask, max_new_tokens=new, stop_token_ids=[], do_sample=True,
                                   temperature=0.8, generator=torch.Generator(device=device).manual_seed(7)).new_tokens
                for _ in range(2)]
        record["checks"]["sampling, same generator twice"] = {
            "exact": runs[0] == runs[1], "global_cuda_rng_untouched": bool(torch.equal(before, rng_state()))}
    except Exception as error:
        record["checks"]["sampling, same generator twice"] = {"error": f"{type(error).__name__}: {error}"}
    return record


def cases():
    """(name, builder) pairs; each builder returns (target, drafter, layer_ids, block)."""
    for family in FAMILIES:
        def build(family=family):
            target = build_target(family)
            return target, tiny_drafter(target, layers=2, block_size=8, layer_ids=[0, LAYERS - 1]), [0, LAYERS - 1], 8
        yield family, build

    def gemma4():
        target, drafter = gemma4_pair()
        return target, drafter, [0, 1, 3], 6
    yield "gemma-4 pair (MoE target, 4 sliding + 1 full drafter)", gemma4
    for model_type in HYBRID_TYPES:
        def build(model_type=model_type):
            target = hybrid_target(model_type)
            return target, tiny_drafter(target, layers=2, block_size=6, layer_ids=[0, 3]), [0, 3], 6
        yield f"{model_type} (hybrid linear attention)", build


def render(records: list[dict], environment: str, command: str) -> str:
    checks = list(dict.fromkeys(c for r in records for c in r.get("checks", {})))
    lines = ["# Losslessness on CUDA: every target family, the released pairs' shapes", "",
             f"- Command: `{command}`", f"- {environment}",
             "- Tiny random models of the real transformers classes (tests/test_target_families.py), fp32, prompts of "
             "30 and 21 tokens left-padded into one batch, 24 new tokens: past every window (8). A cell is `exact` "
             "when both rows equal transformers' greedy `generate` for that row alone, else the first diverging "
             "position per row.", "",
             "| case | " + " | ".join(checks) + " |", "|---" * (len(checks) + 1) + "|"]
    for r in records:
        cells = []
        for c in checks:
            v = r.get("checks", {}).get(c)
            if v is None:
                cells.append("–")
            elif "error" in v:
                cells.append(f"error: {v['error'][:120]}")
            elif c.startswith("sampling"):
                cells.append(("same tokens" if v["exact"] else "DIFFERENT") + (
                    ", global RNG untouched" if v["global_cuda_rng_untouched"] else ", GLOBAL RNG MOVED"))
            else:
                cell = "exact" if v["exact"] else f"diverges at {v['first_divergence']}"
                if "tau" in v:
                    cell += f" (tau {v['tau']})"
                if "lengths" in v:
                    cell += f", lengths used {v['lengths']}"
                cells.append(cell)
        if "error" in r:
            cells = [f"error: {r['error'][:160]}"] + [""] * (len(checks) - 1)
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="families_check_gpu")
    parser.add_argument("--smoke", action="store_true", help="CPU, no graphs, first two cases: checks this script")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke for a CPU run of this script)")
    device = torch.device("cpu" if args.smoke else "cuda")
    hardware = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name(device)
    environment = f"Hardware: {hardware}; torch {torch.__version__}, transformers {transformers.__version__}"
    print(environment, flush=True)
    command = "python3 " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    records = []
    chosen = list(cases())
    for name, build in (chosen[:1] + chosen[-1:] if args.smoke else chosen):
        t0 = time.perf_counter()
        try:
            target, drafter, layer_ids, block = build()
            record = check_case(name, target, drafter, layer_ids, block, device)
        except BaseException as error:  # pytest.skip (a family this transformers lacks) raises a BaseException
            if isinstance(error, KeyboardInterrupt):
                raise
            record = {"case": name, "error": f"{type(error).__name__}: {error}",
                      "trace": traceback.format_exc(limit=4)}
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        records.append(record)
        print(json.dumps(record), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "environment": environment,
                                                       "records": records}, indent=2) + "\n")
    markdown = render(records, environment, command)
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
