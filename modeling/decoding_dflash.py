"""A fast, batched DFlash decode loop (gpt-fast style): static caches, one step = draft + verify + accept on the GPU.

Why not transformers' assisted loop: it runs one sequence at a time, eagerly, with several host syncs and per-token
Python work per step; on a small target the GPU then idles most of the time. Here every row of a left-padded batch
advances by its own number of accepted tokens inside fixed-shape tensors, so a whole step can be captured once as
CUDA graphs and replayed; the host reads one small tensor per step (are all rows done?).

Cache layout (both target and drafter, `RowStaticCache`): slot `s` of row `r` holds the token at position
`s - pad[r]`, where `pad[r]` is the row's left padding. `length[r]` counts slots of committed tokens, anchor included;
the anchor (newest committed token) has no target K/V yet. Each step

1. drafts: the drafter reads the previous verify's B feature rows (written at their token slots; rows past the
   accepted ones are masked until overwritten) plus the block `[anchor, MASK x (B-1)]` (written to B scratch slots
   after the capacity), and the target head turns rows 1..B-1 into drafts;
2. verifies: the target runs on `[anchor, drafts]` at slots `length-1 .. length+B-2`, with a 4D mask that hides
   padding, stale rejected slots and (sliding layers) keys outside the window;
3. accepts per row: greedy prefix match, or speculative sampling (Leviathan et al.); commits up to the row's token
   budget and its first stop token; rejected K/V stay in the cache but are masked and later overwritten.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
import weakref
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .compat_dflash import (
    cache_kwarg,
    forward_accepts,
    keeps_hidden_states_with_logits_to_keep,
    recurrent_state_through_cache,
    stock_loop_limitation,
)
from .generation_dflash import TargetFeatureCapture, check_drafter_fits_target, embed_block, target_text_config
from .masks_dflash import drafter_block_masks, recurrent_layer_kinds, target_layer_masks, target_mask_windows
from .verify_length_dflash import FixedVerifyLength, VerifyLengthPolicy, verify_length_policy


class RowStaticCache:
    """Static K/V `[batch, kv_heads, capacity, head_dim]` per layer, written at per-row slots.

    Set `write_slots` (`[batch, rows]`, one slot per new K/V row) before each forward; `update` scatters the new rows
    there and returns the whole buffer, so attention shapes never change (the mask says what is visible). Buffers are
    allocated on the first (eager) update, from the shapes the model actually produces.

    Hybrid targets' linear-attention layers keep a conv state `[batch, channels, kernel]` and a recurrent state
    `[batch, heads, k_dim, v_dim]` per layer here instead, through the cache methods those layers call (transformers
    5.25). A verify forward of q tokens returns its inputs and every intermediate state (`keep_states = q`); they stay
    pending until `commit_states(count)` keeps, per row, the states after that row's first `count[r]` tokens, so a
    rejected draft never reaches the state. During the prefill (`prefilling`), the layers start from no state.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write_slots: torch.Tensor | None = None
        self.conv_states: dict[int, torch.Tensor] = {}
        self.recurrent_states: dict[int, torch.Tensor] = {}
        self._pending_conv: dict[int, torch.Tensor] = {}  # [batch, channels, kernel + q]: stored state, then inputs
        self._pending_recurrent: dict[int, torch.Tensor] = {}  # [1 + q, batch, ...]: the state after 0 .. q tokens
        self.prefilling = True
        self.keep_states = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            batch, heads, _, dim = key.shape
            self.keys[layer_idx] = key.new_zeros(batch, heads, self.capacity, dim)
            self.values[layer_idx] = value.new_zeros(batch, heads, self.capacity, value.shape[-1])
        index = self.write_slots[:, None, :, None]
        self.keys[layer_idx].scatter_(2, index.expand(-1, key.shape[1], -1, key.shape[-1]), key)
        self.values[layer_idx].scatter_(2, index.expand(-1, value.shape[1], -1, value.shape[-1]), value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def reset(self) -> None:
        for buffer in (*self.keys.values(), *self.values.values()):
            buffer.zero_()
        self._pending_conv.clear()
        self._pending_recurrent.clear()
        self.prefilling, self.keep_states = True, 0

    # -------------------------------------------------------------------- linear-attention layers (hybrid targets)
    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return None if self.prefilling else self.conv_states.get(layer_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return None if self.prefilling else self.recurrent_states.get(layer_idx)

    def is_recording_past(self, layer_idx: int) -> bool:
        return True  # never the in-place one-token conv update: every update goes through `update_conv_state`

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        pass  # positions are passed explicitly; no token count to keep

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return self.keep_states

    def update_conv_state(self, inputs: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """`inputs` `[batch, channels, q]` -> what the causal convolution reads: `[state ; inputs]` (the inputs
        alone at the prefill, whose last `kernel` columns become the state)."""
        if self.prefilling:
            kernel = conv_kernel_size or inputs.shape[-1]
            last = torch.nn.functional.pad(inputs, (max(kernel - inputs.shape[-1], 0), 0))[..., -kernel:]
            self._store(self.conv_states, layer_idx, last)
            return inputs
        full = torch.cat([self.conv_states[layer_idx], inputs], dim=-1)
        self._pending_conv[layer_idx] = full
        return full

    def update_recurrent_state(self, states: torch.Tensor | list[torch.Tensor], layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        """The final state (prefill), or the state after each of the q verified tokens (a list, or one tensor when
        q = 1)."""
        if self.prefilling:
            self._store(self.recurrent_states, layer_idx, states if torch.is_tensor(states) else states[-1])
            return self.recurrent_states[layer_idx]
        after_each = [states] if torch.is_tensor(states) else list(states)
        self._pending_recurrent[layer_idx] = torch.stack([self.recurrent_states[layer_idx], *after_each])
        return after_each[-1]

    def commit_states(self, count: torch.Tensor) -> None:
        """Keep, per row, the linear-attention states after the row's first `count[r]` verified tokens `[batch]`
        (0 keeps the state from before the verify)."""
        for layer_idx, stacked in self._pending_recurrent.items():  # [1 + q, batch, ...]
            rows = torch.arange(stacked.shape[1], device=stacked.device)
            self.recurrent_states[layer_idx].copy_(stacked[count, rows])
        for layer_idx, full in self._pending_conv.items():  # [batch, channels, kernel + q]
            kernel = self.conv_states[layer_idx].shape[-1]
            columns = count[:, None, None] + torch.arange(kernel, device=full.device)[None, None]
            self.conv_states[layer_idx].copy_(full.gather(-1, columns.expand(-1, full.shape[1], -1)))
        self._pending_recurrent.clear()
        self._pending_conv.clear()

    @staticmethod
    def _store(buffers: dict[int, torch.Tensor], layer_idx: int, value: torch.Tensor) -> None:
        # Copied into the first buffer, so that captured graphs keep reading the same memory.
        if layer_idx in buffers and buffers[layer_idx].shape == value.shape:
            buffers[layer_idx].copy_(value)
        else:
            buffers[layer_idx] = value.detach().clone()


@dataclass
class DFlashGenerateOutput:
    """Result of `generate`. `sequences` is `[batch, prompt + generated]`: the prompts as given (left padding kept),
    then each row's new tokens, then `pad_token_id` after the row's end."""

    sequences: torch.LongTensor
    new_tokens: list[list[int]]
    acceptance_lengths: list[list[int]]
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_total: float = 0.0
    steps: int = 0
    verify_lengths: list[int] = field(default_factory=list)  # tokens per row each step verified (anchor included)
    extra: dict = field(default_factory=dict)

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.new_tokens)

    @property
    def mean_acceptance_length(self) -> float:
        flat = [a for row in self.acceptance_lengths for a in row]
        return sum(flat) / max(len(flat), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.time_total if self.time_total > 0 else float("nan")


def _sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
                    ) -> torch.Tensor:
    """`[..., V]` logits -> probabilities after temperature, top-k, top-p and min-p, in transformers' order (all
    shape-static, graph-safe)."""
    # Shifted so that the top score is 0 and stays 0: a temperature too small for float32 (1e-300 is 0 there) then
    # gives -inf below the top, i.e. argmax sampling, instead of NaN; softmax is shift-invariant, so nothing else moves.
    scores = logits.float()
    scores = scores - scores.amax(dim=-1, keepdim=True)
    scores = torch.where(scores == 0, scores, scores / temperature)
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


class _Sampling(NamedTuple):
    """How tokens are chosen: argmax, or a draw after temperature, top-k, top-p and min-p (a workspace key)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return _sampling_probs(logits, self.temperature, self.top_k, self.top_p, self.min_p)


def _sample(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of `[..., V]` probabilities (exponential race: argmax p / E, E ~ Exp(1); graph-safe)."""
    race = torch.empty_like(probs).exponential_()
    return (probs / race).argmax(dim=-1)


class OneCallAtATime:
    """A lock for what one call at a time may use: calls from other threads wait their turn; a call from inside a
    running call on the same thread (a streamer or callback calling back in) raises instead of deadlocking or
    corrupting the running call."""

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> None:
        if self._owner == threading.get_ident():
            raise RuntimeError(
                f"{self.what} was started from inside a running one on the same thread (from a streamer or "
                "callback?); finish the first call before starting another."
            )
        self._lock.acquire()
        self._owner = threading.get_ident()

    def __exit__(self, *exc) -> None:
        self._owner = None
        self._lock.release()


_TARGET_GUARDS: "weakref.WeakKeyDictionary[nn.Module, OneCallAtATime]" = weakref.WeakKeyDictionary()
_TARGET_GUARDS_LOCK = threading.Lock()


def target_guard(target: nn.Module) -> OneCallAtATime:
    """The guard of `target`: DFlash calls on one target take turns, whatever engine or loop runs them, because each
    hooks the target's decoder layers for the length of the call (and an engine's caches serve one call at a time)."""
    with _TARGET_GUARDS_LOCK:
        guard = _TARGET_GUARDS.get(target)
        if guard is None:
            guard = _TARGET_GUARDS[target] = OneCallAtATime(f"a DFlash call on this {type(target).__name__}")
        return guard


def engine_limitation(target: nn.Module, drafter: nn.Module | None) -> str | None:
    """Why the batched loop cannot run this pair, in one sentence with the fix; None when it can."""
    implementation = getattr(target.config, "_attn_implementation", "sdpa") or "sdpa"
    if implementation.startswith("flash") or implementation.startswith("flex"):
        return (
            f"the batched DFlash loop passes explicit 4D masks, which the target's attn_implementation="
            f"{implementation!r} cannot take; load the target with attn_implementation='sdpa'"
        )
    text = target_text_config(target)
    try:
        target_mask_windows(text)
    except ValueError as error:
        return f"the target {type(target).__name__}: {error}"
    recurrent = recurrent_layer_kinds(text)
    if recurrent and not recurrent_state_through_cache():
        import transformers

        return (
            f"the target {type(target).__name__} has {recurrent} layers, whose state the engine holds per row "
            f"through the cache methods of transformers >= 5.25 (installed: {transformers.__version__}); "
            "pip install 'transformers>=5.25'"
        )
    return None


class DFlashDecoder:
    """Batched DFlash decoding for one target/drafter pair; keeps its static caches and CUDA graphs between calls.

    Args:
        target: a decoder-only `*ForCausalLM` (sdpa or eager attention).
        drafter: a `DFlashDraftModel` that fits it, or None for plain autoregressive decoding through the same
            static caches and CUDA graphs (one token per row per step: fast batched generation with no drafter, and
            the loop's own AR baseline).
        max_length: capacity in tokens per row (prompt + new tokens) for the static caches.
        cuda_graphs: capture the draft and verify steps as CUDA graphs (default: when on CUDA).
        compile: run the steady-state draft step and the verify's target forward through `torch.compile` (inductor
            fuses HF's many small kernels; default: when on CUDA); the acceptance stays eager. Compilation happens on
            first use per batch size.
        max_sampling_workspaces: how many sampling settings (temperature, top-k, top-p, min-p per batch size) keep
            their static caches and graphs at once; the oldest is dropped for a new one (greedy ones always stay).
        verify_length: how many tokens per row a step verifies (the anchor and that many drafts minus one).
            "auto" (the default, `verify_length_dflash.DEFAULT_VERIFY_LENGTH`) picks, before each step, the length among 1, 2, 4, ..., block_size with the most
            expected committed tokens per second, from step costs measured per batch size on the first call and
            the acceptance seen so far; 1 is a plain autoregressive step that skips the draft, so the loop is not
            much slower than decoding without a drafter even where drafting does not pay (a CPU, a large batch).
            "full" verifies the whole block (plain DFlash), an int fixes the length, a list gives the candidates,
            and a `VerifyLengthPolicy` decides itself. Greedy output never depends on it, nor does the sampled
            distribution; a seeded sampling call (`generator=`) verifies the longest candidate every step under an
            adaptive policy, because which tokens a seed draws depends on how the steps are cut.
    """

    def __init__(
        self,
        target: nn.Module,
        drafter: nn.Module | None,
        max_length: int = 2048,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        max_sampling_workspaces: int = 4,
        verify_length: int | str | list[int] | VerifyLengthPolicy | None = None,
    ):
        if isinstance(max_sampling_workspaces, bool) or not isinstance(max_sampling_workspaces, int) \
                or max_sampling_workspaces < 1:
            raise ValueError(f"max_sampling_workspaces must be an int >= 1, got {max_sampling_workspaces!r}.")
        self.max_sampling_workspaces = max_sampling_workspaces
        if drafter is not None:
            check_drafter_fits_target(drafter, target)
        limitation = engine_limitation(target, drafter)
        if limitation is not None:
            cannot = stock_loop_limitation(target)
            way_out = ("target.generate(assistant_model=drafter) serves such a pair one prompt at a time on "
                       "transformers' assisted loop" if cannot is None else f"Nor can the other doors yet: {cannot}")
            raise ValueError(f"DFlashDecoder: {limitation}. {way_out}.")
        text = target_text_config(target)
        limit = getattr(text, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            max_length = limit
        self.target, self.drafter = target, drafter
        self.device = next(target.parameters()).device
        # Without a drafter a step verifies the anchor alone: the target's next token, i.e. one AR step.
        self.block_size = drafter.config.block_size if drafter is not None else 1
        self.verify_policy = verify_length_policy(verify_length, self.block_size,
                                                  can_skip_draft=drafter is None or hasattr(drafter, "write_context"))
        self.max_length = max_length
        self.position_limit = limit
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs the target on a CUDA device, but it is on {self.device}; leave cuda_graphs "
                "unset (on only on CUDA) or pass False."
            )
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.compile = (self.device.type == "cuda") if compile is None else compile
        self.target_windows = target_mask_windows(text)
        self.recurrent_kinds = recurrent_layer_kinds(text)  # hybrid targets: their states live in RowStaticCache
        self.cache_kwarg = cache_kwarg(target)
        self.pass_cache_position = forward_accepts(target, "cache_position")
        self.can_keep_last_logits = keeps_hidden_states_with_logits_to_keep(target)
        self.lm_head = target.get_output_embeddings()
        self._workspaces: dict[tuple, "_Workspace"] = {}
        self._one_call_at_a_time = target_guard(target)

    # ------------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        min_new_tokens: int = 0,
        stop_token_ids: list[int] | int | None = None,
        pad_token_id: int | None = None,
        stopping_criteria: Callable | None = None,
        streamer=None,
        stream_prompt: bool = True,
        generator: torch.Generator | None = None,
        progress: bool = False,
        on_step: Callable[[list[list[int]]], None] | None = None,
    ) -> DFlashGenerateOutput:
        """Decode `input_ids` `[batch, prompt]` (left-padded, `attention_mask` 1 for real tokens).

        `stop_token_ids=None` stops at `target.generation_config.eos_token_id`, as `target.generate` does; pass `[]`
        to generate exactly `max_new_tokens` per row. `min_new_tokens` keeps the stop tokens out of a row's first
        tokens (transformers' `min_new_tokens`). Sampling applies temperature, top-k, top-p and min-p in that order,
        as transformers does.

        `stopping_criteria` (transformers' protocol: `criteria(ids [1, len], scores) -> [1] bool`, e.g. a
        `StoppingCriteriaList` with a `StopStringCriteria`) ends a row after the first token at which it says stop.
        It is checked on the host after every committed token, on that row alone with `scores=None`: criteria that
        need the scores are not supported. Stop ids and the length budget need no criteria.

        `on_step(chunks)` streams a batch of any size: it is called once after the prefill and once after every
        step with `chunks[r]`, the tokens row r committed then (empty once the row is done); each row's chunks
        concatenate to its `new_tokens`. The tokens travel with the step's one host sync, so it adds no sync.
        `streamer` (transformers' protocol) takes batch 1 only; `stream_prompt=False` when the caller has already
        put the prompt into it (transformers' `generate` does).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got shape {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids[None]."
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids."
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if do_sample and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0 when do_sample=True, got {temperature}; use do_sample=False "
                "for greedy."
            )
        if not 0 < top_p <= 1 or top_k < 0 or not 0 <= min_p < 1:
            raise ValueError(
                f"top_p must be in (0, 1], top_k >= 0 and min_p in [0, 1), got top_p={top_p}, top_k={top_k}, "
                f"min_p={min_p}."
            )
        if min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}.")
        batch, prompt_len = input_ids.shape
        needed = prompt_len + max_new_tokens
        if self.position_limit is not None and needed > self.position_limit:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds the target's "
                f"max_position_embeddings {self.position_limit}; shorten the prompt or lower max_new_tokens."
            )
        if needed > self.max_length:
            raise ValueError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {needed} exceeds this decoder's "
                f"max_length {self.max_length}; create DFlashDecoder(..., max_length={needed}) or larger."
            )
        if streamer is not None and batch != 1:
            raise ValueError(f"streamer supports batch 1 only (as in transformers), got batch {batch}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("A row of attention_mask is all zeros: every prompt needs at least one real token.")
        if stop_token_ids is None:  # as target.generate: stop at the target's EOS; pass [] for no stop tokens
            stop_token_ids = getattr(getattr(self.target, "generation_config", None), "eos_token_id", None)
        stops = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids or [])
        if pad_token_id is None:
            pad_token_id = target_text_config(self.target).pad_token_id
            pad_token_id = stops[0] if pad_token_id is None and stops else (pad_token_id or 0)

        sampling = _Sampling(do_sample, temperature, top_k, top_p, min_p) if do_sample else _Sampling()
        # With a generator, the draws come from a private copy of the RNG state seeded from it: the caller's global
        # torch RNG is the same after the call as before (the captured graphs draw from the default generator).
        private_rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                            enabled=generator is not None)
        with self._one_call_at_a_time, private_rng:
            workspace = self._workspace(batch, sampling, len(stops), min_new_tokens > 0 and bool(stops))
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
            if streamer is not None and stream_prompt:
                streamer.put(input_ids.cpu())
            return workspace.run(
                input_ids.to(self.device), attention_mask.to(self.device), max_new_tokens, min_new_tokens, stops,
                pad_token_id, stopping_criteria, streamer, progress, on_step, seeded=generator is not None,
            )

    def cost_tables(self) -> dict[int, dict[int, float]]:
        """Measured seconds per step for each candidate verify length, per batch size (filled on the first call of
        each batch size when `verify_length` adapts)."""
        return {ws.batch: dict(ws.costs) for ws in self._workspaces.values() if ws.costs is not None}

    @property
    def compile_failures(self) -> list[str]:
        """Steps whose `torch.compile` failed and that run uncompiled since, as "step (batch N): ErrorType", over
        every batch size and sampling setting used so far; empty when compiling worked or is off."""
        return [f"{fn.name} (batch {ws.batch}): {type(fn.failure).__name__}" for ws in self._workspaces.values()
                for fn in (ws.steady_draft, ws.verify_forward)
                if isinstance(fn, _CompiledOrEager) and fn.failure is not None]

    def evict_sampling_workspaces(self, keep: int) -> int:
        """Drop the oldest sampling workspaces (static caches and CUDA graphs of one batch size and sampling setting)
        beyond the newest `keep`; greedy ones stay. Returns how many were dropped. For a long-running server whose
        clients send many distinct temperatures."""
        with self._one_call_at_a_time:
            return self._evict_sampled(keep)

    def _evict_sampled(self, keep: int) -> int:
        sampled = [key for key in self._workspaces if key[1].do_sample]
        dropped = sampled[: max(len(sampled) - keep, 0)]
        for key in dropped:
            del self._workspaces[key]
        return len(dropped)

    def _workspace(self, batch: int, sampling: "_Sampling", n_stops: int, min_length: bool) -> "_Workspace":
        key = (batch, sampling, n_stops, min_length)
        if key not in self._workspaces:
            if sampling.do_sample:  # bounded: each one holds static caches (and graphs) of its own
                self._evict_sampled(self.max_sampling_workspaces - 1)
            self._workspaces[key] = _Workspace(self, batch, sampling, n_stops, min_length)
        return self._workspaces[key]


def last_error_line(text: str) -> str | None:
    """The last line of `text` that names an exception (`SomethingError: ...`): the cause, in a message that may carry
    a whole traceback (inductor's do)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), None)


class _CompiledOrEager:
    """`torch.compile(fn)` that falls back to `fn` itself, with a warning, when compiling fails: a compiler bug in the
    installed torch / Triton (one was met on the H200) must cost speed, said out loud, not the generation.

    Compilation happens on the first call, before the compiled code runs, and `fn` writes the same values into the
    same static buffers either way, so running `fn` after a failed compile is safe.
    """

    def __init__(self, fn: Callable, name: str):
        from torch._dynamo.exc import TorchDynamoException  # inductor's and Triton's errors derive from it

        self.eager, self.name = fn, name
        self.compiled = torch.compile(fn, dynamic=False)
        self.compile_errors = (TorchDynamoException,)
        self.failure: Exception | None = None

    def __call__(self, *args, **kwargs):
        if self.failure is None:
            try:
                return self.compiled(*args, **kwargs)
            except self.compile_errors as error:
                self.failure = error
                text = str(error).strip()
                cause = last_error_line(text) or (text.splitlines()[0] if text else type(error).__name__)
                warnings.warn(
                    f"DFlashDecoder: torch.compile failed for the {self.name} ({type(error).__name__}: {cause}); it "
                    "runs without compile from now on (CUDA graphs still apply, but steps are slower). Pass "
                    "compile=False to skip compiling.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.eager(*args, **kwargs)


class _HostCommits:
    """What the host does with the tokens a step committed: read them with the step's one sync, end rows that a
    stopping criterion stops (cutting the tokens after it), and hand them to the streamer and `on_step`."""

    def __init__(self, workspace: "_Workspace", input_ids, stopping_criteria, streamer, on_step):
        self.ws = workspace
        self.criteria = stopping_criteria
        self.streamer, self.on_step = streamer, on_step
        self.wants_tokens = stopping_criteria is not None or streamer is not None or on_step is not None
        # Each row as the criteria see it: the prompt as given (padding included, as in transformers), then its
        # committed tokens.
        self.rows = input_ids.tolist() if stopping_criteria is not None else None

    def receive(self) -> tuple[list[int], bool]:
        """Tokens committed by the last step per row, and whether every row is done (one host sync)."""
        ws, batch = self.ws, self.ws.batch
        parts = [ws.committed, ws.done.long()]
        if self.wants_tokens:
            cols = (ws.generated - ws.committed)[:, None] + ws.arange_b[None]
            parts.append(ws.out.gather(1, cols.clamp_max(ws.out.shape[1] - 1)).flatten())
        state = torch.cat(parts).cpu()
        committed = state[:batch].tolist()
        done = [bool(x) for x in state[batch : 2 * batch].tolist()]
        if not self.wants_tokens:
            return committed, all(done)
        block = state[2 * batch :].view(batch, -1).tolist()
        chunks = [block[r][: committed[r]] for r in range(batch)]
        if self.criteria is not None:
            for r in range(batch):
                keep = self._tokens_before_stop(r, chunks[r])
                if keep is not None:
                    self._end_row(r, committed[r] - keep)
                    chunks[r], committed[r], done[r] = chunks[r][:keep], keep, True
        if self.streamer is not None and chunks[0]:
            self.streamer.put(torch.tensor(chunks[0]))
        if self.on_step is not None:
            self.on_step(chunks)
        return committed, all(done)

    def _tokens_before_stop(self, r: int, chunk: list[int]) -> int | None:
        """How many of `chunk` row r keeps when a criterion stops it inside the chunk (the stopping token included);
        None when none does."""
        for k, token in enumerate(chunk):
            self.rows[r].append(token)
            if bool(self.criteria(torch.tensor([self.rows[r]]), None).any()):
                return k + 1
        return None

    def _end_row(self, r: int, drop: int) -> None:
        ws = self.ws
        if drop:
            ws.generated[r] -= drop
        ws.done[r] = True


class _Workspace:
    """Static buffers, caches and (on CUDA) the two captured graphs for one batch size and sampling setting."""

    def __init__(self, decoder: DFlashDecoder, batch: int, sampling: _Sampling, n_stops: int, min_length: bool):
        self.d = decoder
        self.batch = batch
        self.sampling = sampling
        self.do_sample = sampling.do_sample
        # With a minimum length, stop tokens are masked out of the logits of a row's first `min_new` tokens.
        self.min_length = min_length
        B, device = decoder.block_size, decoder.device
        self.capacity = decoder.max_length + B
        self.target_cache = RowStaticCache(self.capacity)
        self.draft_cache = RowStaticCache(self.capacity + B)  # the last B slots are the block scratch
        self.has_drafter = decoder.drafter is not None
        layer_ids = decoder.drafter.config.target_layer_ids if self.has_drafter else []
        self.capture = TargetFeatureCapture(decoder.target, layer_ids)
        long = dict(dtype=torch.long, device=device)
        # Per-row state.
        self.pad = torch.zeros(batch, **long)
        self.length = torch.zeros(batch, **long)  # committed slots, anchor included
        self.ctx_base = torch.zeros(batch, **long)  # slot of the first pending context row
        self.generated = torch.zeros(batch, **long)
        self.budget = torch.zeros(batch, **long)
        self.min_new = torch.zeros((), **long)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.committed = torch.zeros(batch, **long)  # tokens committed by the last step
        self.anchor = torch.zeros(batch, **long)
        self.stops = torch.zeros(max(n_stops, 1), **long)
        self.n_stops = n_stops
        self.out = torch.zeros(batch, decoder.max_length + B, **long)  # new tokens; fixed address for the graphs
        self.ctx_features: torch.Tensor | None = None  # [batch, B, k*H], features of the last verify
        self.drafts = torch.zeros(batch, B - 1, **long)
        self.draft_probs: torch.Tensor | None = None
        self.arange_b = torch.arange(B, device=device)
        self.slot_ids = torch.arange(self.capacity + B, device=device)
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}  # ("draft" | "verify", verify length)
        self.policy = decoder.verify_policy.for_workspace()
        self.costs: dict[int, float] | None = None  # seconds per step by verify length, measured on first use
        self.capture_failure: Exception | None = None  # set when CUDA graphs could not be captured: steps run eagerly
        steady_draft = functools.partial(self._draft, decoder.block_size)
        self.steady_verify = self._verify_and_accept
        if decoder.compile:
            # The model forwards are what compilation pays for (inductor fuses HF's many small kernels). The
            # acceptance and commit stay eager (inside the same CUDA graph, so they still cost no launches): fused
            # with the verify's vocabulary argmax, the stop-token check made Triton fail to compile at batch 1
            # ("PassManager::run failed", torch 2.11 on the H200).
            self.steady_draft = _CompiledOrEager(steady_draft, "draft step")
            self.verify_forward = _CompiledOrEager(self._verify_forward, "verify forward")
        else:
            self.steady_draft, self.verify_forward = steady_draft, self._verify_forward

    # ---------------------------------------------------------------------------------------------- masks & positions
    def _target_mask(self, query_slots: torch.Tensor, dtype) -> torch.Tensor | dict:
        """4D additive mask `[batch, 1, q, capacity]` (or a dict per layer type) for target queries at `query_slots`.

        Slots and positions differ by the row's padding only, so the rule runs on slots. Keys before `pad` are
        padding; a padding query sees itself, so that no row of the mask is empty.
        """
        keys = self.slot_ids[: self.capacity][None, None, :]
        q = query_slots[:, :, None]
        valid = (keys >= self.pad[:, None, None]) | (keys == q)
        return target_layer_masks(self.d.target_windows, q, keys, valid, dtype, self.d.recurrent_kinds,
                                  query_valid=query_slots >= self.pad[:, None])

    def _draft_mask(self, n_ctx: int, dtype) -> torch.Tensor | dict:
        """Additive mask `[batch, 1, B, capacity + B]` for the block queries of a draft call, or one per drafter layer
        type when the drafter mixes patterns (e.g. causal sliding layers and a full layer).

        Context slots are valid from `pad` (or, with the drafter's `draft_window`, from `draft_window` rows back) up
        to the anchor (exclusive); scratch slots hold the block itself. The static cache still holds every row.
        """
        slots = self.slot_ids[None, None, :]
        query_pos = (self.length - 1 - self.pad)[:, None, None] + self.arange_b[None, :, None]  # [b, B, 1]
        is_ctx = slots < self.capacity
        ctx_valid = is_ctx & (slots >= self.pad[:, None, None]) & (slots < (self.length - 1)[:, None, None])
        draft_window = self.d.drafter.config.draft_window
        if draft_window is not None:  # the newest `draft_window` context rows, as the drafter's own cache keeps them
            ctx_valid = ctx_valid & (slots >= (self.length - 1 - draft_window)[:, None, None])
        key_pos = torch.where(
            is_ctx, slots - self.pad[:, None, None], (self.length - 1 - self.pad)[:, None, None] + slots - self.capacity
        )
        return drafter_block_masks(self.d.drafter.config, query_pos, key_pos, ctx_valid | ~is_ctx, dtype)

    # ---------------------------------------------------------------------------------------------------- the steps
    def _draft(self, n_ctx: int, n_draft: int) -> None:
        """One drafter forward over `n_ctx` pending context rows + the block; fills the first `n_draft` columns of
        `self.drafts` (and their probabilities q when sampling): a verify of `n_draft + 1` tokens reads no more."""
        d, B = self.d, self.d.block_size
        block_ids = torch.full((self.batch, B), d.drafter.config.mask_token_id, dtype=torch.long, device=d.device)
        block_ids[:, 0] = self.anchor
        noise = embed_block(d.drafter, d.target, block_ids)
        ctx_slots = self.ctx_base[:, None] + torch.arange(n_ctx, device=d.device)[None]
        self.draft_cache.write_slots = torch.cat([ctx_slots, (self.capacity + self.arange_b)[None].expand(self.batch, -1)], 1)
        ctx_pos = (ctx_slots - self.pad[:, None]).clamp_min(0)
        block_pos = (self.length - 1 - self.pad)[:, None] + self.arange_b[None]
        hidden = d.drafter(
            noise_embeds=noise,
            context_hidden_states=self.ctx_features[:, :n_ctx],
            position_ids=torch.cat([ctx_pos, block_pos], dim=1),
            attention_mask=self._draft_mask(n_ctx, noise.dtype),
            past_key_values=self.draft_cache,
        ).last_hidden_state
        logits = d.drafter.compute_logits(hidden[:, 1 : 1 + n_draft], d.lm_head).float()  # [b, n_draft, V]
        logits = self._without_early_stops(logits, self.generated[:, None] + self.arange_b[None, :n_draft])
        if self.do_sample:
            self.draft_probs = self.sampling.probs(logits)
            self.drafts[:, :n_draft] = _sample(self.draft_probs)
        else:
            self.drafts[:, :n_draft] = logits.argmax(-1)

    def _without_early_stops(self, logits: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """`logits` `[b, q, V]` for the tokens at new-token indices `token_index` `[b, q]`, with the stop tokens
        masked wherever the index is below `min_new_tokens` (transformers' MinNewTokensLengthLogitsProcessor)."""
        if not self.min_length:
            return logits
        early = (token_index < self.min_new)[..., None]  # [b, q, 1]
        columns = self.stops[: self.n_stops].expand(*logits.shape[:2], -1)  # [b, q, n_stops]
        masked = torch.where(early, float("-inf"), logits.gather(-1, columns))
        return logits.scatter(-1, columns, masked)

    def _verify_and_accept(self, length: int) -> None:
        """Target forward on `[anchor, drafts[:length-1]]`, acceptance, commit, and the state update for the next
        step. `length` 1 verifies the anchor alone: an autoregressive step, whose context row goes straight into the
        draft cache (no draft needs it)."""
        drafts = self.drafts[:, : length - 1]  # [b, L-1]
        arange = self.arange_b[:length]
        block = torch.cat([self.anchor[:, None], drafts], dim=1)  # [b, L]
        slots = (self.length - 1)[:, None] + arange[None]
        self.target_cache.write_slots = slots
        self.target_cache.keep_states = length
        positions = slots - self.pad[:, None]
        logits, features = self.verify_forward(block, positions, slots)  # [b, L, V], [b, L, k*H]
        logits = self._without_early_stops(logits, self.generated[:, None] + arange[None])

        if self.do_sample:
            p = self.sampling.probs(logits)  # [b, L, V]
            # With nothing drafted (L = 1) q is empty, so the residual below is p at the bonus.
            q = self.draft_probs[:, : length - 1] if length > 1 else p[:, :0]  # [b, L-1, V]
            p_draft = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
            q_draft = q.gather(-1, drafts[..., None])[..., 0]
            accept = torch.rand_like(p_draft) * q_draft < p_draft
            residual = torch.cat([(p[:, :-1] - q).clamp_min(0), p[:, -1:]], dim=1)
            total = residual.sum(-1, keepdim=True)
            residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p)
            choice = _sample(residual)  # [b, L]
        else:
            choice = logits.argmax(-1)  # [b, L]
            accept = drafts == choice[:, :-1]
        n_accept = accept.long().cumprod(dim=1).sum(dim=1)  # [b]
        bonus = choice.gather(1, n_accept[:, None])[:, 0]
        # Candidate new tokens: accepted drafts, then the bonus at index n_accept.
        new = torch.where(arange[None] < n_accept[:, None], torch.cat([drafts, bonus[:, None]], 1), bonus[:, None])
        count = torch.minimum(n_accept + 1, self.budget - self.generated)
        if self.n_stops:
            is_stop = torch.isin(new, self.stops) & (arange[None] < count[:, None])
            first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, count)
            count = torch.minimum(count, first_stop)
            hit_stop = is_stop.any(1)
        else:
            hit_stop = torch.zeros_like(self.done)
        count = torch.where(self.done, torch.zeros_like(count), count)
        if self.d.recurrent_kinds:
            # The verify fed the anchor and the drafts; a row keeps the states after the anchor and its accepted
            # drafts, i.e. after `count` tokens (the bonus is fed as the next anchor).
            self.target_cache.commit_states(count)
        # Commit into the output buffer (columns past `count` are scratch, overwritten or trimmed later).
        cols = self.generated[:, None] + arange[None]
        self.out.scatter_(1, cols, torch.where(arange[None] < count[:, None], new, self.out.gather(1, cols)))
        self.committed.copy_(count)
        if self.has_drafter and length == 1:
            # No draft will read the rows the last verify left pending, nor this one: hand both to the drafter now.
            # Pending rows past the committed ones go to a scratch slot (the block's, which every draft rewrites).
            pending = self.arange_b[None] < (self.length - 1 - self.ctx_base)[:, None]  # [b, B]
            ctx_slots = torch.where(pending, self.ctx_base[:, None] + self.arange_b[None], self.capacity)
            self._write_context(torch.cat([self.ctx_features, features], 1), torch.cat([ctx_slots, slots], 1))
        self.ctx_base.copy_(self.length - 1)
        self.length.add_(count)
        self.generated.add_(count)
        if self.has_drafter and length == 1:
            self.ctx_base.copy_(self.length - 1)  # the drafter has every committed row already
        new_anchor = new.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0]
        self.anchor.copy_(torch.where(count > 0, new_anchor, self.anchor))
        self.done.copy_(self.done | hit_stop | (self.generated >= self.budget))
        if self.has_drafter and length > 1:
            # The next draft reads B rows from ctx_base; rows past the committed ones are masked until overwritten.
            self.ctx_features[:, :length].copy_(features)

    def _write_context(self, features: torch.Tensor, slots: torch.Tensor) -> None:
        """Context rows `features` `[b, n, k*H]` at `slots` `[b, n]` into the draft cache without drafting. A slot
        that is not committed yet (a finished row's) is masked until a later step overwrites it."""
        self.draft_cache.write_slots = slots
        self.d.drafter.write_context(features, (slots - self.pad[:, None]).clamp_min(0), self.draft_cache)

    def _verify_forward(self, block, positions, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """The verify's target forward on `block` `[b, B]`: fp32 logits `[b, B, V]` and the captured context features
        `[b, B, k*H]` (the part of a step that `compile=True` compiles)."""
        logits = self._target_forward(block, positions, slots)
        return logits, self.capture.features()

    def _target_forward(self, ids, positions, slots, last_only: bool = False) -> torch.Tensor:
        """Target logits `[b, q, V]` (fp32) for `ids` `[b, q]`; `last_only` keeps only the last position's, which
        is all the prefill needs: the full prefill logits cost 6 bytes x prompt x vocab (2.4 GB for an 8,000-token
        SmolLM2 prompt, measured on the H200)."""
        d = self.d
        dtype = next(d.target.parameters()).dtype
        kwargs = {d.cache_kwarg: self.target_cache, "use_cache": True}
        if d.pass_cache_position:
            kwargs["cache_position"] = slots[0]
        if last_only and d.can_keep_last_logits:
            kwargs["logits_to_keep"] = 1
        out = d.target(
            input_ids=ids,
            position_ids=positions.clamp_min(0),
            attention_mask=self._target_mask(slots, dtype),
            **kwargs,
        )
        return out.logits.float()

    # ------------------------------------------------------------------------------------------------------ driving
    def _reset(self, input_ids, attention_mask, max_new_tokens, min_new_tokens, stops):
        batch, prompt_len = input_ids.shape
        self.target_cache.reset()
        self.draft_cache.reset()
        # Left padding: real tokens must be right-aligned.
        real = attention_mask.bool()
        self.pad.copy_(prompt_len - real.sum(-1))
        aligned = torch.arange(prompt_len, device=input_ids.device)[None] >= self.pad[:, None]
        if not torch.equal(aligned, real):
            raise ValueError("attention_mask must describe left padding (real tokens right-aligned); pad on the left.")
        self.length.fill_(prompt_len)
        self.generated.zero_()
        self.budget.fill_(max_new_tokens)
        self.min_new.fill_(min_new_tokens)
        self.done.zero_()
        if self.n_stops:
            self.stops.copy_(torch.tensor(stops, dtype=torch.long, device=self.stops.device))
        self.out.zero_()

    def run(self, input_ids, attention_mask, max_new_tokens, min_new_tokens, stops, pad_token_id, stopping_criteria,
            streamer, progress, on_step=None, seeded: bool = False):
        d, B = self.d, self.d.block_size
        policy = self.policy
        if seeded and self.do_sample and policy.needs_costs:
            # Which tokens a seed draws depends on how the steps are cut, and an adaptive cut depends on timings: a
            # seeded sampling call verifies the longest candidate every step, so the same seed gives the same tokens.
            policy = FixedVerifyLength(policy.lengths[-1])
        sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
        # The host sees each step's new tokens only when someone needs them (they ride along with the step's sync).
        host = _HostCommits(self, input_ids, stopping_criteria, streamer, on_step)
        with self.capture:
            self._reset(input_ids, attention_mask, max_new_tokens, min_new_tokens, stops)
            sync()
            t0 = time.perf_counter()
            # Prefill: target over the prompt, first token, then the first draft over all prompt rows.
            prompt_len = input_ids.shape[1]
            slots = torch.arange(prompt_len, device=d.device)[None].expand(self.batch, -1)
            self.target_cache.write_slots = slots
            logits = self._target_forward(input_ids, slots - self.pad[:, None], slots, last_only=True)[:, -1:]
            # From here every target forward is a verify of B tokens, recording the state after each of them.
            self.target_cache.prefilling, self.target_cache.keep_states = False, B
            logits = self._without_early_stops(logits, torch.zeros_like(self.generated)[:, None])[:, 0]
            features = self.capture.features()
            if self.do_sample:
                first = _sample(self.sampling.probs(logits))
            else:
                first = logits.argmax(-1)
            self.out[:, 0] = first
            self.anchor.copy_(first)
            self.generated.fill_(1)
            self.committed.fill_(1)
            self.length.add_(1)
            if self.n_stops:
                self.done.copy_(torch.isin(first, self.stops))
            self.done |= self.generated >= self.budget
            if self.ctx_features is None and self.has_drafter:
                self.ctx_features = features.new_zeros(self.batch, B, features.shape[-1])
            self.ctx_base.zero_()
            committed, done_host = host.receive()
            prompt_features = features
            sync()
            t1 = time.perf_counter()

            acceptance = [[] for _ in range(self.batch)]
            lengths: list[int] = []
            draft_time = verify_time = calibration_time = 0.0
            steps = 0
            first_step = True
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=max_new_tokens * self.batch, desc="dflash", unit="tok", initial=self.batch)
            while not done_host:
                if not first_step and self.costs is None and policy.needs_costs:
                    ta = time.perf_counter()
                    self.costs = self._calibrate()
                    policy.set_costs(self.costs)
                    calibration_time = time.perf_counter() - ta
                length = policy.choose()
                if first_step and self.has_drafter:
                    # The prompt's context rows (variable length): eager, outside any graph.
                    ta = time.perf_counter()
                    if length > 1:
                        saved = self.ctx_features
                        self.ctx_features = prompt_features
                        self._draft(prompt_len, length - 1)
                        self.ctx_features = saved
                    else:
                        self._write_context(prompt_features, slots)
                        self.ctx_base.copy_(self.length - 1)  # nothing left pending for the verify to hand over
                    sync()
                    draft_time += time.perf_counter() - ta
                    ta = time.perf_counter()
                    self._verify_and_accept(length)
                    sync()
                    verify_time += time.perf_counter() - ta
                else:
                    dt, vt = self._replay_step(length)
                    draft_time += dt
                    verify_time += vt
                first_step = False
                steps += 1
                lengths.append(length)
                committed, done_host = host.receive()
                policy.observe(length, committed)
                for r in range(self.batch):
                    if committed[r] > 0:
                        acceptance[r].append(committed[r])
                if bar is not None:
                    bar.update(sum(committed))
            if bar is not None:
                bar.close()
            sync()
            t2 = time.perf_counter()
        if streamer is not None:
            streamer.end()

        generated = self.generated.tolist()
        new_tokens = [self.out[r, : generated[r]].tolist() for r in range(self.batch)]
        width = max(generated)
        tail = torch.full((self.batch, width), pad_token_id, dtype=torch.long, device=input_ids.device)
        for r in range(self.batch):
            tail[r, : generated[r]] = self.out[r, : generated[r]]
        return DFlashGenerateOutput(
            sequences=torch.cat([input_ids, tail], dim=1),
            new_tokens=new_tokens,
            acceptance_lengths=acceptance,
            time_prefill=t1 - t0,
            time_draft=draft_time,
            time_verify=verify_time,
            time_total=t2 - t0,
            steps=steps,
            verify_lengths=lengths,
            extra={"calibration_s": calibration_time} if calibration_time else {},
        )

    # ------------------------------------------------------------------------------------------------- CUDA graphs
    def _replay_step(self, length: int) -> tuple[float, float]:
        """One steady-state step (B context rows) that verifies `length` tokens per row: eager on CPU, captured graphs
        on CUDA (one pair per length). Returns (draft, verify) seconds."""
        drafts = self.has_drafter and length > 1
        if self.d.cuda_graphs and self.capture_failure is None and ("verify", length) not in self.graphs:
            try:
                self._capture_graphs(length)
            except RuntimeError as error:  # e.g. a target whose forward copies from the host (some MoE routings)
                self.capture_failure = error
                self.graphs.clear()
                torch.cuda.synchronize(self.d.device)
                warnings.warn(
                    f"DFlashDecoder: capturing CUDA graphs failed for this target at batch {self.batch} "
                    f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); its steps run without CUDA graphs "
                    "from now on (same output, slower). Pass cuda_graphs=False to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if not self.d.cuda_graphs or self.capture_failure is not None:
            ta = time.perf_counter()
            if drafts:
                self.steady_draft(length - 1)
            tb = time.perf_counter()
            self.steady_verify(length)
            return tb - ta, time.perf_counter() - tb
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        if drafts:
            self.graphs["draft", length].replay()
        mid.record()
        self.graphs["verify", length].replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(mid) / 1e3, mid.elapsed_time(end) / 1e3

    def _capture_graphs(self, length: int) -> None:
        """Capture the draft and verify of one verify length on the live state. Warm-up runs on a snapshot that is
        restored afterwards, so the capture does not advance the generation. The pair is captured together: the
        verify reads the draft's probabilities where the draft graph wrote them."""
        state = self._step_state()
        snapshot = [t.clone() for t in state]
        steps = [("draft", functools.partial(self.steady_draft, length - 1))] if self.has_drafter and length > 1 else []
        steps.append(("verify", functools.partial(self.steady_verify, length)))
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # the first calls compile, when compiling
                    for _, fn in steps:
                        fn()
            torch.cuda.current_stream().wait_stream(stream)
            for name, fn in steps:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                self.graphs[name, length] = graph
        finally:
            for t, s in zip(state, snapshot):
                t.copy_(s)

    def _calibrate(self, repeats: int = 3) -> dict[int, float]:
        """Seconds per step for each candidate verify length at this batch size (best of `repeats`, after a first run
        that captures and compiles), measured on the live state, which is restored after every run, random state
        included (a seeded call draws the same tokens whether or not it calibrated)."""
        sync = torch.cuda.synchronize if self.d.device.type == "cuda" else (lambda: None)
        state = self._step_state()
        snapshot = [t.clone() for t in state]
        costs = {}
        rng = torch.random.fork_rng(devices=[self.d.device] if self.d.device.type == "cuda" else [])
        with rng:
            for length in self.policy.lengths:
                costs[length] = self._time_step(length, repeats, state, snapshot, sync)
        return costs

    def _time_step(self, length: int, repeats: int, state, snapshot, sync) -> float:
        times = []
        for _ in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            self._replay_step(length)
            sync()
            times.append(time.perf_counter() - t0)
            for t, s in zip(state, snapshot):
                t.copy_(s)
        return min(times[1:])

    def _step_state(self) -> list[torch.Tensor]:
        """Every tensor a steady step writes (per-row state, outputs, caches), which the capture's warm-up restores."""
        state = [self.pad, self.length, self.ctx_base, self.generated, self.budget, self.done, self.committed,
                 self.anchor, self.out, self.drafts] + ([self.ctx_features] if self.has_drafter else [])
        caches = (self.target_cache.keys, self.target_cache.values, self.target_cache.conv_states,
                  self.target_cache.recurrent_states, self.draft_cache.keys, self.draft_cache.values)
        return state + [t for cache in caches for t in cache.values()]


@torch.no_grad()
def generate(
    target: nn.Module,
    drafter: nn.Module | None,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 256,
    cuda_graphs: bool | None = None,
    compile: bool | None = None,
    verify_length: int | str | list[int] | VerifyLengthPolicy | None = None,
    **generate_kwargs,
) -> DFlashGenerateOutput:
    """Batched DFlash generation (see `DFlashDecoder`); builds a decoder sized for this call.

    Greedy output of every row equals the target's own greedy output for that row alone; with `do_sample` each row
    is a sample of the target's (temperature/top-k/top-p/min-p) distribution. `drafter=None` decodes
    autoregressively through the same static caches and graphs. `generate_kwargs` are `DFlashDecoder.generate`'s
    (`do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `min_new_tokens`, `stop_token_ids`, `pad_token_id`,
    `stopping_criteria`, `streamer`, `generator`, `progress`, `on_step`). For repeated calls keep a `DFlashDecoder`.
    """
    decoder = DFlashDecoder(
        target, drafter, max_length=input_ids.shape[-1] + max(max_new_tokens, 1), cuda_graphs=cuda_graphs,
        compile=compile, verify_length=verify_length,
    )
    return decoder.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **generate_kwargs)


__all__ = ["DFlashDecoder", "DFlashGenerateOutput", "OneCallAtATime", "RowStaticCache", "engine_limitation",
           "generate", "target_guard"]
