"""The text-generation pipeline with a DFlash assistant; transformers' native route (`speculation_type="dflash"`)."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import (
    ZLAB_SPECS,
    OracleDrafter,
    greedy,
    random_prompt,
    target_for_spec,
    tiny_drafter,
    tiny_target,
    tiny_tokenizer,
    write_zlab_checkpoint,
    zlab_config_dict,
)
from packaging.version import Version
from transformers import AutoModel, pipeline

from dflash_hf import DFlashDraftModel

NATIVE = Version(transformers.__version__) >= Version("5.15.1")
needs_native = pytest.mark.skipif(not NATIVE, reason="speculation_type='dflash' needs transformers >= 5.15.1")


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def target(request):
    return tiny_target(request.param)


def prompt_text(tokenizer, seed):
    return tokenizer.decode(random_prompt(8, seed=seed)[0])


@pytest.mark.parametrize("oracle", [False, True], ids=["random drafter", "oracle drafter"])
def test_pipeline_with_assistant_gives_the_same_text(target, oracle):
    tokenizer = tiny_tokenizer()
    drafter = OracleDrafter.for_target(target) if oracle else tiny_drafter(target)
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)
    assisted = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)
    try:
        for seed in range(2):
            text = prompt_text(tokenizer, seed)
            kw = dict(max_new_tokens=20, do_sample=False)
            expected = plain(text, **kw)[0]["generated_text"]
            drafter.last_stats = None
            got = assisted(text, **kw)[0]["generated_text"]
            assert got == expected
            assert len(expected.split()) > len(text.split())
            assert drafter.last_stats is not None and drafter.last_stats.steps > 0  # the DFlash route ran
            if oracle:
                assert max(drafter.last_stats.acceptance_lengths) > 1
    finally:
        if oracle:
            drafter.close()


class NativeRecorder(DFlashDraftModel):
    """Records the type of cache each call receives (transformers' DFlashCache on the native route)."""

    cache_types: list

    def forward(self, *args, **kwargs):
        cache = kwargs.get("cache") or kwargs.get("past_key_values")
        self.cache_types.append(type(cache).__name__)
        return super().forward(*args, **kwargs)


@needs_native
@pytest.mark.parametrize("kind", ["random full", "random sliding", "oracle", "oracle partial"])
def test_native_route_is_lossless(target, kind):
    prompt = random_prompt(9, seed=2)
    expected = greedy(target, prompt, 30)
    sliding = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    if kind.startswith("oracle"):
        drafter = OracleDrafter.for_target(target, corrupt_every=3 if "partial" in kind else 0, **sliding)
    else:
        drafter = tiny_drafter(target, cls=NativeRecorder, **(sliding if "sliding" in kind else {}))
        drafter.cache_types = []
    try:
        out = greedy(target, prompt, 30, assistant_model=drafter, speculation_type="dflash")
    finally:
        if kind.startswith("oracle"):
            drafter.close()
    assert torch.equal(out, expected)
    assert drafter.last_stats is None  # transformers' own generator ran, not ours
    if not kind.startswith("oracle"):
        assert drafter.cache_types and set(drafter.cache_types) == {"DFlashCache"}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A gemma-4-shaped z-lab folder loaded through AutoModel, and a target it fits."""
    spec = ZLAB_SPECS["gemma-4-26b-a4b"]
    folder = tmp_path_factory.mktemp("gemma-drafter")
    write_zlab_checkpoint(folder, zlab_config_dict(spec))
    drafter = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    return drafter, target_for_spec(spec)


def test_pipeline_with_released_checkpoint(released):
    """The config of a released drafter carries vocab_size / bos / eos / pad, so the pipeline accepts it as an
    assistant of the same tokenizer (no assistant tokenizer needed) and gives the plain text."""
    drafter, target = released
    tokenizer = tiny_tokenizer()
    text = tokenizer.decode(random_prompt(6, seed=3)[0])
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)(text, max_new_tokens=12, do_sample=False)
    drafter.last_stats = None
    assisted = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)(
        text, max_new_tokens=12, do_sample=False)
    assert assisted[0]["generated_text"] == plain[0]["generated_text"]
    assert drafter.last_stats.steps > 0


@needs_native
def test_native_route_with_released_checkpoint_and_pipeline(released):
    """A z-lab folder loaded through AutoModel works on the native route as shipped (our config exposes the nested
    keys at the top level), also from a pipeline."""
    drafter, target = released
    prompt = random_prompt(6, seed=3)
    expected = greedy(target, prompt, 12)
    assert torch.equal(greedy(target, prompt, 12, assistant_model=drafter, speculation_type="dflash"), expected)

    tokenizer = tiny_tokenizer()
    text = tokenizer.decode(prompt[0])
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)(text, max_new_tokens=12, do_sample=False)
    native = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)(
        text, max_new_tokens=12, do_sample=False, speculation_type="dflash")
    assert native[0]["generated_text"] == plain[0]["generated_text"]


@needs_native
def test_native_route_sampling_runs(target):
    drafter = tiny_drafter(target)
    torch.manual_seed(0)
    out = target.generate(random_prompt(6), assistant_model=drafter, speculation_type="dflash", do_sample=True,
                          temperature=0.8, top_k=0, max_new_tokens=12, eos_token_id=None)
    assert out.shape == (1, 18)


@needs_native
@pytest.mark.parametrize("layer_types, window", [(None, None), (["sliding_attention", "full_attention"], 4)])
def test_native_dflash_cache_computes_what_our_cache_computes(layer_types, window):
    """Driven the way each generator drives it (native: lazy crop(-B) and set_previous_accepted_tokens; ours:
    crop(start) right after the call), transformers' DFlashCache and our DFlashDraftCache give the same drafts,
    also once a sliding layer's window is smaller than the context."""
    from transformers.cache_utils import DFlashCache

    target = tiny_target("qwen3")
    drafter = tiny_drafter(target, layer_types=layer_types, sliding_window=window)
    block, hidden = drafter.config.block_size, 64
    native_cache = DFlashCache(config=drafter.config)
    native_cache.activate_past_recording()
    ours = drafter.make_draft_cache()
    g = torch.Generator().manual_seed(0)
    first = 0
    for i, n_ctx in enumerate([7, 3, 1, 5, 2]):
        start = first + n_ctx
        noise = torch.randn(1, block, hidden, generator=g)
        feats = torch.randn(1, n_ctx, 2 * hidden, generator=g)
        positions = torch.arange(first, start + block)[None]
        native_cache.set_previous_accepted_tokens(n_ctx)
        if i:
            native_cache.crop(-block)
        with torch.no_grad():
            a = drafter(noise_embeds=noise, context_hidden_states=feats, position_ids=positions,
                        attention_mask=torch.ones(1, start + block), cache=native_cache).last_hidden_state
            b = drafter(noise_embeds=noise, context_hidden_states=feats, position_ids=positions,
                        past_key_values=ours).last_hidden_state
        ours.crop(start)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        first = start
