"""argparse value types shared by the `dflash-hf` subcommands."""

from __future__ import annotations

import argparse


def _bounded(text: str, convert, noun: str, minimum):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _bounded(text, int, "an integer", 1)


def non_negative_int(text: str) -> int:
    return _bounded(text, int, "an integer", 0)


def non_negative_float(text: str) -> float:
    return _bounded(text, float, "a number", 0)


def positive_float(text: str) -> float:
    value = _bounded(text, float, "a number", 0)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value
