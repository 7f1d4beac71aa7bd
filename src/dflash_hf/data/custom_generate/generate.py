"""`custom_generate` entry point of a DFlash drafter repository (written by `dflash-hf export`; do not edit the copy).

    drafter = AutoModel.from_pretrained(REPO, trust_remote_code=True, dtype=target.dtype).to(target.device)
    out = target.generate(**batch, custom_generate=REPO, trust_remote_code=True, assistant_model=drafter,
                          max_new_tokens=256)

does what `target.generate(**batch, assistant_model=drafter, max_new_tokens=256)` does once the drafter's remote code
is imported: the batched DFlash engine (`decoding_dflash.py`) behind transformers' generate (`integration_dflash.py`),
both copied beside this file at export time from the single source in the dflash-hf package. It takes left-padded
batches; greedy output of every row equals the target's own greedy output for that row, and sampling keeps the
target's distribution. Options, outputs and errors are those of plain generate; `cuda_graphs=` and `compile=` are
the engine options `dflash_cuda_graphs=` and `dflash_compile=`. `assistant_model.last_stats` holds the acceptance
lengths of the call.
"""

from __future__ import annotations

from transformers.generation.utils import GenerationMixin

# Every sibling module is imported directly: transformers 4.57 copies only the direct relative imports of this file.
from .compat_dflash import install_generate_hook  # noqa: F401
from .decoding_dflash import DFlashDecoder  # noqa: F401
from .generation_dflash import DFlashStats  # noqa: F401
from .integration_dflash import install_generate_integration
from .masks_dflash import drafter_block_masks  # noqa: F401
from .verify_length_dflash import VerifyLengthPolicy  # noqa: F401


def generate(model, assistant_model=None, cuda_graphs=None, compile=None, **generate_arguments):
    """`model.generate(**generate_arguments, assistant_model=assistant_model)` on the DFlash engine."""
    if assistant_model is None:
        raise ValueError(
            "custom_generate=<DFlash drafter repo> needs the drafter: pass assistant_model=AutoModel.from_pretrained("
            "<that repo>, trust_remote_code=True, dtype=target.dtype).to(target.device)."
        )
    install_generate_integration()  # a no-op when the drafter's own copy of the remote code installed it
    if cuda_graphs is not None:
        generate_arguments["dflash_cuda_graphs"] = cuda_graphs
    if compile is not None:
        generate_arguments["dflash_compile"] = compile
    return GenerationMixin.generate(model, assistant_model=assistant_model, **generate_arguments)
