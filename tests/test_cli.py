"""The `dflash-hf` subcommands owned by the product layer (demo, generate, chat, export, convert), run as real
subprocesses: help texts, clear errors with a non-zero exit for bad arguments, and end-to-end `generate` / `chat` on
a tiny real model folder (random Qwen3 weights, a real word-level tokenizer with a chat template)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers import VOCAB, run_main, tiny_drafter, tiny_target

COMMANDS = ("demo", "generate", "chat", "export", "convert")
SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<mask>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def cli(*args, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    # One thread: tiny models gain nothing from more, and contending OpenMP threads on a busy 2-core box cost 10x.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="0")
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "dflash_hf", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def assert_no_bars(stderr: str) -> None:
    """stderr is a pipe here, not a terminal: no progress bars at all, so no transformers 'Loading weights' bar and no
    cursor-up escapes from nested bars."""
    assert "\x1b[A" not in stderr and "Loading weights" not in stderr and "it/s]" not in stderr, stderr[-2000:]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over the tiny vocabulary: ids 0-5 special, 6..95 the words 'w6'..'w95'."""
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<pad>", additional_special_tokens=SPECIAL[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    target = tiny_target()
    target.save_pretrained(tmp / "target")
    word_tokenizer().save_pretrained(tmp / "target")
    drafter = tiny_drafter(target)
    drafter.save_pretrained(tmp / "drafter")
    return {"target": tmp / "target", "drafter": tmp / "drafter", "tmp": tmp}


def greedy_text(folders, ids: list[int], max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(folders["target"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders["target"])
    prompt = torch.tensor([ids])
    out = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


def chat_ids(folders, messages) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(folders["target"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: dflash-hf {command}")
    for option in {"demo": ["--max-new-tokens", "--prompts", "--device"],
                   "generate": ["--target", "--drafter", "--prompt", "--chat", "--temperature"],
                   "chat": ["--target", "--drafter", "--system"],
                   "export": ["DRAFTER", "--target", "--out", "--metrics", "--push", "--dry-run"],
                   "convert": ["ZLAB_FOLDER", "--out", "--push", "--dry-run"]}[command]:
        assert option in result.stdout, option


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
        (["generate", "--target", "smollm2"], "the following arguments are required: --prompt"),
        (["chat", "--temperature", "-1"], "--temperature: must be a finite number >= 0 (0 = greedy), got -1.0"),
        (["export", "bundled", "--out", "x"], "the following arguments are required: --target"),
        (["convert", "/nonexistent/zlab-release", "--out", "x"], "is not a folder"),
    ],
)
def test_bad_arguments_fail_clearly(args, message, capsys):
    code, _, err = run_main(args, capsys)
    assert code == 2
    assert message in err


def test_bad_arguments_through_the_console_entry_point():
    result = cli("demo", "--device", "tpu")
    assert result.returncode == 2
    assert "argument --device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_rejects_missing_folders_and_wrong_pairs(tiny_folders, tmp_path, capsys):
    code, _, err = run_main(["generate", "--target", tmp_path / "nope", "--drafter", tiny_folders["drafter"],
                             "--prompt", "w9"], capsys)
    assert code == 2 and "neither 'smollm2'" in err
    code, _, err = run_main(["generate", "--target", tiny_folders["target"], "--prompt", "w9"], capsys)
    assert code == 2 and "--drafter bundled is the SmolLM2-135M-Instruct drafter" in err
    code, _, err = run_main(["generate", "--target", tiny_folders["target"], "--drafter", tmp_path,
                             "--prompt", "w9"], capsys)
    assert code == 2 and "neither 'bundled' nor a folder with config.json" in err
    code, _, err = run_main(["chat", "--target", tiny_folders["target"], "--drafter", tiny_folders["drafter"],
                             "--top-p", "1.5"], capsys)
    assert code == 2 and "--top-p must be in (0, 1]" in err


def test_generate_streams_the_targets_greedy_text(tiny_folders):
    prompt = "w10 w41 w77 w23 w8"
    result = cli("generate", "--target", tiny_folders["target"], "--drafter", tiny_folders["drafter"],
                 "--prompt", prompt, "--max-new-tokens", "20", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = greedy_text(tiny_folders, [10, 41, 77, 23, 8], 20)
    assert expected.strip(), "the tiny target should say something"
    assert result.stdout.strip() == expected.strip()
    assert "[dflash]" in result.stderr and "tau" in result.stderr  # statistics go to stderr, not into the text
    assert_no_bars(result.stderr)


def test_generate_with_chat_template_and_sampling(tiny_folders):
    greedy = cli("generate", "--target", tiny_folders["target"], "--drafter", tiny_folders["drafter"],
                 "--prompt", "w30 w31", "--chat", "--max-new-tokens", "12")
    assert greedy.returncode == 0, greedy.stderr
    ids = chat_ids(tiny_folders, [{"role": "user", "content": "w30 w31"}])
    assert ids[0] == 3 and ids[-1] == 4  # <|user|> ... <|assistant|>
    assert greedy.stdout.strip() == greedy_text(tiny_folders, ids, 12).strip()

    sampled = cli("generate", "--target", tiny_folders["target"], "--drafter", tiny_folders["drafter"],
                  "--prompt", "w30 w31", "--chat", "--max-new-tokens", "12", "--temperature", "0.9",
                  "--top-p", "0.95", "--seed", "3")
    assert sampled.returncode == 0, sampled.stderr
    words = sampled.stdout.split()
    assert 0 < len(words) <= 12 and all(w.startswith("w") for w in words)


def test_chat_keeps_the_conversation_and_exits(tiny_folders):
    result = cli("chat", "--target", tiny_folders["target"], "--drafter", tiny_folders["drafter"],
                 "--max-new-tokens", "10", "--stats", stdin="w12 w13\n\nw50\n/exit\nw60\n")
    assert result.returncode == 0, result.stderr
    first_messages = [{"role": "user", "content": "w12 w13"}]
    first = greedy_text(tiny_folders, chat_ids(tiny_folders, first_messages), 10).strip()
    second_messages = first_messages + [{"role": "assistant", "content": first}, {"role": "user", "content": "w50"}]
    second = greedy_text(tiny_folders, chat_ids(tiny_folders, second_messages), 10).strip()
    # Two replies (the blank line is skipped, nothing after /exit runs), each streamed on its own line.
    assert [line.strip() for line in result.stdout.splitlines()] == [first, second]
    assert result.stderr.count("[dflash]") == 2
    assert_no_bars(result.stderr)


@pytest.mark.parametrize("route", ["batched", "assisted"])
def test_demo_on_a_local_pair(tiny_folders, route):
    result = cli("demo", "--target", tiny_folders["target"], "--drafter", tiny_folders["drafter"], "--route", route,
                 "--max-new-tokens", "10", "--prompts", "w10 w11", "w20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("identical to greedy: yes") == 2
    assert f"route {route}" in result.stdout and f"drafter from {tiny_folders['drafter']}" in result.stdout
    summary = next(line for line in result.stdout.splitlines() if line.startswith("Summary:"))
    assert "2 prompts; outputs identical to plain greedy: yes" in summary
