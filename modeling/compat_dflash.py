"""Every place dflash-hf relies on transformers internals, and what each supported version needs there.

The rest of the code asks this module; nothing else reads a private attribute of transformers or branches on its
version. Versions: 4.57.1 is the declared minimum; CI runs 4.57.1 and the newest release (README, "Supported versions").

| need | 4.57.1 | 5.0 - 5.23 | 5.24 | 5.25 |
|---|---|---|---|---|
| cache kwarg of a causal LM's forward (`cache_kwarg`) | `past_key_values` | `past_key_values` | `cache` (old name deprecated) | `cache` |
| `cache_position` kwarg of the forward (`forward_accepts`) | yes | model-dependent | model-dependent | model-dependent |
| attention function lookup (`attention_interface`) | `ALL_ATTENTION_FUNCTIONS[impl]` | `.get_interface(impl, eager)` | same | same |
| how `generate(assistant_model=drafter)` reaches the engine (`install_generate_hook`) | wrap `GenerationMixin.generate`; call it with `custom_generate=<callable>` | same | same | same |
| prepared special tokens on the per-call config (`prepared_token_ids`) | `_eos_token_tensor`, `_pad_token_tensor` | same | same | same |
| stock assisted loop, the fallback (`run_stock_assisted_loop`) | instance override of `_get_candidate_generator`; `_assisted_decoding` | same | same | the generator must expose `num_drafting_tokens` |
| cache the stock loop can crop back | `DynamicCache()`, full layers | `DynamicCache(config=...)` with past recording | same | same |
| `return_dict_in_generate` output (`decoder_only_output`) | `GenerateDecoderOnlyOutput` | same | same | same |
| `logits_to_keep=1` keeps every layer's hidden states whole (`keeps_hidden_states_with_logits_to_keep`) | yes | yes | not on Gemma-4 with KV-shared layers | same |
| stock loop rolls back recurrent (linear-attention) state (`stock_loop_limitation`) | no | no | no (refuses stateful models) | yes (`activate_past_recording(recurrent_states_to_keep=)`) |
| linear-attention layers keep their state through cache methods the engine can serve (`recurrent_state_through_cache`) | no (model-specific cache attributes) | no | no | yes (`get_/update_conv_state`, `get_/update_recurrent_state`, `get_recurrent_states_to_keep`) |

Why `custom_generate=<callable>`: it is generate's public extension point. transformers still merges the generation
config, builds the logits processors and stopping criteria (stop strings included), computes `max_length` and
streams the prompt, and then hands all of it to the callable instead of its own decoding method. Only the decision
*that* a call is a DFlash call needs the hook, because generate has no public way to pick a decoder by assistant.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin
from transformers.models.qwen3.modeling_qwen3 import ALL_ATTENTION_FUNCTIONS, eager_attention_forward


def attention_interface(implementation: str | None) -> Callable:
    """transformers' attention function for `implementation` (5.x `get_interface`, 4.57 plain dict lookup)."""
    if implementation in (None, "eager"):
        return eager_attention_forward
    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get_interface is not None:
        return get_interface(implementation, eager_attention_forward)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes the keyword `name` (`cache_position`, `logits_to_keep`, ...)."""
    return name in inspect.signature(model.forward).parameters


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes its KV cache: `cache` from 5.24, `past_key_values` before."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def keeps_hidden_states_with_logits_to_keep(model: nn.Module) -> bool:
    """Whether `model.forward(logits_to_keep=1)` still computes every position in every layer. Gemma-4 (5.24+) drops
    all but the kept positions from its first KV-shared layer on, which would cut the target features a drafter
    reads from the later layers."""
    if not forward_accepts(model, "logits_to_keep"):
        return False
    return not getattr(_text_config(model), "num_kv_shared_layers", 0)


def has_recurrent_layers(model: nn.Module) -> bool:
    """Whether the model's layers carry state a KV cache cannot crop (linear attention, convolutions): declared by
    `_is_stateful` (4.57-5.24) or by non-attention kinds in `config.layer_types` (5.25)."""
    kinds = set(getattr(_text_config(model), "layer_types", None) or [])
    # masks_dflash.ATTENTION_LAYER_KINDS, written out: this module imports no sibling (it is loaded on its own too).
    return bool(getattr(model, "_is_stateful", False)) or bool(kinds - {"full_attention", "sliding_attention"})


def recurrent_state_through_cache() -> bool:
    """Whether linear-attention layers read and write their conv and recurrent states through the cache's methods
    (`get_conv_state`, `update_conv_state`, `get_recurrent_state`, `update_recurrent_state`,
    `get_recurrent_states_to_keep`: transformers 5.25), so that the engine's own cache can hold them per row. Older
    versions reach into model-specific cache attributes."""
    from transformers.cache_utils import Cache

    return all(hasattr(Cache, name) for name in ("get_conv_state", "update_conv_state", "get_recurrent_state",
                                                 "update_recurrent_state", "get_recurrent_states_to_keep"))


def stock_loop_limitation(model: nn.Module) -> str | None:
    """Why transformers' assisted loop cannot verify drafts on `model`, with the fix; None when it can."""
    if not has_recurrent_layers(model):
        return None
    recording = getattr(DynamicCache, "activate_past_recording", None)
    if recording is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "recurrent_states_to_keep"
                                     for p in inspect.signature(recording).parameters.values()):
        return None
    import transformers

    return (
        f"{type(model).__name__} keeps recurrent linear-attention state, which transformers "
        f"{transformers.__version__}'s assisted loop cannot roll back after a rejected draft; transformers >= 5.25 "
        "can (pip install 'transformers>=5.25'), where generate(assistant_model=drafter) and "
        "speculation_type='dflash' serve this pair one prompt at a time"
    )


