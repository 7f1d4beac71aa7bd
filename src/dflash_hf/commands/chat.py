"""`dflash-hf chat`: an interactive chat with DFlash speculative decoding, streamed, with the chat template.

Type a message and press Enter. `/reset` forgets the conversation, `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys

from dflash_hf.cli_args import positive_int, seed, temperature
from dflash_hf.commands.demo import add_model_arguments, encode, load_pair
from dflash_hf.commands.generate import Session, check_sampling_args, report


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="interactive chat with DFlash (streaming, chat template, /exit to quit)",
        description=__doc__.split("\n\n")[0],
    )
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="per reply (default 256)")
    parser.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (with --temperature)")
    parser.add_argument("--seed", type=seed, default=None, help="random seed for sampling")
    parser.add_argument("--stats", action="store_true", help="print tokens/s and tau after each reply (stderr)")
    parser.set_defaults(func=run)


def run(args) -> int:
    check_sampling_args(args)
    target, tokenizer, drafter, _ = load_pair(args)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"The tokenizer of --target {args.target} has no chat template; use `dflash-hf generate`.")
    device = next(target.parameters()).device
    session = Session(target, tokenizer, drafter)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    print("Chat with DFlash. /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        ids = encode(tokenizer, messages, True, device)
        out = session.generate(ids, args)
        reply = tokenizer.decode(out.new_tokens[0], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        sys.stdout.flush()
        if args.stats:
            print(report(out), file=sys.stderr)
    return 0
