"""`target.generate(assistant_model=drafter)`, and so `pipeline(..., assistant_model=drafter)`, on the batched engine.

Importing the remote code installs one hook (`compat_dflash.install_generate_hook`). A call is ours when its
`assistant_model` is a DFlash drafter and it has asked neither for transformers' own route
(`speculation_type="dflash"`) nor for a `custom_generate` of its own; every other call runs untouched. transformers
then prepares the call as for plain greedy or sampling (generation config, logits processors, stopping criteria,
`max_length`, the streamed prompt) and hands the prepared state to `decode_prepared_call`, which

1. refuses what no speculative decoder does (beam search, several sequences per prompt, ...), naming the setting;
2. reads what transformers prepared: temperature, top-k, top-p, min-p, the minimum length, the EOS ids and the length
   budget run inside the engine; stop strings and other stopping criteria are checked on the host after every
   committed token;
3. runs `DFlashDecoder`, kept on the drafter between calls (static caches and CUDA graphs are reused);
4. returns what generate returns: the sequences padded as transformers pads them, or a `GenerateDecoderOnlyOutput`
   with `return_dict_in_generate=True`.

What the engine cannot honour (other logits processors such as `repetition_penalty`, per-token scores, logits,
attentions or hidden states, pairs it cannot run) goes to transformers' own assisted loop with the DFlash candidate
generator (`generation_dflash.DFlashCandidateGenerator`): lossless but slower and batch 1 only, with a warning that
names the reason, once per reason. A batch that needs it raises a ValueError naming the option.

Engine options are per call: `dflash_compile=True` compiles the draft step and the verify forward with
`torch.compile` (once per batch size; tens of seconds on the first call), `dflash_cuda_graphs=False` turns CUDA graphs
off, `dflash_verify_length` sets how many tokens a step verifies (`DFlashDecoder`'s `verify_length`: "auto", "full", an
int, or a list of candidates). By default the engine captures CUDA graphs on CUDA, does not compile, and adapts the verify
length.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from transformers.generation.logits_process import (
    LogitNormalization,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from .compat_dflash import (
    decoder_only_output,
    install_generate_hook,
    prepared_token_ids,
    run_stock_assisted_loop,
    stock_loop_limitation,
    token_id_list,
)
from .decoding_dflash import DFlashDecoder, engine_limitation, target_guard
from .generation_dflash import (
    DFlashCandidateGenerator,
    DFlashStats,
    TargetFeatureCapture,
    check_drafter_fits_target,
    is_dflash_drafter,
    target_text_config,
)

# Generation settings no speculative decoder implements: (name, the values that mean "off").
_REFUSED_SETTINGS = (
    ("num_beams", (None, 1)),
    ("num_beam_groups", (None, 1)),
    ("num_return_sequences", (None, 1)),
    ("penalty_alpha", (None, 0, 0.0)),
    ("dola_layers", (None,)),
    ("constraints", (None,)),
    ("force_words_ids", (None,)),
    ("prompt_lookup_num_tokens", (None,)),
    ("assistant_early_exit", (None,)),
    ("use_mtp", (None, False)),
)
# What the stock loop can add to a `return_dict_in_generate` output and the engine cannot.
_PER_TOKEN_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
# Model inputs transformers itself adds to a decoder-only call; anything else is a user input the engine would drop.
_PREPARED_MODEL_KWARGS = {"attention_mask", "use_cache", "logits_to_keep", "past_key_values", "cache",
                          "cache_position", "position_ids", "output_attentions", "output_hidden_states"}
# The generation option behind each logits processor transformers builds from the generation config.
_OPTION_OF_PROCESSOR = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
    "SequenceBiasLogitsProcessor": "sequence_bias",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
    "TopHLogitsWarper": "top_h",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
}
# Samplers the engine runs, in the order transformers applies them (a list in another order is not ours to reorder).
_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
_warned: set[str] = set()


@dataclass(frozen=True)
class EngineOptions:
    """How the engine behind `generate` runs: `torch.compile` (off by default: compiling costs tens of seconds on a
    first call) and CUDA graphs (None: on CUDA)."""

    compile: bool = False
    cuda_graphs: bool | None = None
    verify_length: int | str | tuple[int, ...] | None = None  # None: verify_length_dflash.DEFAULT_VERIFY_LENGTH


@dataclass
class _Plan:
    """A prepared generate call, read as engine settings; `stock_reasons` lists what only the stock loop can do."""

    budget: int
    stops: list[int]
    pad_token_id: int
    sampling: dict = field(default_factory=dict)
    min_new_tokens: int = 0
    criteria: StoppingCriteriaList | None = None
    stock_reasons: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------------
# Which calls are ours
# ----------------------------------------------------------------------------------------------------------------------


def route_generate_call(model: nn.Module, kwargs: dict) -> Callable | None:
    """The decoding function for a DFlash call of `model.generate(**kwargs)`, or None when the call is not ours.

    Pops the engine options (`dflash_compile`, `dflash_cuda_graphs`, `dflash_verify_length`) and moves stop strings into the stopping criteria:
    generate builds `StopStringCriteria` only for its own decoding methods, from a tokenizer a custom decoder never sees.
    """
    drafter = kwargs.get("assistant_model")
    if not is_dflash_drafter(drafter) or kwargs.get("custom_generate") is not None:
        return None
    if _requested_speculation_type(model, kwargs) == "dflash":
        return None
    verify_length = kwargs.pop("dflash_verify_length", None)
    options = EngineOptions(compile=bool(kwargs.pop("dflash_compile", False)),
                            cuda_graphs=kwargs.pop("dflash_cuda_graphs", None),
                            verify_length=tuple(verify_length) if isinstance(verify_length, list) else verify_length)
    _move_stop_strings_into_criteria(model, kwargs)
    streamer = kwargs.get("streamer")

    def decode(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
               **model_kwargs):
        return decode_prepared_call(model, drafter, options, input_ids, logits_processor, stopping_criteria,
                                    generation_config, streamer, model_kwargs)

    return decode


def _requested_speculation_type(model: nn.Module, kwargs: dict):
    if "speculation_type" in kwargs:
        return kwargs["speculation_type"]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, "speculation_type", None)
        if value is not None:
            return value
    return None


def _move_stop_strings_into_criteria(model: nn.Module, kwargs: dict) -> None:
    if "stop_strings" in kwargs:
        stop_strings = kwargs["stop_strings"]
    else:
        configs = (kwargs.get("generation_config"), getattr(model, "generation_config", None))
        stop_strings = next((c.stop_strings for c in configs if getattr(c, "stop_strings", None)), None)
    if not stop_strings:
        return
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise ValueError(
            f"stop_strings={stop_strings!r} needs the model's tokenizer: pass tokenizer=<the tokenizer> to generate."
        )
    criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria
    kwargs["stop_strings"] = None


# ----------------------------------------------------------------------------------------------------------------------
# A prepared call
# ----------------------------------------------------------------------------------------------------------------------


def decode_prepared_call(target, drafter, options: EngineOptions, input_ids, logits_processor, stopping_criteria,
                         generation_config, streamer, model_kwargs: dict):
    """Decode a call transformers has prepared (see the module docstring); returns what `generate` returns."""
    _refuse_unsupported(target, input_ids, generation_config, model_kwargs)
    check_drafter_fits_target(drafter, target)
    plan = _read_prepared_call(input_ids, logits_processor, stopping_criteria, generation_config)
    limitation = engine_limitation(target, drafter)
    if limitation is not None:
        plan.stock_reasons.append(limitation)
    if plan.stock_reasons:
        return _stock_loop(target, drafter, input_ids, logits_processor, stopping_criteria, generation_config,
                           streamer, model_kwargs, plan.stock_reasons)
    attention_mask = model_kwargs.get("attention_mask")
    engine = engine_for(target, drafter, options, needed_length=input_ids.shape[1] + plan.budget)
    out = engine.generate(
        input_ids,
        attention_mask,
        max_new_tokens=plan.budget,
        min_new_tokens=plan.min_new_tokens,
        stop_token_ids=plan.stops,
        pad_token_id=plan.pad_token_id,
        stopping_criteria=plan.criteria,
        streamer=streamer,
        stream_prompt=False,  # generate has streamed it
        **plan.sampling,
    )
    drafter.last_stats = DFlashStats(acceptance_lengths=[n for row in out.acceptance_lengths for n in row],
                                     verify_steps=out.steps, time_prefill=out.time_prefill,
                                     time_draft=out.time_draft, time_verify=out.time_verify)
    if generation_config.return_dict_in_generate:
        return decoder_only_output(out.sequences)
    return out.sequences


def _refuse_unsupported(target, input_ids, generation_config, model_kwargs: dict) -> None:
    for name, off in _REFUSED_SETTINGS:
        value = getattr(generation_config, name, None)
        if value not in off:
            raise ValueError(
                f"{name}={value!r} is not supported with a DFlash drafter: speculative decoding verifies one "
                f"greedy or sampled continuation per prompt. Leave {name} unset, or generate without assistant_model."
            )
    if getattr(target.config, "is_encoder_decoder", False):
        raise ValueError(f"{type(target).__name__} is an encoder-decoder model; DFlash drafts for decoder-only LMs.")
    if input_ids.shape[1] == 0:
        raise ValueError(
            "The prompt has 0 tokens (generate from inputs_embeds alone?); DFlash needs input_ids with at least one "
            "token."
        )
    unknown = sorted(k for k, v in model_kwargs.items() if k not in _PREPARED_MODEL_KWARGS and v is not None)
    if unknown:
        raise ValueError(
            f"generate(assistant_model=<DFlash drafter>) got model inputs {unknown} that the DFlash decoder cannot "
            "pass on; generate with input_ids and attention_mask only."
        )
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        raise ValueError(
            f"generate(assistant_model=<DFlash drafter>) got a cache that already holds {cache.get_seq_length()} "
            "tokens; DFlash starts from the prompt. Pass the whole prompt without past_key_values."
        )


def _read_prepared_call(input_ids, logits_processor, stopping_criteria, generation_config) -> _Plan:
    prompt_len = input_ids.shape[1]
    stops: list[int] = []
    budget = (generation_config.max_length or prompt_len + 1) - prompt_len
    others = StoppingCriteriaList()
    for criterion in stopping_criteria or []:
        if isinstance(criterion, MaxLengthCriteria):
            budget = min(budget, criterion.max_length - prompt_len)
        elif isinstance(criterion, EosTokenCriteria):
            stops += token_id_list(criterion.eos_token_id)
        else:
            others.append(criterion)
    stops = list(dict.fromkeys(stops))
    pad = prepared_token_ids(generation_config, "pad")
    plan = _Plan(
        budget=max(budget, 1),  # as transformers: one token even when the prompt already reaches max_length
        stops=stops,
        pad_token_id=pad[0] if pad else (stops[0] if stops else 0),
        criteria=others if len(others) else None,
    )
    do_sample = bool(generation_config.do_sample)
    plan.sampling = {"do_sample": do_sample}
    last_warper = -1
    for processor in logits_processor or []:
        if isinstance(processor, LogitNormalization):
            continue  # log-softmax: the same argmax and the same distribution
        if isinstance(processor, (MinNewTokensLengthLogitsProcessor, MinLengthLogitsProcessor)):
            if last_warper >= 0 or set(token_id_list(processor.eos_token_id)) != set(stops):
                plan.stock_reasons.append(_option_name(processor))
                continue
            if isinstance(processor, MinNewTokensLengthLogitsProcessor):
                minimum = processor.min_new_tokens + processor.prompt_length_to_skip - prompt_len
            else:
                minimum = processor.min_length - prompt_len
            plan.min_new_tokens = max(plan.min_new_tokens, minimum)
            continue
        rank = next((i for i, kind in enumerate(_WARPERS) if type(processor) is kind), None)
        if rank is None or rank <= last_warper or not _filters_to_zero(processor):
            plan.stock_reasons.append(_option_name(processor))
            continue
        last_warper = rank
        if not do_sample:
            continue  # temperature, top-k, top-p and min-p all keep the argmax
        if isinstance(processor, TemperatureLogitsWarper):
            plan.sampling["temperature"] = float(processor.temperature)
        elif isinstance(processor, TopKLogitsWarper):
            plan.sampling["top_k"] = int(processor.top_k)
        elif isinstance(processor, TopPLogitsWarper):
            plan.sampling["top_p"] = float(processor.top_p)
        else:
            plan.sampling["min_p"] = float(processor.min_p)
    if generation_config.return_dict_in_generate:
        plan.stock_reasons += [f"{flag}=True" for flag in _PER_TOKEN_OUTPUTS if getattr(generation_config, flag, False)]
    return plan


def _filters_to_zero(processor) -> bool:
    """The engine's samplers drop filtered tokens entirely and keep at least the top one, as these do by default."""
    return getattr(processor, "filter_value", -math.inf) == -math.inf and (
        isinstance(processor, TopKLogitsWarper) or getattr(processor, "min_tokens_to_keep", 1) <= 1
    )


