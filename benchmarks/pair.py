"""The target + drafter pair the stand-alone benchmark scripts run on: shared command-line options and loading."""

from __future__ import annotations

import argparse

from dflash_hf.bench import load_drafter
from dflash_hf.training.loading import load_target, resolve_device, resolve_dtype


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2", help="'smollm2' (embedded) or a local model folder")
    parser.add_argument("--drafter", default="bundled", help="a drafter folder, 'bundled' or 'random:N' (untrained)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default="benchmarks/results", help="folder for <name>.json / .md")


def load_pair(args: argparse.Namespace):
    """`(target, tokenizer, drafter, description, device, dtype)` from the options above."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    target, tokenizer = load_target(args.target, dtype, device)
    drafter, _, description = load_drafter(args.drafter, target, tokenizer)
    return target, tokenizer, drafter, description, device, dtype
