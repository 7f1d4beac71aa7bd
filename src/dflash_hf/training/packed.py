"""The packed training forward: every block of a batch of sequences in one drafter call (recipe step 3).

Query rows are the blocks laid end to end (block j of a sequence at rows `j*B .. j*B+B-1`, `Q = m * B` rows); keys are
`[context (T rows) ; block rows (Q)]`. A block row sees the context keys before its anchor and its own block, never
another block, so all but `B` of the `Q` block keys of every row are masked. Rather than compute those scores and throw
them away, the blocks are split into groups of `blocks_per_group` (128 query rows at B = 16) and each group attends to
`[context ; its own blocks]` only: the same result over a key axis of `T + 128` instead of `T + Q` (about 4x less
attention work at 96 blocks a sequence). The grouping is a registered transformers attention function that wraps the
drafter's own sdpa or eager attention, so the drafter's modules run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface

from dflash_hf.modeling.compat_dflash import attention_interface
from dflash_hf.modeling.configuration_dflash import DFlashConfig
from dflash_hf.modeling.masks_dflash import additive_mask, block_visibility
from dflash_hf.modeling.modeling_dflash import DFlashDraftModel

# Query rows per group: a multiple of the attention kernels' tiles that keeps the re-used context a small share.
GROUP_ROWS = 128


def default_blocks_per_group(num_blocks: int, block_size: int, rows: int = GROUP_ROWS) -> int:
    """The largest divisor of `num_blocks` whose blocks fit in `rows` query rows (at least 1)."""
    most = max(1, min(num_blocks, rows // block_size))
    return next(g for g in range(most, 0, -1) if num_blocks % g == 0)


def packed_visibility(
    anchors: torch.Tensor,
    ctx_len: int,
    block_size: int,
    *,
    causal: bool,
    window: int | None,
    blocks_per_group: int | None = None,
) -> torch.Tensor:
    """Bool `[b * G, 1, g * B, T + g * B]`: True where a query row (block j, offset k) may attend to the key.

    `anchors` is `[b, m]`; the m blocks of a sequence form `G = m / g` groups of `g = blocks_per_group` blocks
    (default: all m in one group, `G = 1`). Group n of sequence i is row `i * G + n`; its keys are the T context rows
    followed by its own `g * B` block rows. Context key t is visible iff `t < a_j` (and, with a window,
    `(a_j + k) - t < window`); block key (j', k') iff `j' == j`, plus `k' <= k` on causal layers and `|k - k'| <
    window` on windowed ones. This mirrors `build_block_attention_mask` at inference, where the draft cache holds
    exactly the context rows `0 .. a_j - 1`.
    """
    b, m = anchors.shape
    g = m if blocks_per_group is None else blocks_per_group
    if g < 1 or m % g:
        raise ValueError(f"blocks_per_group={g} must divide the {m} blocks of a sequence.")
    B, device = block_size, anchors.device
    q_anchor = anchors.reshape(b * (m // g), g).repeat_interleave(B, dim=1)  # [b * G, g * B]
    q_offset = torch.arange(B, device=device).repeat(g)  # [g * B]
    q_block = torch.arange(g, device=device).repeat_interleave(B)  # [g * B]
    t = torch.arange(ctx_len, device=device)[None, None, :]
    # Context keys sit at their own positions, block queries at anchor + offset (the drafter's rule, both ways).
    ctx = (t < q_anchor[:, :, None]) & block_visibility((q_anchor + q_offset[None])[:, :, None], t, causal=causal,
                                                         window=window)  # [b * G, g * B, T]
    own = (q_block[:, None] == q_block[None, :]) & block_visibility(q_offset[:, None], q_offset[None, :],
                                                                    causal=causal, window=window)  # [g * B, g * B]
    return torch.cat([ctx, own.expand(ctx.shape[0], -1, -1)], dim=-1)[:, None]


def layer_attention_masks(
    config: DFlashConfig,
    anchors: torch.Tensor,
    ctx_len: int,
    *,
    dtype: torch.dtype,
    blocks_per_group: int | None = None,
) -> list[torch.Tensor]:
    """One grouped 4D mask per drafter layer (layers with the same pattern share one tensor), for `PackedDrafter`.

    Groups default to `default_blocks_per_group(m, B)` (`m` = blocks per sequence). sdpa gets a bool mask (valid
    whatever the compute dtype under autocast); eager gets the additive form in `dtype`."""
    if blocks_per_group is None:
        blocks_per_group = default_blocks_per_group(anchors.shape[1], config.block_size)
    by_pattern: dict[tuple, torch.Tensor] = {}
    masks = []
    additive = config._attn_implementation in (None, "eager")
    for i in range(config.num_hidden_layers):
        pattern = (config.layer_is_causal(i), config.layer_window(i))
        if pattern not in by_pattern:
            visible = packed_visibility(anchors, ctx_len, config.block_size, causal=pattern[0], window=pattern[1],
                                        blocks_per_group=blocks_per_group)
            if additive:
                visible = additive_mask(visible[:, 0], dtype)
            by_pattern[pattern] = visible
        masks.append(by_pattern[pattern])
    return masks


def _per_group(states: torch.Tensor, ctx_len: int, groups: int) -> torch.Tensor:
    """Keys or values `[b, heads, T + Q, d]` -> `[b * G, heads, T + Q / G, d]`: the context, then the group's blocks."""
    b, heads, _, d = states.shape
    context = states[:, :, :ctx_len].unsqueeze(1).expand(b, groups, heads, ctx_len, d)
    blocks = states[:, :, ctx_len:].unflatten(2, (groups, -1)).transpose(1, 2)  # [b, G, heads, Q / G, d]
    return torch.cat([context, blocks], dim=3).flatten(0, 1)