def _option_name(processor) -> str:
    name = type(processor).__name__
    option = _OPTION_OF_PROCESSOR.get(name)
    return option if option is not None else f"logits_processor=[{name}(...)]"


# ----------------------------------------------------------------------------------------------------------------------
# The engine kept between calls, and the stock loop for what it cannot do
# ----------------------------------------------------------------------------------------------------------------------


class EngineSlot:
    """Where a drafter keeps its engine between generate calls (`drafter._dflash_engine`). A deep copy of the drafter,
    or one saved whole with `torch.save`, gets an empty slot: the engine's caches, graphs and locks belong to this
    drafter object alone, and copying or saving the drafter must keep working."""

    def __init__(self):
        self.key: tuple | None = None
        self.engine: DFlashDecoder | None = None

    def __deepcopy__(self, memo) -> "EngineSlot":
        return EngineSlot()

    def __reduce__(self):
        return (EngineSlot, ())


def engine_for(target, drafter, options: EngineOptions, needed_length: int) -> DFlashDecoder:
    """The drafter's engine for `target`, reused while the pair, its device and dtype and the options stay the same
    and its capacity suffices; otherwise replaced (one engine per drafter, so memory stays bounded)."""
    parameter = next(target.parameters())
    key = (id(target), parameter.device, parameter.dtype, options)
    slot = drafter.__dict__.get("_dflash_engine")
    if not isinstance(slot, EngineSlot):
        slot = drafter.__dict__["_dflash_engine"] = EngineSlot()
    held = slot.engine if slot.key == key else None
    if held is not None and held.target is target and held.max_length >= needed_length:
        return held
    # Room to grow: the next calls with somewhat longer prompts reuse this engine instead of rebuilding it.
    capacity = max(needed_length, 2 * (held.max_length if held is not None else 0), 256)
    limit = getattr(target_text_config(target), "max_position_embeddings", None)
    if limit is not None:
        capacity = min(capacity, max(limit, needed_length))
    slot.key, slot.engine = None, None  # free the old caches before allocating new ones
    engine = DFlashDecoder(target, drafter, max_length=capacity, cuda_graphs=options.cuda_graphs,
                           compile=options.compile, verify_length=options.verify_length)
    slot.key, slot.engine = key, engine
    return engine


