"""`dflash-hf train`: train a DFlash drafter for a target on data from `dflash-hf make-data`.

The published recipe (docs/TRAINING.md): frozen target features, random anchors per sequence re-drawn every epoch,
all blocks of a sequence in one packed drafter forward, exponentially decayed cross-entropy on response tokens, AdamW
with warmup and cosine decay, bf16 autocast on GPU. Acceptance length tau is measured with the real decode loop on
the independent evaluation set (prompts written apart from the training prompts; --eval-prompts heldout for the old,
in-distribution held-out split). Under `torchrun --nproc_per_node=N` the same command trains data-parallel (DDP); with
`--shard-target` the frozen target's decoder layers are also sharded over the N processes (FSDP), for targets that do
not fit on one GPU.

Writes OUTPUT/drafter/ (config.json + model.safetensors in the released layout), OUTPUT/metrics.json (per-category
tau on the evaluation prompts, their source, history) and OUTPUT/curves.png.

Example:

    dflash-hf train --target smollm2 --data runs/smollm2/data.jsonl --output runs/smollm2 --num-layers 4 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from dflash_hf.cli_args import dtype as cli_dtype
from dflash_hf.cli_args import non_negative_float, positive_float, positive_int, seed
from dflash_hf.commands.make_data import add_target_arguments


def layer_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices, e.g. 1,14,27") from None
    if not ids:
        raise argparse.ArgumentTypeError("the list of target layer ids is empty")
    return ids


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a DFlash drafter on data from make-data (DDP under torchrun)",
        description="\n\n".join(__doc__.split("\n\n")[:3]),
        epilog="\n\n".join(__doc__.split("\n\n")[3:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL written by `dflash-hf make-data`")
    parser.add_argument("--output", required=True, help="output folder (drafter/, metrics.json, curves.png)")
    parser.add_argument("--shard-target", action="store_true",
                        help="under torchrun (>= 2 processes): shard the frozen target's decoder layers over the "
                             "processes (FSDP2) instead of a whole copy per process; for targets that do not fit "
                             "on one GPU")
    drafter = parser.add_argument_group("drafter")
    drafter.add_argument("--init-from", help="continue from this drafter folder instead of a new drafter")
    drafter.add_argument("--num-layers", type=positive_int, default=4, help="drafter layers (default 4)")
    drafter.add_argument("--block-size", type=positive_int, default=16, help="block size B (default 16)")
    drafter.add_argument("--target-layer-ids", type=layer_ids, default=None,
                         help="comma-separated target layers read as context (default: the spread rule)")
    drafter.add_argument("--num-context-layers", type=positive_int, default=5,
                         help="number of target layers for the spread rule (default 5)")
    drafter.add_argument("--mask-token-id", type=int, default=None,
                         help="mask embedding id (default: a rarely produced special token of the tokenizer)")
    drafter.add_argument("--intermediate-size", type=positive_int, default=None,
                         help="drafter MLP width (default: the target's)")
    drafter.add_argument("--drafter-seed", type=seed, default=0, help="initialisation seed of a new drafter")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=6, help="passes over the data (default 6)")
    optim.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps")
    optim.add_argument("--time-budget-minutes", type=positive_float, default=None,
                       help="minutes of optimisation (evaluations excluded): the run is re-planned to fit after its "
                            "first 30 steps, so warmup and cosine decay complete, and stops at the budget regardless")
    optim.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step and process (default 8)")
    optim.add_argument("--num-anchors", type=positive_int, default=512,
                       help="blocks per sequence, re-drawn each epoch (default 512, capped by the response length)")
    optim.add_argument("--lr", type=non_negative_float, default=6e-4, help="peak learning rate (default 6e-4)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay")
    optim.add_argument("--warmup-ratio", type=non_negative_float, default=0.04, help="warmup share of the steps")
    optim.add_argument("--min-lr-ratio", type=non_negative_float, default=0.0, help="cosine floor as a share of --lr")
    optim.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="gradient norm clip (default 1.0)")
    optim.add_argument("--gamma", type=non_negative_float, default=None,
                       help="loss decay over block rows (default 7 for B=16, 4 for B=8)")
    optim.add_argument("--max-length", type=positive_int, default=2048, help="truncate sequences (default 2048)")
    optim.add_argument("--seed", type=int, default=0, help="data order and anchor seed")
    optim.add_argument("--no-autocast", action="store_true", help="no bf16 autocast on GPU")
    optim.add_argument("--compile", action="store_true",
                       help="torch.compile the training step (1.8x faster steps on an H200 after ~40 s of compilation)")
    evaluation = parser.add_argument_group("evaluation (prompts never trained on, real decode loop)")
    evaluation.add_argument("--eval-prompts", default="independent", choices=("independent", "heldout"),
                            help="independent (default): the evaluation set written apart from the training prompts; "
                                 "heldout: the held-out split of the training templates and sources, whose tau is "
                                 "in-distribution and labelled so")
    evaluation.add_argument("--eval-per-category", type=int, default=8,
                            help="evaluation prompts per category (default 8; 0 = no evaluation)")
    evaluation.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = start and end)")
    evaluation.add_argument("--eval-max-new-tokens", type=positive_int, default=128, help="tokens per eval prompt")
    evaluation.add_argument("--eval-backend", default="auto", choices=("auto", "hf", "dflash"),
                            help="auto: dflash_hf.generate (batched) when present, else target.generate")
    evaluation.add_argument("--eval-batch-size", type=positive_int, default=16, help="rows per batched eval call")
    evaluation.add_argument("--eval-seed", type=int, default=0,
                            help="prompt selection seed of --eval-prompts heldout (the independent set is fixed)")
    evaluation.add_argument("--humaneval", default="auto", choices=("auto", "yes", "no"),
                            help="HumanEval prompts among the code evaluation prompts (auto = if installed)")
    evaluation.add_argument("--no-chat-template", action="store_true", help="raw eval prompts (base models)")
    evaluation.add_argument("--system-prompt", default=None, help="system message before each eval prompt")
    output = parser.add_argument_group("output")
    output.add_argument("--save-every", type=positive_int, default=None, help="checkpoint every N steps")
    output.add_argument("--save-dtype", type=cli_dtype, default="bf16", choices=("bf16", "fp32"),
                        help="dtype of saved weights: bf16 (default, as released drafters) or fp32")
    output.add_argument("--log-every", type=positive_int, default=10, help="history granularity in steps")
    output.add_argument("--no-plot", action="store_true", help="skip curves.png")
    output.add_argument("--no-progress", action="store_true",
                        help="no progress bar (none is drawn when stderr is not a terminal)")
    parser.set_defaults(func=run)


def check_arguments(args) -> None:
    """Fail before loading anything heavy."""
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data!r} does not exist; create it with `dflash-hf make-data`.")
    if args.block_size < 2:
        raise ValueError(f"--block-size {args.block_size} must be >= 2 (the anchor and at least one draft).")
    if args.eval_per_category < 0 or args.eval_every < 0:
        raise ValueError("--eval-per-category and --eval-every must be >= 0.")
    if args.warmup_ratio >= 1 or args.min_lr_ratio > 1:
        raise ValueError(f"--warmup-ratio {args.warmup_ratio} must be < 1 and --min-lr-ratio {args.min_lr_ratio} <= 1.")
    if args.shard_target:
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ValueError(
                "--shard-target splits the target over the processes of a torchrun job and needs at least 2 of them; "
                "run `torchrun --nproc_per_node=N -m dflash_hf train ... --shard-target` with N >= 2, or drop the "
                "option."
            )
    if args.init_from and not (Path(args.init_from) / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {args.init_from!r} is not a drafter folder with config.json.")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {args.output!r} exists and is not a folder.")


def eval_prompts(args, tokenizer) -> tuple[list[dict], str | None]:
    """(tokenized evaluation prompts, the label of their source for the report)."""
    from dflash_hf import prompts as builtin
    from dflash_hf.training.data import encode_prompt

    if args.eval_per_category == 0:
        return [], None
    humaneval = {"auto": None, "yes": True, "no": False}[args.humaneval]
    if args.eval_prompts == "heldout":
        prompts = builtin.build_prompts(args.eval_per_category, split="heldout", seed=args.eval_seed,
                                        include_humaneval=humaneval)
        source = builtin.HELDOUT_SOURCE
    else:
        prompts = builtin.eval_prompts(args.eval_per_category, include_humaneval=humaneval)
        source = builtin.EVAL_SOURCE
    return [
        {"category": p["category"], "prompt": p["prompt"],
         "input_ids": encode_prompt(tokenizer, p["prompt"], use_chat_template=not args.no_chat_template,
                                    system_prompt=args.system_prompt)}
        for p in prompts
    ], source


def run(args) -> int:
    check_arguments(args)
    import torch
    import torch.distributed

    from dflash_hf.modeling.modeling_dflash import DFlashDraftModel
    from dflash_hf.stops import target_stop_ids
    from dflash_hf.training.data import pad_token_id
    from dflash_hf.training.loading import (
        load_target, resolve_device, resolve_dtype, setup_distributed, shard_target, teardown_distributed,
    )
    from dflash_hf.training.recipe import count_parameters, new_drafter_config, train_drafter

    rank, world = setup_distributed()
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        started = time.perf_counter()
        # Rank 0 loads first, so a one-time conversion (smollm2) runs once, not once per process.
        if world > 1 and rank != 0:
            torch.distributed.barrier()
        # A target to be sharded is loaded on the CPU: its layers reach the GPU one shard at a time.
        target, tokenizer = load_target(args.target, dtype, torch.device("cpu") if args.shard_target else device)
        if world > 1 and rank == 0:
            torch.distributed.barrier()
        if args.shard_target:
            target = shard_target(target, device)
        load_seconds = time.perf_counter() - started
        if args.init_from:
            drafter = DFlashDraftModel.from_pretrained(args.init_from, dtype=torch.float32)
        else:
            config = new_drafter_config(
                target, num_layers=args.num_layers, block_size=args.block_size,
                target_layer_ids=args.target_layer_ids, mask_token_id=args.mask_token_id, tokenizer=tokenizer,
                num_context_layers=args.num_context_layers, intermediate_size=args.intermediate_size,
            )
            torch.manual_seed(args.drafter_seed)
            drafter = DFlashDraftModel(config)
        params = count_parameters(drafter.config)
        if rank == 0:
            print(f"[train] target {args.target} loaded in {load_seconds:.1f} s on {device} ({dtype}); drafter "
                  f"{drafter.config.num_hidden_layers} layers, {params:,} parameters ({params * 2 / 1e6:.1f} MB in "
                  f"bf16), target layers {drafter.config.target_layer_ids}, mask id {drafter.config.mask_token_id}, "
                  f"{world} process(es)", file=sys.stderr)
        # A sharded target needs every process in each of its forwards, so then every process evaluates.
        eval_set, eval_source = eval_prompts(args, tokenizer) if rank == 0 or args.shard_target else ([], None)
        run_info = {
            "argv": sys.argv, "target": args.target, "data": str(args.data), "load_seconds": load_seconds,
            "device": str(device), "dtype": str(dtype), "world_size": world, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "drafter_parameters": params, "eval_prompts": len(eval_set), "eval_source": eval_source,
            "shard_target": args.shard_target,
        }
        result = train_drafter(
            target, drafter, args.data,
            epochs=args.epochs, max_steps=args.max_steps,
            time_budget=args.time_budget_minutes * 60 if args.time_budget_minutes else None,
            batch_size=args.batch_size, num_anchors=args.num_anchors,
            lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio,
            grad_clip=args.grad_clip, gamma=args.gamma, max_length=args.max_length, seed=args.seed,
            autocast=False if args.no_autocast else None, compile=args.compile, eval_set=eval_set,
            eval_source=eval_source,
            eval_every=args.eval_every or None,
            eval_max_new_tokens=args.eval_max_new_tokens, eval_backend=args.eval_backend,
            eval_batch_size=args.eval_batch_size, stop_token_ids=target_stop_ids(target, tokenizer),
            pad_token_id=pad_token_id(target, tokenizer), output_dir=args.output, save_every=args.save_every,
            save_dtype=torch.bfloat16 if args.save_dtype == "bf16" else torch.float32, log_every=args.log_every,
            plot=not args.no_plot, progress=not args.no_progress and sys.stderr.isatty(), run_info=run_info,
        )
        if rank == 0:
            summary = {
                "drafter": str(Path(args.output) / "drafter"),
                "metrics": str(Path(args.output) / "metrics.json"),
                "steps": result.steps,
                "train_seconds": round(result.seconds, 2),
                "stopped_by_time_budget": bool(result.extra.get("stopped_by_time_budget", False)),
                "eval_seconds": round(result.eval_seconds, 2),
                "final_tau": result.final_eval["tau"] if result.final_eval else None,
                "final_tau_per_category": result.final_eval["per_category"] if result.final_eval else None,
                "untrained_tau": result.evals[0]["tau"] if result.evals else None,
                "eval_source": eval_source,
            }
            print(json.dumps(summary, indent=2))
    finally:
        teardown_distributed()
    return 0
