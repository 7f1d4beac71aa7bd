"""dflash-hf: DFlash speculative decoding for Hugging Face transformers.

The model classes live in the remote-code files under `modeling/` (shipped as `dflash_hf.modeling`); this package
re-exports them, so there is one source of truth. Loading a DFlash drafter (through `dflash_hf.DFlashDraftModel`, the
`dflash_hf.assets` loaders or `AutoModel.from_pretrained(..., trust_remote_code=True)`) also enables
`target.generate(assistant_model=drafter)`.

Every name and submodule here is imported on first use (`dflash_hf.assets`, `dflash_hf.DFlashDecoder`, ...), so
`import dflash_hf` stays light: the `dflash-hf` command line answers `--help` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it (imported when the name is first read).
_EXPORTS = {
    "DFlashConfig": "dflash_hf.modeling.configuration_dflash",
    "build_target_layer_ids": "dflash_hf.modeling.configuration_dflash",
    "DFlashDecoder": "dflash_hf.modeling.decoding_dflash",
    "DFlashGenerateOutput": "dflash_hf.modeling.decoding_dflash",
    "generate": "dflash_hf.modeling.decoding_dflash",
    "DFlashStats": "dflash_hf.modeling.generation_dflash",
    "check_drafter_fits_target": "dflash_hf.modeling.generation_dflash",
    "DFlashDraftModel": "dflash_hf.modeling.modeling_dflash",
}
# Submodules reachable as attributes after a bare `import dflash_hf`, as the README uses them.
_SUBMODULES = ("assets", "bench", "cli", "cli_args", "commands", "export", "modeling", "prompts", "serve", "stops",
               "training")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name == "__version__":
        from dflash_hf.cli_args import package_version

        value = package_version()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # cached: later reads do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES, "__version__"})
