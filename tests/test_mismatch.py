"""Failure modes: a drafter that does not fit its target, batches, and state hygiene after every DFlash call."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import greedy, random_prompt, tiny_drafter, tiny_target
from transformers import StoppingCriteria, StoppingCriteriaList

from dflash_hf import DFlashDraftModel


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", layers=6, hidden=64)


def count_target_forwards(target):
    calls = []
    return calls, target.register_forward_pre_hook(lambda *a: calls.append(1))


def expect_fit_error(target, drafter, *values):
    """generate fails with a ValueError naming every value in `values`, before any target forward."""
    calls, handle = count_target_forwards(target)
    try:
        with pytest.raises(ValueError) as info:
            greedy(target, random_prompt(6), 5, assistant_model=drafter)
    finally:
        handle.remove()
    message = str(info.value)
    for value in values:
        assert re.search(rf"(?<![\w.]){re.escape(str(value))}(?![\w.])", message), (value, message)
    assert not calls, "the target ran before the drafter was checked"
    assert_clean(target)
    return message


def test_fc_input_does_not_match_target_hidden_size(target):
    other = tiny_target("qwen3", layers=6, hidden=48)
    drafter = tiny_drafter(other, layer_ids=[1, 2, 3])  # fc: 3 x 48 = 144 inputs; the target gives 3 x 64 = 192
    expect_fit_error(target, drafter, 144, 192, 64)


def test_layer_ids_beyond_target_depth(target):
    drafter = tiny_drafter(target, layer_ids=[1, 9, 17, 25, 33])  # a 36-layer drafter on a 6-layer target
    expect_fit_error(target, drafter, "[9, 17, 25, 33]", 6)


@pytest.mark.parametrize("mask", [96, 151669, -1])
def test_mask_id_outside_vocabulary(target, mask):
    drafter = tiny_drafter(target, mask_token_id=mask)
    expect_fit_error(target, drafter, mask, 96)


def test_dtype_mismatch(target):
    drafter = tiny_drafter(target, dtype=torch.bfloat16)
    expect_fit_error(target, drafter, "torch.bfloat16", "torch.float32")


def test_device_mismatch(target):
    drafter = tiny_drafter(target).to("meta")  # a second device that exists on every machine
    expect_fit_error(target, drafter, "meta", "cpu")


def test_batch_size_above_one(target):
    drafter = tiny_drafter(target)
    prompts = torch.cat([random_prompt(6, seed=0), random_prompt(6, seed=1)])
    try:
        out = target.generate(prompts, attention_mask=torch.ones_like(prompts), assistant_model=drafter,
                              do_sample=False, max_new_tokens=5)
    except ValueError as error:
        assert re.search(r"batch", str(error)) and "2" in str(error), str(error)
    else:  # if a later version routes batches to the batched loop, the rows must be right
        for row in range(2):
            assert torch.equal(out[row : row + 1], greedy(target, prompts[row : row + 1], 5))
    assert_clean(target)


# ----------------------------------------------------------------------------------------------------------------------
# State hygiene
# ----------------------------------------------------------------------------------------------------------------------


def assert_clean(target):
    """No forward hooks anywhere in the target, no instance override of `_get_candidate_generator`."""
    hooked = [name for name, module in target.named_modules() if module._forward_hooks]
    assert not hooked, f"forward hooks left on {hooked}"
    assert "_get_candidate_generator" not in target.__dict__


class RaiseAfter(StoppingCriteria):
    def __init__(self, calls: int):
        self.calls = calls

    def __call__(self, input_ids, scores, **kwargs):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("stopping criterion failed on purpose")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class InterruptedDrafter(DFlashDraftModel):
    """Drafts once, then raises KeyboardInterrupt on its second call (as a user pressing Ctrl-C would)."""

    calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_state_is_clean_after_success_and_after_an_exception(family):
    target = tiny_target(family, layers=4)
    prompt = random_prompt(7, seed=2)
    before = greedy(target, prompt, 15)
    drafter = tiny_drafter(target, layer_ids=[0, 1])

    assert torch.equal(greedy(target, prompt, 15, assistant_model=drafter), before)
    assert_clean(target)

    with pytest.raises(RuntimeError, match="on purpose"):
        greedy(target, prompt, 15, assistant_model=drafter, stopping_criteria=StoppingCriteriaList([RaiseAfter(3)]))
    assert_clean(target)

    # A KeyboardInterrupt from inside the drafter, mid-generation, is cleaned up too.
    interrupted = tiny_drafter(target, layer_ids=[0, 1], cls=InterruptedDrafter)
    with pytest.raises(KeyboardInterrupt):
        greedy(target, prompt, 15, assistant_model=interrupted)
    assert interrupted.calls == 2
    assert_clean(target)

    # Plain generate behaves as before, and DFlash still works afterwards.
    assert torch.equal(greedy(target, prompt, 15), before)
    assert torch.equal(greedy(target, prompt, 15, assistant_model=drafter), before)
    assert_clean(target)


def test_user_hooks_and_overrides_survive(target):
    """Hooks and an instance override the user installed before are left as they were."""
    prompt = random_prompt(7, seed=3)
    seen = []
    handle = target.model.layers[1].register_forward_hook(lambda *a: seen.append(1))
    try:
        drafter = tiny_drafter(target)
        greedy(target, prompt, 6, assistant_model=drafter)
        assert seen  # the user's hook kept firing during the DFlash call
        assert list(target.model.layers[1]._forward_hooks) == [handle.id]
    finally:
        handle.remove()
    assert_clean(target)
