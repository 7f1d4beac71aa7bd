"""Subcommands of `dflash-hf`; each module defines `register(subparsers)`."""
