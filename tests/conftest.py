"""Test session setup: offline, one CPU thread, remote code cached in a private temp folder."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# Must be set before transformers is imported: remote code loaded by the tests goes to a throwaway folder, and the
# Hub is never contacted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="dflash_hf_modules_")
atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from every test module

# Tiny models gain nothing from intra-op threads, and on a shared 2-core runner they oversubscribe (10x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _verify_length(request, monkeypatch):
    """Suites written about plain DFlash (oracle drafters that accept whole blocks, per-step statistics, compile
    counts) verify the whole block each step; tests of the adaptive verify length, marked `adaptive`, keep the
    library's default ("auto"). An oracle's drafts cost a target rollout, so "auto" would rightly stop drafting."""
    if request.node.get_closest_marker("adaptive") is None:
        from dflash_hf.modeling import verify_length_dflash

        monkeypatch.setattr(verify_length_dflash, "DEFAULT_VERIFY_LENGTH", "full")
    yield


# The three target families of the lossless suites; a module that defines its own `target` fixture overrides these.
FAMILIES = ["qwen3", "llama", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def target(request):
    """A tiny random target of each family in turn (module-scoped: built once per family and module)."""
    from helpers import tiny_target

    return tiny_target(request.param)


@pytest.fixture
def oracle(target):
    """An `OracleDrafter` (block 8) for `target`: drafts the target's own continuation."""
    from helpers import OracleDrafter

    with OracleDrafter.for_target(target, block_size=8) as drafter:
        yield drafter
