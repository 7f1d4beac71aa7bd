"""dflash-hf: DFlash speculative decoding for Hugging Face transformers.

The model classes live in the remote-code files under `modeling/` (shipped as `dflash_hf.modeling`); this package
imports them, so there is one source of truth. Importing it also enables `target.generate(assistant_model=drafter)`.
"""

from dflash_hf.modeling.configuration_dflash import DFlashConfig, build_target_layer_ids
from dflash_hf.modeling.decoding_dflash import DFlashDecoder, DFlashGenerateOutput, generate
from dflash_hf.modeling.generation_dflash import DFlashStats, check_drafter_fits_target
from dflash_hf.modeling.modeling_dflash import DFlashDraftModel

__version__ = "0.1.0"

__all__ = [
    "DFlashConfig",
    "DFlashDecoder",
    "DFlashDraftModel",
    "DFlashGenerateOutput",
    "DFlashStats",
    "build_target_layer_ids",
    "check_drafter_fits_target",
    "generate",
]
