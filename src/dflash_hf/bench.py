"""Side-by-side decoding benchmark (issue 3), behind `dflash-hf bench`.

One process, one model load, the same prompts and the same number of new tokens for every method:

- `ar_eager`            HF greedy `generate`, DynamicCache (also the lossless reference, batch 1),
- `ar_static`           HF greedy `generate(cache_implementation="static")`; on CUDA transformers compiles the decode step,
- `hf_dflash`           transformers' native DFlash route `generate(assistant_model=drafter, speculation_type="dflash")`
                        (transformers >= 5.15.1 only),
- `dflash_generate`     our generate integration `target.generate(assistant_model=drafter)` (batch 1),
- `dflash_loop_compiled` our batched loop `DFlashDecoder(cuda_graphs=True, compile=True)` (its CUDA default),
- `dflash_loop_graphs`  the same loop with CUDA graphs and no compile (CUDA only),
- `dflash_loop_eager`   the same loop with neither,
- `dflash_loop_full`    the loop with its device defaults, verifying the whole block every step (`verify_length="full"`,
                        plain DFlash); every other loop method adapts the verify length (`"auto"`, the default),
- `ar_loop`             the loop without a drafter (`DFlashDecoder(target, None)`, graphs + compile on CUDA): one token
                        a step through the same machinery, so `dflash_loop_compiled` / `ar_loop` is the drafter's share,
- `assisted_truncated`  classic assisted generation; the assistant is the target truncated to its first N layers
                        (a real `AutoModelForCausalLM`, sharing the target's embedding and head modules),
- `prompt_lookup`       prompt-lookup decoding (`prompt_lookup_num_tokens`),
- `bare`                the cost floor: the target's verify forward (block B) and the drafter's forward alone, each
                        captured as a CUDA graph (and, for the compiled loop, compiled first), plus a 1-token target
                        forward; loop overhead = our steady-state step / floor of the same kind.

By default EOS is ignored by every method (`eos_token_id=None` for `generate`, no stop tokens for the loop), so every
row of every method produces exactly `max_new_tokens` tokens and greedy outputs can be compared token by token with
`ar_eager`. With `--stop-at-eos` every method stops a row at the target's EOS token(s) instead (how the models are
used, and what the drafter was trained on); rows are compared up to and including their stop token.
Timing: warm-up call(s) (on CUDA `ar_static` compiles there), then `repeats` timed passes; per item we keep the best and
the median wall time (CUDA synchronised). Splits into draft / verify / overhead come from forward hooks with CUDA events
(HF routes) or from the loop's own counters (`DFlashGenerateOutput.time_draft/time_verify/steps`).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from dflash_hf.cli_args import resolve_device_dtype
from dflash_hf.modeling.decoding_dflash import last_error_line
from dflash_hf.stops import cut_after_stop, target_stop_ids

# Weight-read bandwidth ceilings of the H200 the lead runs on: HBM3e spec and the device-to-device copy measured there
# (~4.3 TB/s counting bytes read and written, measured on the H200 by a device copy).
H200_PEAK_BANDWIDTH = 4.8e12
H200_COPY_BANDWIDTH = 4.3e12
LOOP_OVERHEAD_GOAL = 1.15


@dataclass(frozen=True)
class MethodSpec:
    key: str
    label: str
    batched: bool  # runs at every requested batch size (else batch 1 only)
    cuda_only: bool = False
    speculative: bool = True


METHODS: dict[str, MethodSpec] = {
    spec.key: spec
    for spec in (
        MethodSpec("ar_eager", "HF AR greedy, eager DynamicCache", batched=True, speculative=False),
        MethodSpec("ar_static", "HF AR greedy, static cache (compiled on CUDA)", batched=True, speculative=False),
        MethodSpec("dflash_loop_compiled", "DFlashDecoder, CUDA graphs + torch.compile (its CUDA default)",
                   batched=True, cuda_only=True),
        MethodSpec("dflash_loop_graphs", "DFlashDecoder, CUDA graphs, no compile", batched=True, cuda_only=True),
        MethodSpec("ar_loop", "DFlashDecoder without a drafter (AR), its defaults (CUDA: graphs + compile)",
                   batched=True, speculative=False),
        MethodSpec("bare", "bare graphed forwards (cost floor)", batched=True, speculative=False),
        MethodSpec("dflash_loop_eager", "DFlashDecoder, eager (no graphs, no compile)", batched=True),
        MethodSpec("dflash_loop_full", "DFlashDecoder, whole block every step, graphs on CUDA, no compile", batched=True),
        MethodSpec("dflash_generate", "target.generate(assistant_model=drafter): the engine, CUDA graphs (default)",
                   batched=True),
        MethodSpec("dflash_generate_compiled", "target.generate(assistant_model=drafter, dflash_compile=True)",
                   batched=True, cuda_only=True),
        MethodSpec("hf_dflash", "transformers native DFlash (speculation_type='dflash')", batched=False),
        MethodSpec("assisted_truncated", "HF assisted, truncated-target assistant", batched=False),
        MethodSpec("prompt_lookup", "HF prompt-lookup decoding", batched=False),
    )
}
METHOD_ORDER = list(METHODS)


class LoopMode(NamedTuple):
    """DFlashDecoder settings of a loop method; None = the decoder's default (for the device: graphs and compile on
    CUDA, neither on CPU; for the verify length: "auto")."""

    cuda_graphs: bool | None
    compile: bool | None
    with_drafter: bool
    verify_length: str | None = None


LOOP_MODES: dict[str, LoopMode] = {
    "dflash_loop_eager": LoopMode(False, False, True), "dflash_loop_graphs": LoopMode(True, False, True),
    "dflash_loop_compiled": LoopMode(True, True, True), "ar_loop": LoopMode(None, None, False),
    "dflash_loop_full": LoopMode(None, False, True, "full"),
}
# The methods without a drafter: every other method's tokens/s is also given as a ratio to each of them.
AR_METHODS = ("ar_eager", "ar_static", "ar_loop")

EOS_POLICY = (
    "EOS ignored by every method (generate(eos_token_id=None); DFlashDecoder stop_token_ids=[]): every row generates "
    "exactly max_new_tokens tokens, so throughput compares equal work and greedy tokens compare one to one. Tokens after "
    "an end-of-turn are the model's own continuation, which can shift acceptance relative to stopping at EOS."
)
EOS_POLICY_STOP = (
    "Every method stops a row at the target's EOS token(s) {ids} (generate(eos_token_id=...); DFlashDecoder "
    "stop_token_ids=...), up to max_new_tokens: answers end where the model ends them. tokens/s counts the tokens each "
    "row produced (stop token included); a batch runs until its longest row ends, as it would in use."
)

# ======================================================================================================================
# Small utilities
# ======================================================================================================================


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, digits)
    return value


def environment_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Versions, accelerator and host facts for the JSON record."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def command_line() -> str:
    """The command that started this process, as a shell line (`python -m dflash_hf ...` or the console script)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "-m")):
        argv = ["python", "-m", "dflash_hf", *argv[1:]]
    elif argv and Path(argv[0]).name == "dflash-hf":
        argv = ["dflash-hf", *argv[1:]]
    elif argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    return shlex.join(argv)


def forward_weight_bytes(model: nn.Module, extra: nn.Module | None = None) -> int:
    """Bytes of weights one forward of `model` reads: every parameter once, except an input embedding that is not
    also the output head (a lookup reads only a few rows). `extra` adds another module's weights (e.g. the target
    head that a DFlash drafter borrows)."""
    seen: dict[int, torch.Tensor] = {}
    for module in (model, extra):
        if module is None:
            continue
        for p in module.parameters():
            seen[id(p)] = p
    total = sum(p.numel() * p.element_size() for p in seen.values())
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if isinstance(embedding, nn.Module) and getattr(embedding, "weight", None) is not None:
        tied = head is not None and getattr(head, "weight", None) is embedding.weight
        in_extra = extra is not None and any(p is embedding.weight for p in extra.parameters())
        if not tied and not in_extra and id(embedding.weight) in seen:
            total -= embedding.weight.numel() * embedding.weight.element_size()
    return int(total)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ======================================================================================================================
# Models: target, drafter, truncated assistant
# ======================================================================================================================


