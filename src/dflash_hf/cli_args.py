"""argparse value types shared by the `dflash-hf` subcommands, and the value rules that `dflash-hf serve` applies to
the same request fields (one copy of each rule)."""

from __future__ import annotations

import argparse
import math

# What torch.manual_seed and torch.Generator.manual_seed accept (a negative seed wraps modulo 2**64).
SEED_RANGE = (-(2**63), 2**64 - 1)


def seed_problem(value: int) -> str | None:
    """Why `value` cannot seed torch's random generators, or None if it can."""
    low, high = SEED_RANGE
    if not low <= value <= high:
        return f"must be an integer in [{low}, {high}] (the range torch.manual_seed accepts), got {value}"
    return None


def temperature_problem(value: float) -> str | None:
    """Why `value` is not a sampling temperature, or None if it is (0 means greedy)."""
    if not math.isfinite(value) or value < 0:
        return f"must be a finite number >= 0 (0 = greedy), got {value}"
    return None


def _convert(text: str, convert, noun: str):
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None


def _bounded(text: str, convert, noun: str, minimum):
    value = _convert(text, convert, noun)
    # float("nan") < minimum is False, so NaN would pass the bound below; no option here means anything by NaN or inf.
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum}, got {value}")
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
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def seed(text: str) -> int:
    """A `--seed` that torch accepts (checked here, not later as torch's bare "Overflow")."""
    value = _convert(text, int, "an integer")
    problem = seed_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def temperature(text: str) -> float:
    """A sampling `--temperature`: finite and >= 0, 0 = greedy."""
    value = _convert(text, float, "a number")
    problem = temperature_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


class RuntimeFailure(Exception):
    """A failure of the world rather than of the input (the network, the Hub); `dflash-hf` prints it on one line and
    exits 1, where bad input exits 2."""
