"""One `--dtype` / `--device` vocabulary for every `dflash-hf` subcommand, help that answers without torch, and
`dflash-hf --version`."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

from dflash_hf import cli_args
from dflash_hf.cli import build_parser

COMMANDS = ("bench", "chat", "convert", "demo", "export", "generate", "make-data", "serve", "train")
WITH_DTYPE = {"bench", "chat", "demo", "export", "generate", "make-data", "serve", "train"}
WITH_DEVICE = WITH_DTYPE - {"export"}
# The required arguments of each command, so that one option can be parsed alone.
REQUIRED = {"generate": ["--prompt", "hi"], "make-data": ["--target", "smollm2", "--output", "d.jsonl"],
            "train": ["--target", "smollm2", "--data", "d.jsonl", "--output", "out"],
            "export": ["bundled", "--target", "smollm2", "--out", "out"], "convert": ["zlab", "--out", "out"]}
DTYPE_SPELLINGS = {"auto": "auto", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "bfloat16": "bf16",
                   "float16": "fp16", "float32": "fp32", "BF16": "bf16"}
DEVICE_SPELLINGS = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "cuda:0": "cuda:0", "cuda:3": "cuda:3",
                    "CUDA:1": "cuda:1"}
HEAVY = ("torch", "transformers", "numpy")
# Python start-up plus argparse takes ~0.2 s here; importing torch alone takes several seconds on the same machine.
HELP_SECONDS = 3.0


def python(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_the_command_list_is_the_one_these_tests_cover():
    assert tuple(sorted(subparsers())) == COMMANDS
    assert {name for name, p in subparsers().items() if option(p, "--dtype")} == WITH_DTYPE
    assert {name for name, p in subparsers().items() if option(p, "--device")} == WITH_DEVICE


def test_building_the_parser_imports_neither_torch_nor_transformers():
    code = ("import sys, dflash_hf.cli as c; c.build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_every_help_answers_without_torch_and_fast(command):
    argv = [command, "--help"] if command else ["--help"]
    code = ("import contextlib, io, sys\n"
            "from dflash_hf.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit as exit_:\n"
            "        assert exit_.code == 0, exit_.code\n"
            "assert out.getvalue().startswith('usage: dflash-hf'), out.getvalue()[:200]\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"`dflash-hf {command} --help` imported {result.stdout.strip()}"
    # And the console path itself, timed.
    start = time.perf_counter()
    result = python("-m", "dflash_hf", *argv)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert seconds < HELP_SECONDS, f"`dflash-hf {command} --help` took {seconds:.2f} s"


@pytest.mark.parametrize("command", sorted(WITH_DTYPE))
def test_dtype_accepts_every_spelling(command):
    parser = subparsers()[command]
    assert option(parser, "--dtype").metavar.startswith("{auto,bf16,fp16,fp32")
    for spelling, normalised in DTYPE_SPELLINGS.items():
        args = parser.parse_args([*REQUIRED.get(command, []), "--dtype", spelling])
        assert args.dtype == normalised, (command, spelling)


@pytest.mark.parametrize("command", sorted(WITH_DEVICE))
def test_device_accepts_every_spelling_and_defaults_to_auto(command):
    parser = subparsers()[command]
    assert option(parser, "--device").metavar == "{auto,cpu,cuda,cuda:N}"
    assert parser.parse_args(REQUIRED.get(command, [])).device == "auto"
    for spelling, normalised in DEVICE_SPELLINGS.items():
        args = parser.parse_args([*REQUIRED.get(command, []), "--device", spelling])
        assert args.device == normalised, (command, spelling)


BAD_VALUES = [
    ("--dtype", "int8", "argument --dtype: 'int8' is not a dtype; use one of auto, bf16, fp16, fp32"),
    ("--dtype", "half", "argument --dtype: 'half' is not a dtype; use one of auto, bf16, fp16, fp32"),
    ("--device", "tpu", "argument --device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ("--device", "cuda:x", "argument --device: 'cuda:x' is not a device; use auto, cpu, cuda or cuda:N"),
    ("--device", "gpu", "argument --device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize(("command", "flag", "bad", "message"), [
    (command, *bad) for command in sorted(WITH_DTYPE) for bad in BAD_VALUES
    if bad[0] == "--dtype" or command in WITH_DEVICE
])
def test_a_bad_value_is_an_argparse_error_naming_it_and_the_fix(command, flag, bad, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        subparsers()[command].parse_args([*REQUIRED.get(command, []), flag, bad])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_value_through_the_console_entry_point():
    result = python("-m", "dflash_hf", "bench", "--dtype", "float64")
    assert result.returncode == 2
    assert "dflash-hf bench: error: argument --dtype: 'float64' is not a dtype" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_keeps_its_own_word_keep():
    parser = subparsers()["export"]
    assert parser.parse_args([*REQUIRED["export"], "--dtype", "keep"]).dtype == "keep"
    assert parser.parse_args(REQUIRED["export"]).dtype == "bf16"


def test_train_save_dtype_speaks_the_same_words(capsys):
    parser = subparsers()["train"]
    for spelling, normalised in {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}.items():
        assert parser.parse_args([*REQUIRED["train"], "--save-dtype", spelling]).save_dtype == normalised
    with pytest.raises(SystemExit):
        parser.parse_args([*REQUIRED["train"], "--save-dtype", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_one_resolution_of_auto(monkeypatch):
    resolve = cli_args.resolve_device_dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve("auto", "auto") == ("cpu", torch.float32)
    assert resolve("cpu", "bf16") == ("cpu", torch.bfloat16)
    assert resolve("auto", "fp16") == ("cpu", torch.float16)
    with pytest.raises(ValueError, match=r"--device cuda:1 was requested but torch sees no CUDA GPU; use --device cpu"):
        resolve("cuda:1", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("auto", "auto") == ("cuda", torch.bfloat16)
    assert resolve("cuda:1", "fp32") == ("cuda:1", torch.float32)


def test_copies_kept_for_a_torch_free_parser_match_their_sources():
    from dflash_hf import bench
    from dflash_hf.commands import bench as bench_command
    from dflash_hf.commands import make_data
    from dflash_hf.training import data

    assert bench_command.METHOD_NAMES == tuple(bench.METHOD_ORDER)
    assert make_data.ENGINES == data.ENGINES


def test_bench_help_examples_point_at_what_exists():
    from dflash_hf.commands.bench import DESCRIPTION, METHOD_NAMES

    parser = subparsers()["bench"]
    text = DESCRIPTION.replace("\\\n", " ")
    examples = [line.split(":", 1)[1] for line in text.splitlines() if line.startswith("example")]
    assert len(examples) == 2
    for example in examples:
        words = shlex.split(example)
        assert words[:2] == ["dflash-hf", "bench"], example
        args = parser.parse_args(words[2:])
        assert args.target == "smollm2" or Path(args.target).is_dir(), example
        assert args.drafter in ("bundled",) or args.drafter.startswith("random:") or Path(args.drafter).is_dir()
        assert set(args.methods.split(",")) <= set(METHOD_NAMES), example
    results_dir = option(parser, "--results-dir")
    assert not Path(results_dir.default).is_absolute()
    assert "relative to the current directory" in results_dir.help


def test_version_prints_the_installed_version():
    result = python("-m", "dflash_hf", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dflash-hf {metadata.version('dflash-hf')}"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(cli_args.__file__).resolve().parents[2] / "pyproject.toml"
    expected = tomllib.loads(pyproject.read_text())["project"]["version"]

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli_args.package_version() == expected
