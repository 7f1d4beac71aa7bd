"""`dflash-hf bench`: AR, HF speculative routes and the DFlash loop side by side on the same prompts.

The work lives in `dflash_hf.bench` (imported on use, so `dflash-hf --help` stays fast).
"""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Benchmark, in one process on the same prompts and the same number of new tokens (EOS ignored by every method):
HF greedy AR (eager DynamicCache, and static cache which transformers compiles on CUDA), transformers' native DFlash
route, our generate integration, our batched DFlashDecoder loop (eager, CUDA graphs, graphs + torch.compile),
classic assisted generation with a truncated-target assistant, and prompt-lookup decoding; plus the bare graphed
forwards (the cost floor of one DFlash step). Reports tokens/s, speedups, tau, ms per step (draft / verify / overhead), peak GPU memory, weight
bandwidth and a lossless check against AR; writes <results-dir>/<out>.json, .md and .png.

example (GPU):  dflash-hf bench --target smollm2 --drafter bundled --batch-sizes 1,8 --max-new-tokens 256 --out smollm2_h200
example (CPU):  dflash-hf bench --target ./tiny --drafter random:2 --device cpu --dtype fp32 --max-new-tokens 16 --repeats 1
"""


def _run(args: argparse.Namespace) -> int:
    from dflash_hf import bench

    return bench.main(args)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark AR, HF speculative routes and the DFlash loop side by side",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from dflash_hf.bench import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=_run)
