"""Progress output: the library leaves transformers' bars alone, and the one-time SmolLM2 conversion silences
transformers' bars (the GGUF de-quantisation, "Loading weights", "Writing model shards") only while it draws its own."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_the_library_leaves_transformers_bars_on():
    code = ("import dflash_hf, dflash_hf.assets; from transformers.utils import logging; "
            "assert logging.is_progress_bar_enabled()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_conversion_silences_transformers_bars_and_restores_them():
    pytest.importorskip("gguf")
    import huggingface_hub.utils as hub_utils
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from dflash_hf.assets import _transformers_bars_off

    before = (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(), gguf_utils.tqdm)
    hf_logging.enable_progress_bar()
    try:
        with _transformers_bars_off():
            assert not hf_logging.is_progress_bar_enabled()
            assert gguf_utils.tqdm(range(3)).disable  # the GGUF de-quantisation bar, plain tqdm in transformers
        assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
        assert gguf_utils.tqdm is before[2]
        hf_logging.disable_progress_bar()
        with _transformers_bars_off():
            pass
        assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    finally:
        (hf_logging.enable_progress_bar if before[0] else hf_logging.disable_progress_bar)()
        (hub_utils.disable_progress_bars if before[1] else hub_utils.enable_progress_bars)()
