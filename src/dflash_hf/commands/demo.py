"""`dflash-hf demo`: the embedded SmolLM2 target with the bundled drafter, plain greedy vs DFlash, side by side.

Runs each chat prompt twice, once with the target's own greedy `generate` and once with DFlash, checks that the two
outputs are token-identical (exit 1 if not), and prints the acceptance length (tau), tokens/s and speedup.

Shared helpers for the `generate` and `chat` commands live here too (they import them).
"""

from __future__ import annotations

import argparse
import sys
import time

from dflash_hf.cli_args import add_device_argument, add_dtype_argument, positive_int, resolve_device_dtype

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that reverses a string.",
    "List three tips for staying focused while studying.",
)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers shared by demo, generate and chat
# ----------------------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2",
                        help="'smollm2' (the embedded SmolLM2-135M-Instruct, default) or a local model folder")
    parser.add_argument("--drafter", default="bundled",
                        help="'bundled' (the SmolLM2 drafter shipped with dflash-hf, default) or a local drafter "
                             "folder (an export of ours or a z-lab release)")
    add_device_argument(parser)
    add_dtype_argument(parser, default="fp32",
                       help="weights dtype (default fp32: exact on CPU; bf16 can flip near-ties vs greedy; auto = bf16 "
                            "on cuda, else fp32)")


def resolve_device(name: str | None) -> str:
    """The concrete device of a parsed `--device` (auto, or None as before auto existed: cuda when torch sees a GPU,
    else cpu); `dflash-hf serve` uses it too."""
    return resolve_device_dtype(name or "auto", "fp32")[0]


def load_pair(args, *, quiet: bool = False):
    """`(target, tokenizer, drafter, trained)` from `--target/--drafter/--device/--dtype`."""
    from dflash_hf.assets import resolve_drafter, resolve_target

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.drafter == "bundled" and args.target.lower() not in ("smollm2", "default"):
        raise ValueError(
            f"--drafter bundled is the SmolLM2-135M-Instruct drafter and cannot draft for --target {args.target}; "
            "pass --drafter FOLDER with a drafter made for that target."
        )
    target, tokenizer = resolve_target(args.target, dtype=dtype, device=device)
    drafter, trained = resolve_drafter(args.drafter, dtype=dtype, device=device, tokenizer=tokenizer)
    if not trained and not quiet:
        print(untrained_notice(), file=sys.stderr)
    return target, tokenizer, drafter, trained


def untrained_notice() -> str:
    return ("NOTE: no trained SmolLM2 drafter is bundled with this install yet, so an UNTRAINED drafter (random "
            "weights) is used: outputs stay exact, but expect tau near 1 and no speedup.")


def encode(tokenizer, text_or_messages, chat: bool, device):
    """`[1, prompt]` input ids: the chat template applied to a message list / user text, or the raw text."""
    import torch

    if chat:
        messages = text_or_messages
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("This tokenizer has no chat template; drop --chat to use the raw prompt.")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):  # transformers 5.x returns a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text_or_messages, return_tensors="pt")["input_ids"]
    return ids.to(device)


def stats_line(n_tokens: int, seconds: float, tau: float | None = None) -> str:
    rate = n_tokens / seconds if seconds > 0 else float("nan")
    text = f"{n_tokens} tokens in {seconds:.2f} s ({rate:.1f} tok/s)"
    return text if tau is None else f"{text}, tau {tau:.2f}"


# ----------------------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="SmolLM2-135M-Instruct with the bundled drafter: plain greedy vs DFlash, identical text, tau, speedup",
        description=__doc__.split("\n\n")[0],
    )
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--prompts", nargs="+", metavar="PROMPT", default=None,
                        help="user messages to run (chat template applied); default: three built-in prompts")
    parser.add_argument("--route", choices=("batched", "assisted"), default="batched",
                        help="DFlash path: 'batched' = dflash_hf.generate (fast loop, default); 'assisted' = "
                             "target.generate(assistant_model=drafter)")
    parser.set_defaults(func=run)


def _greedy(target, ids, max_new_tokens, stops):
    import torch

    out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=stops or None, pad_token_id=stops[0] if stops else None)
    return out[0, ids.shape[1]:].tolist()


def _dflash(route, target, drafter, ids, max_new_tokens, stops, decoder=None):
    """New token ids and the acceptance lengths of one DFlash run (`decoder`: a reusable `DFlashDecoder`)."""
    import torch

    if route == "batched":
        out = decoder.generate(ids, max_new_tokens=max_new_tokens, stop_token_ids=stops or None)
        return out.new_tokens[0], out.acceptance_lengths[0]
    out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=drafter, do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                          pad_token_id=stops[0] if stops else None)
    return out[0, ids.shape[1]:].tolist(), list(drafter.last_stats.acceptance_lengths)


