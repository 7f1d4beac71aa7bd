"""The DFlash training recipe (docs/DFLASH.md, "Training recipe"): a new drafter config for a target, and the training loop.

One training step, for a batch of sequences (chat prompt + the target's own response):

1. **Context features.** A frozen forward of the target (no grad) gives the outputs of the `target_layer_ids` decoder
   layers at every position (HF `hidden_states[i + 1]`, captured with forward hooks): `[batch, T, len(ids) * H]`.
2. **Anchors.** Up to `num_anchors` random positions `a` per sequence where `loss_mask[a] = 1` (and `a + 1` too),
   re-drawn every epoch. Each gives the block `[token@a, MASK x (B-1)]` at positions `a .. a+B-1`, embedded with the
   **target's** (frozen) embedding.
3. **Packed forward.** All blocks of a sequence go through ONE drafter forward: `Q = n_blocks * B` query rows over
   the keys `[context (T rows) ; all block rows (Q)]`, with a mask in which a block row sees the context keys with
   index `< a` (the features of the anchor itself do not exist yet at inference), its own block (bidirectionally on
   full layers; causal with a window on sliding layers, as at inference) and no other block. This is exactly the
   inference computation of every block at once (tests/test_training.py checks it row by row). The attention runs
   on groups of blocks (128 query rows), each over `[context ; its own blocks]`, so the masked-off block keys cost
   nothing (`dflash_hf.training.packed`).
4. **Loss.** Row `k >= 1` of a block predicts the token at `a + k` through the target's (frozen) LM head; row 0 is
   excluded. Cross-entropy on response tokens with weight `exp(-(k - 1) / gamma)` (gamma = 7 for B = 16), normalised
   by the total weight. The logits exist a chunk of rows at a time (`dflash_hf.training.head_loss`).

AdamW, linear warmup then cosine decay, gradient clipping at 1.0, bf16 autocast on GPU. Only the drafter's own
weights (`fc`, `hidden_norm`, layers, `norm`) train; the target's embedding and head are shared, never copied.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dflash_hf.modeling.configuration_dflash import DFlashConfig, build_target_layer_ids
from dflash_hf.modeling.generation_dflash import TargetFeatureCapture, embed_block, target_text_config
from dflash_hf.modeling.modeling_dflash import DFlashDraftModel

from .data import as_examples
from .head_loss import default_chunk_rows, head_cross_entropy
from .loading import is_sharded
from .packed import PackedDrafter, layer_attention_masks, packed_attention

# Published loss-decay constants: gamma = 7 for B = 16 (community repro, MiMo), gamma = 4 for B = 8 (ModelOpt).
_PUBLISHED_GAMMA = {16: 7.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    """The loss-decay gamma for `block_size`: the published value for B = 16 or 8, else `7 * B / 16`."""
    return _PUBLISHED_GAMMA.get(int(block_size), 7.0 * block_size / 16)


# ----------------------------------------------------------------------------------------------------------------------
# A new drafter for a target
# ----------------------------------------------------------------------------------------------------------------------


def _chat_template_ids(tokenizer) -> set[int]:
    """Ids the chat template itself writes (turn markers etc.), which the model therefore produces or reads often."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # some templates reject a system turn; the ids of a plain exchange are what matter
        text = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False)
    return set(tokenizer(text, add_special_tokens=False)["input_ids"])


