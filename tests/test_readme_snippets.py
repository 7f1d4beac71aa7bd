"""Every ```python block of README.md and docs/*.md runs as written, in a fresh `python` subprocess.

A block may carry a marker on the line before it:

- `<!-- snippet: skip (why) -->`: not run (it needs a GPU, the network, a server...); reported as skipped with `why`.
- `<!-- snippet: continues -->`: runs in the same process after the blocks before it in the same file (it uses what
  they defined), so a chain of blocks is one program, run once.
- `<!-- snippet: needs transformers>=5.15.1 -->` (with `continues` too: `continues, needs ...`): skipped, saying so,
  where the installed package does not satisfy the requirement.

Blocks run with `compile(..., "README.md")` at their own line numbers, so a failure's traceback names the markdown
file and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    code: str
    skip: str | None = None  # why it is not run
    continues: bool = False
    needs: list[Requirement] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_marker(body: str, where: str) -> dict:
    """The directives of one `<!-- snippet: ... -->` marker; a ValueError names a malformed one."""
    found: dict = {"needs": []}
    for part in (p.strip() for p in body.split(",")):
        if match := re.fullmatch(r"skip \((.+)\)", part):
            found["skip"] = match.group(1).strip()
        elif part == "continues":
            found["continues"] = True
        elif part.startswith("needs "):
            found["needs"].append(Requirement(part.removeprefix("needs ").strip()))
        else:
            raise ValueError(f"{where}: unknown snippet directive {part!r}; use 'skip (why)', 'continues' or "
                             "'needs PACKAGE>=VERSION'")
    return found


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        first_line = text.count("\n", 0, match.start("code")) + 1
        before = text.splitlines()[first_line - 3] if first_line >= 3 else ""  # the line above the opening fence
        where = f"{path.relative_to(ROOT)}:{first_line - 1}"
        marker = MARKER.match(before)
        directives = parse_marker(marker.group("body"), where) if marker else {}
        blocks.append(Block(path, first_line, textwrap.dedent(match.group("code")), **directives))
    return blocks


def unmet(block: Block) -> str | None:
    for requirement in block.needs:
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return f"needs {requirement}, which is not installed"
        if not requirement.specifier.contains(installed, prereleases=True):
            return f"needs {requirement}, installed {installed}"
    return None


def programs() -> list[tuple[str, list[Block], str | None]]:
    """`(name, blocks run together, why not run)`: one program per chain of blocks, one per skipped block."""
    result: list[tuple[str, list[Block], str | None]] = []
    for path in FILES:
        chain: list[Block] | None = None
        for block in blocks_of(path):
            if block.skip:
                result.append((block.name, [block], block.skip))
                continue
            if block.continues and chain is None:
                raise ValueError(f"{block.name}: 'continues' but no block runs before it in {path.name}")
            if not block.continues:
                chain = []
                result.append((block.name, chain, None))
            chain.append(block)
    return result


PROGRAMS = programs()


def test_the_docs_have_runnable_snippets():
    # Guards the extraction itself: an empty harvest would pass every test below.
    runnable = [block for _, blocks, why in PROGRAMS if why is None for block in blocks]
    assert len(runnable) >= 8, [block.name for block in runnable]
    assert any(block.path.name == "TRAINING.md" for block in runnable)


def runner(blocks: list[Block]) -> str:
    """A script that runs `blocks` in order in one namespace, each at its own file and line for tracebacks."""
    lines = ["import sys, time", "namespace = {'__name__': '__main__'}", "start = time.perf_counter()"]
    for block in blocks:
        why = unmet(block)
        if why:
            lines.append(f"print({f'skipped {block.name}: {why}'!r}, file=sys.stderr)")
            continue
        source = "\n" * (block.line - 1) + block.code
        lines.append(f"print(f'[{{time.perf_counter() - start:.0f}} s] running {block.name}', file=sys.stderr, flush=True)")
        lines.append(f"exec(compile({source!r}, {str(block.path.relative_to(ROOT))!r}, 'exec'), namespace)")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("blocks", "why"), [(blocks, why) for _, blocks, why in PROGRAMS],
                         ids=[name for name, _, _ in PROGRAMS])
def test_snippet_runs(blocks, why, tmp_path):
    if why:
        pytest.skip(f"{blocks[0].name}: {why}")
    if all(unmet(block) for block in blocks):
        pytest.skip("; ".join(f"{block.name} {unmet(block)}" for block in blocks))
    script = tmp_path / "snippet.py"
    script.write_text(runner(blocks))
    # The test's own environment (PYTHONPATH, HF_HUB_OFFLINE, ...); a scratch folder as the working directory.
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ), timeout=900)
    assert result.returncode == 0, f"{blocks[0].name} failed:\n{result.stderr[-6000:]}"
    for block in blocks:
        if unmet(block):  # the rest of the chain ran; say which block did not
            warnings.warn(f"{block.name} not run: {unmet(block)}", stacklevel=1)


def test_a_broken_snippet_fails(tmp_path):
    """The runner reports a failing block by file and line (so test_snippet_runs can fail)."""
    block = Block(ROOT / "README.md", 7, "x = 1\nraise RuntimeError('broken snippet')\n")
    script = tmp_path / "snippet.py"
    script.write_text(runner([block]))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert 'File "README.md", line 8' in result.stderr and "broken snippet" in result.stderr


def test_markers_are_checked():
    with pytest.raises(ValueError, match=r"README.md:1: unknown snippet directive 'skipp \(typo\)'"):
        parse_marker("skipp (typo)", "README.md:1")
    assert parse_marker("continues, needs transformers>=5.15.1", "x")["needs"][0].name == "transformers"


def test_a_bare_import_reaches_every_documented_name():
    code = ("import sys, dflash_hf\n"
            "assert 'torch' not in sys.modules, 'import dflash_hf loaded torch'\n"
            "for name in ('assets', 'training', 'prompts', 'export', 'DFlashDraftModel', 'DFlashDecoder', 'generate',"
            " '__version__'):\n"
            "    getattr(dflash_hf, name)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
