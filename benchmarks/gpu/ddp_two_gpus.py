"""`dflash-hf train` data-parallel on two GPUs (torchrun, NCCL) against the same command on one GPU.

Checks what the gloo tests (tests/test_cli_train.py) check on CPU, on real GPUs: both ranks end with the very same
drafter weights, with a whole target per process (DDP) and with the target's layers sharded over the two
(`--shard-target`, FSDP2), and measures the data-parallel throughput (sequences a second, each process with the same
`--batch-size`). The target is a random-weight model with SmolLM2-135M's shapes (30 layers, hidden 576, 9/3 heads)
and a character-level chat tokenizer built in code (so its vocabulary is 102, not 49,152), saved to a folder: no
download, no GGUF. Its answers are noise, which is all a throughput and correctness check of the training path needs.

    python3 benchmarks/gpu/ddp_two_gpus.py --out benchmarks/results/ddp_two_gpus           # on a 2-GPU machine
    python3 benchmarks/gpu/ddp_two_gpus.py --out /tmp/ddp --layers 2 --hidden 64 --steps 3  # a CPU smoke (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_target(folder: Path, layers: int, hidden: int) -> None:
    """A random Llama-architecture target (SmolLM2's architecture) with the tests' character-level chat tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_chat_tokenizer  # a real fast tokenizer with a ChatML template, built offline
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_chat_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 192), max_position_embeddings=4096,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run(command: list[str], log: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}); see {log}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for ddp_two_gpus.json / .md and the logs")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per process per step (default 32)")
    parser.add_argument("--num-anchors", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=128, help="make-data prompts per category (default 128)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ddp-two-gpus-"))
    target = work / "target"
    build_target(target, args.layers, args.hidden)
    data = work / "data.jsonl"
    make_data_s = run([sys.executable, "-m", "dflash_hf", "make-data", "--target", str(target), "--output", str(data),
                       "--n-per-category", str(args.prompts), "--max-new-tokens", "64", "--batch-size", "128",
                       "--engine", "hf-dynamic", "--no-progress"], out / "make_data.log")
    train_args = ["-m", "dflash_hf", "train", "--target", str(target), "--data", str(data), "--num-layers", "2",
                  "--num-context-layers", "5" if args.layers >= 8 else "1", "--block-size", "8", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--num-anchors", str(args.num_anchors), "--eval-per-category", "1", "--eval-max-new-tokens", "16",
                  "--eval-every", "0", "--no-progress", "--no-plot", "--seed", "0", "--drafter-seed", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {}
    for name, tag, launcher, extra in (("1 process", "1", [sys.executable], []),
                                       ("2 processes (torchrun)", "2", torchrun, []),
                                       ("2 processes, target sharded (--shard-target)", "2-sharded", torchrun,
                                        ["--shard-target"])):
        folder = work / tag
        wall = run(launcher + train_args + extra + ["--output", str(folder)], out / f"train_{tag}.log")
        metrics = json.loads((folder / "metrics.json").read_text())
        world = metrics["extra"].get("world_size", 1)
        checksums = metrics["extra"].get("rank_parameter_checksums")
        runs[name] = {
            "world_size": world, "steps": metrics["steps"], "train_seconds": metrics["seconds"], "wall_seconds": wall,
            "sequences_per_second": metrics["steps"] * args.batch_size * world / metrics["seconds"],
            "rank_parameter_checksums": checksums, "device": metrics["run"]["device"],
            "final_tau": metrics["final_tau"], "final_loss": metrics["history"][-1]["loss"],
            "target_parameters_per_rank": metrics["extra"].get("target_parameters_per_rank"),
            "ranks_identical": None if world == 1 else bool(checksums) and len(set(map(str, checksums))) == 1,
        }
    one, two = runs["1 process"], runs["2 processes (torchrun)"]
    payload = {
        "command": "python3 " + " ".join([str(Path(__file__).relative_to(ROOT))] + (argv or sys.argv[1:])),
        "settings": vars(args), "make_data_seconds": make_data_s, "runs": runs,
        "scaling": two["sequences_per_second"] / one["sequences_per_second"],
        "ranks_identical": all(r["ranks_identical"] for r in runs.values() if r["world_size"] > 1),
    }
    import torch
    import transformers

    payload["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    (out / "ddp_two_gpus.json").write_text(json.dumps(payload, indent=2))
    lines = ["# `dflash-hf train` on 1 and 2 processes", "", f"- Command: `{payload['command']}`",
             f"- Environment: torch {torch.__version__}, transformers {transformers.__version__}, "
             f"GPUs: {', '.join(payload['environment']['gpus']) or 'none (CPU, gloo)'}",
             f"- Target: random weights, {args.layers} layers, hidden {args.hidden}, character-level vocabulary; "
             f"drafter 2 layers, block 8; {args.batch_size} sequences x {args.num_anchors} anchors per process per step",
             "", "| run | device (rank 0) | target parameters per rank | steps | train s | sequences/s | final loss | "
             "final tau | both ranks' weights identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        same = "–" if r["world_size"] == 1 else ("yes" if r["ranks_identical"] else "**no**")
        held = ", ".join(f"{n:,}" for n in r["target_parameters_per_rank"] or [])
        lines.append(f"| {name} | {r['device']} | {held} | {r['steps']} | {r['train_seconds']:.1f} | "
                     f"{r['sequences_per_second']:.1f} | {r['final_loss']:.4f} | {r['final_tau']:.3f} | {same} |")
    lines += ["", f"Data-parallel scaling (sequences/s, 2 processes / 1): **{payload['scaling']:.2f}x**."]
    (out / "ddp_two_gpus.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if payload["ranks_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