def load_target(name: str, dtype: torch.dtype, device: torch.device):
    """`smollm2` (the embedded default, via `dflash_hf.assets`) or a local folder -> `(model, tokenizer, label)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.lower() in ("smollm2", "default"):
        from dflash_hf import assets  # lazily: it converts a GGUF on first use

        model, tokenizer = assets.load_smollm2(dtype=dtype, device=device)
        return model.eval(), tokenizer, "SmolLM2-135M-Instruct (embedded default)"
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--target {name!r} is neither 'smollm2' nor a local model folder with config.json; pass a folder written "
            "by save_pretrained (weights + tokenizer). Hub ids are not fetched by this command."
        )
    from dflash_hf.assets import TARGET_FOLDER_FIX, explained_load, refuse_drafter_as_target

    refuse_drafter_as_target(folder)
    # sdpa: the batched loop passes explicit 4D masks, which flash/flex attention cannot take. trust_remote_code=False:
    # never transformers' interactive prompt, which would block a benchmark run.
    with explained_load(f"--target {name!r}", TARGET_FOLDER_FIX):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa",
                                                     trust_remote_code=False).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer, str(folder)


def _pick_mask_token_id(tokenizer, text_config) -> int:
    """A real vocabulary id for the mask embedding of an untrained drafter: the tokenizer's mask token, else a special
    token that is not bos/eos/pad, else the last vocabulary row."""
    vocab = text_config.vocab_size
    if tokenizer is not None:
        mask = getattr(tokenizer, "mask_token_id", None)
        if mask is not None and 0 <= mask < vocab:
            return int(mask)
        reserved = {text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id,
                    tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        for token_id in sorted(getattr(tokenizer, "all_special_ids", []) or []):
            if token_id not in reserved and 0 <= token_id < vocab:
                return int(token_id)
    return vocab - 1


def eos_policy_stop_ids(target: nn.Module, tokenizer) -> list[int]:
    """The ids `--stop-at-eos` stops at (`dflash_hf.stops.target_stop_ids`: where `target.generate` stops). Raises if
    the target names none (the flag would then never stop)."""
    ids = target_stop_ids(target, tokenizer)
    if ids:
        return ids
    raise ValueError("--stop-at-eos: the target names no EOS token (generation_config, config and tokenizer all "
                     "lack eos_token_id); set generation_config.eos_token_id in the model folder or drop the flag.")


def build_random_drafter(target: nn.Module, num_layers: int, *, block_size: int = 16, tokenizer=None,
                         seed: int = 0) -> nn.Module:
    """An **untrained** DFlash drafter of `num_layers` layers shaped for `target` (random weights, tau ~ 1).

    Uses the target's width, heads and vocabulary, `target_layer_ids` from the spread rule (3 ids, or fewer for very
    shallow targets) and a real vocabulary id as mask token.
    """
    from dflash_hf import DFlashConfig, DFlashDraftModel, build_target_layer_ids

    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    depth = text.num_hidden_layers
    if depth >= 4:
        layer_ids = build_target_layer_ids(depth, 3)
    else:
        layer_ids = sorted({0, depth - 1})
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rope_theta = getattr(text, "rope_theta", None)
    if rope_theta is None:
        rope = getattr(text, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta") if isinstance(rope, dict) and "rope_theta" in rope else None
        if rope_theta is None and isinstance(rope, dict):  # per-layer-type dicts (Gemma): take the full layers'
            rope_theta = (rope.get("full_attention") or {}).get("rope_theta")
    extra = {"rope_theta": float(rope_theta)} if rope_theta is not None else {}
    config = DFlashConfig(
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", heads),
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        max_position_embeddings=getattr(text, "max_position_embeddings", 4096),
        block_size=block_size,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        num_target_layers=depth,
        final_logit_softcapping=getattr(text, "final_logit_softcapping", None),
        dflash_config={"mask_token_id": _pick_mask_token_id(tokenizer, text), "target_layer_ids": layer_ids},
        **extra,
    )
    torch.manual_seed(seed)
    param = next(target.parameters())
    drafter = DFlashDraftModel(config)
    return drafter.to(device=param.device, dtype=param.dtype).eval()


def load_drafter(spec: str, target: nn.Module, tokenizer, *, block_size: int = 16, seed: int = 0):
    """`--drafter` -> `(drafter, trained, description)`: a folder, `bundled`, or `random:N`."""
    from dflash_hf import DFlashDraftModel

    param = next(target.parameters())
    if spec.lower().startswith("random:"):
        raw = spec.split(":", 1)[1]
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"--drafter {spec!r}: random:N needs a positive layer count, e.g. random:2.")
        drafter = build_random_drafter(target, int(raw), block_size=block_size, tokenizer=tokenizer, seed=seed)
        return drafter, False, f"random {raw}-layer drafter (UNTRAINED, tau ~ 1)"
    if spec.lower() == "bundled":
        from dflash_hf import assets

        drafter, trained = assets.resolve_drafter("bundled", dtype=param.dtype, device=param.device,
                                                  tokenizer=tokenizer)
        if trained:
            description = f"bundled drafter ({assets.bundled_drafter_path().name})"
        else:
            description = "bundled drafter missing: UNTRAINED stand-in (tau ~ 1)"
        return drafter.eval(), bool(trained), description
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--drafter {spec!r} is not a folder with config.json and weights, 'bundled', or 'random:N'."
        )
    drafter = DFlashDraftModel.from_pretrained(folder, dtype=param.dtype).to(param.device).eval()
    return drafter, True, str(folder)


def build_truncated_assistant(target: nn.Module, num_layers: int) -> nn.Module:
    """A real `AutoModelForCausalLM` made of the target's first `num_layers` decoder layers, its final norm, and the
    target's own embedding and head **modules** (shared, not copied): a same-tokenizer draft model for classic
    assisted generation where the family has no smaller sibling (SmolLM2)."""
    from transformers import AutoModelForCausalLM

    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    if not 1 <= num_layers < text.num_hidden_layers:
        raise ValueError(
            f"--assistant-layers {num_layers} must be between 1 and {text.num_hidden_layers - 1} (the target has "
            f"{text.num_hidden_layers} layers)."
        )
    config = copy.deepcopy(target.config)
    sub = config.get_text_config() if hasattr(config, "get_text_config") else config
    sub.num_hidden_layers = num_layers
    if isinstance(getattr(sub, "layer_types", None), list):
        sub.layer_types = sub.layer_types[:num_layers]
    for key in ("max_window_layers",):
        if isinstance(getattr(sub, key, None), int):
            setattr(sub, key, min(getattr(sub, key), num_layers))
    param = next(target.parameters())
    assistant = AutoModelForCausalLM.from_config(config)
    assistant = assistant.to(device=param.device, dtype=param.dtype).eval()
    state = {k: v for k, v in target.state_dict().items() if k in assistant.state_dict()}
    result = assistant.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise RuntimeError(f"Truncated assistant did not receive weights for {result.missing_keys[:5]}")
    assistant.set_input_embeddings(target.get_input_embeddings())
    head = target.get_output_embeddings()
    if head is not None:
        assistant.set_output_embeddings(head)
    assistant.generation_config = copy.deepcopy(target.generation_config)
    return assistant


# ======================================================================================================================
# Prompts
# ======================================================================================================================


def parse_prompt_spec(spec: str) -> dict[str, int] | int:
    """`--prompts`: `N` (N per category) or `cat:N[,cat:N...]`."""
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) < 1:
            raise ValueError(f"--prompts {spec!r} must be at least 1.")
        return int(spec)
    counts: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, count = part.strip().partition(":")
        if not sep or not count.strip().isdigit() or int(count) < 1 or not name:
            raise ValueError(
                f"--prompts {spec!r}: use N (per category) or category:count pairs such as 'math:2,code:1,chat:1'."
            )
        counts[name.strip()] = int(count)
    return counts


def read_prompt_file(path: str | Path) -> list[dict[str, str]]:
    """`--prompt-file`: a JSON list of `{"category": ..., "prompt": ...}` objects (or of plain strings, category
    "prompt")."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--prompt-file {path}: cannot read a JSON list of prompts ({error}).") from None
    prompts = [{"category": "prompt", "prompt": item} if isinstance(item, str) else item for item in items] \
        if isinstance(items, list) else None
    if not prompts or not all(isinstance(p, dict) and isinstance(p.get("prompt"), str) and p["prompt"]
                              and isinstance(p.get("category", ""), str) for p in prompts):
        raise ValueError(f"--prompt-file {path}: expected a non-empty JSON list of strings or of "
                         '{"category": ..., "prompt": ...} objects.')
    return [{"category": p.get("category") or "prompt", "prompt": p["prompt"]} for p in prompts]


def load_prompts(spec: dict[str, int] | int, seed: int = 0, prompt_file: str | None = None,
                 prompt_set: str = "independent") -> tuple[list[dict[str, str]], str]:
    """`(prompts, source)`: the project's independent evaluation set (`dflash_hf.prompts.eval_prompts`, written apart
    from the training prompt generator), or with `prompt_set="heldout"` the training generator's held-out split
    (labelled in-distribution in the source); with `prompt_file`, that file's prompts. `--prompts` then picks per
    category. Each prompt is `{"category", "prompt"}`."""
    from dflash_hf.prompts import EVAL_SOURCE, HELDOUT_SOURCE, build_prompts, eval_prompts

    need = max(spec.values()) if isinstance(spec, dict) else spec
    if prompt_file is not None:
        pool, source = read_prompt_file(prompt_file), f"{prompt_file}"
    elif prompt_set == "heldout":
        pool, source = [dict(p) for p in build_prompts(need, split="heldout", seed=seed)], HELDOUT_SOURCE
    elif prompt_set == "independent":
        pool, source = [dict(p) for p in eval_prompts()], EVAL_SOURCE
    else:
        raise ValueError(f"prompt_set must be 'independent' or 'heldout', got {prompt_set!r}.")
    by_category: dict[str, list[dict[str, str]]] = {}
    for item in pool:
        by_category.setdefault(item["category"], []).append(item)
    wanted = spec if isinstance(spec, dict) else {c: spec for c in by_category}
    chosen: list[dict[str, str]] = []
    for category, count in wanted.items():
        if category not in by_category:
            raise ValueError(f"--prompts: unknown category {category!r}; available: {sorted(by_category)}.")
        items = by_category[category]
        if count > len(items):
            raise ValueError(
                f"--prompts asks for {count} {category!r} prompts but {source} has {len(items)}; ask for fewer."
            )
        chosen.extend(items[:count])
    return chosen, source


