"""`dflash-hf generate`: one prompt through DFlash speculative decoding, streamed to stdout as it is accepted.

The text goes to stdout; the statistics (tokens, tau, tokens/s) and notices go to stderr, so
`dflash-hf generate --prompt ... > out.txt` captures only the generated text.
"""

from __future__ import annotations

import sys

from dflash_hf.cli_args import positive_int, seed, temperature
from dflash_hf.commands.demo import add_model_arguments, encode, load_pair


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate from one prompt with DFlash, streaming the text",
        description=__doc__.split("\n\n")[0],
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text (a user message with --chat)")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="default 256")
    parser.add_argument("--temperature", type=temperature, default=0.0,
                        help="0 = greedy (default, identical to the target's greedy output); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (with --temperature)")
    parser.add_argument("--seed", type=seed, default=None, help="random seed for sampling")
    parser.set_defaults(func=run)


def check_sampling_args(args) -> None:
    """Reject bad sampling settings before any model is loaded."""
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}.")


class Session:
    """One target/drafter pair with a reusable `DFlashDecoder` (its static caches, and on GPU its CUDA graphs and
    compiled steps, survive between calls; it is rebuilt larger only when a conversation outgrows it)."""

    def __init__(self, target, tokenizer, drafter):
        from dflash_hf.stops import target_stop_ids

        self.target, self.tokenizer, self.drafter = target, tokenizer, drafter
        self.decoder = None
        self.stops = target_stop_ids(target, tokenizer)

    def generate(self, ids, args, *, stream: bool = True):
        """Decode `[1, prompt]` ids, printing text as it is committed; returns the loop's output."""
        import torch
        from transformers import TextStreamer

        import dflash_hf

        check_sampling_args(args)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        needed = ids.shape[1] + args.max_new_tokens
        if self.decoder is None or self.decoder.max_length < needed:
            self.decoder = dflash_hf.DFlashDecoder(self.target, self.drafter, max_length=max(needed, 2048))
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        return self.decoder.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k, top_p=args.top_p,
            stop_token_ids=self.stops or None, streamer=streamer,
        )


def report(out) -> str:
    n = len(out.new_tokens[0])
    return (f"[dflash] {n} tokens in {out.time_total:.2f} s ({out.tokens_per_second:.1f} tok/s), "
            f"tau {out.mean_acceptance_length:.2f} over {len(out.acceptance_lengths[0])} verify steps")


def run(args) -> int:
    if not args.prompt.strip():
        raise ValueError("--prompt is empty; pass some text.")
    check_sampling_args(args)
    target, tokenizer, drafter, _ = load_pair(args)
    ids = encode(tokenizer, args.prompt, args.chat, next(target.parameters()).device)
    out = Session(target, tokenizer, drafter).generate(ids, args)
    sys.stdout.flush()
    print(report(out), file=sys.stderr)
    return 0
