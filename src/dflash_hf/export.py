"""Hub-ready export of a DFlash drafter, conversion of z-lab releases, and upload.

An exported folder is a complete model repository that needs **no dflash-hf install** to use:

    config.json              model_type "dflash_draft", auto_map AutoConfig/AutoModel -> the files below,
                             z-lab's nested `dflash_config` plus the same keys at the top level
    model.safetensors        z-lab's released weight layout (fc, hidden_norm, layers.N.*, norm; no embedding/head)
    configuration_dflash.py  remote code, copied from the installed `dflash_hf.modeling` package (the single source)
    modeling_dflash.py, ...  every other `*_dflash.py` and dflash.py of that package (idem)
    custom_generate/         generate.py (`target.generate(custom_generate=REPO, ...)`: plain generate on the engine) and
                             copies of the same remote-code files, because custom_generate code may only import
                             single-dot modules inside custom_generate/
    README.md                model card (dflash_hf.model_card): Hub metadata with measured results as a model-index,
                             usage for transformers, vLLM and SGLang

Nothing in an export is hand-maintained: every `.py` file is copied from the package at export time.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dflash_hf.model_card import model_card, summarize_metrics

AUTO_MAP = {"AutoConfig": "configuration_dflash.DFlashConfig", "AutoModel": "modeling_dflash.DFlashDraftModel"}
MODEL_TYPE = "dflash_draft"
WEIGHTS_NAME = "model.safetensors"
CUSTOM_GENERATE_TEMPLATE = Path(__file__).resolve().parent / "data" / "custom_generate" / "generate.py"

# Target aliases understood by the CLI, with their Hub ids (for the card's base_model) and architecture facts.
KNOWN_TARGETS = {
    "smollm2": {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "num_hidden_layers": 30, "hidden_size": 576,
                "vocab_size": 49152},
}

# z-lab's released weight layout (docs/DFLASH.md, "Released config and weight layout"). Biases are allowed only when the config asks for them.
_LAYOUT = re.compile(
    r"^(fc\.weight|hidden_norm\.weight|norm\.weight|"
    r"layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)|"
    r"layers\.\d+\.self_attn\.(q_norm|k_norm)\.weight|"
    r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight)$"
)
# Aliases used by other ports of the same weights (vLLM's midlayer, MuseGlimmer's encoder.*).
_ALIASES = (("encoder.fc.", "fc."), ("encoder.output_norm_enc.", "hidden_norm."), ("midlayer.", "layers.0."),
            ("model.", ""))
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ExportResult:
    folder: Path
    files: list[tuple[str, int]]  # (path relative to folder, size in bytes), sorted

    def listing(self) -> str:
        width = max((len(name) for name, _ in self.files), default=0)
        lines = [f"  {name:<{width}}  {_human(size):>9}" for name, size in self.files]
        total = sum(size for _, size in self.files)
        return "\n".join(lines + [f"  {len(self.files)} files, {_human(total)}"])


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


# ----------------------------------------------------------------------------------------------------------------------
# Remote code
# ----------------------------------------------------------------------------------------------------------------------


def modeling_dir() -> Path:
    """Folder of the installed `dflash_hf.modeling` package: the single source of every exported `.py` file."""
    import dflash_hf.modeling

    return Path(list(dflash_hf.modeling.__path__)[0])


def remote_code_files() -> list[Path]:
    """The remote-code files to ship: every `.py` in `dflash_hf.modeling` except `__init__.py`."""
    files = sorted(p for p in modeling_dir().glob("*.py") if p.name != "__init__.py")
    names = {p.name for p in files}
    for needed in ("configuration_dflash.py", "modeling_dflash.py"):
        if needed not in names:
            raise FileNotFoundError(f"{needed} is missing from {modeling_dir()}; the dflash-hf install is broken.")
    return files


def write_remote_code(folder: Path) -> None:
    """Copy the remote-code files into `folder` and, with the custom_generate entry point, into
    `folder/custom_generate/`."""
    files = remote_code_files()
    for path in files:
        shutil.copyfile(path, folder / path.name)
    custom = folder / "custom_generate"
    custom.mkdir(exist_ok=True)
    for path in files:
        shutil.copyfile(path, custom / path.name)
    shutil.copyfile(CUSTOM_GENERATE_TEMPLATE, custom / "generate.py")
    if not (modeling_dir() / "decoding_dflash.py").is_file():
        print(
            "dflash-hf export: warning: dflash_hf.modeling has no decoding_dflash.py yet, so custom_generate/ "
            "cannot run until this folder is exported again from an install that has it.",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------------------------------


def portable_rope(config: dict) -> dict:
    """Write RoPE both ways: transformers 5.x reads `rope_parameters`, 4.57 (and vLLM/SGLang builds on it) reads
    `rope_theta`/`rope_scaling`. A 5.x-saved config alone would load in 4.57 with the default theta, silently."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and config.get("rope_theta") is None:
            config["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = scaling
    elif config.get("rope_theta") is not None:
        rope = dict(config.get("rope_scaling") or {"rope_type": "default"})
        rope["rope_theta"] = config["rope_theta"]
        config["rope_parameters"] = rope
    return config


def _base_config_noise() -> dict:
    """Generic PretrainedConfig fields and their default values (dropped from the export when unchanged)."""
    from transformers import PretrainedConfig

    noise = PretrainedConfig().to_dict()
    for key in ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype"):
        noise.pop(key, None)
    return noise


def export_config(config, dtype: torch.dtype | None) -> dict:
    """The exported config.json of a `DFlashConfig`: complete model fields, without PretrainedConfig boilerplate."""
    data = config.to_dict()
    noise = _base_config_noise()
    data = {k: v for k, v in data.items() if not (k in noise and noise[k] == v)}
    data.pop("_name_or_path", None)
    data.pop("auto_map", None)
    data.update(model_type=MODEL_TYPE, architectures=["DFlashDraftModel"], auto_map=dict(AUTO_MAP))
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        data["dtype"] = name
        data["torch_dtype"] = name
    return portable_rope(data)


def convert_zlab_config(data: dict) -> dict:
    """A z-lab release's config.json -> ours, changing only what loading needs: our model_type and auto_map (theirs
    names `dflash.DFlashDraftModel`, which our `dflash.py` alias also resolves), and the DFlash keys mirrored at the
    top level where transformers' native route reads them. Every original key is kept."""
    data = copy.deepcopy(data)
    nested = data.get("dflash_config") or {}
    for key in ("mask_token_id", "target_layer_ids", "block_size"):
        if key in nested and key not in data:
            data[key] = nested[key]
    if data.get("target_layer_ids") is None:
        raise ValueError(
            "This config.json has no target_layer_ids (neither in dflash_config nor at the top level); it is not a "
            "DFlash drafter release, or it predates the released schema."
        )
    data.update(model_type=MODEL_TYPE, architectures=["DFlashDraftModel"], auto_map=dict(AUTO_MAP))
    return portable_rope(data)


# ----------------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------------


def canonical_key(key: str) -> str:
    for old, new in _ALIASES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def check_layout(keys, expected_shapes: dict | None = None, shapes: dict | None = None) -> None:
    """Raise ValueError unless `keys` are exactly z-lab's released layout (and, if given, match the shapes the
    config implies)."""
    bad = sorted(k for k in keys if not _LAYOUT.match(k))
    if bad:
        raise ValueError(
            f"Tensors {bad[:6]}{' ...' if len(bad) > 6 else ''} are not part of the released DFlash layout "
            "(fc, hidden_norm, layers.N.*, norm; no embedding or head)."
        )
    if expected_shapes is not None and shapes is not None:
        missing = sorted(set(expected_shapes) - set(shapes))
        extra = sorted(set(shapes) - set(expected_shapes))
        if missing or extra:
            raise ValueError(f"Checkpoint does not match its config: missing {missing[:6]}, unexpected {extra[:6]}.")
        wrong = [(k, tuple(shapes[k]), tuple(expected_shapes[k])) for k in sorted(shapes)
                 if tuple(shapes[k]) != tuple(expected_shapes[k])]
        if wrong:
            k, got, want = wrong[0]
            raise ValueError(f"Tensor {k} has shape {got} but the config implies {want} ({len(wrong)} mismatches).")


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a `DFlashDraftModel` built from `config`, without allocating it (meta device)."""
    from dflash_hf import DFlashDraftModel

    with torch.device("meta"):
        model = DFlashDraftModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def drafter_state_dict(drafter, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The drafter's persistent weights in the released layout, cast to `dtype` (None keeps each tensor's)."""
    state = {}
    for key, tensor in drafter.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    check_layout(state.keys())
    return dict(sorted(state.items()))


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------


def load_metrics(path: str | os.PathLike | None) -> dict | list | None:
    """The `--metrics` JSON (a `dflash-hf bench` results file, a training metrics.json or a short summary; see
    `dflash_hf.model_card`), checked to hold measured results."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--metrics {path}: no such file; pass the JSON of `dflash-hf bench` (benchmarks/results/"
                                "NAME.json) or a training metrics.json.")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"--metrics {path} is not valid JSON: {error}") from None
    summarize_metrics(data)  # a file the card cannot summarise fails here, before anything is written
    return data


# ----------------------------------------------------------------------------------------------------------------------
# Export and convert
# ----------------------------------------------------------------------------------------------------------------------


def _card_license(readme: Path) -> str | None:
    """The `license:` value in a model card's YAML front matter, if any."""
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1]
    match = re.search(r"^license:\s*(\S+)\s*$", front, flags=re.MULTILINE)
    return match.group(1) if match else None