def pick_mask_token_id(tokenizer, target: nn.Module) -> int:
    """A mask id for a new drafter of `target`: a real embedding row that the target practically never produces and
    that no decode loop strips or stops on.

    In order: the tokenizer's own mask token; else the first embedding row past the tokenizer's vocabulary when the
    table is padded (what Qwen3's 151669 is); else the highest-id special/added token that is not BOS/EOS/PAD/UNK,
    not a stop id of the target and not written by the chat template (SmolLM2: 16, `<empty_output>`).
    """
    rows = target.get_input_embeddings().weight.shape[0]
    generation_config = getattr(target, "generation_config", None)
    reserved = set()
    for value in (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
        getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "cls_token_id", None),
        getattr(generation_config, "eos_token_id", None), getattr(generation_config, "pad_token_id", None),
        getattr(generation_config, "bos_token_id", None), getattr(target.config, "eos_token_id", None),
    ):
        if value is not None:
            reserved.update([value] if isinstance(value, int) else value)
    reserved |= _chat_template_ids(tokenizer)
    mask = getattr(tokenizer, "mask_token_id", None)
    if isinstance(mask, int) and 0 <= mask < rows and mask not in reserved:
        return mask
    if rows > len(tokenizer):
        return len(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    candidates = sorted(
        (i for i, token in added.items() if getattr(token, "special", True) and 0 <= i < rows and i not in reserved),
        reverse=True,
    )
    if candidates:
        return int(candidates[0])
    raise ValueError(
        f"The tokenizer {type(tokenizer).__name__} has no mask token, no spare embedding rows ({rows} rows, "
        f"{len(tokenizer)} tokens) and no unused special token; pass mask_token_id explicitly (CLI: --mask-token-id) "
        "with the id of a token the target rarely produces."
    )


def new_drafter_config(
    target: nn.Module,
    num_layers: int = 4,
    block_size: int = 16,
    target_layer_ids: Sequence[int] | None = None,
    mask_token_id: int | None = None,
    *,
    tokenizer=None,
    num_context_layers: int = 5,
    intermediate_size: int | None = None,
    **overrides,
) -> DFlashConfig:
    """A `DFlashConfig` for a new drafter of `target`, with the target's width, heads and RoPE.

    Args:
        target: the causal LM the drafter will serve.
        num_layers: drafter decoder layers (released drafters use 5).
        block_size: tokens per draft block, anchor included.
        target_layer_ids: target decoder layers read as context; default: the published spread rule over the
            target's depth with `num_context_layers` ids (e.g. [1, 8, 14, 20, 27] for 30 layers).
        mask_token_id: id of the mask embedding row; default: `pick_mask_token_id(tokenizer, target)`.
        tokenizer: needed only when `mask_token_id` is None.
        intermediate_size: MLP width; default: the target's.
        overrides: any other `DFlashConfig` / `Qwen3Config` field.
    """
    text = target_text_config(target)
    depth, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1.")
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2 (the anchor and at least one draft).")
    if target_layer_ids is None:
        target_layer_ids = build_target_layer_ids(depth, num_context_layers)
    target_layer_ids = [int(i) for i in target_layer_ids]
    bad = [i for i in target_layer_ids if not 0 <= i < depth]
    if bad or not target_layer_ids:
        raise ValueError(
            f"target_layer_ids {target_layer_ids} must be non-empty ids of decoder layers 0..{depth - 1} of the "
            f"target (out of range: {bad})."
        )
    rows = target.get_input_embeddings().weight.shape[0]
    if mask_token_id is None:
        if tokenizer is None:
            raise ValueError("new_drafter_config needs mask_token_id or a tokenizer to pick one from.")
        mask_token_id = pick_mask_token_id(tokenizer, target)
    if not 0 <= int(mask_token_id) < rows:
        raise ValueError(f"mask_token_id={mask_token_id} is outside the target embedding table of {rows} rows.")
    heads = int(text.num_attention_heads)
    kwargs = dict(
        hidden_size=hidden,
        intermediate_size=int(intermediate_size or text.intermediate_size),
        num_hidden_layers=int(num_layers),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
        hidden_act="silu",
        attention_bias=False,
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 4096)),
        vocab_size=int(text.vocab_size),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        pad_token_id=getattr(text, "pad_token_id", None),
        block_size=int(block_size),
        num_target_layers=depth,
        dflash_config={"mask_token_id": int(mask_token_id), "target_layer_ids": target_layer_ids},
        layer_types=["full_attention"] * int(num_layers),
    )
    # Same RoPE as the target (positions are the target's absolute positions): 5.x keeps it in `rope_parameters`,
    # 4.57 in `rope_theta` / `rope_scaling`.
    rope_parameters = getattr(text, "rope_parameters", None)
    if isinstance(rope_parameters, dict) and rope_parameters:
        kwargs["rope_parameters"] = dict(rope_parameters)
    else:
        kwargs["rope_theta"] = float(getattr(text, "rope_theta", 10000.0))
        if getattr(text, "rope_scaling", None):
            kwargs["rope_scaling"] = dict(text.rope_scaling)
    kwargs.update(overrides)
    config = DFlashConfig(**kwargs)
    config.architectures = ["DFlashDraftModel"]
    # transformers 5.x saves `rope_theta: null` next to `rope_parameters`, and 4.57 (and z-lab's released schema) read
    # only the top-level `rope_theta` / `rope_scaling`: without them a 4.57 load silently falls back to theta 10000.
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and parameters.get("rope_theta") is not None:
        config.rope_theta = float(parameters["rope_theta"])
        if parameters.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    return config