def run(args) -> int:
    import torch

    from dflash_hf.stops import target_stop_ids

    target, tokenizer, drafter, trained = load_pair(args, quiet=True)
    device, dtype = next(target.parameters()).device, next(target.parameters()).dtype
    stops = target_stop_ids(target, tokenizer)
    prompts = args.prompts or list(DEFAULT_PROMPTS)
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompts got an empty prompt; every prompt needs some text.")
    name = "SmolLM2-135M-Instruct" if args.target.lower() in ("smollm2", "default") else args.target
    if not trained:
        kind = "UNTRAINED (random weights)"
    elif args.drafter.lower() == "bundled":
        kind = "bundled (trained)"
    else:
        kind = f"from {args.drafter}"
    print(f"dflash-hf demo: target {name} on {device} ({str(dtype).removeprefix('torch.')}); drafter {kind}, block "
          f"{drafter.config.block_size}, reads target layers {drafter.config.target_layer_ids}; "
          f"route {args.route}; {args.max_new_tokens} new tokens per prompt")
    if not trained:
        print(untrained_notice())

    encoded = [encode(tokenizer, prompt, True, device) for prompt in prompts]
    # One decoder for every prompt: its static caches (and, on GPU, CUDA graphs and compiled steps) are built once.
    decoder = None
    if args.route == "batched":
        import dflash_hf

        longest = max(ids.shape[1] for ids in encoded)
        decoder = dflash_hf.DFlashDecoder(target, drafter, max_length=longest + args.max_new_tokens)
    # Warm both paths once so the timings below do not include first-call setup (the batched route also measures
    # its step costs there, from which it picks how many drafted tokens each step verifies).
    _greedy(target, encoded[0], 4, stops)
    _dflash(args.route, target, drafter, encoded[0], min(12, args.max_new_tokens), stops, decoder)

    all_same, total_plain, total_dflash, tokens_plain, tokens_dflash, acceptance = True, 0.0, 0.0, 0, 0, []
    with torch.no_grad():
        for i, (prompt, ids) in enumerate(zip(prompts, encoded), 1):
            start = time.perf_counter()
            plain = _greedy(target, ids, args.max_new_tokens, stops)
            t_plain = time.perf_counter() - start
            start = time.perf_counter()
            fast, accepted = _dflash(args.route, target, drafter, ids, args.max_new_tokens, stops, decoder)
            t_fast = time.perf_counter() - start
            same = plain == fast
            all_same &= same
            total_plain += t_plain
            total_dflash += t_fast
            tokens_plain += len(plain)
            tokens_dflash += len(fast)
            acceptance += accepted
            tau = sum(accepted) / max(len(accepted), 1)
            print(f"\n[{i}/{len(prompts)}] {prompt}")
            print(f"  greedy : {stats_line(len(plain), t_plain)}")
            print(f"  DFlash : {stats_line(len(fast), t_fast, tau)}, speedup {t_plain / t_fast:.2f}x")
            if same:
                print("  identical to greedy: yes")
            else:
                at = next((k for k, (a, b) in enumerate(zip(plain, fast)) if a != b), min(len(plain), len(fast)))
                print(f"  identical to greedy: NO, first difference at new token {at}")
                print(f"  DFlash text: {tokenizer.decode(fast, skip_special_tokens=True)!r}")
            print(f"  text   : {tokenizer.decode(plain, skip_special_tokens=True)!r}")

    tau = sum(acceptance) / max(len(acceptance), 1)
    rate_plain = tokens_plain / total_plain if total_plain else float("nan")
    rate_fast = tokens_dflash / total_dflash if total_dflash else float("nan")
    plural = "s" if len(prompts) != 1 else ""
    verdict = "yes" if all_same else "NO"
    print(f"\nSummary: {len(prompts)} prompt{plural}; outputs identical to plain greedy: {verdict}; "
          f"mean tau {tau:.2f}; greedy {rate_plain:.1f} tok/s, DFlash {rate_fast:.1f} tok/s, "
          f"speedup {total_plain / total_dflash:.2f}x")
    if not trained:
        print("The drafter is UNTRAINED, so this run checks exactness, not speed: a trained drafter accepts several "
              "tokens per step (tau > 1), which is where the speedup comes from.")
    if not all_same:
        print("ERROR: DFlash output differs from plain greedy decoding.", file=sys.stderr)
        return 1
    return 0