def tokenize_prompts(prompts: list[dict[str, str]], tokenizer, *, chat_template: bool = True,
                     max_prompt_tokens: int | None = None) -> list[torch.LongTensor]:
    """Each prompt -> 1-D ids (through the chat template with a generation prompt when the tokenizer has one).
    `max_prompt_tokens` keeps the **last** tokens (the generation prompt sits at the end)."""
    out = []
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    for item in prompts:
        if use_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": item["prompt"]}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(item["prompt"])["input_ids"]
        if max_prompt_tokens is not None:
            ids = ids[-max_prompt_tokens:]
        if not ids:
            raise ValueError(f"Prompt {item['prompt'][:40]!r} tokenised to nothing.")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def left_pad(rows: list[torch.LongTensor], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """1-D id rows -> `(input_ids, attention_mask)`, both `[batch, max_len]`, real tokens right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# ======================================================================================================================
# Timing instruments
# ======================================================================================================================


class ForwardTimer:
    """Forward hooks that time every call of a module (CUDA events on CUDA, so no host sync in the hot loop).

    `take()` synchronises once and returns the per-call durations (seconds) since the last `take()`.
    """

    def __init__(self, module: nn.Module, device: torch.device):
        self.device = device
        self._open: list[Any] = []
        self._done: list[tuple[Any, Any]] = []
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module, args):
        self._open.append(self._now())

    def _post(self, module, args, output):
        if self._open:
            self._done.append((self._open.pop(), self._now()))

    def take(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            durations = [start.elapsed_time(end) / 1e3 for start, end in self._done]
        else:
            durations = [end - start for start, end in self._done]
        self._done.clear()
        self._open.clear()
        return durations

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class StepIntervalTimer:
    """Wall time of each steady-state step of `DFlashDecoder`'s loop.

    Wraps the workspace method that runs one step after the first (`_Workspace._replay_step`) on the instance; the
    interval between two consecutive starts is one full loop iteration: draft + verify (graphs or eager), the one
    host sync and the host bookkeeping. Returns False from `attach` when the decoder's internals differ.
    """

    def __init__(self):
        self.intervals: list[float] = []
        self._last: float | None = None
        self._wrapped: list[tuple[Any, Any]] = []

    def attach(self, decoder) -> bool:
        workspaces = getattr(decoder, "_workspaces", None)
        if not isinstance(workspaces, dict) or not workspaces:
            return False
        ok = False
        for workspace in workspaces.values():
            original = getattr(workspace, "_replay_step", None)
            if original is None or getattr(original, "_bench_wrapped", False):
                ok = ok or original is not None
                continue

            def wrapped(*args, _original=original, **kwargs):
                now = time.perf_counter()
                if self._last is not None:
                    self.intervals.append(now - self._last)
                self._last = now
                return _original(*args, **kwargs)

            wrapped._bench_wrapped = True
            workspace._replay_step = wrapped
            self._wrapped.append((workspace, original))
            ok = True
        return ok

    def new_run(self) -> None:
        self._last = None

    def detach(self) -> None:
        for workspace, _ in self._wrapped:
            workspace.__dict__.pop("_replay_step", None)
        self._wrapped.clear()


def decoder_supports_compile() -> bool:
    from dflash_hf import DFlashDecoder

    return "compile" in inspect.signature(DFlashDecoder.__init__).parameters


def make_decoder(target: nn.Module, drafter: nn.Module | None, *, max_length: int, cuda_graphs: bool | None,
                 compile: bool | None = None, max_batch_size: int = 1, verify_length: str | None = None):
    """`(DFlashDecoder, extra generate kwargs)`, passing only the constructor arguments this version accepts.
    `compile=None` leaves the decoder's default."""
    from dflash_hf import DFlashDecoder

    params = inspect.signature(DFlashDecoder.__init__).parameters
    kwargs: dict[str, Any] = {}
    generate_kwargs: dict[str, Any] = {}
    if "max_length" in params:
        kwargs["max_length"] = max_length
    if "max_batch_size" in params:
        kwargs["max_batch_size"] = max_batch_size
    if "cuda_graphs" in params:
        kwargs["cuda_graphs"] = cuda_graphs
    elif "cuda_graphs" in inspect.signature(DFlashDecoder.generate).parameters:
        generate_kwargs["cuda_graphs"] = cuda_graphs
    if compile is not None and "compile" in params:
        kwargs["compile"] = compile
    elif compile and "compile" not in params:
        raise ValueError("This DFlashDecoder has no compile option.")
    if verify_length is not None:
        kwargs["verify_length"] = verify_length
    return DFlashDecoder(target, drafter, **kwargs), generate_kwargs


def time_callable(fn: Callable[[], Any], device: torch.device, *, graphs: bool, iters: int = 50,
                  warmup: int = 3) -> dict[str, Any]:
    """Median seconds per call of `fn` (static shapes). On CUDA with `graphs`, `fn` is captured once as a CUDA graph
    and the replays are timed with CUDA events; otherwise it runs eagerly (synchronised wall time)."""
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        run = fn
        graph = None
        capture_error = None
        if graphs:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                run = graph.replay
                run()
            except Exception as error:  # report eager timings rather than nothing, and say why
                capture_error = f"{type(error).__name__}: {error}"
                graph, run, graphs = None, fn, False
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
        del graph
        result = {"median_s": statistics.median(times), "min_s": min(times), "iters": iters, "graphed": graphs}
        if capture_error:
            result["capture_error"] = capture_error
        return result
    for _ in range(min(warmup, 1)):
        fn()
    times = []
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "iters": len(times), "graphed": False}


@torch.no_grad()
def bare_forward_costs(target: nn.Module, drafter: nn.Module, *, batch: int, capacity: int, context: int,
                       graphs: bool, iters: int = 50, compile: bool = False,
                       parts: tuple[str, ...] = ("verify", "draft", "ar_1tok")) -> dict[str, Any]:
    """The floor under one DFlash step: the target's verify forward on a block of B tokens and the drafter's forward
    (block embedding + layers + target head on B-1 rows + argmax), each alone, plus a 1-token target forward (the
    AR step floor). Shapes are those of `DFlashDecoder`: static row caches of `capacity` slots, explicit 4D masks,
    `context` committed tokens visible. With `compile`, each piece goes through `torch.compile(dynamic=False)` first
    (as `DFlashDecoder(compile=True)` does) and is then captured. Returns medians in seconds.
    """
    from dflash_hf.modeling.decoding_dflash import RowStaticCache
    from dflash_hf.modeling.generation_dflash import embed_block, target_text_config
    from dflash_hf.modeling.compat_dflash import cache_kwarg as compat_cache_kwarg
    from dflash_hf.modeling.compat_dflash import forward_accepts
    from dflash_hf.modeling.masks_dflash import (
        drafter_block_masks,
        recurrent_layer_kinds,
        target_layer_masks,
        target_mask_windows,
    )

    device = next(target.parameters()).device
    dtype = next(target.parameters()).dtype
    text = target_text_config(target)
    B = drafter.config.block_size
    if context + B > capacity:
        raise ValueError(f"context {context} + block {B} exceeds capacity {capacity}.")
    cache_kwarg = compat_cache_kwarg(target)
    pass_cache_position = forward_accepts(target, "cache_position")
    windows, recurrent = target_mask_windows(text), recurrent_layer_kinds(text)

    def target_mask(query_slots: torch.Tensor):  # [batch, q] -> [batch, 1, q, capacity] (or a dict per layer type)
        keys = torch.arange(capacity, device=device)[None, None, :]
        q = query_slots[:, :, None]
        return target_layer_masks(windows, q, keys, torch.ones_like(keys, dtype=torch.bool), dtype, recurrent,
                                  query_valid=torch.ones_like(query_slots, dtype=torch.bool))

    def target_forward_fn(q_len: int):
        cache = RowStaticCache(capacity)
        slots = (context + torch.arange(q_len, device=device))[None].expand(batch, -1).contiguous()
        ids = torch.randint(0, text.vocab_size, (batch, q_len), device=device)
        mask = target_mask(slots)
        kwargs = {cache_kwarg: cache, "use_cache": True}
        if pass_cache_position:
            kwargs["cache_position"] = slots[0]
        if recurrent:  # a hybrid target's linear-attention layers need their states: a prefill, then verifies
            cache.write_slots = slots
            target(input_ids=ids, position_ids=slots, attention_mask=mask, **kwargs)
            cache.prefilling, cache.keep_states = False, q_len

        def fn():
            cache.write_slots = slots
            logits = target(input_ids=ids, position_ids=slots, attention_mask=mask, **kwargs).logits
            return logits.float().argmax(-1)

        return fn

    lm_head = target.get_output_embeddings()
    draft_cache = RowStaticCache(capacity + B)
    ctx_slots = (context - B + torch.arange(B, device=device))[None].expand(batch, -1)
    scratch = (capacity + torch.arange(B, device=device))[None].expand(batch, -1)
    draft_slots = torch.cat([ctx_slots, scratch], dim=1).contiguous()
    block_pos = (context + torch.arange(B, device=device))[None].expand(batch, -1)
    draft_positions = torch.cat([ctx_slots, block_pos], dim=1).contiguous()
    block_ids = torch.full((batch, B), drafter.config.mask_token_id, dtype=torch.long, device=device)
    features = torch.randn(batch, B, len(drafter.config.target_layer_ids) * text.hidden_size, device=device,
                           dtype=dtype)
    all_slots = torch.arange(capacity + B, device=device)[None, None, :]
    is_scratch = all_slots >= capacity
    key_pos = torch.where(is_scratch, context + all_slots - capacity, all_slots)
    draft_mask = drafter_block_masks(drafter.config, block_pos[:, :, None], key_pos, is_scratch | (all_slots < context),
                                     dtype)  # the drafter's own per-layer pattern, as in the loop

    def draft_fn():
        draft_cache.write_slots = draft_slots
        noise = embed_block(drafter, target, block_ids)
        hidden = drafter(noise_embeds=noise, context_hidden_states=features, position_ids=draft_positions,
                         attention_mask=draft_mask, past_key_values=draft_cache).last_hidden_state
        return drafter.compute_logits(hidden[:, 1:], lm_head).float().argmax(-1)

    builders = {"verify": lambda: target_forward_fn(B), "draft": lambda: draft_fn, "ar_1tok": lambda: target_forward_fn(1)}
    results: dict[str, Any] = {"batch": batch, "block_size": B, "capacity": capacity, "context": context}
    for part in parts:
        fn = builders[part]()
        if compile:
            fn = torch.compile(fn, dynamic=False)
        results[part] = time_callable(fn, device, graphs=graphs, iters=iters)
    return results


