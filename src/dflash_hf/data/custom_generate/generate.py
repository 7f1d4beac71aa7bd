"""`custom_generate` entry point of a DFlash drafter repository (written by `dflash-hf export`; do not edit the copy).

    drafter = AutoModel.from_pretrained(REPO, trust_remote_code=True, dtype=target.dtype).to(target.device)
    out = target.generate(**batch, custom_generate=REPO, trust_remote_code=True, assistant_model=drafter,
                          max_new_tokens=256)

replaces transformers' `generate` with dflash-hf's batched block-diffusion speculative loop (`decoding_dflash.py`,
copied beside this file at export time from the single source in the dflash-hf package). Unlike transformers' own
assisted decoding it takes a left-padded batch. Greedy output of every row equals the target's own greedy output for
that row; sampling follows speculative sampling, so the output distribution is the target's.

Returns the sequences `[batch, prompt + generated]` like `generate` does (rows that stop early are padded with
`pad_token_id`), or the loop's full output (`.sequences`, `.new_tokens`, `.acceptance_lengths`,
`.mean_acceptance_length`, `.tokens_per_second`, ...) with `return_dict_in_generate=True`. `assistant_model.last_stats`
then holds the acceptance lengths of the call (all rows together).
"""

from __future__ import annotations

import copy

from .decoding_dflash import generate as dflash_generate
from .generation_dflash import DFlashStats

# Arguments transformers hands every custom generate function; they carry nothing this loop needs.
_PASSED_THROUGH = ("tokenizer", "assistant_tokenizer", "use_model_defaults", "synced_gpus", "use_cache")
# Hooks this loop cannot honour: allowed only while unset or empty.
_HOOKS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "negative_prompt_ids",
          "negative_prompt_attention_mask")
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
# Generation settings this loop does not implement; asking for them must fail loudly, not be ignored.
_UNSUPPORTED_SETTINGS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_new_tokens": None,
    "min_length": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "guidance_scale": None,
}


def _token_list(value) -> list[int]:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def generate(model, input_ids=None, attention_mask=None, assistant_model=None, generation_config=None, streamer=None,
             inputs=None, return_dict_in_generate=None, cuda_graphs=None, compile=None, generator=None, **kwargs):
    """Batched DFlash generation with `model` as target and `assistant_model` as drafter (see the module docstring).

    Args:
        model: the target causal LM (transformers passes it).
        input_ids / inputs: `[batch, prompt]` token ids, left-padded when prompts differ in length.
        attention_mask: `[batch, prompt]`, 1 for real tokens (optional when there is no padding).
        assistant_model: the DFlash drafter, e.g. `AutoModel.from_pretrained(REPO, trust_remote_code=True)`.
        generation_config / kwargs: `max_new_tokens`, `max_length`, `do_sample`, `temperature`, `top_k`, `top_p`,
            `eos_token_id`, `pad_token_id`, as for `generate`.
        cuda_graphs / compile: the loop's CUDA graph capture and `torch.compile` switches (default: on for CUDA).
        generator: optional `torch.Generator` seeding the sampling.
    """
    if assistant_model is None:
        raise ValueError(
            "custom_generate=<DFlash drafter repo> needs the drafter: pass assistant_model=AutoModel.from_pretrained("
            "<that repo>, trust_remote_code=True, dtype=target.dtype).to(target.device)."
        )
    ids = input_ids if input_ids is not None else inputs
    if ids is None:
        raise ValueError("custom_generate DFlash loop needs input_ids [batch, prompt].")
    for key in _PASSED_THROUGH:
        kwargs.pop(key, None)
    for key in _HOOKS:
        value = kwargs.pop(key, None)
        if value is not None and not (isinstance(value, list) and len(value) == 0):
            raise ValueError(
                f"{key} is not supported by the DFlash custom_generate loop; drop it, or call "
                "target.generate(assistant_model=drafter) without custom_generate (transformers' own loop)."
            )
    for key in _OUTPUT_FLAGS:
        if kwargs.pop(key, None):
            raise ValueError(f"{key}=True is not supported by the DFlash custom_generate loop.")

    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unknown = config.update(**kwargs)
    if unknown:
        raise ValueError(
            f"The DFlash custom_generate loop does not understand {sorted(unknown)}; supported: max_new_tokens, "
            "max_length, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, streamer, "
            "return_dict_in_generate."
        )
    for key, neutral in _UNSUPPORTED_SETTINGS.items():
        value = getattr(config, key, neutral)
        if value is not None and value != neutral and not (key == "min_new_tokens" and value == 0):
            raise ValueError(
                f"generation setting {key}={value!r} is not supported by the DFlash custom_generate loop "
                f"(only greedy and temperature/top-k/top-p sampling); leave it at {neutral!r}."
            )

    prompt_len = ids.shape[1]
    if config.max_new_tokens is not None:
        max_new_tokens = int(config.max_new_tokens)
    else:
        max_new_tokens = int(config.max_length) - prompt_len
    if max_new_tokens < 1:
        raise ValueError(
            f"Nothing to generate: max_length={config.max_length} does not exceed the prompt length {prompt_len}; "
            "pass max_new_tokens=N."
        )
    stop = _token_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (stop[0] if stop else None)
    do_sample = bool(config.do_sample)
    out = dflash_generate(
        model,
        assistant_model,
        ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=float(config.temperature) if do_sample and config.temperature is not None else 1.0,
        top_k=int(config.top_k or 0) if do_sample else 0,
        top_p=float(config.top_p) if do_sample and config.top_p is not None else 1.0,
        stop_token_ids=stop,
        pad_token_id=pad,
        streamer=streamer,
        cuda_graphs=cuda_graphs,
        compile=compile,
        generator=generator,
    )
    assistant_model.last_stats = DFlashStats(
        acceptance_lengths=[n for row in out.acceptance_lengths for n in row]
    )
    if return_dict_in_generate is None:
        return_dict_in_generate = bool(getattr(config, "return_dict_in_generate", False))
    return out if return_dict_in_generate else out.sequences
