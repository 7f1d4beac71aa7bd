"""`dflash-hf bench`: AR, HF speculative routes and the DFlash loop side by side on the same prompts.

The work lives in `dflash_hf.bench`, imported when the command runs; the options are defined here, without torch, so
`dflash-hf bench --help` answers at once.
"""

from __future__ import annotations

import argparse

from dflash_hf import cli_args

DESCRIPTION = """\
Benchmark, in one process on the same prompts and the same number of new tokens (EOS ignored by every method):
HF greedy AR (eager DynamicCache, and static cache which transformers compiles on CUDA), transformers' native DFlash
route, our generate integration, our batched DFlashDecoder loop (eager, CUDA graphs, graphs + torch.compile),
classic assisted generation with a truncated-target assistant, and prompt-lookup decoding; plus the bare graphed
forwards (the cost floor of one DFlash step). Reports tokens/s, speedups, tau, ms per step (draft / verify / overhead), peak GPU memory, weight
bandwidth and a lossless check against AR; writes <results-dir>/<out>.json, .md and .png.

example (GPU):  dflash-hf bench --target smollm2 --drafter bundled --batch-sizes 1,8 --max-new-tokens 256 --out smollm2_h200
example (CPU):  dflash-hf bench --target smollm2 --drafter bundled --device cpu --dtype fp32 --batch-sizes 1 \\
                    --methods ar_eager,dflash_loop_eager --max-new-tokens 16 --repeats 1 --out smollm2_cpu
"""

# dflash_hf.bench.METHOD_ORDER, written out so that building the parser does not import torch (a test keeps the two
# equal).
METHOD_NAMES = ("ar_eager", "ar_static", "dflash_loop_compiled", "dflash_loop_graphs", "ar_loop", "bare",
                "dflash_loop_eager", "dflash_loop_full", "dflash_generate", "dflash_generate_compiled", "hf_dflash",
                "assisted_truncated", "prompt_lookup")


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
    add_arguments(parser)
    parser.set_defaults(func=_run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dflash-hf bench` (read by `dflash_hf.bench.options_from_args`)."""
    parser.add_argument("--target", default="smollm2", help="'smollm2' (embedded default) or a local model folder")
    parser.add_argument("--drafter", default="bundled",
                        help="a drafter folder, 'bundled' (the shipped SmolLM2 drafter) or 'random:N' (untrained)")
    cli_args.add_dtype_argument(parser, default="auto", help="weights dtype (default auto: bf16 on CUDA, fp32 on CPU)")
    cli_args.add_device_argument(parser)
    parser.add_argument("--batch-sizes", default="1,8",
                        help="comma list for the batched methods (ar_eager, ar_static, dflash_loop_*, bare)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method (best and median kept)")
    parser.add_argument("--warmup-tokens", type=int, default=16,
                        help="length of the warm-up call of eager methods (static and graphed ones warm up full length)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help=f"comma subset of: {', '.join(METHOD_NAMES)} (ar_eager b=1 always runs: the reference)")
    parser.add_argument("--prompts", default="1", help="N per category, or e.g. 'math:2,code:1,chat:1'")
    parser.add_argument("--prompt-set", default="independent", choices=("independent", "heldout"),
                        help="the project's prompts: the independent evaluation set (default; written apart from the "
                             "training generator) or the generator's held-out split (in-distribution, labelled so)")
    parser.add_argument("--prompt-file", default=None,
                        help="JSON list of prompts ({category, prompt} objects or strings) instead of the project's, "
                             "e.g. benchmarks/prompts/everyday.json; --prompts then counts per category of the file")
    parser.add_argument("--seed", type=cli_args.seed, default=0, help="sampling seed (default 0)")
    parser.add_argument("--block-size", type=int, default=16, help="block size of a random:N drafter")
    parser.add_argument("--assistant-layers", type=int, default=None,
                        help="layers of the truncated-target assistant (default: target layers // 6)")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--out", default=None, help="result name: writes <results-dir>/<out>.json/.md/.png")
    parser.add_argument("--results-dir", default="benchmarks/results",
                        help="folder for the results, relative to the current directory unless absolute (default "
                             "benchmarks/results; created if missing)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds; methods not started by then are skipped (results are written as they come)")
    parser.add_argument("--method-time-limit", type=float, default=0.0,
                        help="seconds of timed passes per method and batch size (warm-up excluded); stop "
                             "repeating after a full pass once exceeded")
    parser.add_argument("--no-chat-template", action="store_true", help="tokenize prompts as plain text")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="keep only the last N prompt tokens")
    parser.add_argument("--bare-iters", type=int, default=50)
    parser.add_argument("--bare-compile-batches", default="1",
                        help="batch sizes at which the bare floor is also measured compiled (CUDA, with "
                             "dflash_loop_compiled); '' for none. Each costs a compile of verify and draft")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="stop every row at the target's EOS token(s) instead of generating exactly "
                             "--max-new-tokens (default: EOS ignored, equal work for every method)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest for tiny models on a busy CPU)")