# ======================================================================================================================
# Runners: one call of one method on one item (a prompt, or a padded batch of prompts)
# ======================================================================================================================


@dataclass
class RunOutput:
    tokens: list[list[int]]  # new tokens per row
    steps: int | None = None  # verify steps (forwards of the target after the prefill, or loop steps)
    committed: int | None = None  # tokens committed by those steps (all rows)
    draft_s: float | None = None
    verify_s: float | None = None
    prefill_s: float | None = None
    target_forwards: int | None = None
    draft_forwards: int | None = None
    acceptance: list[int] | None = None
    verify_lengths: list[int] | None = None  # loop methods: tokens per row each step verified


@dataclass
class Item:
    input_ids: torch.LongTensor  # [batch, width], left padded, on the device
    attention_mask: torch.LongTensor
    prompt_index: list[int]  # which prompt each row is


class Context:
    """Everything the runners share for one benchmark invocation."""

    def __init__(self, *, target, tokenizer, drafter, device, dtype, max_new_tokens, pad_id, opts):
        self.target, self.tokenizer, self.drafter = target, tokenizer, drafter
        self.device, self.dtype = device, dtype
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id
        self.opts = opts
        self.assistant: nn.Module | None = None
        self.decoders: dict[LoopMode, tuple[Any, dict]] = {}
        self.step_timers: dict[LoopMode, StepIntervalTimer] = {}
        self.max_width = 0
        self.stop_ids: list[int] = []  # empty: EOS ignored (the default); else --stop-at-eos

    def trim(self, rows: list[list[int]]) -> list[list[int]]:
        """Each row cut after its first stop token (`generate` pads finished rows of a batch; the loop stops itself)."""
        if not self.stop_ids:
            return rows
        stops = set(self.stop_ids)
        return [cut_after_stop(row, stops) for row in rows]

    def generate_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        return dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0,
                    eos_token_id=list(self.stop_ids) or None, pad_token_id=self.pad_id, num_beams=1)

    def decoder(self, mode: LoopMode):
        """The reusable decoder for `mode`."""
        if mode not in self.decoders:
            self.decoders[mode] = make_decoder(
                self.target, self.drafter if mode.with_drafter else None,
                max_length=self.max_width + self.max_new_tokens, cuda_graphs=mode.cuda_graphs,
                compile=mode.compile if decoder_supports_compile() else None,
                max_batch_size=max(self.opts.batch_sizes), verify_length=mode.verify_length,
            )
            self.step_timers[mode] = StepIntervalTimer()
        return self.decoders[mode]


def _hf_runner(ctx: Context, extra: dict[str, Any], *, draft_module: nn.Module | None,
               prefill_first: bool) -> Callable[[Item, int], RunOutput]:
    """A runner around `target.generate(...)` with forward timers on the target (and on the draft model)."""

    def run(item: Item, max_new_tokens: int) -> RunOutput:
        target_timer = ForwardTimer(ctx.target, ctx.device)
        draft_timer = ForwardTimer(draft_module, ctx.device) if draft_module is not None else None
        try:
            out = ctx.target.generate(item.input_ids, attention_mask=item.attention_mask,
                                      **{**ctx.generate_kwargs(max_new_tokens), **extra})
        finally:
            target_timer.remove()
            if draft_timer is not None:
                draft_timer.remove()
        sequences = out.sequences if hasattr(out, "sequences") else out
        new = ctx.trim(sequences[:, item.input_ids.shape[1]:].tolist())
        target_calls = target_timer.take()
        draft_calls = draft_timer.take() if draft_timer is not None else []
        n_tokens = sum(len(r) for r in new)
        result = RunOutput(tokens=new, target_forwards=len(target_calls), draft_forwards=len(draft_calls),
                           draft_s=sum(draft_calls) if draft_module is not None else 0.0)
        if prefill_first and target_calls:
            # The first target forward is the prefill that yields the first token; later ones are steps.
            result.prefill_s = target_calls[0]
            result.verify_s = sum(target_calls[1:])
            result.steps = len(target_calls) - 1
            result.committed = n_tokens - len(new)
        else:
            result.prefill_s = 0.0
            result.verify_s = sum(target_calls)
            result.steps = len(target_calls)
            result.committed = n_tokens
        return result

    return run


def _door_runner(ctx: Context, extra: dict[str, Any]) -> Callable[[Item, int], RunOutput]:
    """A runner around `target.generate(..., assistant_model=drafter)`, the door that runs the DFlash engine; its
    statistics come from `drafter.last_stats` (the engine's steps are CUDA graph replays, invisible to hooks)."""

    def run(item: Item, max_new_tokens: int) -> RunOutput:
        out = ctx.target.generate(item.input_ids, attention_mask=item.attention_mask, assistant_model=ctx.drafter,
                                  **ctx.generate_kwargs(max_new_tokens), **extra)
        stats = ctx.drafter.last_stats
        flat = list(stats.acceptance_lengths)
        return RunOutput(tokens=ctx.trim(out[:, item.input_ids.shape[1]:].tolist()), steps=stats.steps,
                         committed=sum(flat), target_forwards=stats.steps + 1, draft_forwards=stats.steps,
                         acceptance=flat, draft_s=stats.time_draft, verify_s=stats.time_verify,
                         prefill_s=stats.time_prefill)

    return run


def _static_runner(ctx: Context) -> Callable[[Item, int], RunOutput]:
    from transformers import GenerationConfig

    extra: dict[str, Any] = {"cache_implementation": "static"}
    if hasattr(GenerationConfig(), "max_cache_len"):
        # One cache size for every call, so the compiled decode step is not recompiled per prompt length.
        extra["max_cache_len"] = ctx.max_width + ctx.max_new_tokens + 1

    def run(item: Item, max_new_tokens: int) -> RunOutput:
        out = ctx.target.generate(item.input_ids, attention_mask=item.attention_mask,
                                  **ctx.generate_kwargs(max_new_tokens), **extra)
        # One decode forward per generated position of the batch (all of them when EOS is ignored).
        positions = out.shape[1] - item.input_ids.shape[1]
        new = ctx.trim(out[:, item.input_ids.shape[1]:].tolist())
        return RunOutput(tokens=new, steps=positions, committed=sum(len(r) for r in new), target_forwards=positions)

    return run


def _loop_runner(ctx: Context, mode: LoopMode) -> Callable[[Item, int], RunOutput]:
    def run(item: Item, max_new_tokens: int) -> RunOutput:
        decoder, gen_kwargs = ctx.decoder(mode)
        timer = ctx.step_timers[mode]
        timer.attach(decoder)  # no-op before the first call (no workspace yet) and once wrapped
        timer.new_run()
        out = decoder.generate(item.input_ids, item.attention_mask, max_new_tokens=max_new_tokens,
                               stop_token_ids=list(ctx.stop_ids), pad_token_id=ctx.pad_id, **gen_kwargs)
        flat = [a for row in out.acceptance_lengths for a in row]
        return RunOutput(tokens=ctx.trim([list(r) for r in out.new_tokens]), steps=out.steps, committed=sum(flat),
                         draft_s=out.time_draft, verify_s=out.time_verify, prefill_s=out.time_prefill,
                         target_forwards=out.steps + 1,
                         draft_forwards=sum(n > 1 for n in out.verify_lengths) if mode.with_drafter else 0,
                         acceptance=flat, verify_lengths=list(out.verify_lengths))

    return run


def native_dflash_available() -> tuple[bool, str]:
    import transformers

    try:
        from packaging.version import Version

        new_enough = Version(transformers.__version__.split("+")[0]) >= Version("5.15.1")
    except Exception:  # packaging missing: fall back to the class check alone
        new_enough = True
    from transformers.generation import candidate_generator

    has_class = hasattr(candidate_generator, "DFlashTokenCandidateGenerator")
    if new_enough and has_class:
        return True, ""
    return False, (f"transformers {transformers.__version__} has no native DFlash route (needs >= 5.15.1 with "
                   "speculation_type='dflash')")


# ======================================================================================================================
# The driver
# ======================================================================================================================


@dataclass
class BenchOptions:
    target: str = "smollm2"
    drafter: str = "bundled"
    dtype: str = "auto"
    device: str = "auto"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    max_new_tokens: int = 256
    repeats: int = 3
    warmup_tokens: int = 16
    methods: list[str] = field(default_factory=lambda: list(METHOD_ORDER))
    prompts: str = "1"
    prompt_file: str | None = None
    prompt_set: str = "independent"
    seed: int = 0
    block_size: int = 16
    assistant_layers: int | None = None
    prompt_lookup_tokens: int = 10
    out: str | None = None
    results_dir: str = "benchmarks/results"
    time_budget: float = 0.0
    method_time_limit: float = 0.0
    chat_template: bool = True
    max_prompt_tokens: int | None = None
    bare_iters: int = 50
    bare_compile_batches: list[int] = field(default_factory=lambda: [1])
    plot: bool = True
    margin_checks: int = 12
    threads: int | None = None
    stop_at_eos: bool = False