def _grouped(base: str) -> Callable:
    """transformers attention function running `base` (sdpa / eager) group by group on the packed layout."""

    def grouped_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        # query [b, heads, Q, d]; key / value [b, kv_heads, T + Q, d]; attention_mask [b * G, 1, Q / G, T + Q / G].
        b, heads, q_len, d = query.shape
        groups = attention_mask.shape[0] // b
        ctx_len = key.shape[2] - q_len
        query = query.unflatten(2, (groups, -1)).transpose(1, 2).flatten(0, 1)  # [b * G, heads, Q / G, d]
        key, value = _per_group(key, ctx_len, groups), _per_group(value, ctx_len, groups)
        out, _ = attention_interface(base)(module, query, key, value, attention_mask, **kwargs)
        return out.unflatten(0, (b, groups)).flatten(1, 2), None  # [b, Q, heads, d]

    return grouped_attention


_GROUPED = {base: f"dflash_packed_{base}" for base in ("sdpa", "eager")}
for _base, _name in _GROUPED.items():
    AttentionInterface.register(_name, _grouped(_base))


def packed_attention(implementation: str | None) -> str:
    """The registered grouped attention that runs a drafter's `implementation` on the packed layout; raises for
    implementations that cannot take the packed mask (flash, flex)."""
    base = implementation or "eager"
    if base not in _GROUPED:
        raise ValueError(
            f"The drafter uses attn_implementation={base!r}, which cannot apply the packed block mask; load or "
            "build it with attn_implementation='sdpa' (or 'eager') for training."
        )
    return _GROUPED[base]


class PackedDrafter(nn.Module):
    """Runs a drafter over all packed blocks at once (wrap this in DDP; the drafter is its only submodule).

    forward(noise `[b, Q, H]`, features `[b, T, k*H]`, position_ids `[b, T + Q]`, layer_masks from
    `layer_attention_masks`) -> `[b, Q, H]`. The drafter's attention (sdpa or eager) runs group by group for the
    duration of the call. When every layer shares one mask this is `drafter.forward` with a ready 4D mask; drafters
    that mix full and sliding layers need one mask per layer, so their layers are called one by one (the same modules,
    in the same order as `DFlashDraftModel.forward`).
    """

    def __init__(self, drafter: DFlashDraftModel):
        super().__init__()
        self.drafter = drafter

    def forward(self, noise, features, position_ids, layer_masks):
        drafter = self.drafter
        base = drafter.config._attn_implementation
        drafter.config._attn_implementation = packed_attention(base)
        try:
            if all(mask is layer_masks[0] for mask in layer_masks):
                return drafter(
                    noise_embeds=noise, context_hidden_states=features, position_ids=position_ids,
                    attention_mask=layer_masks[0],
                ).last_hidden_state
            context = drafter.project_context(features.to(drafter.fc.weight.dtype))
            hidden = noise.to(drafter.fc.weight.dtype)
            position_embeddings = drafter.rotary_emb(hidden, position_ids)
            for layer, mask in zip(drafter.layers, layer_masks):
                hidden = layer(hidden, context, position_embeddings, mask)
            return drafter.norm(hidden)
        finally:
            drafter.config._attn_implementation = base


__all__ = ["GROUP_ROWS", "PackedDrafter", "default_blocks_per_group", "layer_attention_masks", "packed_attention",
           "packed_visibility"]
