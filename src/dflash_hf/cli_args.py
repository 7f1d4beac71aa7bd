"""argparse value types shared by the `dflash-hf` subcommands, and the value rules that `dflash-hf serve` applies to
the same request fields (one copy of each rule)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only where a value is resolved, never while a parser is built
    import torch

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


def _checked(text: str, convert, noun: str, problem_of):
    value = _convert(text, convert, noun)
    problem = problem_of(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def seed(text: str) -> int:
    """A `--seed` that torch accepts (checked here, not later as torch's bare "Overflow")."""
    return _checked(text, int, "an integer", seed_problem)


def temperature(text: str) -> float:
    """A sampling `--temperature`: finite and >= 0, 0 = greedy."""
    return _checked(text, float, "a number", temperature_problem)


# ----------------------------------------------------------------------------------------------------------------------
# --dtype / --device: one vocabulary for every subcommand
# ----------------------------------------------------------------------------------------------------------------------

DTYPES = ("auto", "bf16", "fp16", "fp32")
# The long spellings (torch's own names) are accepted and normalised to the short ones.
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TORCH_DTYPE_NAMES = {short: long for long, short in DTYPE_ALIASES.items()}
DEVICE_METAVAR = "{auto,cpu,cuda,cuda:N}"


def _not_a_dtype(text: str, words: tuple[str, ...]) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(
        f"{text!r} is not a dtype; use one of {', '.join(words)} (or bfloat16, float16, float32)")


def dtype(text: str) -> str:
    """A `--dtype`: auto, bf16, fp16 or fp32 (bfloat16, float16, float32 accepted), returned in the short spelling."""
    value = text.strip().lower()
    value = DTYPE_ALIASES.get(value, value)
    if value not in DTYPES:
        raise _not_a_dtype(text, DTYPES)
    return value


def device(text: str) -> str:
    """A `--device`: auto, cpu, cuda or cuda:N (N the GPU index), returned lower-case."""
    value = text.strip().lower()
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)")


def add_dtype_argument(parser, *, default: str, help: str, extra: tuple[str, ...] = ()) -> None:
    """`--dtype` in the shared vocabulary; `extra` adds a command's own words (export's `keep`)."""
    words = DTYPES + extra

    def parse(text: str) -> str:
        word = text.strip().lower()
        if word in extra:
            return word
        try:
            return dtype(text)
        except argparse.ArgumentTypeError:
            raise _not_a_dtype(text, words) from None  # the message names this command's extra words too

    parser.add_argument("--dtype", type=parse, default=default, metavar="{" + ",".join(words) + "}", help=help)


def add_device_argument(parser, *, help: str = "auto (default: cuda when torch sees a GPU, else cpu), cpu, cuda, "
                                               "cuda:N") -> None:
    parser.add_argument("--device", type=device, default="auto", metavar=DEVICE_METAVAR, help=help)


def resolve_device_dtype(device_word: str, dtype_word: str) -> tuple[str, torch.dtype]:
    """The concrete device and torch dtype of a `--device` / `--dtype` word: device auto = cuda when torch sees a
    GPU, else cpu; dtype auto = bf16 on cuda (its speed and memory), fp32 elsewhere (bf16 matmuls are slow on CPU).
    Words that did not come through argparse (bench's options, for one) are checked here by the same rules."""
    import torch

    try:
        device_word, dtype_word = device(device_word), dtype(dtype_word)
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None
    if device_word == "auto":
        device_word = "cuda" if torch.cuda.is_available() else "cpu"
    elif device_word.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device_word} was requested but torch sees no CUDA GPU; use --device cpu (or "
                         "auto).")
    if dtype_word == "auto":
        dtype_word = "bf16" if device_word.startswith("cuda") else "fp32"
    return device_word, getattr(torch, TORCH_DTYPE_NAMES[dtype_word])


def package_version() -> str:
    """The installed dflash-hf version; from a source checkout that is not installed, pyproject.toml's."""
    from importlib import metadata

    try:
        return metadata.version("dflash-hf")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        text = ""
    # The version line of the [project] table (up to the next table header); tomllib is not in Python 3.10.
    table = re.search(r"^\[project\]$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    match = table and re.search(r'^version\s*=\s*"([^"]+)"', table.group(1), re.M)
    return match.group(1) if match else "unknown (not installed, no pyproject.toml)"


class RuntimeFailure(Exception):
    """A failure of the world rather than of the input (the network, the Hub); `dflash-hf` prints it on one line and
    exits 1, where bad input exits 2."""