def _stock_loop(target, drafter, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                model_kwargs, reasons: list[str]):
    listed = ", ".join(reasons)
    cannot = stock_loop_limitation(target)
    if cannot is not None:
        raise ValueError(f"generate(assistant_model=<DFlash drafter>): the batched DFlash engine cannot serve this call "
                         f"({listed}), and {cannot}.")
    if input_ids.shape[0] > 1:
        raise ValueError(
            f"generate(assistant_model=<DFlash drafter>) on a batch of {input_ids.shape[0]} cannot honour {listed}: "
            "the batched DFlash engine does not implement it and transformers' assisted loop takes one sequence at "
            "a time. Drop it, or generate one prompt at a time."
        )
    if listed not in _warned:
        _warned.add(listed)
        warnings.warn(
            f"DFlash: this call runs on transformers' assisted loop (lossless, one prompt at a time, slower) "
            f"because the batched DFlash engine does not support: {listed}.",
            UserWarning,
            stacklevel=4,
        )
    stats = DFlashStats()
    drafter.last_stats = stats
    # The stock loop hands transformers our generator through an attribute of the target for the length of the call,
    # so calls on one target take turns (`target_guard`, shared with the engine).
    with target_guard(target), TargetFeatureCapture(target, drafter.config.target_layer_ids) as capture:
        generator = DFlashCandidateGenerator(target, drafter, capture, generation_config, logits_processor,
                                             stopping_criteria, stats)
        return run_stock_assisted_loop(target, generator, input_ids, logits_processor, stopping_criteria,
                                       generation_config, streamer, drafter, model_kwargs)


def install_generate_integration() -> None:
    """Install the one generate hook (idempotent across copies of the remote code)."""
    install_generate_hook(route_generate_call)


__all__ = ["EngineOptions", "decode_prepared_call", "engine_for", "install_generate_integration",
           "route_generate_call"]