def _has_custom_generate(folder: Path) -> bool:
    return (folder / "custom_generate" / "generate.py").is_file()


def _looks_like_an_export(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "custom_generate" / "generate.py").is_file()


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary folder beside `out` (renamed to `out` when complete). `--overwrite` replaces only a previous
    export; the current folder, its parents and any other non-empty folder are never replaced, so an export cannot
    delete what it did not write."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder path (new, empty, or a previous export).")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {out} lies under {blocking}, which is a file, not a folder; pass a folder path "
                         "outside it.")
    if out.exists() and any(out.iterdir()):
        cwd = Path.cwd().resolve()
        if out == cwd or out in cwd.parents:
            raise ValueError(
                f"--out {out} is the current folder or one of its parents; exports go to a folder of their own, "
                "e.g. --out hub_upload/NAME."
            )
        if not overwrite:
            raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace a previous export.")
        if not _looks_like_an_export(out):
            raise ValueError(
                f"--out {out} is not empty and is not a previous export (no config.json and custom_generate/); "
                "--overwrite replaces only exports. Choose a new or empty folder."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def make_files_readable(folder: Path) -> None:
    """Give every file under `folder` the mode a plain `open()` would (0644 under the usual umask 022):
    safetensors writes weights 0600, which other users of a shared model folder cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _finish(tmp: Path, out: Path) -> ExportResult:
    """Swap the finished `tmp` in for `out`: the previous export is set aside first and removed only once the new one
    is in place."""
    out = out.resolve()
    tmp.chmod(0o755)
    make_files_readable(tmp)
    previous = None
    if out.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, previous / out.name)
    os.replace(tmp, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    files = sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob("*") if p.is_file())
    return ExportResult(out, files)


def check_fits_target_config(config, target: dict) -> None:
    """Config-level check that the drafter can read `target` (a dict with num_hidden_layers, hidden_size)."""
    depth, hidden = target.get("num_hidden_layers"), target.get("hidden_size")
    ids = list(config.target_layer_ids or [])
    if depth is not None and any(not 0 <= i < depth for i in ids):
        raise ValueError(f"Drafter target_layer_ids {ids} do not fit a target with {depth} layers; wrong --target?")
    if hidden is not None and config.hidden_size != hidden:
        raise ValueError(
            f"Drafter hidden_size {config.hidden_size} != target hidden_size {hidden}; wrong --target?"
        )


def export_drafter(drafter, out: str | os.PathLike, *, name: str | None = None, base_model: str | None = None,
                   repo_id: str | None = None, metrics=None, dtype: torch.dtype | None = torch.bfloat16,
                   license: str = "apache-2.0", trained: bool = True, overwrite: bool = False) -> ExportResult:
    """Write a Hub-ready folder for a loaded `DFlashDraftModel` (see the module docstring for its contents).

    The card's title is `name`, else the last part of `repo_id`, else `<base model>-DFlash`; `metrics` is a
    `--metrics` JSON document or a `dflash_hf.model_card.Measured` (None: the card says it was not measured)."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = _prepare_out(out, overwrite)
    try:
        state = drafter_state_dict(drafter, dtype)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = export_config(drafter.config, dtype if dtype is not None else next(drafter.parameters()).dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_remote_code(tmp)
        n_params = sum(t.numel() for t in state.values())
        (tmp / "README.md").write_text(model_card(name=name, repo_id=repo_id, config=config, base_model=base_model,
                                                  n_params=n_params, metrics=metrics, license=license,
                                                  trained=trained, custom_generate=_has_custom_generate(tmp)))
        return _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_zlab(src: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                 base_model: str | None = None, repo_id: str | None = None, metrics=None, license: str | None = None,
                 overwrite: bool = False) -> ExportResult:
    """Turn a released z-lab checkpoint folder into our export **without changing a tensor**.

    The weight file is copied byte for byte when its keys already follow the released layout; if it uses a known
    alias (`encoder.fc.`, `midlayer.`, ...) the tensors are rewritten under the canonical names, bytes unchanged.
    Shapes are checked against the config before anything is written. The card's license is `license`, else the
    one in the release's own README.md metadata, else "other" (check the release's terms before uploading).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    from dflash_hf import DFlashConfig

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json; pass the folder of a downloaded z-lab DFlash release.")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{src} has no *.safetensors weights; pass a complete z-lab DFlash release folder.")
    data = convert_zlab_config(json.loads((src / "config.json").read_text()))
    license = license or _card_license(src / "README.md") or "other"
    config = DFlashConfig.from_dict(data)

    shapes, keys_by_shard = {}, {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys_by_shard[shard] = list(f.keys())
                for key in f.keys():
                    shapes[canonical_key(key)] = tuple(f.get_slice(key).get_shape())
        except SafetensorError as error:
            raise ValueError(f"{shard} is not a readable safetensors file ({error}); download the release "
                             "again.") from error
    check_layout(shapes.keys(), expected_shapes(config), shapes)

    out = Path(out)
    tmp = _prepare_out(out, overwrite)
    try:
        aliased = any(canonical_key(k) != k for keys in keys_by_shard.values() for k in keys)
        if len(shards) == 1 and not aliased:
            shutil.copyfile(shards[0], tmp / WEIGHTS_NAME)
        else:
            tensors, metadata = {}, {"format": "pt"}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    metadata.update(f.metadata() or {})
                    for key in f.keys():
                        tensors[canonical_key(key)] = f.get_tensor(key)
            save_file(dict(sorted(tensors.items())), str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        write_remote_code(tmp)
        n_params = 0
        for shape in shapes.values():
            count = 1
            for dim in shape:
                count *= dim
            n_params += count
        (tmp / "README.md").write_text(model_card(name=name, repo_id=repo_id, config=data, base_model=base_model,
                                                  n_params=n_params, metrics=metrics, license=license,
                                                  source=str(src.name), custom_generate=_has_custom_generate(tmp)))
        for extra in ("LICENSE", "LICENSE.txt", "NOTICE"):
            if (src / extra).is_file():
                shutil.copyfile(src / extra, tmp / extra)
        return _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------------------


def hub_token() -> str:
    """The token `--push` uploads with, found as huggingface_hub finds it (`HF_TOKEN`, else the saved login); also
    refuses offline mode. `dflash-hf export/convert` call it before writing anything."""
    from huggingface_hub import constants, get_token

    token = get_token()
    if not token:
        raise ValueError(
            "--push needs a Hugging Face token with write access: log in once with `hf auth login` (or "
            "`huggingface-cli login`), or set the HF_TOKEN environment variable, e.g. HF_TOKEN=hf_... dflash-hf "
            "export ... --push REPO_ID (create one at huggingface.co/settings/tokens)."
        )
    if constants.HF_HUB_OFFLINE:
        raise ValueError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing can be uploaded; unset it to "
                         "--push, or drop --push to only write the folder.")
    return token


def _network_errors() -> tuple[type[BaseException], ...]:
    """What an upload raises when the network or the Hub fails: OSError covers the OS's connection errors,
    huggingface_hub's HTTP and offline errors and requests' errors (huggingface_hub < 1.0); newer versions raise the
    errors of httpx (or its fork httpx2), which are not OSErrors."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            pass
    return tuple(errors)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an export folder to the Hub model repo `repo_id` (created if needed); returns the commit URL.

    A failed upload raises `RuntimeFailure` naming the folder, which is left complete for another try."""
    from huggingface_hub import HfApi

    from dflash_hf.cli_args import RuntimeFailure

    token = token or hub_token()
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="Upload DFlash drafter exported by dflash-hf")
    except _network_errors() as error:
        raise RuntimeFailure(
            f"uploading {folder} to https://huggingface.co/{repo_id} failed: {error}. The folder is complete; check "
            f"the network and the token, then upload it again (the same command with --overwrite)."
        ) from error
    return str(getattr(info, "commit_url", info))


def validate_repo_id(repo_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id or ""):
        raise ValueError(f"--push {repo_id!r} is not a Hub repo id; use NAMESPACE/NAME, e.g. my-org/my-drafter.")
    return repo_id


__all__ = [
    "AUTO_MAP",
    "ExportResult",
    "convert_zlab",
    "convert_zlab_config",
    "export_config",
    "export_drafter",
    "model_card",
    "push_folder",
    "remote_code_files",
]
