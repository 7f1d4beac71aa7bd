"""Alias module: z-lab's released config.json maps AutoModel to `dflash.DFlashDraftModel`; with this file beside it,
that entry loads our implementation.

Every sibling module is imported here directly, not only through `modeling_dflash`: transformers 4.57 copies just the
*direct* relative imports of a remote-code file when loading from a local folder, so a nested import would be missing.
"""

from .compat_dflash import install_generate_hook  # noqa: F401
from .configuration_dflash import DFlashConfig
from .decoding_dflash import DFlashDecoder  # noqa: F401
from .generation_dflash import DFlashStats
from .integration_dflash import install_generate_integration  # noqa: F401
from .masks_dflash import drafter_block_masks  # noqa: F401
from .modeling_dflash import DFlashDraftModel
from .verify_length_dflash import VerifyLengthPolicy  # noqa: F401

__all__ = ["DFlashConfig", "DFlashDraftModel", "DFlashStats"]