def validate_options(opts: BenchOptions) -> None:
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHOD_ORDER)}.")
    if not opts.batch_sizes or any(b < 1 for b in opts.batch_sizes):
        raise ValueError(f"--batch-sizes {opts.batch_sizes}: give positive integers, e.g. 1,8.")
    if opts.max_new_tokens < 2:
        raise ValueError(f"--max-new-tokens {opts.max_new_tokens} must be at least 2.")
    if opts.repeats < 1:
        raise ValueError(f"--repeats {opts.repeats} must be at least 1.")
    parse_prompt_spec(opts.prompts)
    if opts.prompt_file is not None:
        read_prompt_file(opts.prompt_file)
    spec = opts.drafter.lower()
    if spec.startswith("random:") and (not spec[7:].isdigit() or int(spec[7:]) < 1):
        raise ValueError(f"--drafter {opts.drafter!r}: random:N needs a positive layer count, e.g. random:2.")


def _items_for(ctx: Context, ids: list[torch.LongTensor], batch: int) -> list[Item]:
    """Batch 1: one item per prompt. Batch b > 1: one padded item whose rows cycle through the prompts."""
    if batch == 1:
        items = []
        for i, row in enumerate(ids):
            input_ids, mask = left_pad([row], ctx.pad_id)
            items.append(Item(input_ids.to(ctx.device), mask.to(ctx.device), [i]))
        return items
    index = [i % len(ids) for i in range(batch)]
    input_ids, mask = left_pad([ids[i] for i in index], ctx.pad_id)
    return [Item(input_ids.to(ctx.device), mask.to(ctx.device), index)]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _measure(ctx: Context, key: str, batch: int, items: list[Item], runner: Callable[[Item, int], RunOutput],
             *, warmup_tokens: int, time_limit: float) -> dict[str, Any]:
    """Warm up, then `repeats` timed passes over `items`; keep each item's best/median time and the outputs of its
    best run. With `time_limit` > 0, stops repeating once that many seconds of timed passes (warm-up excluded) have
    passed, after at least one full pass."""
    device = ctx.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    longest = max(items, key=lambda it: it.input_ids.shape[1])
    _sync(device)
    t0 = time.perf_counter()
    runner(longest, warmup_tokens)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    deadline = time.perf_counter() + time_limit if time_limit > 0 else None

    times: list[list[float]] = [[] for _ in items]
    best: list[RunOutput | None] = [None for _ in items]
    passes = 0
    for _ in range(ctx.opts.repeats):
        for k, item in enumerate(items):
            _sync(device)
            t0 = time.perf_counter()
            result = runner(item, ctx.max_new_tokens)
            _sync(device)
            elapsed = time.perf_counter() - t0
            times[k].append(elapsed)
            if best[k] is None or elapsed <= min(times[k]):
                best[k] = result
        passes += 1
        if deadline is not None and time.perf_counter() > deadline:
            break
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"times": times, "best": best, "passes": passes, "warmup_s": warmup_s, "peak_bytes": peak}


def _summarise(ctx: Context, spec: MethodSpec, batch: int, items: list[Item], raw: dict[str, Any],
               reference: dict[int, list[int]], categories: list[str], weights: dict[str, int]) -> dict[str, Any]:
    N = ctx.max_new_tokens
    best_times = [min(t) for t in raw["times"]]
    median_times = [statistics.median(t) for t in raw["times"]]
    outputs: list[RunOutput] = raw["best"]
    tokens = sum(sum(len(r) for r in o.tokens) for o in outputs)
    total_best, total_median = sum(best_times), sum(median_times)
    row: dict[str, Any] = {
        "method": spec.key, "label": spec.label, "batch_size": batch, "status": "ok",
        "items": len(items), "passes": raw["passes"], "warmup_s": raw["warmup_s"],
        "new_tokens": tokens,
        # Every row has exactly N tokens (EOS ignored), or at most N and ends at a stop token or at N (--stop-at-eos).
        "tokens_per_row_ok": all(
            (len(r) == N) if not ctx.stop_ids else (0 < len(r) <= N and (len(r) == N or r[-1] in ctx.stop_ids))
            for o in outputs for r in o.tokens),
        "time_best_s": total_best, "time_median_s": total_median,
        "times_s": raw["times"],
        "tokens_per_second": tokens / total_best, "tokens_per_second_median": tokens / total_median,
        "peak_memory_bytes": raw["peak_bytes"],
    }
    # Steps and the draft / verify / overhead split (from the best run of each item).
    steps = [o.steps for o in outputs]
    if all(s is not None for s in steps):
        n_steps = sum(steps)
        prefill = sum(o.prefill_s or 0.0 for o in outputs)
        row["steps"] = n_steps
        row["time_prefill_s"] = prefill if any(o.prefill_s for o in outputs) else None
        if n_steps > 0:
            decode = total_best - (prefill or 0.0)
            row["ms_per_step"] = 1e3 * decode / n_steps
            if all(o.verify_s is not None for o in outputs):
                row["ms_draft_per_step"] = 1e3 * sum(o.draft_s or 0.0 for o in outputs) / n_steps
                row["ms_verify_per_step"] = 1e3 * sum(o.verify_s for o in outputs) / n_steps
                row["ms_overhead_per_step"] = row["ms_per_step"] - row["ms_draft_per_step"] - row["ms_verify_per_step"]
        committed = sum(o.committed or 0 for o in outputs)
        if spec.speculative and n_steps > 0:
            # Tokens committed per verify step, per row (bonus included): in a batch every row advances each step.
            row["tau"] = committed / (n_steps * batch)
        elif not spec.speculative:
            row["tau"] = 1.0
    if raw.get("compile_failures"):
        row["compile_failures"] = raw["compile_failures"]
    intervals = raw.get("step_intervals")
    if intervals is not None:
        # Steady-state loop step (all timed passes): the number the loop-overhead goal is about.
        row["ms_per_step_steady"] = 1e3 * statistics.median(intervals) if intervals else None
        row["steady_steps_timed"] = len(intervals)
    accept = [a for o in outputs if o.acceptance for a in o.acceptance]
    if accept:
        row["tau"] = sum(accept) / len(accept)
        row["acceptance_histogram"] = {str(k): accept.count(k) for k in sorted(set(accept))}
    lengths = [n for o in outputs if o.verify_lengths for n in o.verify_lengths]
    if lengths:
        row["verify_length_histogram"] = {str(k): lengths.count(k) for k in sorted(set(lengths))}
    # Weight bytes read per second.
    t_fwd = [o.target_forwards for o in outputs]
    if all(t is not None for t in t_fwd):
        d_fwd = sum(o.draft_forwards or 0 for o in outputs)
        draft_bytes = weights.get("assistant" if spec.key == "assisted_truncated" else "drafter", 0)
        read = weights["target"] * sum(t_fwd) + draft_bytes * d_fwd
        row["target_forwards"] = sum(t_fwd)
        row["draft_forwards"] = d_fwd
        row["weight_bytes_read"] = read
        row["weight_bandwidth_Bps"] = read / total_best
        if ctx.device.type == "cuda":
            row["weight_bandwidth_fraction_of_peak"] = row["weight_bandwidth_Bps"] / H200_PEAK_BANDWIDTH
    # Lossless: every row against ar_eager's batch-1 tokens for the same prompt.
    checks = []
    for item, output in zip(items, outputs):
        for r, prompt_index in enumerate(item.prompt_index):
            ref = reference.get(prompt_index)
            if ref is None:
                continue
            got = output.tokens[r]
            div = _first_divergence(ref, got)
            checks.append({"prompt": prompt_index, "row": r, "category": categories[prompt_index],
                           "exact": div is None, "first_divergence": div})
    row["lossless"] = {
        "exact": all(c["exact"] for c in checks) if checks else None,
        "rows_exact": sum(c["exact"] for c in checks), "rows": len(checks),
        "divergences": [c for c in checks if not c["exact"]],
    }
    # Per category (batch 1 items are single prompts).
    if batch == 1:
        per: dict[str, dict[str, float]] = {}
        for item, output, t in zip(items, outputs, best_times):
            cat = categories[item.prompt_index[0]]
            entry = per.setdefault(cat, {"tokens": 0, "time_s": 0.0, "steps": 0, "committed": 0})
            entry["tokens"] += sum(len(r) for r in output.tokens)
            entry["time_s"] += t
            entry["steps"] += output.steps or 0
            entry["committed"] += (sum(output.acceptance) if output.acceptance else (output.committed or 0))
        row["per_category"] = {
            cat: {"tokens_per_second": e["tokens"] / e["time_s"],
                  "tau": (e["committed"] / e["steps"]) if (spec.speculative and e["steps"]) else None}
            for cat, e in per.items()
        }
    return row


