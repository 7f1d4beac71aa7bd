"""Alias module: z-lab's released config.json maps AutoModel to `dflash.DFlashDraftModel`; with this file beside it,
that entry loads our implementation.

Every sibling module is imported here directly, not only through `modeling_dflash`: transformers 4.57 copies just the
*direct* relative imports of a remote-code file when loading from a local folder, so a nested import would be missing.
"""

from .configuration_dflash import DFlashConfig
from .generation_dflash import DFlashStats
from .modeling_dflash import DFlashDraftModel

__all__ = ["DFlashConfig", "DFlashDraftModel", "DFlashStats"]
