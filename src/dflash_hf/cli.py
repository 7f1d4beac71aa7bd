"""`dflash-hf` command line: one subcommand per module in `dflash_hf.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func` to a callable taking the
parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from dflash_hf import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash-hf",
        description="DFlash block-diffusion speculative decoding for Hugging Face transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"dflash_hf.commands.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"dflash-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
