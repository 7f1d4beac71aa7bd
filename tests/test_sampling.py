"""Sampling through a DFlash drafter keeps the target's output distribution (speculative sampling is lossless).

A tiny-vocabulary target generates 4 tokens per run, many seeded runs. The empirical distribution of generated
tokens 2, 3 and 4 (those that can come from drafts, rejections, residual resampling and bonus tokens) is compared by a
chi-square test with the exact marginal computed by enumerating every prefix with the target itself, under the
same temperature / top-k / top-p warpers. The seed is fixed, so the test is deterministic; the threshold is p = 0.001.

Power, checked in a throwaway experiment that patched `_speculative_sampling` in transformers.generation.utils, with
these very runs: "always accept the drafts" fails with p ~ 1e-116 (random drafter) and 1e-6 (oracle drafter);
"resample from p instead of the residual max(p - q, 0)" fails with p ~ 7e-10 (random drafter). The oracle drafter's
drafts are almost always right, so it exercises accepted chains and bonus tokens rather than the residual.
"""

from __future__ import annotations

import pytest
import torch
from helpers import OracleDrafter, tiny_drafter, tiny_target
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 16
PROMPT = torch.tensor([[7, 3, 9, 4, 12]])
NEW = 4
SETTINGS = dict(temperature=0.9, top_k=10, top_p=0.9)
P_THRESHOLD = 1e-3
RUNS = {"random drafter": 300, "oracle drafter": 200}  # the power numbers above were measured at 300


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", vocab=VOCAB, hidden=32, layers=3, seed=3)


def warp(logits: torch.Tensor, settings: dict = SETTINGS) -> torch.Tensor:
    """`[n, V]` raw logits -> probabilities, with transformers' warpers in generate's order."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings["temperature"]),
                                   TopKLogitsWarper(settings["top_k"]), TopPLogitsWarper(settings["top_p"])])
    if "min_p" in settings:
        warpers.append(MinPLogitsWarper(settings["min_p"]))
    return warpers(None, logits.float()).softmax(-1)


@torch.no_grad()
def exact_marginals(target, steps: int, settings: dict = SETTINGS) -> list[torch.Tensor]:
    """Marginal distribution `[V]` of each of the first `steps` generated tokens, by enumerating every prefix of
    nonzero probability with plain target forwards."""
    prefixes, weights = PROMPT, torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(steps):
        probs = warp(target(prefixes).logits[:, -1], settings).double()  # [n, V]
        joint = weights[:, None] * probs
        marginals.append(joint.sum(0))
        rows, tokens = joint.nonzero(as_tuple=True)
        prefixes = torch.cat([prefixes[rows], tokens[:, None]], dim=1)
        weights = joint[rows, tokens]
    return marginals


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value; categories expected below 5 are pooled into one bin."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)]).double()
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)]).double()
    keep = exp > 0
    assert (obs[~keep] == 0).all(), "a token of probability zero was generated"
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def sample_runs(target, drafter, runs: int, seed: int) -> torch.Tensor:
    """`[runs, NEW]` generated tokens of seeded `target.generate(..., assistant_model=drafter)` calls."""
    torch.manual_seed(seed)
    out = [
        target.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), assistant_model=drafter, do_sample=True,
                        max_new_tokens=NEW, eos_token_id=None, pad_token_id=0, **SETTINGS)[0, -NEW:]
        for _ in range(runs)
    ]
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["random drafter", "oracle drafter"])
def test_sampled_tokens_follow_the_target_distribution(target, kind):
    if kind == "oracle drafter":
        # Drafts along the target's greedy path: mostly accepted, so accepted chains and bonus tokens are tested.
        drafter = OracleDrafter.for_target(target, block_size=4, layer_ids=[0, 1], mask_token_id=5)
    else:
        drafter = tiny_drafter(target, block_size=4, layer_ids=[0, 1], mask_token_id=5)
    try:
        samples = sample_runs(target, drafter, runs=RUNS[kind], seed=1234)
        taus = drafter.last_stats.acceptance_lengths
    finally:
        if isinstance(drafter, OracleDrafter):
            drafter.close()
    assert samples.shape == (RUNS[kind], NEW)
    marginals = exact_marginals(target, NEW)
    for position in (1, 2, 3):  # generated tokens 2, 3 and 4
        counts = torch.bincount(samples[:, position], minlength=VOCAB)
        p = chi_square_p(counts, marginals[position])
        assert p > P_THRESHOLD, (position, p, counts.tolist(), (marginals[position] * RUNS[kind]).round().tolist())
    assert sum(taus) == NEW - 1


def test_one_batch_with_min_p_follows_the_target_distribution(target):
    """The same check with min-p added, all runs as the rows of one `generate` call (a batch through the engine):
    every row is an independent sample of the target's distribution."""
    settings = dict(SETTINGS, min_p=0.4)
    runs = RUNS["random drafter"]
    drafter = tiny_drafter(target, block_size=4, layer_ids=[0, 1], mask_token_id=5)
    torch.manual_seed(4321)
    ids = PROMPT.expand(runs, -1)
    out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=drafter, do_sample=True,
                          max_new_tokens=NEW, eos_token_id=None, pad_token_id=0, **settings)
    samples = out[:, -NEW:]
    marginals = exact_marginals(target, NEW, settings)
    assert not torch.allclose(marginals[1], exact_marginals(target, 2)[1])  # min-p changes the distribution
    for position in range(NEW):
        counts = torch.bincount(samples[:, position], minlength=VOCAB)
        p = chi_square_p(counts, marginals[position])
        assert p > P_THRESHOLD, (position, p, counts.tolist(), (marginals[position] * runs).round().tolist())


def test_chi_square_has_power(target):
    """The statistic above rejects a wrong distribution at this sample size: here the marginal of token 2 against
    tokens drawn from token 3's marginal (which differs), the kind of shift a broken acceptance rule produces."""
    marginals = exact_marginals(target, 3)
    g = torch.Generator().manual_seed(0)
    runs = RUNS["random drafter"]
    wrong = torch.multinomial(marginals[2].float(), runs, replacement=True, generator=g)
    right = torch.multinomial(marginals[1].float(), runs, replacement=True, generator=g)
    assert chi_square_p(torch.bincount(wrong, minlength=VOCAB), marginals[1]) < P_THRESHOLD
    assert chi_square_p(torch.bincount(right, minlength=VOCAB), marginals[1]) > P_THRESHOLD