def prepared_token_ids(generation_config, which: str) -> list[int]:
    """The `which` ("eos" or "pad") ids that `generate` settled on for this call (after merging the model's
    generation config, the model config and the call's kwargs); `[]` when there is none."""
    value = getattr(generation_config, f"_{which}_token_tensor", None)
    if value is None:
        value = getattr(generation_config, f"{which}_token_id", None)
    return token_id_list(value)


def token_id_list(value) -> list[int]:
    """Token ids as transformers hands them around (None, an int, a list, a tensor of any shape) -> `list[int]`."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def decoder_only_output(sequences: torch.LongTensor) -> GenerateDecoderOnlyOutput:
    """What `generate(..., return_dict_in_generate=True)` returns for a decoder-only model, sequences only."""
    return GenerateDecoderOnlyOutput(sequences=sequences)


def run_stock_assisted_loop(model, candidate_generator, input_ids, logits_processor, stopping_criteria,
                            generation_config, streamer, assistant_model, model_kwargs: dict):
    """transformers' own assisted loop (`_assisted_decoding`, batch 1) driven by `candidate_generator`.

    The loop builds its generator through `self._get_candidate_generator(...)`, called through the instance in every
    supported version, so an instance attribute hands it ours for this call only; it is removed afterwards.
    """
    model_kwargs = dict(model_kwargs)
    for name in ("cache", "past_key_values"):
        if name in model_kwargs:
            model_kwargs[name] = _rollbackable_cache(model)
    had_override = "_get_candidate_generator" in model.__dict__
    previous = model.__dict__.get("_get_candidate_generator")
    model.__dict__["_get_candidate_generator"] = lambda *args, **kwargs: candidate_generator
    try:
        return GenerationMixin._assisted_decoding(
            model,
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            synced_gpus=False,
            streamer=streamer,
            assistant_model=assistant_model,
            **model_kwargs,
        )
    finally:
        if had_override:
            model.__dict__["_get_candidate_generator"] = previous
        else:
            model.__dict__.pop("_get_candidate_generator", None)


def _rollbackable_cache(model) -> DynamicCache:
    """A cache the assisted loop can crop back, as generate prepares one for assisted decoding: per-layer sliding
    caches where they can record their past (5.x), full-length layers where they cannot (4.57: cropping a sliding
    layer past its window raises)."""
    if hasattr(DynamicCache, "activate_past_recording"):
        return DynamicCache(config=model.config.get_text_config(decoder=True))
    return DynamicCache()


# The one hook: `GenerationMixin.generate`, wrapped once per process whatever the number of copies of this module.
_HOOK_MARKER = "_dflash_generate_hook"


def install_generate_hook(route: Callable[[nn.Module, dict], Callable | None]) -> None:
    """Wrap `GenerationMixin.generate` once (idempotent across copies of the remote code).

    For each call, `route(model, kwargs)` returns None (the call is not ours: it runs untouched) or a decoding
    function; then generate runs with `custom_generate=<that function>` and `assistant_model=None`, so transformers
    prepares everything as for plain greedy/sampling and our function decodes. `route` may pop its own kwargs.
    """
    current = GenerationMixin.generate
    if getattr(current, _HOOK_MARKER, False):
        return

    @functools.wraps(current)
    def generate(self, *args, **kwargs):
        if len(args) > 1:  # arguments past `inputs` given positionally: name them all, so the router sees them
            kwargs, args = _named_arguments(current, self, args, kwargs), ()
        decode = route(self, kwargs)
        if decode is None:
            return current(self, *args, **kwargs)
        kwargs["assistant_model"] = None
        kwargs["custom_generate"] = decode
        return current(self, *args, **kwargs)

    setattr(generate, _HOOK_MARKER, True)
    GenerationMixin.generate = generate


def _named_arguments(function: Callable, model, args: tuple, kwargs: dict) -> dict:
    """`function(model, *args, **kwargs)`'s arguments as one keyword dict (its `**kwargs` flattened in)."""
    parameters = inspect.signature(function).parameters
    var_keyword = next((n for n, p in parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    named = dict(inspect.signature(function).bind_partial(model, *args, **kwargs).arguments)
    named.pop(next(iter(parameters)))
    return {**named, **named.pop(var_keyword, {})} if var_keyword else named


def generate_hook_installed() -> bool:
    return bool(getattr(GenerationMixin.generate, _HOOK_MARKER, False))


__all__ = [
    "attention_interface",
    "cache_kwarg",
    "decoder_only_output",
    "forward_accepts",
    "generate_hook_installed",
    "install_generate_hook",
    "prepared_token_ids",
    "run_stock_assisted_loop",
    "token_id_list",
]