def _divergence_margins(ctx: Context, rows: list[dict[str, Any]], ids: list[torch.LongTensor],
                        reference: dict[int, list[int]], method_tokens: dict[tuple, list[int]]) -> None:
    """For divergent rows, recompute the target's logits at the divergence point along the AR path (one full forward)
    and record how far the AR token was ahead of the method's token: a gap of a few bf16 ulps is a near-tie that
    rounding flipped, a large gap points at a bug."""
    budget = ctx.opts.margin_checks
    for row in rows:
        for div in row.get("lossless", {}).get("divergences", []):
            if budget <= 0:
                return
            k, p = div["first_divergence"], div["prompt"]
            got = method_tokens.get((row["method"], row["batch_size"], p, div["row"]))
            ref = reference[p]
            if got is None or k is None or k >= len(ref) or k >= len(got):
                continue
            seq = torch.cat([ids[p], torch.tensor(ref[:k], dtype=torch.long)])[None].to(ctx.device)
            with torch.no_grad():
                logits = ctx.target(input_ids=seq).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            div["ar_token"], div["method_token"] = ref[k], got[k]
            div["logit_gap"] = float(logits[ref[k]] - logits[got[k]])
            div["top2_gap"] = float(top2[0] - top2[1])
            dtype = str(ctx.dtype).replace("torch.", "")
            if div["logit_gap"] == 0.0:
                div["note"] = f"exact tie in {dtype} logits: the two computations broke it differently"
            elif abs(div["logit_gap"]) < 0.5:
                div["note"] = (f"near-tie flipped by {dtype} rounding (different kernel shapes: block verify / "
                               "batched or static attention vs 1-token steps)")
            else:
                div["note"] = "large logit gap: not a rounding tie, investigate"
            budget -= 1


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Run the selected methods and write `<results_dir>/<out>.json/.md/.png`; returns the JSON payload."""
    from tqdm.auto import tqdm

    validate_options(opts)
    device, dtype = resolve_device_dtype(opts.device, opts.dtype)
    device = torch.device(device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    start_wall = time.perf_counter()
    deadline_all = start_wall + opts.time_budget if opts.time_budget > 0 else None
    torch.manual_seed(opts.seed)
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    name = opts.out or f"bench_{Path(opts.target).name}_{dtype_name}_{device.type}"
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (results_dir / f"{name}{ext}" for ext in (".json", ".md", ".png"))

    print(f"[bench] loading target {opts.target!r} ({dtype_name}, {device})", file=sys.stderr)
    t0 = time.perf_counter()
    target, tokenizer, target_label = load_target(opts.target, dtype, device)
    load_s = time.perf_counter() - t0
    drafter, trained, drafter_label = load_drafter(opts.drafter, target, tokenizer, block_size=opts.block_size,
                                                   seed=opts.seed)
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    if pad_id is None:
        pad_id = text.eos_token_id if isinstance(text.eos_token_id, int) else 0

    prompts, prompt_source = load_prompts(parse_prompt_spec(opts.prompts), seed=opts.seed,
                                          prompt_file=opts.prompt_file, prompt_set=opts.prompt_set)
    ids = tokenize_prompts(prompts, tokenizer, chat_template=opts.chat_template,
                           max_prompt_tokens=opts.max_prompt_tokens)
    categories = [p["category"] for p in prompts]

    ctx = Context(target=target, tokenizer=tokenizer, drafter=drafter, device=device, dtype=dtype,
                  max_new_tokens=opts.max_new_tokens, pad_id=pad_id, opts=opts)
    ctx.max_width = max(len(r) for r in ids)
    if opts.stop_at_eos:
        ctx.stop_ids = eos_policy_stop_ids(target, tokenizer)
    assistant_layers = opts.assistant_layers or max(1, text.num_hidden_layers // 6)
    weights = {"target": forward_weight_bytes(target),
               "drafter": forward_weight_bytes(drafter, extra=target.get_output_embeddings())}

    payload: dict[str, Any] = {
        "name": name,
        "command": command_line(),
        "argv": sys.argv,
        "environment": environment_info(device, dtype),
        "settings": {
            "target": target_label, "target_params": param_count(target),
            "drafter": drafter_label, "drafter_trained": trained, "drafter_params": param_count(drafter),
            "block_size": drafter.config.block_size, "target_layer_ids": list(drafter.config.target_layer_ids),
            "max_new_tokens": opts.max_new_tokens, "repeats": opts.repeats, "warmup_tokens": opts.warmup_tokens,
            "batch_sizes": opts.batch_sizes, "methods": opts.methods,
            "eos_policy": EOS_POLICY_STOP.format(ids=ctx.stop_ids) if ctx.stop_ids else EOS_POLICY,
            "stop_token_ids": ctx.stop_ids,
            "timing": "per item: best (and median) of the timed passes after a warm-up; tokens/s = new tokens / "
                      "summed best times; on CUDA every timing is synchronised",
            "prompt_source": prompt_source, "chat_template": bool(opts.chat_template and tokenizer.chat_template),
            "prompts": [{"category": c, "prompt_tokens": len(r), "text": p["prompt"][:200]}
                        for c, r, p in zip(categories, ids, prompts)],
            "assistant_layers": assistant_layers, "prompt_lookup_num_tokens": opts.prompt_lookup_tokens,
            "weight_bytes_per_forward": weights, "target_load_s": load_s,
            "h200_peak_bandwidth_Bps": H200_PEAK_BANDWIDTH, "h200_measured_copy_bandwidth_Bps": H200_COPY_BANDWIDTH,
        },
        "results": [],
        "bare": [],
    }

    def save() -> None:
        json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")

    reference: dict[int, list[int]] = {}
    method_tokens: dict[tuple, list[int]] = {}
    plan: list[tuple[MethodSpec, int]] = []
    for key in METHOD_ORDER:
        if key not in opts.methods and not (key == "ar_eager" and opts.methods):
            continue
        spec = METHODS[key]
        for batch in (opts.batch_sizes if spec.batched else [1]):
            plan.append((spec, batch))
    # ar_eager at batch 1 is the lossless reference: always run first, reported only when asked for.
    plan.sort(key=lambda sb: (sb[0].key != "ar_eager" or sb[1] != 1))
    requested = set(opts.methods)

    import transformers.utils.logging as hf_logging

    previous_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate's per-call notices would drown the progress bar
    bar = tqdm(plan, desc="bench", unit="method", file=sys.stderr, disable=None)
    try:
        for spec, batch in bar:
            bar.set_postfix_str(f"{spec.key} b={batch}")
            if spec.key == "ar_eager" and spec.key not in requested and batch != 1:
                continue
            entry = {"method": spec.key, "label": spec.label, "batch_size": batch}
            skip = _skip_reason(spec, batch, device, opts)
            if skip is None and deadline_all is not None and time.perf_counter() > deadline_all and reference:
                skip = f"time budget of {opts.time_budget:.0f} s used up"
            if skip:
                payload["results"].append({**entry, "status": "skipped", "reason": skip})
                save()
                continue
            try:
                if spec.key == "bare":
                    payload["bare"].append(_run_bare(ctx, batch, opts))
                    save()
                    continue
                runner, warmup_tokens = _make_runner(ctx, spec, assistant_layers, weights)
                items = _items_for(ctx, ids, batch)
                timer = ctx.step_timers.get(LOOP_MODES.get(spec.key))
                if timer is not None:
                    timer.intervals.clear()
                raw = _measure(ctx, spec.key, batch, items, runner, warmup_tokens=warmup_tokens,
                               time_limit=opts.method_time_limit)
                if spec.key in LOOP_MODES:
                    # A compile that failed and fell back to eager must show in the results, not only on stderr;
                    # the decoder serves every batch size, so keep this batch size's failures only.
                    failures = getattr(ctx.decoder(LOOP_MODES[spec.key])[0], "compile_failures", [])
                    raw["compile_failures"] = [f for f in failures if f"(batch {batch})" in f]
                    timer = ctx.step_timers.get(LOOP_MODES[spec.key])
                    raw["step_intervals"] = list(timer.intervals) if timer is not None else []
                    if timer is not None:
                        timer.intervals.clear()
                if spec.key == "ar_eager" and batch == 1:
                    for item, output in zip(items, raw["best"]):
                        reference[item.prompt_index[0]] = output.tokens[0]
                for item, output in zip(items, raw["best"]):
                    for r, p in enumerate(item.prompt_index):
                        method_tokens[(spec.key, batch, p, r)] = output.tokens[r]
                row = _summarise(ctx, spec, batch, items, raw, reference, categories, weights)
                row["reported"] = spec.key in requested
                payload["results"].append(row)
            except Exception as error:  # one failing method must not lose the others' numbers
                payload["results"].append({**entry, "status": "error", "reason": f"{type(error).__name__}: {error}"})
                print(f"[bench] {spec.key} (batch {batch}) failed: {type(error).__name__}: {error}", file=sys.stderr)
                if spec.key == "ar_eager" and batch == 1:
                    raise
            finally:
                gc.collect()
            save()
    finally:
        bar.close()
        hf_logging.set_verbosity(previous_verbosity)

    ok_rows = [r for r in payload["results"] if r.get("status") == "ok"]
    _divergence_margins(ctx, ok_rows, ids, reference, method_tokens)
    _derive(payload, device)
    payload["results"] = [r for r in payload["results"] if r.get("reported", True)]
    payload["total_wall_s"] = time.perf_counter() - start_wall
    save()
    markdown = render_markdown(payload)
    md_path.write_text(markdown)
    if opts.plot:
        payload["plot"] = write_plot(payload, png_path)
    save()
    print(markdown)
    print(f"\nJSON: {json_path}\nMarkdown: {md_path}" + (f"\nPlot: {png_path}" if payload.get("plot") == str(png_path) else ""))
    print(f"Command: {payload['command']}")
    return payload


def _skip_reason(spec: MethodSpec, batch: int, device: torch.device, opts: BenchOptions) -> str | None:
    if spec.cuda_only and device.type != "cuda":
        return "CUDA graphs need --device cuda"
    if spec.key == "hf_dflash":
        ok, why = native_dflash_available()
        if not ok:
            return why
    if spec.key == "dflash_loop_compiled" and not decoder_supports_compile():
        return "this DFlashDecoder has no compile option"
    return None


def _make_runner(ctx: Context, spec: MethodSpec, assistant_layers: int, weights: dict[str, int]):
    """`(runner, warm-up tokens)` for one method."""
    import transformers

    full, short = ctx.max_new_tokens, min(ctx.max_new_tokens, ctx.opts.warmup_tokens)
    key = spec.key
    if key == "ar_eager":
        return _hf_runner(ctx, {}, draft_module=None, prefill_first=True), short
    if key == "ar_static":
        # Full length on the longest prompt: on CUDA this call compiles the decode step for the final cache shape.
        return _static_runner(ctx), full
    if key in ("dflash_loop_graphs", "dflash_loop_compiled", "ar_loop", "dflash_loop_full"):
        # Full length so graphs are captured (and steps compiled) in the warm-up, not in a timed run.
        return _loop_runner(ctx, LOOP_MODES[key]), full
    if key == "dflash_loop_eager":
        return _loop_runner(ctx, LOOP_MODES[key]), short
    if key == "dflash_generate":
        return _door_runner(ctx, {}), full  # full length: the engine captures its graphs in the warm-up
    if key == "dflash_generate_compiled":
        return _door_runner(ctx, {"dflash_compile": True}), full
    if key == "hf_dflash":
        return _hf_runner(ctx, {"assistant_model": ctx.drafter, "speculation_type": "dflash"},
                          draft_module=ctx.drafter, prefill_first=True), short
    if key == "assisted_truncated":
        if ctx.assistant is None:
            ctx.assistant = build_truncated_assistant(ctx.target, assistant_layers)
            weights["assistant"] = forward_weight_bytes(ctx.assistant)
        return _hf_runner(ctx, {"assistant_model": ctx.assistant}, draft_module=ctx.assistant,
                          prefill_first=False), short
    if key == "prompt_lookup":
        extra: dict[str, Any] = {"prompt_lookup_num_tokens": ctx.opts.prompt_lookup_tokens}
        if int(transformers.__version__.split(".")[0]) < 5 and not ctx.stop_ids:
            # 4.x's prompt-lookup generator calls isin(candidates, eos) and fails on eos=None; an id outside the
            # vocabulary never matches, so EOS is still ignored.
            text = ctx.target.config.get_text_config() if hasattr(ctx.target.config, "get_text_config") else ctx.target.config
            extra["eos_token_id"] = text.vocab_size
        return _hf_runner(ctx, extra, draft_module=None, prefill_first=False), short
    raise ValueError(key)


def _run_bare(ctx: Context, batch: int, opts: BenchOptions) -> dict[str, Any]:
    graphs = ctx.device.type == "cuda"
    B = ctx.drafter.config.block_size
    capacity = ctx.max_width + ctx.max_new_tokens + B  # what DFlashDecoder allocates for this run
    context = ctx.max_width + ctx.max_new_tokens // 2  # a mid-generation step
    iters = opts.bare_iters if graphs else max(3, opts.bare_iters // 10)
    costs = bare_forward_costs(ctx.target, ctx.drafter, batch=batch, capacity=capacity, context=context,
                               graphs=graphs, iters=iters)
    if not graphs:
        costs["mode"] = "eager (no CUDA)"
    elif all(costs[k]["graphed"] for k in ("verify", "draft", "ar_1tok")):
        costs["mode"] = "CUDA graphs"
    else:
        costs["mode"] = "eager: graph capture failed (" + "; ".join(
            f"{k}: {costs[k]['capture_error']}" for k in ("verify", "draft", "ar_1tok") if "capture_error" in costs[k]
        )[:300] + ")"
    if (graphs and batch in opts.bare_compile_batches and "dflash_loop_compiled" in opts.methods
            and decoder_supports_compile()):
        # The floor of the compiled loop: the same pieces through torch.compile, then captured.
        t0 = time.perf_counter()
        try:
            compiled = bare_forward_costs(ctx.target, ctx.drafter, batch=batch, capacity=capacity, context=context,
                                          graphs=True, iters=iters, compile=True, parts=("verify", "draft"))
            compiled["mode"] = "torch.compile + CUDA graphs"
        except Exception as error:
            compiled = {"error": f"{type(error).__name__}: {error}"}
        compiled["compile_and_time_s"] = time.perf_counter() - t0
        costs["compiled"] = compiled
    return costs


def _derive(payload: dict[str, Any], device: torch.device) -> None:
    """Speedups against each AR setting at the same batch size, and the loop overhead ratio against the bare floor."""
    rows = [r for r in payload["results"] if r.get("status") == "ok"]
    base = {(r["method"], r["batch_size"]): r["tokens_per_second"] for r in rows if r["method"] in AR_METHODS}
    for r in rows:
        for ar in AR_METHODS:
            ref = base.get((ar, r["batch_size"]))
            r[f"speedup_vs_{ar}"] = (r["tokens_per_second"] / ref) if ref else None
    bare = {b["batch"]: b for b in payload.get("bare", [])}
    for r in rows:
        b = bare.get(r["batch_size"])
        steady = r.get("ms_per_step_steady")
        if r["method"] not in LOOP_MODES or b is None or steady is None:
            continue
        graphed_floor = bool(b["verify"]["graphed"]) and bool(b["draft"]["graphed"])
        plain = 1e3 * (b["verify"]["median_s"] + b["draft"]["median_s"])
        compiled = b.get("compiled") or {}
        # Compare like with like: compiled loop vs compiled floor, graphed loop vs graphed floor, eager loop vs eager
        # floor (CPU); the compiled loop is also set against the uncompiled graphed floor.
        floor = kind = None
        if r["method"] == "dflash_loop_compiled":
            if "verify" in compiled and "draft" in compiled:
                floor, kind = 1e3 * (compiled["verify"]["median_s"] + compiled["draft"]["median_s"]), "compile+graphs"
            if graphed_floor:
                r["loop_over_graphed_floor"] = steady / plain
        elif r["method"] == "dflash_loop_graphs" and graphed_floor:
            floor, kind = plain, "graphs"
        elif r["method"] == "dflash_loop_eager" and not graphed_floor:
            floor, kind = plain, "eager"
        if floor:
            r["ms_bare_floor_per_step"] = floor
            r["bare_floor_kind"] = kind
            r["loop_overhead_ratio"] = steady / floor
            r["loop_overhead_goal"] = LOOP_OVERHEAD_GOAL


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _round(obj, 6)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


# ======================================================================================================================
# Reports
# ======================================================================================================================


def _fmt(value: Any, spec: str = ".1f", none: str = "–") -> str:
    if value is None:
        return none
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _one_line(reason: str) -> str:
    """A (possibly multi-line, traceback-carrying) reason as one table cell: its first line and the last line that
    names an exception (`SomethingError: ...`). The JSON keeps the whole text."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    if len(lines) > 1:
        cause = last_error_line("\n".join(lines[1:])) or lines[-1]
        lines = [f"{lines[0]} ... {cause}"]
    return (lines[0] if lines else "").replace("|", "/")  # a "|" would split the table row


