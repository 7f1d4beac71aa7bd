"""Nothing a DFlash call installs survives it: no forward hook, no patched method, no cache on the target, one single
wrapper on `GenerationMixin.generate` -- after success, after 20 calls, and after calls interrupted by an
exception from a StoppingCriteria or a KeyboardInterrupt from a streamer. Plain `generate()` is unchanged by DFlash
use, and two target/drafter pairs used alternately do not interfere.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings

import pytest
import torch
from helpers import greedy, random_prompt, tiny_drafter, tiny_target
from transformers import GenerationMixin, StoppingCriteria, StoppingCriteriaList

import dflash_hf
from dflash_hf import DFlashDecoder
from dflash_hf.modeling.compat_dflash import generate_hook_installed

NEW = 10


def hook_counts(model) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
            for name, m in model.named_modules()}


def snapshot(target, drafter) -> dict:
    """Everything a call could leave behind: hooks on both models, instance attributes, the patched method."""
    return {
        "target_hooks": hook_counts(target),
        "drafter_hooks": hook_counts(drafter),
        "target_dict": sorted(target.__dict__),
        "module_dicts": {name: sorted(k for k in m.__dict__ if not k.startswith("_")) for name, m in
                         target.named_modules()},
        "generate": GenerationMixin.generate,
        "assisted": GenerationMixin._assisted_decoding,
        "buffers": sorted(name for name, _ in target.named_buffers()),
    }


def assert_single_wrapper() -> None:
    method = GenerationMixin.generate
    assert generate_hook_installed(), "the generate integration is not installed"
    inner = method.__wrapped__
    while inner is not None:  # transformers' own decorators may wrap generate too; none of them may be ours
        assert not getattr(inner, "_dflash_generate_hook", False), "GenerationMixin.generate is wrapped twice"
        inner = getattr(inner, "__wrapped__", None)
    assert not hasattr(GenerationMixin._assisted_decoding, "__wrapped__"), "_assisted_decoding must stay stock"


def assert_no_hooks(model) -> None:
    left = {name: n for name, n in hook_counts(model).items() if n}
    assert not left, f"hooks left on {left}"


@pytest.fixture(scope="module")
def pair():
    target = tiny_target("qwen3", layers=4, hidden=64)
    drafter = tiny_drafter(target, layer_ids=[0, 2], block_size=4)
    prompt = random_prompt(7, seed=21)
    return target, drafter, prompt, greedy(target, prompt, NEW)


def test_nothing_survives_20_calls_in_both_routes(pair):
    target, drafter, prompt, reference = pair
    assert_no_hooks(target)
    before = snapshot(target, drafter)
    decoder = DFlashDecoder(target, drafter, max_length=64)
    for i in range(20):
        if i % 3 == 0:
            out = greedy(target, prompt, NEW, assistant_model=drafter)
        elif i % 3 == 1:
            out = dflash_hf.generate(target, drafter, prompt, max_new_tokens=NEW).sequences
        else:
            out = decoder.generate(prompt, max_new_tokens=NEW).sequences
        assert torch.equal(out, reference), i
        assert snapshot(target, drafter) == before, f"state changed after call {i}"
    assert_single_wrapper()
    assert "_get_candidate_generator" not in target.__dict__
    assert "past_key_values" not in target.__dict__ and "_cache" not in target.__dict__


def test_reimporting_the_remote_code_does_not_wrap_twice(pair, monkeypatch):
    """Loading another copy of the modeling files (AutoModel + trust_remote_code does) must keep one wrapper."""
    import importlib.util

    import dflash_hf.modeling.compat_dflash as compat
    import dflash_hf.modeling.integration_dflash as integration

    before = GenerationMixin.generate
    integration.install_generate_integration()
    # A second, independent copy of the file (as transformers' remote-code loader creates), not a reload.
    spec = importlib.util.spec_from_file_location("dflash_copy_compat", compat.__file__)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)  # dataclasses look their module up while it executes
    spec.loader.exec_module(copy)
    copy.install_generate_hook(integration.route_generate_call)
    assert GenerationMixin.generate is before
    assert_single_wrapper()


class RaiseAt(StoppingCriteria):
    """Raises `error` on its `calls`-th call: a user criterion that fails mid-generation."""

    def __init__(self, calls: int, error: BaseException):
        self.calls, self.error = calls, error

    def __call__(self, input_ids, scores, **kwargs):
        self.calls -= 1
        if self.calls <= 0:
            raise self.error
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class InterruptingStreamer:
    """A streamer whose `put` raises KeyboardInterrupt on the `calls`-th call (Ctrl-C while printing)."""

    def __init__(self, calls: int):
        self.calls = calls
        self.ended = False

    def put(self, value):
        self.calls -= 1
        if self.calls <= 0:
            raise KeyboardInterrupt

    def end(self):
        self.ended = True


@pytest.mark.parametrize("route, interruption", [("plain", "criterion-error"), ("plain", "criterion-keyboard"),
                                                 ("plain", "streamer-keyboard"), ("batched", "streamer-keyboard")])
def test_interrupted_call_leaves_nothing_and_next_call_is_right(pair, route, interruption):
    target, drafter, prompt, reference = pair
    before = snapshot(target, drafter)
    decoder = DFlashDecoder(target, drafter, max_length=64)  # reused across the interruption
    expected = RuntimeError if interruption == "criterion-error" else KeyboardInterrupt
    with pytest.raises(expected):
        if interruption.startswith("criterion"):
            error = RuntimeError("criterion failed") if interruption == "criterion-error" else KeyboardInterrupt()
            greedy(target, prompt, NEW, assistant_model=drafter,
                   stopping_criteria=StoppingCriteriaList([RaiseAt(3, error)]))
        elif route == "plain":
            greedy(target, prompt, NEW, assistant_model=drafter, streamer=InterruptingStreamer(3))
        else:
            decoder.generate(prompt, max_new_tokens=NEW, streamer=InterruptingStreamer(3))
    assert snapshot(target, drafter) == before
    assert_no_hooks(target)
    assert "_get_candidate_generator" not in target.__dict__
    if route == "plain":
        assert torch.equal(greedy(target, prompt, NEW, assistant_model=drafter), reference)
    else:
        assert torch.equal(decoder.generate(prompt, max_new_tokens=NEW).sequences, reference)
    assert torch.equal(greedy(target, prompt, NEW), reference)


def test_plain_generate_unchanged_by_dflash_use(pair):
    """Plain generate (greedy, sampling with a seed, beam search) gives the same output before and after DFlash."""
    target, drafter, prompt, _ = pair
    mask = torch.ones_like(prompt)

    def runs():
        torch.manual_seed(5)
        sampled = target.generate(prompt, attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=NEW)
        beams = target.generate(prompt, attention_mask=mask, do_sample=False, num_beams=2, max_new_tokens=NEW)
        return [greedy(target, prompt, NEW), sampled, beams]

    before = runs()
    greedy(target, prompt, NEW, assistant_model=drafter)
    dflash_hf.generate(target, drafter, prompt, max_new_tokens=NEW)
    torch.manual_seed(1)
    target.generate(prompt, attention_mask=mask, do_sample=True, max_new_tokens=NEW, assistant_model=drafter)
    after = runs()
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_two_pairs_alternately_do_not_interfere():
    """Two targets of different families and depths, each with its own drafter (different ids and block sizes)."""
    t1 = tiny_target("qwen3", layers=4, hidden=64, seed=3)
    t2 = tiny_target("llama", layers=5, hidden=32, seed=4)
    d1 = tiny_drafter(t1, layer_ids=[0, 2], block_size=4)
    d2 = tiny_drafter(t2, layer_ids=[1, 2, 3], block_size=6, layers=1)
    prompts = [random_prompt(5 + i, seed=30 + i) for i in range(3)]
    refs = {(k, i): greedy(t, p, NEW) for k, t in ((1, t1), (2, t2)) for i, p in enumerate(prompts)}
    decoders = {1: DFlashDecoder(t1, d1, max_length=32), 2: DFlashDecoder(t2, d2, max_length=32)}
    for i, p in enumerate(prompts):
        for k, t, d in ((1, t1, d1), (2, t2, d2)):
            assert torch.equal(greedy(t, p, NEW, assistant_model=d), refs[k, i]), (k, i)
            eos = t.generation_config.eos_token_id
            out = decoders[k].generate(p, max_new_tokens=NEW, stop_token_ids=[eos])
            assert out.new_tokens[0] == refs[k, i][0, p.shape[1]:].tolist(), (k, i)
        # The other pair's drafter on this target is refused (not silently used).
        with pytest.raises(ValueError):
            greedy(t1, p, NEW, assistant_model=d2)
    for t in (t1, t2):
        assert_no_hooks(t)
        assert "_get_candidate_generator" not in t.__dict__


def test_batched_loop_stops_at_the_target_eos_by_default():
    target = tiny_target("llama", layers=5, hidden=32, seed=4)
    drafter = tiny_drafter(target, layer_ids=[1, 2, 3], block_size=6, layers=1)
    prompt = random_prompt(6, seed=31)  # the target's greedy continuation hits EOS (2) after 1 token
    reference = greedy(target, prompt, NEW)
    assert reference.shape[1] < prompt.shape[1] + NEW and reference[0, -1] == target.generation_config.eos_token_id
    out = dflash_hf.generate(target, drafter, prompt, max_new_tokens=NEW)
    assert out.new_tokens[0] == reference[0, prompt.shape[1]:].tolist()


class SlowStreamer:
    """A streamer that blocks a little on every chunk, so that two calls in two threads overlap."""

    def __init__(self):
        self.chunks = 0

    def put(self, value):
        self.chunks += 1
        time.sleep(0.01)

    def end(self):
        pass


@pytest.mark.parametrize("path", ["engine", "stock loop"])
def test_two_threads_through_plain_generate(pair, path):
    """Two threads generate with the same pair at once (blocking streamers make them overlap): both get the target's
    own output, and nothing is left on the target. The stock loop is reached by asking for per-token logits."""
    target, drafter, prompt, reference = pair
    other = random_prompt(9, seed=22)
    expected = {0: reference, 1: greedy(target, other, NEW)}
    extra = dict(return_dict_in_generate=True, output_logits=True) if path == "stock loop" else {}
    results, errors = {}, []

    def run(i, ids):
        try:
            for _ in range(3):
                out = greedy(target, ids, NEW, assistant_model=drafter, streamer=SlowStreamer(), **extra)
                results.setdefault(i, []).append(out.sequences if extra else out)
        except Exception as error:  # noqa: BLE001 -- reported below
            errors.append(error)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stock loop's fallback warning
        threads = [threading.Thread(target=run, args=(i, ids)) for i, ids in enumerate((prompt, other))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert not errors, errors
    for i, outs in results.items():
        assert len(outs) == 3 and all(torch.equal(out, expected[i]) for out in outs), i
    assert "_get_candidate_generator" not in target.__dict__
    assert_no_hooks(target)


def test_two_threads_share_one_decoder(pair):
    target, drafter, prompt, reference = pair
    decoder = DFlashDecoder(target, drafter, max_length=64)
    other = random_prompt(9, seed=22)
    expected = greedy(target, other, NEW)
    outs, errors = [], []

    def run(ids, want):
        try:
            for _ in range(3):
                out = decoder.generate(ids, max_new_tokens=NEW, streamer=SlowStreamer()).sequences
                outs.append(torch.equal(out, want))
        except Exception as error:  # noqa: BLE001 -- reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=a) for a in ((prompt, reference), (other, expected))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert outs == [True] * 6


def test_a_call_from_inside_a_running_call_raises(pair):
    """A streamer that starts another DFlash call on the same target from inside the running one gets a clear
    RuntimeError instead of a deadlock or a corrupted first call."""
    target, drafter, prompt, reference = pair

    class Reentrant(SlowStreamer):
        def put(self, value):
            greedy(target, prompt, NEW, assistant_model=drafter)

    with pytest.raises(RuntimeError, match="from inside a running one"):
        greedy(target, prompt, NEW, assistant_model=drafter, streamer=Reentrant())
    assert torch.equal(greedy(target, prompt, NEW, assistant_model=drafter), reference)


def test_a_generator_leaves_the_global_rng_alone(pair):
    """`generator=` seeds the call's draws; the caller's global RNG continues as if the call had not happened, and
    one seed gives one output."""
    target, drafter, prompt, _ = pair
    decoder = DFlashDecoder(target, drafter, max_length=7 + NEW, cuda_graphs=False, compile=False)
    torch.manual_seed(123)
    untouched = torch.rand(4)
    torch.manual_seed(123)
    first = decoder.generate(prompt, max_new_tokens=NEW, do_sample=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(4), untouched)
    again = decoder.generate(prompt, max_new_tokens=NEW, do_sample=True, generator=torch.Generator().manual_seed(5))
    assert again.new_tokens == first.new_tokens


def test_sampling_workspaces_are_bounded(pair):
    """Forty temperatures do not keep forty sets of static caches: at most `max_sampling_workspaces`, newest kept."""
    target, drafter, prompt, reference = pair
    decoder = DFlashDecoder(target, drafter, max_length=7 + NEW, cuda_graphs=False, compile=False,
                            max_sampling_workspaces=3)
    decoder.generate(prompt, max_new_tokens=NEW, stop_token_ids=[])
    for i in range(40):
        decoder.generate(prompt, max_new_tokens=2, do_sample=True, temperature=0.5 + i / 40)
    sampled = [key[1].temperature for key in decoder._workspaces if key[1].do_sample]
    assert sampled == [0.5 + i / 40 for i in (37, 38, 39)]
    assert [key for key in decoder._workspaces if not key[1].do_sample]  # greedy stays
    assert decoder.generate(prompt, max_new_tokens=NEW).sequences.tolist() == reference.tolist()
    with pytest.raises(ValueError, match="max_sampling_workspaces"):
        DFlashDecoder(target, drafter, max_sampling_workspaces=0)
