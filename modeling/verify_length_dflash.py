"""How many tokens a DFlash step verifies: the length that maximises expected committed tokens per second.

A verify of `L` tokens per row feeds the anchor and the first `L - 1` drafts; each row commits its accepted prefix
plus one token of the target's own, so 1 to `L` tokens. `L = 1` is a plain autoregressive step: nothing is drafted
(the drafter only takes the new context row into its cache), so the loop is never much slower than decoding without
a drafter. Verifying more tokens pays off while a wider forward costs about as much as a narrow one (a small batch on
a GPU); on a CPU or in a large batch it costs real time, and the right length shrinks.

Costs come from a table measured per batch size at warm-up: `costs[L]`, seconds of one step that verifies `L` tokens,
its draft included. Acceptance comes from the run itself: for each block position `j`, the rate `a_j` at which the
`j`-th draft is accepted given that the ones before it were, from recent steps (exponentially decayed) and a prior.
The expected number of tokens a row commits when verifying `L` is

    E(L) = 1 + sum_{j=1}^{L-1} prod_{i=1}^{j} a_i

and the choice is the `L` with the largest `E(L) / costs[L]` (every active row shares the step, so the row count
cancels). An autoregressive step tries no draft and so teaches nothing about acceptance: after `explore_every`
autoregressive steps in a row, one step verifies the best drafting length, so that a text on which the drafter
becomes good (code after prose, a repetitive answer) is noticed. The choice depends only on earlier steps, never on the current step's draws: greedy output stays exact and
speculative sampling stays distribution-preserving whatever length is chosen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

#: What `verify_length=None` means everywhere (DFlashDecoder, the generate doors): "auto" adapts, "full" verifies the
#: whole block (plain DFlash).
DEFAULT_VERIFY_LENGTH = "auto"
_MODES = ("auto", "full")


def default_verify_lengths(block_size: int) -> tuple[int, ...]:
    """Candidate lengths for a block of `block_size`: 1, the powers of two below it, and the block itself."""
    lengths = {1, block_size}
    power = 2
    while power < block_size:
        lengths.add(power)
        power *= 2
    return tuple(sorted(lengths))


class VerifyLengthPolicy:
    """Chooses the verify length of each step. Subclasses override `choose` (and `observe` to learn from the run).

    The engine keeps one copy per batch size and sampling setting (`for_workspace`), hands it the measured cost table
    when `needs_costs`, asks `choose()` before each steady step and reports each step's committed counts to `observe`.
    """

    #: Whether the engine must measure the step cost of every candidate length before the first steady step.
    needs_costs = False

    def __init__(self, lengths: Sequence[int]):
        given = list(lengths)
        if not given or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in given):
            raise ValueError(f"verify lengths must be ints >= 1, got {given!r}.")
        self.lengths = tuple(sorted(set(given)))
        self.costs: dict[int, float] | None = None

    def for_workspace(self) -> "VerifyLengthPolicy":
        """An independent copy of this policy as given (one per batch size / sampling setting): what one workspace
        learns never reaches another."""
        return copy.deepcopy(self)

    def set_costs(self, costs: dict[int, float]) -> None:
        missing = [n for n in self.lengths if n not in costs]
        if missing:
            raise ValueError(f"the cost table has no entry for verify lengths {missing}.")
        self.costs = {n: float(costs[n]) for n in self.lengths}

    def choose(self) -> int:
        return self.lengths[-1]

    def observe(self, length: int, committed: Sequence[int]) -> None:
        """`committed[r]`: tokens row r committed in a step that verified `length` tokens (0 for a finished row)."""


class FixedVerifyLength(VerifyLengthPolicy):
    """Always the same length (`block_size` reproduces plain DFlash; 1 is autoregressive decoding)."""

    def __init__(self, length: int):
        super().__init__([length])


class AdaptiveVerifyLength(VerifyLengthPolicy):
    """The length with the most expected committed tokens per second (module docstring).

    Args:
        lengths: candidate lengths, e.g. `default_verify_lengths(block_size)`.
        prior: acceptance rate assumed for a position before the run has tried it.
        prior_weight: how many observations the prior counts for.
        decay: weight kept by older observations at each step (recent acceptance counts more).
        explore_every: after this many autoregressive steps in a row, verify the best drafting length once.
    """

    needs_costs = True

    def __init__(self, lengths: Sequence[int], *, prior: float = 0.7, prior_weight: float = 2.0, decay: float = 0.9,
                 explore_every: int = 16):
        super().__init__(lengths)
        if not 0 < prior < 1 or prior_weight <= 0 or not 0 < decay <= 1 or explore_every < 1:
            raise ValueError(f"need 0 < prior < 1, prior_weight > 0, 0 < decay <= 1 and explore_every >= 1; got "
                             f"prior={prior}, prior_weight={prior_weight}, decay={decay}, explore_every={explore_every}.")
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.explore_every = explore_every
        self.autoregressive_run = 0  # autoregressive steps chosen in a row
        positions = self.lengths[-1]  # index j = the j-th draft, 1 .. longest - 1
        self.tried = [0.0] * positions
        self.accepted = [0.0] * positions

    def acceptance_rates(self) -> list[float]:
        """`a_j` for j = 1 .. longest - 1: P(draft j accepted | drafts before it accepted)."""
        w = self.prior_weight
        return [(self.accepted[j] + self.prior * w) / (self.tried[j] + w) for j in range(1, len(self.tried))]

    def expected_tokens(self, length: int) -> float:
        """E(length): tokens a row is expected to commit in a step that verifies `length` tokens."""
        expected, survive = 1.0, 1.0
        for rate in self.acceptance_rates()[: length - 1]:
            survive *= rate
            expected += survive
        return expected

    def choose(self) -> int:
        if self.costs is None:  # before the cost table exists: the whole block, as plain DFlash
            return self.lengths[-1]
        rate = {n: self.expected_tokens(n) / self.costs[n] for n in self.lengths}
        best = max(self.lengths, key=lambda n: (rate[n], -n))
        if best != 1:
            self.autoregressive_run = 0
            return best
        self.autoregressive_run += 1
        drafting = [n for n in self.lengths if n > 1]
        if drafting and self.autoregressive_run > self.explore_every:
            self.autoregressive_run = 0
            return max(drafting, key=lambda n: (rate[n], -n))
        return 1

    def observe(self, length: int, committed: Sequence[int]) -> None:
        rows = [c for c in committed if c > 0]
        if not rows or length < 2:
            return  # an autoregressive step tries no draft
        for j in range(1, len(self.tried)):
            self.tried[j] *= self.decay
            self.accepted[j] *= self.decay
        for c in rows:
            accepted = min(c - 1, length - 1)
            # Draft j was tried when every draft before it was accepted; the last tried one is accepted + 1.
            for j in range(1, min(accepted + 1, length - 1) + 1):
                self.tried[j] += 1.0
                self.accepted[j] += 1.0 if j <= accepted else 0.0


def verify_length_policy(spec, block_size: int, can_skip_draft: bool) -> VerifyLengthPolicy:
    """The policy for `DFlashDecoder(verify_length=spec)`: None (`DEFAULT_VERIFY_LENGTH`), "auto", "full", an int,
    a sequence of candidate lengths, or a `VerifyLengthPolicy`. `can_skip_draft`: whether the drafter can take context
    rows without drafting (length 1)."""
    if spec is None:
        spec = DEFAULT_VERIFY_LENGTH
    if isinstance(spec, VerifyLengthPolicy):
        policy = spec
    elif isinstance(spec, str):
        if spec not in _MODES:
            raise ValueError(f"verify_length must be 'auto', 'full', an int in [1, {block_size}], a list of such ints "
                             f"or a VerifyLengthPolicy, got {spec!r}.")
        if spec == "full":
            return FixedVerifyLength(block_size)
        lengths = default_verify_lengths(block_size)
        policy = AdaptiveVerifyLength(lengths) if len(lengths) > 1 else FixedVerifyLength(lengths[0])
    elif isinstance(spec, int) and not isinstance(spec, bool):
        policy = FixedVerifyLength(spec)
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(n, int) and not isinstance(n, bool)
                                                           for n in spec):
        policy = AdaptiveVerifyLength(spec) if len(set(spec)) > 1 else FixedVerifyLength(spec[0])
    else:
        raise ValueError(f"verify_length must be 'auto', 'full', an int in [1, {block_size}], a list of such ints or "
                         f"a VerifyLengthPolicy, got {spec!r}.")
    bad = [n for n in policy.lengths if not 1 <= n <= block_size]
    if bad:
        raise ValueError(f"verify lengths {bad} are outside [1, {block_size}] (the drafter's block_size); a step "
                         "verifies the anchor and at most block_size - 1 drafts.")
    if not can_skip_draft and 1 in policy.lengths:
        if isinstance(spec, str):  # auto: leave 1 out rather than fail
            rest = [n for n in policy.lengths if n > 1]
            policy = AdaptiveVerifyLength(rest) if len(rest) > 1 else FixedVerifyLength(rest[0])
        else:
            raise ValueError("verify length 1 needs a drafter that can take context rows without drafting "
                             "(DFlashDraftModel.write_context, in dflash-hf's modeling_dflash.py); this drafter's "
                             "remote code predates it: reload it with the current code or use lengths >= 2.")
    return policy


__all__ = ["DEFAULT_VERIFY_LENGTH", "AdaptiveVerifyLength", "FixedVerifyLength", "VerifyLengthPolicy", "default_verify_lengths",
           "verify_length_policy"]