def render_markdown(payload: dict[str, Any]) -> str:
    env, s = payload["environment"], payload["settings"]
    cuda = env["device"].startswith("cuda")
    lines = [f"# Benchmark `{payload['name']}`", ""]
    lines.append(f"- Command: `{payload['command']}`")
    hw = env.get("gpu_name") or f"CPU ({env['cpu_count']} cores, {env['torch_threads']} threads)"
    lines.append(f"- Hardware: {hw}; torch {env['torch']}, transformers {env['transformers']}, dtype {env['dtype']}")
    lines.append(f"- Target: {s['target']} ({s['target_params'] / 1e6:.1f}M params); drafter: {s['drafter']} "
                 f"({s['drafter_params'] / 1e6:.1f}M params, block {s['block_size']}, target layers "
                 f"{s['target_layer_ids']})")
    if not s["drafter_trained"]:
        lines.append("- **Drafter is UNTRAINED (random weights): tau ~ 1, so DFlash rows show per-step overhead, not "
                     "DFlash's potential speedup.**")
    lines.append(f"- Prompts: {len(s['prompts'])} from {s['prompt_source']} "
                 f"({', '.join(sorted(set(p['category'] for p in s['prompts'])))}; "
                 f"{min(p['prompt_tokens'] for p in s['prompts'])}–{max(p['prompt_tokens'] for p in s['prompts'])} "
                 f"tokens, chat template {'on' if s['chat_template'] else 'off'}); max_new_tokens {s['max_new_tokens']}")
    lines.append(f"- {s['eos_policy']}")
    lines.append(f"- Timing: {s['timing']}; repeats {s['repeats']}.")
    lines.append("")
    lines.append("| method | batch | tok/s (best) | tok/s (median) | × AR eager | × AR static | tau | ms/step | draft | "
                 "verify | overhead | peak mem GiB | weight BW GB/s" + (" (% of 4.8 TB/s)" if cuda else "") +
                 " | lossless |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in payload["results"]:
        label = f"`{r['method']}`"
        if r.get("compile_failures"):  # ran, but (partly) uncompiled: the numbers are not the compiled loop's
            label += f" (compile failed: {', '.join(r['compile_failures'])}; ran uncompiled)"
        if r.get("status") != "ok":
            lines.append(f"| {label} | {r['batch_size']} | {r['status']}: {_one_line(r.get('reason', ''))} "
                         "| | | | | | | | | | | |")
            continue
        bw = r.get("weight_bandwidth_Bps")
        bw_text = _fmt(bw / 1e9 if bw else None, ".1f" if (bw or 0) >= 1e8 else ".3f")
        if cuda and r.get("weight_bandwidth_fraction_of_peak") is not None:
            bw_text += f" ({100 * r['weight_bandwidth_fraction_of_peak']:.1f}%)"
        loss = r["lossless"]
        if loss["exact"] is None:
            loss_text = "n/a"
        elif loss["exact"]:
            loss_text = f"exact ({loss['rows']}/{loss['rows']})"
        else:
            firsts = ", ".join(str(d["first_divergence"]) for d in loss["divergences"][:4])
            loss_text = f"{loss['rows_exact']}/{loss['rows']} exact; first diff at {firsts}"
        peak = r.get("peak_memory_bytes")
        lines.append(
            f"| {label} | {r['batch_size']} | {r['tokens_per_second']:.1f} | {r['tokens_per_second_median']:.1f} | "
            f"{_fmt(r.get('speedup_vs_ar_eager'), '.2f')} | {_fmt(r.get('speedup_vs_ar_static'), '.2f')} | "
            f"{_fmt(r.get('tau'), '.2f')} | {_fmt(r.get('ms_per_step'), '.2f')} | "
            f"{_fmt(r.get('ms_draft_per_step'), '.2f')} | {_fmt(r.get('ms_verify_per_step'), '.2f')} | "
            f"{_fmt(r.get('ms_overhead_per_step'), '.2f')} | {_fmt(peak / 2**30 if peak else None, '.2f')} | "
            f"{bw_text} | {loss_text} |"
        )
    lines.append("")
    lines.append("Columns: tokens/s counts new tokens of all rows; × columns compare with the AR row of the same batch "
                 "size; tau = tokens committed per verify step per row (bonus included; 1 for AR); ms/step = decode "
                 "time (prefill excluded) per target forward; draft/verify = measured forward time per step, "
                 "overhead = the rest (host work, syncs, Python); weight BW = (target bytes × target forwards + draft "
                 "bytes × draft forwards) / time.")
    bare = payload.get("bare") or []
    if bare:
        lines += ["", "## Cost floor (bare forwards) and loop overhead", "",
                  "| batch | floor | context / capacity | verify B tok (ms) | draft (ms) | floor (ms) | AR 1-tok (ms) | "
                  "loop | loop step (ms) | loop / floor |", "|---|---|---|---|---|---|---|---|---|---|"]
        loops = {(r["method"], r["batch_size"]): r for r in payload["results"] if r.get("status") == "ok"}

        def floor_row(b, costs, mode, loop_key):
            floor = 1e3 * (costs["verify"]["median_s"] + costs["draft"]["median_s"])
            ar = costs.get("ar_1tok")
            loop = loops.get((loop_key, b["batch"])) if loop_key else None
            steady = loop.get("ms_per_step_steady") if loop else None
            ratio = loop.get("loop_overhead_ratio") if loop else None
            lines.append(
                f"| {b['batch']} | {mode} | {b['context']} / {b['capacity']} | {1e3 * costs['verify']['median_s']:.3f} | "
                f"{1e3 * costs['draft']['median_s']:.3f} | {floor:.3f} | "
                f"{_fmt(1e3 * ar['median_s'] if ar else None, '.3f')} | {'`' + loop_key + '`' if loop else '–'} | "
                f"{_fmt(steady, '.3f')} | {_fmt(ratio, '.2f')} |"
            )

        for b in bare:
            graphed = b["verify"]["graphed"]
            floor_row(b, b, b["mode"], "dflash_loop_graphs" if graphed else "dflash_loop_eager")
            compiled = b.get("compiled") or {}
            if "verify" in compiled:
                floor_row(b, compiled, compiled["mode"], "dflash_loop_compiled")
            elif "error" in compiled:
                lines.append(f"| {b['batch']} | compiled floor failed: {compiled['error'][:120]} | | | | | | | | |")
        lines.append("")
        lines.append(f"Loop step = median wall interval between steady-state steps of `DFlashDecoder` (graph replays, "
                     f"the one host sync per step, bookkeeping); each loop is set against the floor of its own kind "
                     f"(graphs / compile + graphs / eager on CPU). Goal: loop / floor <= {LOOP_OVERHEAD_GOAL}.")
        extra = [r for r in payload["results"] if r.get("loop_over_graphed_floor") is not None]
        for r in extra:
            lines.append(f"- `dflash_loop_compiled` b={r['batch_size']} against the uncompiled graphed floor: "
                         f"{r['loop_over_graphed_floor']:.2f}.")
    shares = [r for r in payload["results"] if r.get("status") == "ok" and r["method"] == "dflash_loop_compiled"
              and r.get("speedup_vs_ar_loop")]
    if shares:
        lines += ["", "The drafter's own share (the same compiled, graphed loop with and without it): " + "; ".join(
            f"batch {r['batch_size']} {r['speedup_vs_ar_loop']:.2f}x" for r in shares) + "."]
    spec_rows = [r for r in payload["results"] if r.get("status") == "ok" and r.get("per_category")
                 and r["method"] not in AR_METHODS]
    if spec_rows:
        cats = sorted({c for r in spec_rows for c in r["per_category"]})
        lines += ["", "## Per category (batch 1)", "",
                  "| method | " + " | ".join(f"{c} tau | {c} tok/s" for c in cats) + " |",
                  "|---|" + "---|---|" * len(cats)]
        for r in spec_rows:
            cells = []
            for c in cats:
                e = r["per_category"].get(c, {})
                cells += [_fmt(e.get("tau"), ".2f"), _fmt(e.get("tokens_per_second"), ".1f")]
            lines.append(f"| `{r['method']}` | " + " | ".join(cells) + " |")
    notes = []
    for r in payload["results"]:
        for d in (r.get("lossless") or {}).get("divergences", []):
            if "logit_gap" in d:
                notes.append(f"- `{r['method']}` b={r['batch_size']} prompt {d['prompt']} row {d['row']}: first "
                             f"divergence at token {d['first_divergence']} (AR {d['ar_token']} vs {d['method_token']}), "
                             f"AR logit gap {d['logit_gap']:.3f}, top-2 gap {d['top2_gap']:.3f}: {d['note']}.")
    if notes:
        lines += ["", "## Divergences from AR eager", ""] + notes
        lines.append("")
        lines.append("Gaps are recomputed with one full forward along the AR path. In bf16 a B-token verify forward and "
                     "1-token decode steps round differently, so (near-)tied logits can flip; exactness is checked in "
                     "fp32.")
    lines.append("")
    lines.append(f"Total wall time {payload.get('total_wall_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def write_plot(payload: dict[str, Any], path: Path) -> str | None:
    """Horizontal bars of tokens/s per method, one panel per batch size. Returns the path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    rows = [r for r in payload["results"] if r.get("status") == "ok"]
    batches = sorted({r["batch_size"] for r in rows})
    if not batches:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 0.6 * max(
        len([r for r in rows if r["batch_size"] == b]) for b in batches) + 1.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        sel = [r for r in rows if r["batch_size"] == batch]
        names = [r["method"] for r in sel]
        values = [r["tokens_per_second"] for r in sel]
        colors = ["#888888" if r["method"].startswith("ar_") else "#1f77b4" if r["method"].startswith("dflash")
                  else "#ff7f0e" for r in sel]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        for y, r in enumerate(sel):
            speed = r.get("speedup_vs_ar_eager")
            text = f" {r['tokens_per_second']:.0f}" + (f" ({speed:.2f}×)" if speed else "")
            ax.text(r["tokens_per_second"], y, text, va="center", fontsize=8)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("new tokens / s")
        ax.set_xlim(0, max(values) * 1.35)
    env = payload["environment"]
    fig.suptitle(f"{payload['name']}: {env.get('gpu_name', 'CPU')}, {env['dtype']}, "
                 f"{payload['settings']['max_new_tokens']} new tokens"
                 + ("" if payload["settings"]["drafter_trained"] else " (UNTRAINED drafter)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ======================================================================================================================
# Command line
# ======================================================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The definitions live in dflash_hf.commands.bench, which does not import torch, so that `dflash-hf bench --help`
    # answers at once; this name stays for callers that build their own parser.
    from dflash_hf.commands.bench import add_arguments as add_bench_arguments

    add_bench_arguments(parser)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    try:
        batch_sizes = [int(x) for x in str(args.batch_sizes).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes {args.batch_sizes!r}: use a comma list of integers such as 1,8.") from None
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    return BenchOptions(
        target=args.target, drafter=args.drafter, dtype=args.dtype, device=args.device, batch_sizes=batch_sizes,
        max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup_tokens=args.warmup_tokens, methods=methods,
        prompts=args.prompts, prompt_file=args.prompt_file, prompt_set=args.prompt_set, seed=args.seed,
        block_size=args.block_size, assistant_layers=args.assistant_layers,
        prompt_lookup_tokens=args.prompt_lookup_tokens, out=args.out, results_dir=args.results_dir,
        time_budget=args.time_budget, method_time_limit=args.method_time_limit,
        chat_template=not args.no_chat_template, max_prompt_tokens=args.max_prompt_tokens,
        bare_iters=args.bare_iters, plot=not args.no_plot, threads=args.threads, stop_at_eos=args.stop_at_eos,
        bare_compile_batches=[int(x) for x in str(args.bare_compile_batches).split(",") if x.strip()],
    )


def main(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    validate_options(opts)
    run_benchmark(opts)
    return 0


__all__ = [
    "BenchOptions",
    "ForwardTimer",
    "METHODS",
    "StepIntervalTimer",
    "bare_forward_costs",
    "build_random_drafter",
    "build_truncated_assistant",
    "environment_info",
    "forward_weight_bytes",
    "load_prompts",
    "make_decoder",
    "run_benchmark",
    "eos_policy_stop_ids",
    "time_callable",
]
