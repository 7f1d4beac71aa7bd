"""Where a response ends: the target's stop ids, and cutting a row after the first of them.

Every command (demo, generate, serve, bench --stop-at-eos, make-data, train's evaluations) stops where
`target.generate` would, so that the answers dflash-hf produces, trains on and measures are the target's own.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from torch import nn


def target_stop_ids(target: nn.Module, tokenizer=None) -> list[int]:
    """The ids at which `target.generate` ends a response: the generation config's `eos_token_id` (an int or a list,
    e.g. a chat model's end-of-turn ids), else the model config's (the text config of a multimodal model), else the
    tokenizer's EOS. `[]` when none of them names one."""
    config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    generation_config = getattr(target, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), getattr(config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        ids = [value] if isinstance(value, int) else list(value or [])
        if ids:
            return list(dict.fromkeys(int(i) for i in ids))
    return []


def cut_after_stop(ids: Sequence[int], stops: Collection[int]) -> list[int]:
    """`ids` up to and including the first id in `stops` (all of `ids` when none is there)."""
    return list(ids[: next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))])


__all__ = ["cut_after_stop", "target_stop_ids"]
