"""scripts/extract_manpages.py: the man pages' running prose as extra chat passages for `make-data --text-file`."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "extract_manpages.py"
spec = importlib.util.spec_from_file_location("extract_manpages", SCRIPT)
extract_manpages = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extract_manpages)

BODY = ("The frobnicate() function reads the configuration file named by path and returns a handle that later calls "
        "use to look up values.")
NOTE = "Handles are not shared between threads; each thread must call frobnicate() to get its own handle first."

# What man-db renders at a very wide MANWIDTH: section names at column 0, body paragraphs one line each at 7 spaces.
RENDERED = f"""FROBNICATE(3)            Library Functions Manual            FROBNICATE(3)

NAME
       frobnicate - read a configuration file and return a handle for it

SYNOPSIS
       #include <frob.h>
       struct frob *frobnicate(const char *path, int flags, struct frob_options *options, size_t size);

DESCRIPTION
       {BODY}

       The flags argument is one of:

       FROB_READ
              Open the file read-only, which is what most programs want when they only look values up.

       short line.

       A sentence that runs on at the body indent but never ends with a full stop, which marks a fragment
NOTES
       {NOTE}

SEE ALSO
       unfrobnicate(3), and a paragraph of prose here is not part of the prose sections so it is dropped.
"""


def test_prose_keeps_body_paragraphs_of_the_prose_sections_only():
    assert extract_manpages.prose(RENDERED) == [BODY, NOTE]


def troff_page() -> str:
    return (".TH FROBNICATE 3 2026-01-01 test\n.SH NAME\nfrobnicate \\- read a configuration file\n"
            ".SH SYNOPSIS\n.B #include <frob.h>\n.SH DESCRIPTION\n" + BODY + "\n.PP\n" + BODY.replace("reads", "parses")
            + "\n.TP\n.B FROB_READ\nOpen the file read-only, which is what most programs want when they look up.\n"
            ".SH NOTES\n" + NOTE + "\n")


@pytest.mark.skipif(shutil.which("man") is None or shutil.which("groff") is None,
                    reason="rendering needs man-db and groff")
def test_script_renders_pages_into_deduplicated_paragraphs(tmp_path):
    man3 = tmp_path / "man" / "man3"
    man3.mkdir(parents=True)
    for name in ("frobnicate.3.gz", "frobnicate_again.3.gz"):  # the same text twice: written once
        with gzip.open(man3 / name, "wt") as handle:
            handle.write(troff_page())
    out = tmp_path / "man.txt"
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "man"), "--output", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_text().split("\n\n") == [BODY, BODY.replace("reads", "parses"), NOTE + "\n"]
    assert "2 pages -> 3 paragraphs" in result.stderr


def test_script_names_the_packages_when_the_folder_has_no_pages(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--output", str(tmp_path / "x.txt")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no man pages under" in result.stderr and "packages" in result.stderr
