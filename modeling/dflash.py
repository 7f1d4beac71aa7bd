"""Alias module: z-lab's released config.json maps AutoModel to `dflash.DFlashDraftModel`; with this file beside it,
that entry loads our implementation."""

from .modeling_dflash import DFlashDraftModel

__all__ = ["DFlashDraftModel"]
