"""The batched loop with `compile=True` (what it uses on CUDA by default), run on CPU: the same tokens as the target's
greedy output, with and without stop tokens. Inductor needs a C++ compiler on CPU; without one the test is skipped."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from helpers import greedy, random_prompt, tiny_drafter, tiny_target

from dflash_hf import DFlashDecoder

NEW = 20


def pair_and_greedy():
    """A tiny target, an untrained drafter for it, a `[1, 9]` prompt and the target's greedy continuation (NEW ids)."""
    target = tiny_target("qwen3", layers=4, hidden=32, seed=3)
    drafter = tiny_drafter(target, layer_ids=[0, 2], block_size=4)
    prompt = random_prompt(9, seed=4)
    return target, drafter, prompt, greedy(target, prompt, NEW, eos_token_id=None)[0, prompt.shape[1]:].tolist()


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_loop_equals_greedy_with_and_without_stop_tokens():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    target, drafter, prompt, want = pair_and_greedy()
    stop = want[5]
    cut = want.index(stop) + 1

    decoder = DFlashDecoder(target, drafter, max_length=64, cuda_graphs=False, compile=True)
    mask = torch.ones_like(prompt)
    plain = decoder.generate(prompt, mask, max_new_tokens=NEW, stop_token_ids=[])
    stopped = decoder.generate(prompt, mask, max_new_tokens=NEW, stop_token_ids=[stop])
    assert plain.new_tokens == [want]
    assert stopped.new_tokens == [want[:cut]]
    assert 1 + sum(stopped.acceptance_lengths[0]) == cut  # the prefill commits the first token
    # The draft and the verify forward went through inductor (and were not recompiled for the stop tokens: the
    # acceptance, which reads them, runs outside the compiled functions).
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert decoder.compile_failures == []


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    """A compiler bug (here: a torch.compile backend that raises, so dynamo reports a real BackendCompilerFailed) costs
    speed with a RuntimeWarning, not the generation; the output is still the target's greedy output."""
    import functools

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("PassManager::run failed (injected)")

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    target, drafter, prompt, want = pair_and_greedy()

    decoder = DFlashDecoder(target, drafter, max_length=64, cuda_graphs=False, compile=True)
    expected = r"torch.compile failed for the (draft step|verify forward) .*PassManager::run failed \(injected\).*compile=False"
    with pytest.warns(RuntimeWarning, match=expected):
        out = decoder.generate(prompt, torch.ones_like(prompt), max_new_tokens=NEW, stop_token_ids=[])
    assert out.new_tokens == [want]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no second warning, no second compile attempt
        again = decoder.generate(prompt, torch.ones_like(prompt), max_new_tokens=NEW, stop_token_ids=[])
    assert again.new_tokens == [want]
    assert set(decoder.compile_failures) == {"draft step (batch 1): BackendCompilerFailed",
                                             "verify forward (batch 1): BackendCompilerFailed"}