def count_parameters(config: DFlashConfig) -> int:
    """Parameters of a drafter with `config` (what is saved: fc, hidden_norm, layers, norm)."""
    with torch.device("meta"):
        model = DFlashDraftModel(config)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Packed blocks: anchors, ids, positions, labels, masks
# ----------------------------------------------------------------------------------------------------------------------


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions `a` of a `[T]` loss mask that can anchor a block: `loss_mask[a]` and `loss_mask[a + 1]`."""
    mask = loss_mask.bool()
    return torch.nonzero(mask[:-1] & mask[1:]).flatten()


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `num_anchors` distinct anchor positions, drawn uniformly, sorted: LongTensor `[n]`."""
    candidates = anchor_candidates(loss_mask)
    if candidates.numel() <= num_anchors:
        return candidates
    pick = torch.randperm(candidates.numel(), generator=generator)[:num_anchors]
    return candidates[pick].sort().values


@dataclass
class PackedBatch:
    """Everything one packed training step needs (b sequences, m blocks each, block size B, Q = m * B).

    input_ids / attention_mask `[b, T]` (right padded); anchors `[b, m]`; block_valid `[b, m]`; block_ids `[b, Q]`;
    position_ids `[b, T + Q]`; labels `[b, m, B - 1]` (-100 where not trained); weights `[b, m, B - 1]`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    anchors: torch.Tensor
    block_valid: torch.Tensor
    block_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def pack_blocks(
    examples: Sequence[dict],
    anchors: Sequence[torch.Tensor],
    *,
    block_size: int,
    mask_token_id: int,
    gamma: float,
    pad_token_id: int = 0,
    pad_to: int = 16,
) -> PackedBatch:
    """Lay out the blocks of `anchors[i]` (positions in `examples[i]`) for one packed forward. Block j of a sequence
    occupies query rows `j*B .. j*B+B-1`; sequences with fewer blocks get dummy blocks at anchor 0 with no labels.
    The context length is rounded up to a multiple of `pad_to`."""
    B = block_size
    b = len(examples)
    # Context length rounded up to a multiple of `pad_to` (16): the key axis T + Q then stays aligned, which the
    # fused sdpa kernels want for an explicit mask (the extra positions are padding, masked like any other). A
    # compiled step uses a coarser multiple, so that few distinct shapes reach the compiler.
    T = -(-max(int(e["input_ids"].numel()) for e in examples) // pad_to) * pad_to
    m = max(max(int(a.numel()) for a in anchors), 1)
    input_ids = torch.full((b, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, T), dtype=torch.long)
    anchor_t = torch.zeros((b, m), dtype=torch.long)
    block_valid = torch.zeros((b, m), dtype=torch.bool)
    labels = torch.full((b, m, B - 1), -100, dtype=torch.long)
    offsets = torch.arange(1, B)
    for i, (example, a) in enumerate(zip(examples, anchors)):
        ids, loss_mask = example["input_ids"], example["loss_mask"].bool()
        n = ids.numel()
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        anchor_t[i, : a.numel()] = a
        block_valid[i, : a.numel()] = True
        target_pos = a[:, None] + offsets[None]  # [n_i, B-1]
        inside = target_pos < n
        clamped = target_pos.clamp(max=n - 1)
        trained = inside & loss_mask[clamped]
        labels[i, : a.numel()] = torch.where(trained, ids[clamped], torch.full_like(clamped, -100))
    block_ids = torch.full((b, m, B), mask_token_id, dtype=torch.long)
    block_ids[:, :, 0] = torch.gather(input_ids, 1, anchor_t)
    block_pos = anchor_t[:, :, None] + torch.arange(B)[None, None]  # [b, m, B]
    position_ids = torch.cat([torch.arange(T).expand(b, T), block_pos.reshape(b, m * B)], dim=1)
    decay = torch.exp(-(offsets.float() - 1) / gamma)  # weight of row k: exp(-(k - 1) / gamma)
    weights = torch.where(labels != -100, decay.expand(b, m, B - 1), torch.zeros(()))
    return PackedBatch(input_ids, attention_mask, anchor_t, block_valid, block_ids.reshape(b, m * B), position_ids,
                       labels, weights)


@torch.no_grad()
def target_features(target: nn.Module, input_ids, attention_mask, layer_ids: Sequence[int]) -> torch.Tensor:
    """`[b, T, len(ids) * H]`: outputs of the `layer_ids` decoder layers of the frozen target (HF hs[i + 1])."""
    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(target.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the head over every position is the most expensive part and is not needed
    with TargetFeatureCapture(target, list(layer_ids)) as capture:
        target(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return capture.features()


def packed_loss(drafter: DFlashDraftModel, hidden: torch.Tensor, batch: PackedBatch, lm_head: nn.Module,
                chunk_rows: int | None = None, compile: bool = False):
    """Weighted CE of rows k >= 1 on their labels; returns (loss, stats dict of floats).

    hidden `[b, Q, H]` from the packed forward. Logits are computed only for the trained rows (the head is
    `vocab x H`, by far the largest matmul of the step), `chunk_rows` rows at a time (`head_cross_entropy`; default
    `default_chunk_rows(vocab)`), compiled if `compile`.
    """
    b, m, width = batch.labels.shape
    hidden = hidden.view(b, m, width + 1, -1)[:, :, 1:]  # drop row 0 (the anchor)
    trained = batch.labels != -100
    targets = batch.labels[trained]
    weights = batch.weights[trained]
    if any(p.requires_grad for p in lm_head.parameters()):
        raise ValueError("The target's LM head must be frozen (requires_grad=False): the drafter's loss passes "
                         "gradients to the drafter only; call target.requires_grad_(False).")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(lm_head.weight.shape[0])
    loss, hits = head_cross_entropy(hidden[trained], targets, weights / weights.sum().clamp_min(1e-9),
                                    drafter.compute_logits, lm_head, chunk_rows, compile)
    with torch.no_grad():
        correct = torch.zeros_like(trained)
        correct[trained] = hits
        # Teacher-forced acceptance estimate: 1 + leading correct drafts per block (the bonus token counts, as tau).
        accepted = correct.long().cumprod(-1).sum(-1)
        valid = batch.block_valid
        stats = {
            "loss": float(loss),
            "acc": float(correct[trained].float().mean()) if trained.any() else 0.0,
            "acc_first": float(correct[:, :, 0][trained[:, :, 0]].float().mean()) if trained[:, :, 0].any() else 0.0,
            "train_tau": 1.0 + float(accepted[valid].float().mean()) if valid.any() else 1.0,
            "rows": int(trained.sum()),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation with the real decode loop
# ----------------------------------------------------------------------------------------------------------------------


def _eval_copy(drafter: DFlashDraftModel, target: nn.Module) -> DFlashDraftModel:
    """The drafter as it would be deployed next to `target`: same dtype and device, eval mode (a copy when the
    training weights are kept in another dtype)."""
    param = next(target.parameters())
    d_param = next(drafter.parameters())
    if d_param.dtype == param.dtype and d_param.device == param.device:
        return drafter
    return copy.deepcopy(drafter).to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def evaluate_tau(
    target: nn.Module,
    drafter: DFlashDraftModel,
    eval_set: Sequence[dict],
    *,
    max_new_tokens: int = 128,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    backend: str = "auto",
    batch_size: int = 16,
    source: str | None = None,
) -> dict:
    """Acceptance length tau of `drafter` on `eval_set` with the real greedy decode loop.

    `eval_set` items are `{category, input_ids}` (prompt ids). Backends: "hf" runs
    `target.generate(assistant_model=drafter)` one prompt at a time and reads `drafter.last_stats`; "dflash" runs
    the batched `dflash_hf.DFlashDecoder` (eager: no CUDA graphs or compilation, which would cost more time than a
    small evaluation and do not change tau); "auto" takes "dflash" when it exists. Returns `{tau, per_category: {cat: tau},
    steps, tokens, seconds, backend, source}`, where tau is tokens committed per verify step (bonus included), pooled
    over steps, and `source` is the caller's label of where the prompts came from (`dflash_hf.prompts.EVAL_SOURCE` for
    the independent evaluation set, `HELDOUT_SOURCE`, which says "in-distribution", for the held-out split), so a
    report never shows tau without its prompts' provenance.
    """
    import dflash_hf

    fast = getattr(dflash_hf, "DFlashDecoder", None)
    if backend == "auto":
        backend = "dflash" if fast is not None else "hf"
    if backend not in ("hf", "dflash"):
        raise ValueError(f"backend={backend!r} must be 'auto', 'hf' or 'dflash'.")
    if backend == "dflash" and fast is None:
        raise ValueError("backend='dflash' needs dflash_hf.DFlashDecoder, which this install lacks; use backend='hf'.")
    model = _eval_copy(drafter, target)
    was_training = model.training
    model.eval()
    device = next(target.parameters()).device
    per_category: dict[str, list[int]] = {}
    started = time.perf_counter()
    try:
        if backend == "hf":
            from transformers import GenerationConfig

            config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
                                      eos_token_id=list(stop_token_ids) or None)
            for item in eval_set:
                ids = torch.as_tensor(item["input_ids"], dtype=torch.long, device=device)[None]
                target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=model,
                                generation_config=config)
                per_category.setdefault(item.get("category", "unknown"), []).extend(
                    model.last_stats.acceptance_lengths
                )
        else:
            longest = max(len(item["input_ids"]) for item in eval_set)
            decoder = fast(target, model, max_length=longest + max_new_tokens, cuda_graphs=False, compile=False)
            for first in range(0, len(eval_set), batch_size):
                chunk = eval_set[first : first + batch_size]
                width = max(len(item["input_ids"]) for item in chunk)
                input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for r, item in enumerate(chunk):
                    n = len(item["input_ids"])
                    input_ids[r, width - n :] = torch.as_tensor(item["input_ids"])
                    attention_mask[r, width - n :] = 1
                out = decoder.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                                       stop_token_ids=list(stop_token_ids), pad_token_id=pad_token_id)
                for item, lengths in zip(chunk, out.acceptance_lengths):
                    per_category.setdefault(item.get("category", "unknown"), []).extend(int(x) for x in lengths)
    finally:
        model.train(was_training)
    every = [x for lengths in per_category.values() for x in lengths]
    return {
        "tau": sum(every) / max(len(every), 1),
        "per_category": {c: sum(v) / max(len(v), 1) for c, v in sorted(per_category.items())},
        "steps": len(every),
        "tokens": sum(every),
        "seconds": time.perf_counter() - started,
        "backend": backend,
        "source": source,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------


def save_drafter(drafter: DFlashDraftModel, path: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """`save_pretrained` in the released layout (one `model.safetensors`: fc, hidden_norm, layers.N.*, norm) in
    `dtype` (released drafters are bf16), without touching the training copy."""
    path = Path(path)
    model = drafter
    if dtype is not None and next(drafter.parameters()).dtype != dtype:
        model = copy.deepcopy(drafter).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    from dflash_hf.export import make_files_readable  # the export's rule for weight files

    make_files_readable(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What `train_drafter` did: per-step training stats, tau evaluations, timings and where outputs went."""

    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    output_dir: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def final_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WarmupCosine:
    """LR factor: linear warmup over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`. The fields
    may change during training (a time budget re-plans the number of steps once the step time is known)."""

    total_steps: int
    warmup_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def budgeted_total_steps(planned: int, done: int, elapsed: float, budget: float, per_step: float,
                         margin: float = 0.03) -> int:
    """Steps that fit in `budget` seconds when `done` steps took `elapsed` seconds and the rest go at `per_step`
    seconds each (measured after the first steps, which pay for CUDA start-up and allocator growth and ran at half
    the steady pace on an H200), never more than `planned` and never fewer than `done`."""
    fit = done + int(max(budget * (1 - margin) - elapsed, 0.0) / max(per_step, 1e-9) + 1e-9)
    return max(done, min(planned, fit))


