"""Every released drafter layout on the batched engine: all-full (Qwen3/LLaMA), causal sliding + full (gemma-4,
Qwen3.6-27B), bidirectional sliding + full, all-causal.

Greedy equality alone cannot catch a wrong drafter mask (a random drafter's drafts are rejected either way), so the
drafts themselves are compared: for every block the engine drafts, its drafter output must equal what the drafter
model computes for the same block through its own cache and mask on transformers' assisted loop (the path
tests/test_architecture.py checks against a written-out reference of the algorithm). Each row of a left-padded
engine batch is compared with that prompt decoded alone.
"""

from __future__ import annotations

import pytest
import torch
from helpers import greedy, left_pad, random_prompt, tiny_drafter, tiny_target

import dflash_hf
from dflash_hf import DFlashDraftModel
from dflash_hf.modeling import integration_dflash
from dflash_hf.modeling.masks_dflash import drafter_layer_patterns

LAYOUTS = {
    "all-full": dict(layer_types=None, sliding_window=None),
    "gemma-4 (4 causal sliding + 1 full)": dict(layer_types=["sliding_attention"] * 4 + ["full_attention"],
                                                sliding_window=5),
    "full first, then sliding": dict(layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                     sliding_window=3),
    "bidirectional sliding + full (is_causal=False)": dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4, is_causal=False),
    "all-causal (is_causal=True)": dict(layer_types=None, sliding_window=None, is_causal=True),
}


class RecordingDrafter(DFlashDraftModel):
    """Records, per (prompt, block start), the drafter's output rows of every draft call."""

    def record_as(self, labels: list[str]) -> None:
        self.labels, self.seen = labels, {}

    def forward(self, noise_embeds=None, context_hidden_states=None, position_ids=None, *args, **kwargs):
        out = super().forward(noise_embeds, context_hidden_states, position_ids, *args, **kwargs)
        hidden = out if torch.is_tensor(out) else out.last_hidden_state
        block = hidden.shape[1]
        for r, label in enumerate(self.labels):
            self.seen[(label, int(position_ids[r, -block]))] = hidden[r].detach().clone()
        return out


def recording_drafter(target, layout: str, block_size: int = 6) -> RecordingDrafter:
    kw = LAYOUTS[layout]
    layers = len(kw["layer_types"]) if kw["layer_types"] else 2
    base = tiny_drafter(target, layers=layers, block_size=block_size, layer_ids=[0, 2, 4], **kw)
    drafter = RecordingDrafter(base.config)
    drafter.load_state_dict(base.state_dict())
    with torch.no_grad():  # non-trivial norm weights, so that every part of the forward shows in the rows
        for p in drafter.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return drafter.eval()


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", layers=6, hidden=64)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_engine_drafts_equal_the_model_drafts(target, layout, monkeypatch):
    monkeypatch.setattr(integration_dflash, "_warned", set())  # the fallback warns once per process
    drafter = recording_drafter(target, layout)
    prompts = [random_prompt(23, seed=1), random_prompt(14, seed=2)]
    new = 20
    reference = {}
    for i, prompt in enumerate(prompts):
        drafter.record_as([f"p{i}"])
        integration_dflash._warned.clear()
        # Per-token logits send the call to transformers' assisted loop, which drafts through the model's own cache.
        with pytest.warns(UserWarning, match="output_logits"):
            out = greedy(target, prompt, new, assistant_model=drafter, eos_token_id=None, return_dict_in_generate=True,
                         output_logits=True).sequences
        assert out[0, prompt.shape[1]:].tolist() == greedy(target, prompt, new, eos_token_id=None)[0, prompt.shape[1]:].tolist()
        reference.update(drafter.seen)

    ids, mask = left_pad(prompts)
    drafter.record_as([f"p{i}" for i in range(len(prompts))])
    out = dflash_hf.generate(target, drafter, ids, mask, max_new_tokens=new, stop_token_ids=[])
    for r, p in enumerate(prompts):
        assert out.new_tokens[r] == greedy(target, p, new, eos_token_id=None)[0, p.shape[1]:].tolist()
    compared = 0
    for (label, start), rows in drafter.seen.items():
        if (label, start) in reference:
            # Row 0 is the anchor's; rows 1.. are the drafts. A row that read a wrong key would differ by O(1).
            torch.testing.assert_close(rows, reference[(label, start)], rtol=1e-4, atol=1e-4,
                                       msg=f"{layout}: block at {start} of {label}")
            compared += 1
    assert compared >= new, f"only {compared} blocks were drafted by both"


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if LAYOUTS[k]["layer_types"]])
def test_plain_generate_runs_mixed_drafters_on_the_engine(target, layout, recwarn):
    """The door no longer falls back to transformers' loop for mixed layouts: a left-padded batch works, greedy-equal
    per row, and no fallback warning is given."""
    drafter = recording_drafter(target, layout)
    drafter.record_as(["a", "b"])
    assert len(set(drafter_layer_patterns(drafter.config).values())) > 1
    prompts = [random_prompt(17, seed=5), random_prompt(9, seed=6)]
    ids = torch.zeros(2, 17, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, 17 - p.shape[1]:], mask[r, 17 - p.shape[1]:] = p[0], 1
    out = target.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=12,
                          eos_token_id=None, pad_token_id=0)
    for r, p in enumerate(prompts):
        assert out[r, 17:].tolist() == greedy(target, p, 12, eos_token_id=None)[0, p.shape[1]:].tolist()
    assert drafter.last_stats is not None and drafter.last_stats.verify_steps is not None
    assert not [w for w in recwarn if "assisted" in str(w.message) or "engine" in str(w.message)]
