"""Who sees whom: the attention visibility rules of DFlash, in one place.

Two rules, both over absolute token positions:

- **Drafter layers** (docs/DFLASH.md, "Drafter forward"). A block query at position `i` sees a key at
  position `j` when the layer allows it: full layers see every valid key (context and the whole block, in both
  directions); causal layers only `j <= i`; sliding layers also only `|i - j| < window` (`i - j < window` once
  causal). Which context keys are *valid* (committed, not padding, inside a runtime `draft_window`) is the caller's
  business; the rule only relates positions.
- **Target layers**, as transformers masks them: causal, and on sliding layers `i - j < window` (transformers'
  `sliding_window_overlay`: the window includes the current token). `target_mask_windows` reads which layers slide,
  the way each family's modeling code does.

The drafter model (`modeling_dflash.build_block_attention_mask`), the batched engine (`decoding_dflash`), the packed
training forward and the benchmark's bare floor all build their masks from these functions.
"""

from __future__ import annotations

import torch

# Layer kinds whose attention is a causal softmax over cached keys (with or without a window), and the recurrent kinds
# of hybrid targets (gated delta-net linear attention), which take a 2D padding mask and keep a state instead of keys.
# Other kinds (convolution-only layers, chunked attention) are refused by name.
ATTENTION_LAYER_KINDS = ("full_attention", "sliding_attention")
RECURRENT_LAYER_KINDS = ("linear_attention",)


def block_visibility(query_pos: torch.Tensor, key_pos: torch.Tensor, *, causal: bool, window: int | None
                     ) -> torch.Tensor:
    """Bool, broadcast of `query_pos` `[..., q, 1]` and `key_pos` `[..., 1, k]`: True where a drafter layer of this
    pattern lets the block query at that position attend to the key at that position."""
    visible = torch.ones(torch.broadcast_shapes(query_pos.shape, key_pos.shape), dtype=torch.bool,
                         device=query_pos.device)
    if causal:
        visible = visible & (key_pos <= query_pos)
    if window is not None:
        visible = visible & (query_pos - key_pos < window)
        if not causal:
            visible = visible & (key_pos - query_pos < window)
    return visible


def causal_visibility(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Bool, broadcast of `query_pos` `[..., q, 1]` and `key_pos` `[..., 1, k]`: a target layer's rule (causal, and
    `query - key < window` on a sliding layer)."""
    visible = key_pos <= query_pos
    if window is not None:
        visible = visible & (query_pos - key_pos < window)
    return visible


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`visible` bool `[batch, q, k]` -> additive mask `[batch, 1, q, k]` (0 where visible, the dtype's min
    elsewhere), the form transformers' attention functions take."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def drafter_layer_patterns(config) -> dict[str, tuple[bool, int | None]]:
    """`{layer_type: (causal, window)}` over a drafter config's layers (one entry per distinct layer type)."""
    return {
        config.layer_type(i): (config.layer_is_causal(i), config.layer_window(i))
        for i in range(config.num_hidden_layers)
    }


def drafter_block_masks(config, query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive masks `[batch, 1, q, k]` for a draft call: one tensor when every drafter layer has the same pattern,
    else `{layer_type: mask}` (what `DFlashAttention` takes per layer).

    `query_pos` `[batch, q, 1]` and `key_pos` `[batch, 1 or q, k]` are absolute positions; `key_valid` (broadcastable
    to `[batch, q, k]`) marks the keys that exist for the row (committed context, not padding, the block itself).
    """
    patterns = drafter_layer_patterns(config)
    by_pattern = {
        pattern: additive_mask(key_valid & block_visibility(query_pos, key_pos, causal=pattern[0], window=pattern[1]),
                               dtype)
        for pattern in dict.fromkeys(patterns.values())
    }
    if len(by_pattern) == 1:
        return next(iter(by_pattern.values()))
    return {kind: by_pattern[pattern] for kind, pattern in patterns.items()}


def target_mask_windows(text_config) -> dict[str | None, int | None]:
    """How transformers masks the target's attention layers: `{layer_type: window or None}` for models that take one
    mask per layer type (their config has `layer_types`), or `{None: window or None}` for one mask shared by every
    layer (Llama has no window; Mistral, Phi-3 and Starcoder2 apply `sliding_window` to every layer when it is set).

    Recurrent kinds (`RECURRENT_LAYER_KINDS`) are left out: see `recurrent_layer_kinds`. Raises ValueError for any
    other kind, naming it.
    """
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - set(ATTENTION_LAYER_KINDS) - set(RECURRENT_LAYER_KINDS))
        if unknown:
            raise ValueError(
                f"its {getattr(text_config, 'model_type', 'target')!r} config has layers of kind {unknown} "
                f"(layer_types), which the engine's static key/value caches cannot serve"
            )
        return {kind: (window if kind == "sliding_attention" else None) for kind in dict.fromkeys(layer_types)
                if kind in ATTENTION_LAYER_KINDS}
    # Without `layer_types`, transformers' Mistral-style models pick the sliding-window mask for every layer whenever
    # `sliding_window` is set (Qwen2/3 configs, which gate it by `use_sliding_window`, always have `layer_types`).
    return {None: window}


def recurrent_layer_kinds(text_config) -> list[str]:
    """The recurrent (linear-attention) layer kinds of a hybrid target, in `layer_types` order; [] for others."""
    return [kind for kind in dict.fromkeys(getattr(text_config, "layer_types", None) or [])
            if kind in RECURRENT_LAYER_KINDS]


def target_layer_masks(windows: dict[str | None, int | None], query_pos: torch.Tensor, key_pos: torch.Tensor,
                       key_valid: torch.Tensor, dtype: torch.dtype, recurrent_kinds: list[str] | tuple = (),
                       query_valid: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The target's masks: additive attention masks `[batch, 1, q, k]` from `target_mask_windows` (one tensor, or
    `{layer_type: mask}`), plus, for a hybrid target's `recurrent_kinds`, the 2D `[batch, q]` mask of real (not
    padding) queries `query_valid` that its linear-attention layers multiply their inputs by. Positions and
    `key_valid` as in `drafter_block_masks`."""
    masks = {kind: additive_mask(key_valid & causal_visibility(query_pos, key_pos, window), dtype)
             for kind, window in windows.items()}
    if None in masks:
        return masks[None]
    masks.update({kind: query_valid.to(dtype) for kind in recurrent_kinds})
    return masks


__all__ = ["ATTENTION_LAYER_KINDS", "RECURRENT_LAYER_KINDS", "additive_mask", "block_visibility", "causal_visibility",
           "drafter_block_masks", "drafter_layer_patterns", "recurrent_layer_kinds", "target_layer_masks",
           "target_mask_windows"]