def _distributed() -> tuple[bool, int, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def train_drafter(
    target: nn.Module,
    drafter: DFlashDraftModel,
    dataset,
    *,
    epochs: int = 6,
    max_steps: int | None = None,
    time_budget: float | None = None,
    batch_size: int = 8,
    num_anchors: int = 512,
    lr: float = 6e-4,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.04,
    min_lr_ratio: float = 0.0,
    grad_clip: float = 1.0,
    gamma: float | None = None,
    max_length: int | None = None,
    seed: int = 0,
    autocast: bool | None = None,
    eval_set: Sequence[dict] | None = None,
    eval_source: str | None = None,
    eval_every: int | None = None,
    eval_max_new_tokens: int = 128,
    eval_backend: str = "auto",
    eval_batch_size: int = 16,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    output_dir: str | os.PathLike | None = None,
    save_every: int | None = None,
    save_dtype: torch.dtype | None = torch.bfloat16,
    log_every: int = 10,
    plot: bool = True,
    progress: bool = True,
    run_info: dict | None = None,
    compile: bool = False,
) -> TrainResult:
    """Train `drafter` for `target` on `dataset` with the published recipe (see the module docstring).

    Args:
        target: the frozen target (any dtype/device; the drafter is moved to its device and trained in fp32 with
            bf16 autocast on GPU).
        drafter: a `DFlashDraftModel` (new from `new_drafter_config`, or loaded to continue training).
        dataset: a JSONL path from `make_data`, a list of `{input_ids, loss_mask}` dicts, or a list of token-id
            sequences (loss on every token after the first).
        epochs / max_steps: length of training (`max_steps` wins when set).
        time_budget: seconds of optimisation (evaluations excluded): at step 30 the number of steps is cut to what
            fits at the pace of steps 10-30, so the warmup and the cosine decay still complete;
            training stops at the budget in any case.
        batch_size: sequences per step per process; `num_anchors`: blocks per sequence (re-drawn every epoch).
        lr, weight_decay, warmup_ratio, min_lr_ratio, grad_clip: AdamW with linear warmup then cosine decay.
        gamma: loss decay over block rows (default 7 for B = 16).
        max_length: truncate sequences to this many tokens.
        autocast: bf16 autocast; default on for CUDA.
        compile: torch.compile the packed drafter forward and the head loss (static shapes: the context length is
            padded to a multiple of 64 so few shapes reach the compiler; the first steps pay the compilation).
        eval_set: `{category, input_ids}` prompts for tau with the real decode loop, at step 0, every `eval_every`
            steps and at the end (rank 0 only).
        eval_source: label of where `eval_set` came from, stored with every evaluation and in `metrics.json`
            (`dflash_hf.prompts.EVAL_SOURCE` for the independent evaluation set, the default of `dflash-hf train`).
        output_dir: where `drafter/` (final weights), `checkpoints/step-N/`, `metrics.json` and `curves.png` go.
        run_info: extra facts stored in `metrics.json` (e.g. the command line).

    Under `torchrun` (an initialised process group) each process trains on its own shard of the sequences and the
    gradients are averaged by DDP; only rank 0 evaluates, saves and shows progress. A target sharded over the
    processes (`dflash_hf.training.loading.shard_target`, FSDP2) works the same, except that every process runs the
    evaluations (each target forward needs all of them), so every process must get the same `eval_set`.
    """
    distributed, rank, world = _distributed()
    main_process = rank == 0
    sharded_target = distributed and is_sharded(target)
    if sharded_target:
        sizes = [None] * world
        dist.all_gather_object(sizes, len(eval_set or ()))
        if len(set(sizes)) > 1:
            raise ValueError(
                f"The target is sharded over the processes, so every process runs the evaluation, but they were given "
                f"eval sets of {sizes} prompts; pass the same eval_set on every rank."
            )
    device = next(target.parameters()).device
    config: DFlashConfig = drafter.config
    packed_attention(config._attn_implementation)  # raises before any work for attention the packing cannot use
    if num_anchors < 1 or batch_size < 1:
        raise ValueError(f"num_anchors={num_anchors} and batch_size={batch_size} must be >= 1.")
    if max_steps is None and epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1 (or set max_steps).")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget={time_budget} must be a positive number of seconds.")
    examples = as_examples(dataset)
    if max_length is not None:
        examples = as_examples(
            [{"input_ids": e["input_ids"][:max_length], "loss_mask": e["loss_mask"][:max_length],
              "category": e["category"]} for e in examples]
        )
    gamma = default_gamma(config.block_size) if gamma is None else float(gamma)
    autocast = device.type == "cuda" if autocast is None else bool(autocast)

    target.eval()
    target.requires_grad_(False)
    lm_head = target.get_output_embeddings()
    drafter.to(device=device, dtype=torch.float32)  # fp32 master weights; autocast does the bf16 math
    drafter.train()
    packed = PackedDrafter(drafter)
    model: nn.Module = packed
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(packed, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model, dynamic=False)  # dynamic shapes hit an inductor assertion on torch 2.11

    per_rank = len(examples) // world
    if per_rank < 1:
        raise ValueError(f"{len(examples)} usable sequences cannot be shared by {world} processes.")
    steps_per_epoch = math.ceil(per_rank / batch_size)
    total_steps = int(max_steps) if max_steps is not None else epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = torch.optim.AdamW(
        [p for p in drafter.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95)
    )
    warmup = max(1, round(warmup_ratio * total_steps))
    schedule = WarmupCosine(total_steps, warmup, min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # A time budget re-plans the run at step `calibration`, from the pace of the steps after `pace_from`.
    pace_from, calibration = 10, 30
    pace_started = 0.0
    mask_dtype = torch.bfloat16 if autocast else torch.float32
    output_dir = Path(output_dir) if output_dir is not None else None
    result = TrainResult(output_dir=str(output_dir) if output_dir else None)
    # Parameters of the target each process holds (all of them, unless the target is sharded).
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in target.parameters())
    local_target = [held]
    if distributed:
        local_target = [None] * world
        dist.all_gather_object(local_target, held)
    result.extra.update(
        target_sharded=sharded_target, target_parameters_per_rank=local_target,
        world_size=world, steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup,
        sequences=len(examples), gamma=gamma, batch_size=batch_size, num_anchors=num_anchors, lr=lr,
        drafter_parameters=sum(p.numel() for p in drafter.parameters()), time_budget=time_budget, compile=compile,
    )

    def run_eval(step: int) -> None:
        """Rank 0 evaluates (every rank, in lockstep, when the target is sharded) while the others wait. Every rank
        counts the time as evaluation, so the time budget sees the same training time on all of them."""
        eval_started = time.perf_counter()
        if eval_set and (main_process or sharded_target):
            report = evaluate_tau(target, drafter, eval_set, max_new_tokens=eval_max_new_tokens,
                                  stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, backend=eval_backend,
                                  batch_size=eval_batch_size, source=eval_source)
            if main_process:
                report["step"] = step
                result.evals.append(report)
                result.eval_seconds += report["seconds"]
                if bar is not None:
                    # stderr: stdout is kept for the commands' machine-readable summaries.
                    bar.write(f"step {step}: tau {report['tau']:.3f} " +
                              " ".join(f"{c} {t:.3f}" for c, t in report["per_category"].items()) +
                              (f" on {eval_source}" if eval_source else ""), file=sys.stderr)
        if distributed:
            dist.barrier()
        if step > 0:
            timers["eval_in_loop"] += time.perf_counter() - eval_started

    timers = {"eval_in_loop": 0.0, "target_features": 0.0}
    bar = tqdm(total=total_steps, desc="training drafter", unit="step", disable=not (progress and main_process),
               dynamic_ncols=True)
    run_eval(0)
    started = time.perf_counter()
    step = 0
    window: list[dict] = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()
        mine = order[rank::world][:per_rank]
        for first in range(0, per_rank, batch_size):
            if step >= total_steps:
                break
            indices = mine[first : first + batch_size]
            chosen = [examples[i] for i in indices]
            # Anchors depend only on (seed, epoch, sequence), not on the batch layout or the number of processes.
            anchors = [
                sample_anchors(e["loss_mask"], num_anchors,
                               torch.Generator().manual_seed((seed * 7919 + epoch) * 1_000_003 + i))
                for e, i in zip(chosen, indices)
            ]
            batch = pack_blocks(chosen, anchors, block_size=config.block_size, mask_token_id=config.mask_token_id,
                                gamma=gamma, pad_token_id=pad_token_id, pad_to=64 if compile else 16).to(device)
            features_started = time.perf_counter()
            # pack_blocks pads on the right, so under causal attention no real position ever sees a pad and the
            # features of real positions are the same without the mask; padded positions are never visible to a
            # block. Without a mask the target takes sdpa's causal fast path and skips building a 4D padding mask,
            # which on GPU cost ~40 ms a step whatever the batch size.
            features = target_features(target, batch.input_ids, None, config.target_layer_ids)
            timers["target_features"] += time.perf_counter() - features_started  # asynchronous on GPU: a lower bound
            with torch.no_grad():
                noise = embed_block(drafter, target, batch.block_ids)
            masks = layer_attention_masks(config, batch.anchors, batch.input_ids.shape[1], dtype=mask_dtype)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                hidden = model(noise, features, batch.position_ids, masks)
                loss, stats = packed_loss(drafter, hidden, batch, lm_head, compile=compile)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(drafter.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - started - timers["eval_in_loop"]
            stats.update(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                         seconds=seconds)
            if step == pace_from:
                pace_started = seconds  # the stats above synchronised with the GPU, so `seconds` is real
            if time_budget is not None and step == calibration < total_steps:
                # Re-plan once the steady pace is known. The budget is per process; DDP keeps the processes in
                # lockstep, and every rank must agree.
                per_step = (seconds - pace_started) / (calibration - pace_from)
                planned = budgeted_total_steps(total_steps, step, seconds, time_budget, per_step)
                if distributed:
                    agreed = torch.tensor([planned], device=device if device.type == "cuda" else "cpu")
                    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
                    planned = int(agreed.item())
                if planned < total_steps:
                    total_steps = schedule.total_steps = planned
                    schedule.warmup_steps = max(1, min(warmup, round(warmup_ratio * total_steps)))
                    bar.total = total_steps
                    bar.refresh()
                result.extra.update(total_steps=total_steps, warmup_steps=schedule.warmup_steps,
                                    calibration_seconds_per_step=per_step)
            if time_budget is not None and step < total_steps:
                over = torch.tensor([float(seconds >= time_budget)])
                if distributed:  # every rank stops at the same step, or DDP would wait forever
                    over = over.to(device if device.type == "cuda" else "cpu")
                    dist.all_reduce(over, op=dist.ReduceOp.MAX)
                if over.item():
                    total_steps = schedule.total_steps = step
                    bar.total = total_steps
                    result.extra.update(total_steps=total_steps, stopped_by_time_budget=True)
            window.append(stats)
            if step % max(log_every, 1) == 0 or step == total_steps:
                merged = {k: sum(s[k] for s in window) / len(window) for k in ("loss", "acc", "acc_first", "train_tau")}
                merged.update({k: window[-1][k] for k in ("step", "epoch", "lr", "grad_norm", "seconds")})
                result.history.append(merged)
                window = []
                bar.set_postfix(loss=f"{merged['loss']:.3f}", tau_tf=f"{merged['train_tau']:.2f}")
            bar.update(1)
            if eval_every and step % eval_every == 0 and step < total_steps:
                run_eval(step)
            if save_every and output_dir is not None and step % save_every == 0 and main_process:
                save_drafter(drafter, output_dir / "checkpoints" / f"step-{step}", save_dtype)
        if step >= total_steps:
            break
    result.steps, result.epochs = step, min(epochs, epoch + 1)
    # Training time alone (periodic evaluations excluded), for throughput estimates.
    result.seconds = time.perf_counter() - started - timers["eval_in_loop"]
    result.extra["target_features_seconds"] = timers["target_features"]
    run_eval(step)
    bar.close()

    if distributed:
        # Evidence that the processes trained one model: the parameter checksums must agree.
        checksum = float(sum(p.detach().double().sum() for p in drafter.parameters()))
        gathered = [None] * world
        dist.all_gather_object(gathered, checksum)
        result.extra["rank_parameter_checksums"] = gathered
    if main_process and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_drafter(drafter, output_dir / "drafter", save_dtype)
        write_metrics(result, output_dir / "metrics.json", run_info)
        if plot:
            plot_curves(result, output_dir / "curves.png")
    if distributed:
        dist.barrier()
    return result


def write_metrics(result: TrainResult, path: str | os.PathLike, run_info: dict | None = None) -> Path:
    """`metrics.json`: final per-category tau on the evaluation prompts and their source first, then the full
    history."""
    path = Path(path)
    final = result.final_eval
    initial = result.evals[0] if result.evals else None
    payload = {
        "final_tau": final["tau"] if final else None,
        "final_tau_per_category": final["per_category"] if final else None,
        "untrained_tau": initial["tau"] if initial and initial["step"] == 0 else None,
        "eval_source": final.get("source") if final else None,
        "run": run_info or {},
        **result.to_dict(),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def plot_curves(result: TrainResult, path: str | os.PathLike) -> Path | None:
    """PNG with the training loss (left) and tau per category on held-out prompts (right). Needs matplotlib;
    returns None (and writes nothing) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in result.history]
    left.plot(steps, [h["loss"] for h in result.history], label="weighted CE")
    left.set_xlabel("step")
    left.set_ylabel("loss (log scale)")
    left.set_yscale("log")  # a fresh drafter starts far above ln(vocab) on large vocabularies
    twin = left.twinx()
    twin.plot(steps, [h["train_tau"] for h in result.history], color="tab:orange", label="teacher-forced tau")
    twin.set_ylabel("teacher-forced tau")
    left.set_title("training")
    left.legend(loc="upper left")
    twin.legend(loc="upper right")
    if result.evals:
        eval_steps = [e["step"] for e in result.evals]
        right.plot(eval_steps, [e["tau"] for e in result.evals], marker="o", label="all", color="black")
        for category in sorted({c for e in result.evals for c in e["per_category"]}):
            right.plot(eval_steps, [e["per_category"].get(category, float("nan")) for e in result.evals], marker=".",
                       label=category)
        right.legend()
    right.set_xlabel("step")
    right.set_ylabel("tau (tokens per verify step)")
    right.set_title("held-out acceptance length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "PackedBatch", "TrainResult", "anchor_candidates", "count_parameters", "default_gamma", "evaluate_tau",
    "new_drafter_config", "pack_blocks", "packed_loss", "pick_mask_token_id", "plot_curves", "sample_anchors",
    "save_drafter", "target_features", "train_drafter", "write_metrics",
]
