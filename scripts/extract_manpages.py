"""Prose of the Linux man pages as a plain-text file for `dflash-hf make-data --text-file` (more chat passages).

The offline chat pool (Python documentation topics and stdlib module docstrings) holds ~3,400 training prompts; the
Debian `manpages` + `manpages-dev` packages (system calls, C library, file formats, overviews: technical English like
the held-out chat passages, but not the same text) add thousands of passages. Only the running prose of each page's
DESCRIPTION / NOTES / BUGS sections is kept (paragraphs at the body indent), without synopses, option lists or code.

    mkdir -p /tmp/man && cd /tmp/man && apt-get download manpages manpages-dev && for d in *.deb; do dpkg -x "$d" root; done
    python scripts/extract_manpages.py /tmp/man/root/usr/share/man --output manpages.txt

Needs `man` (man-db) to render the pages. The output is deterministic for given packages.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SECTIONS = ("DESCRIPTION", "NOTES", "BUGS")
BODY_INDENT = 7  # man-db renders section bodies at 7 spaces; deeper indents are lists, examples and code


def render(page: Path) -> str:
    """The page as plain text, one line per paragraph (very wide, no hyphenation or justification)."""
    result = subprocess.run(
        ["man", "--no-hyphenation", "--no-justification", "-l", str(page)],
        capture_output=True, text=True, env={**os.environ, "MANWIDTH": "5000", "MAN_KEEP_FORMATTING": "0",
                                             "LC_ALL": "C.UTF-8"},
    )
    return re.sub(r".\x08", "", result.stdout)  # overstrike bold / underline, should any remain


def prose(text: str) -> list[str]:
    """Body paragraphs of the prose sections: sentences of some length, not option lists or code."""
    out, section = [], None
    for line in text.splitlines():
        if line and not line[0].isspace():
            section = line.strip()
            continue
        if section not in SECTIONS:
            continue
        indent = len(line) - len(line.lstrip(" "))
        paragraph = " ".join(line.split())
        if indent == BODY_INDENT and len(paragraph) >= 80 and paragraph.endswith(".") and not paragraph.endswith(":"):
            out.append(paragraph)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a man folder holding man1 .. man8 (e.g. <dpkg -x root>/usr/share/man)")
    parser.add_argument("--output", required=True, help="plain-text file to write (paragraphs separated by blank lines)")
    args = parser.parse_args(argv)
    pages = sorted(p for p in Path(args.root).glob("man[1-8]/*") if p.is_file() and p.stat().st_size > 200)
    if not pages:
        raise SystemExit(f"no man pages under {args.root!r}/man[1-8]; see this script's docstring for the packages.")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        texts = list(pool.map(render, pages))
    paragraphs = [p for text in texts for p in prose(text)]
    paragraphs = list(dict.fromkeys(paragraphs))  # pages that document the same thing repeat whole paragraphs
    Path(args.output).write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    print(f"{len(pages)} pages -> {len(paragraphs)} paragraphs, {sum(map(len, paragraphs)):,} characters "
          f"-> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
