"""`dflash-hf` command line: one subcommand per module in `dflash_hf.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func` to a callable taking the
parsed namespace and returning an exit code. Command modules import torch and transformers inside `func`, never at
import time, so `dflash-hf --help` and every `dflash-hf COMMAND --help` answer without loading them.

Errors end in one line, `dflash-hf <command>: error: <what was wrong and the fix>`, never a traceback, with the exit
status saying whose move it is:

- 2: the input is wrong (an argument, a file or a folder the user passed): fix it and run again. Argument values are
  checked by argparse, which also exits 2.
- 1: the input was fine but the world failed at run time (`RuntimeFailure`: e.g. the Hub upload could not connect).

Progress: transformers' own bars ("Loading weights" and the like, one per model load, nested under a command's own
bar) are switched off here, for the commands; importing the library leaves them as the user set them.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from dflash_hf import commands
from dflash_hf.cli_args import RuntimeFailure, package_version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash-hf",
        description="DFlash block-diffusion speculative decoding for Hugging Face transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"dflash_hf.commands.{info.name}").register(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    # Some library messages span several lines; the CLI's contract is one line per error.
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _quiet_transformers_bars() -> None:
    """No transformers progress bars in the commands: they would nest under the commands' own bars, and a chat or a
    generate run does not need one per model load. huggingface_hub's download and upload bars stay as they were."""
    try:
        import huggingface_hub.utils as hub_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # the command reports a missing dependency itself
        return
    hub_off = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also switches the Hub's bars off
    if not hub_off:
        hub_utils.enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_transformers_bars()
    try:
        return int(args.func(args) or 0)
    except RuntimeFailure as error:
        print(f"dflash-hf {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    # OSError: a path the user passed that cannot be read or written (missing, a file where a folder belongs, no
    # permission), wherever it surfaces; the loaders turn their own into ValueErrors naming the option.
    except (ValueError, OSError) as error:
        print(f"dflash-hf {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
