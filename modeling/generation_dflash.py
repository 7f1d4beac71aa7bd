"""What every door shares about a target and a DFlash drafter, and transformers' assisted loop as a fallback.

- The target side: its text config, decoder layers, the drafter's block embedding, the fit check, and
  `TargetFeatureCapture` (forward hooks on the `target_layer_ids` layers, so no `output_hidden_states`).
- `DFlashCandidateGenerator`: drafts for transformers' own assisted loop (`_assisted_decoding`, batch 1). The
  generate integration (`integration_dflash.py`) uses it only for what the batched engine cannot do (e.g.
  `repetition_penalty`, per-token scores); the stock loop then verifies and accepts with its own greedy matching or
  speculative sampling, which keeps the output lossless on every supported transformers version.
- `dflash_spec_generate`: z-lab's reference entry point, through `target.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList


@dataclass
class DFlashStats:
    """What one DFlash generate call did. `acceptance_lengths[i]` tokens were committed by verify step i of a row
    (bonus included, so 1 <= tau <= block_size), row after row. When the batched engine ran the call, `verify_steps`
    counts the steps of the whole batch (each verifies every unfinished row at once) and `time_prefill`,
    `time_draft`, `time_verify` are its seconds in each part (synchronised on CUDA). Read it after a call as
    `drafter.last_stats`."""

    acceptance_lengths: list[int] = field(default_factory=list)
    verify_steps: int | None = None
    time_prefill: float | None = None
    time_draft: float | None = None
    time_verify: float | None = None

    @property
    def mean_acceptance_length(self) -> float:
        return sum(self.acceptance_lengths) / max(len(self.acceptance_lengths), 1)

    @property
    def steps(self) -> int:
        """Verify steps of the call: of the whole batch when the engine ran it, else one per acceptance length."""
        return self.verify_steps if self.verify_steps is not None else len(self.acceptance_lengths)


def is_dflash_drafter(model) -> bool:
    return bool(getattr(model, "_is_dflash_drafter", False))


# ----------------------------------------------------------------------------------------------------------------------
# The target side: its text config, decoder layers, embedding and head
# ----------------------------------------------------------------------------------------------------------------------


def target_text_config(target: nn.Module):
    config = target.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(target: nn.Module) -> nn.ModuleList:
    """The target's list of decoder layers (`model.layers`, or `model.language_model.layers` for multimodal ones)."""
    depth = target_text_config(target).num_hidden_layers
    for name, module in target.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module) == depth:
            return module
    raise ValueError(
        f"Cannot find the {depth} decoder layers of {type(target).__name__}: no ModuleList named 'layers' of that "
        "length. DFlash needs a decoder-only causal LM."
    )


def embed_block(drafter: nn.Module, target: nn.Module, block_ids: torch.LongTensor) -> torch.Tensor:
    """`[batch, block]` ids -> `[batch, block, hidden]` target embeddings, with the embedding scale applied once.

    With `input_embedding_scale` in the drafter config (z-lab ref-v2), the raw embedding row is scaled by it;
    otherwise the target's embedding module is called, which includes a Gemma target's own `sqrt(hidden)` scale
    (and skips an `embed_norm` inside the module, if any).
    """
    embedding = target.get_input_embeddings()
    scale = drafter.config.input_embedding_scale
    if scale is not None:
        return F.embedding(block_ids, embedding.weight) * scale
    # Some targets (MuseGlimmer / MuseSpark) normalise inside the embedding module; DFlash drafts from the plain
    # embedding, so the norm is bypassed for this call, as transformers' native DFlash generator does.
    embed_norm = getattr(embedding, "embed_norm", None)
    if embed_norm is None:
        return embedding(block_ids)
    try:
        embedding.embed_norm = nn.Identity()
        return embedding(block_ids)
    finally:
        embedding.embed_norm = embed_norm


def check_drafter_fits_target(drafter: nn.Module, target: nn.Module) -> None:
    """Raise ValueError, naming both values and the fix, when `drafter` cannot draft for `target`."""
    text = target_text_config(target)
    cfg = drafter.config
    ids = list(cfg.target_layer_ids or [])
    depth = text.num_hidden_layers
    if not ids:
        raise ValueError("The drafter config has no target_layer_ids; set dflash_config.target_layer_ids.")
    bad = [i for i in ids if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"Drafter target_layer_ids {ids} reach layers {bad}, but the target {type(target).__name__} has only "
            f"{depth} decoder layers (0..{depth - 1}); this drafter was made for a deeper target."
        )
    fc_in = drafter.fc.in_features
    if fc_in != len(ids) * text.hidden_size:
        raise ValueError(
            f"Drafter fc expects {fc_in} input features but the target gives {len(ids)} layers x hidden_size "
            f"{text.hidden_size} = {len(ids) * text.hidden_size}; this drafter was made for another target."
        )
    if cfg.hidden_size != text.hidden_size:
        raise ValueError(
            f"Drafter hidden_size {cfg.hidden_size} != target hidden_size {text.hidden_size}; the drafter reads the "
            "target's embeddings and head, so the sizes must match."
        )
    rows = target.get_input_embeddings().weight.shape[0]
    if cfg.mask_token_id is None or not 0 <= cfg.mask_token_id < rows:
        raise ValueError(
            f"Drafter mask_token_id {cfg.mask_token_id} is outside the target embedding table of {rows} rows; set "
            "dflash_config.mask_token_id to an id below that."
        )
    if cfg.block_size < 2:
        raise ValueError(f"Drafter block_size {cfg.block_size} must be at least 2 (anchor + one draft).")
    t_param, d_param = next(target.parameters()), next(drafter.parameters())
    if t_param.device != d_param.device:
        raise ValueError(
            f"Drafter is on {d_param.device} but the target is on {t_param.device}; move the drafter with "
            f"drafter.to('{t_param.device}')."
        )
    if t_param.dtype != d_param.dtype:
        raise ValueError(
            f"Drafter dtype {d_param.dtype} != target dtype {t_param.dtype}; load both with the same dtype, e.g. "
            f"drafter.to({t_param.dtype})."
        )


class TargetFeatureCapture:
    """Forward hooks on the `layer_ids` decoder layers of `target` that keep the last forward's outputs.

    `features()` returns `[batch, seq, len(ids) * hidden]` in the order of `layer_ids` (the output of decoder layer
    i is HF's `hidden_states[i + 1]`), then forgets it. Use as a context manager: hooks are removed on exit.
    """

    def __init__(self, target: nn.Module, layer_ids: list[int]):
        self.layers = find_decoder_layers(target)
        self.layer_ids = list(layer_ids)
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "TargetFeatureCapture":
        for layer_id in dict.fromkeys(self.layer_ids):
            self._handles.append(self.layers[layer_id].register_forward_hook(self._make_hook(layer_id)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _make_hook(self, layer_id: int):
        def hook(module, args, output):
            self._outputs[layer_id] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def features(self) -> torch.Tensor | None:
        if not self._outputs:
            return None
        feats = torch.cat([self._outputs[i] for i in self.layer_ids], dim=-1)
        self._outputs.clear()
        return feats


# ----------------------------------------------------------------------------------------------------------------------
# The candidate generator used inside transformers' own assisted-decoding loop
# ----------------------------------------------------------------------------------------------------------------------


class DFlashCandidateGenerator(CandidateGenerator):
    """Drafts up to `block_size - 1` tokens with one drafter forward per verify step, batch 1.

    Works with the stock loop of every supported version: it asks for no model outputs (features come from hooks),
    returns no drafts on the first call (so iteration 1 is the target's prefill), and caps drafts to the
    `max_length` budget (4.57 has no budget crop in the loop).

    Drafts stop **before** the first draft that would end generation (an EOS id, or any other stopping criterion
    such as a stop string or a user criterion, checked on the growing prefix). The stock loops only look at the last
    committed token, and 5.x would append a bonus token after a stop token that is itself a draft; left out, the stop
    token can only be committed as the bonus, i.e. last, so the output matches plain `generate` exactly.
    """

    def __init__(self, target, drafter, capture: TargetFeatureCapture, generation_config, logits_processor,
                 stopping_criteria, stats):
        self.target = target
        self.drafter = drafter
        self.capture = capture
        self.generation_config = generation_config
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.stats = stats
        self.lm_head = target.get_output_embeddings()
        self.cache = drafter.make_draft_cache()
        self.block_size = drafter.config.block_size
        self.mask_token_id = drafter.config.mask_token_id
        # EOS ids are checked for all drafts at once; the length criterion is the `max_length` budget below; any
        # other criterion is evaluated on each draft prefix.
        eos_ids = [c.eos_token_id for c in stopping_criteria or [] if isinstance(c, EosTokenCriteria)]
        self.eos = torch.cat([torch.as_tensor(e).reshape(-1) for e in eos_ids]).long() if eos_ids else None
        self.other_criteria = StoppingCriteriaList(
            c for c in stopping_criteria or [] if not isinstance(c, (EosTokenCriteria, MaxLengthCriteria))
        )
        self.context_len = 0  # committed tokens whose features are already in (or pending for) the draft cache
        self.pending: torch.Tensor | None = None  # [1, n, len(ids) * hidden] features not yet fed to the drafter
        self.len_before_step: int | None = None

    @property
    def num_drafting_tokens(self) -> int:
        """The most drafts one verify step can carry; transformers 5.25+ sizes the target cache's rollback record
        (`activate_past_recording(recurrent_states_to_keep=...)`) with it."""
        return self.block_size - 1

    def _collect_features(self, cur_len: int) -> None:
        """Append the rows of the last target forward that are now committed (all but the newest bonus token)."""
        feats = self.capture.features()
        if feats is None:
            return
        n_new = cur_len - 1 - self.context_len
        rows = feats[:, :n_new]
        self.pending = rows if self.pending is None else torch.cat([self.pending, rows], dim=1)
        self.context_len += n_new

    @torch.no_grad()
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        """`input_ids` `[1, cur_len]` -> (`[1, cur_len + n_drafts]`, draft logits `[1, n_drafts, V]` when sampling)."""
        cur_len = input_ids.shape[1]
        self.len_before_step = cur_len
        self._collect_features(cur_len)
        max_length = self.generation_config.max_length
        budget = min(self.block_size - 1, max_length - cur_len - 1) if max_length is not None else self.block_size - 1
        if self.pending is None or budget <= 0:
            return input_ids, None

        device = self.drafter.device
        block_ids = torch.full((1, self.block_size), self.mask_token_id, dtype=torch.long, device=device)
        block_ids[:, 0] = input_ids[0, -1]
        noise = embed_block(self.drafter, self.target, block_ids)
        anchor_pos = cur_len - 1
        positions = torch.arange(anchor_pos - self.pending.shape[1], anchor_pos + self.block_size, device=device)
        hidden = self.drafter(
            noise_embeds=noise,
            context_hidden_states=self.pending.to(device),
            position_ids=positions[None],
            past_key_values=self.cache,
        ).last_hidden_state
        # Block rows are never kept: between calls the draft cache holds one row per committed token.
        self.cache.crop(anchor_pos)
        self.pending = None
        logits = self.drafter.compute_logits(hidden[:, 1 : 1 + budget], self.lm_head).float()  # [1, budget, V]
        drafts, logits = self._choose(input_ids, logits)
        keep = self._drafts_before_stop(input_ids, drafts)
        if keep == 0:
            return input_ids, None
        drafts = drafts[:, :keep]
        logits = logits[:, :keep] if logits is not None else None
        return torch.cat([input_ids, drafts.to(input_ids.device)], dim=1), logits

    def _drafts_before_stop(self, input_ids: torch.LongTensor, drafts: torch.LongTensor) -> int:
        """Number of leading drafts that do not end generation (see the class docstring)."""
        keep = drafts.shape[1]
        if self.eos is not None:
            is_eos = torch.isin(drafts[0], self.eos.to(drafts.device))
            if bool(is_eos.any()):
                keep = int(is_eos.nonzero()[0, 0])
        if len(self.other_criteria) > 0:
            candidate = torch.cat([input_ids, drafts.to(input_ids.device)], dim=1)
            cur_len = input_ids.shape[1]
            for k in range(keep):
                if bool(self.other_criteria(candidate[:, : cur_len + k + 1], None).any()):
                    return k
        return keep

    def _choose(self, input_ids, logits):
        """Drafts from the processed draft logits: argmax when greedy; sampled from q (and q returned, for the
        loop's speculative sampling) when `do_sample`."""
        do_sample = bool(self.generation_config.do_sample)
        if len(self.logits_processor) == 0 and not do_sample:
            return logits.argmax(-1), None
        prefix = input_ids
        drafts = []
        for i in range(logits.shape[1]):
            # Processors see the prefix each draft would have (e.g. repetition penalty, min_new_tokens).
            logits[:, i] = self.logits_processor(prefix, logits[:, i])
            if do_sample:
                token = torch.multinomial(logits[:, i].softmax(-1), 1)
            else:
                token = logits[:, i].argmax(-1, keepdim=True)
            drafts.append(token)
            prefix = torch.cat([prefix, token.to(prefix.device)], dim=1)
        return torch.cat(drafts, dim=1), (logits if do_sample else None)

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        if self.context_len > 0:  # not the prefill
            self.stats.acceptance_lengths.append(input_ids.shape[1] - self.len_before_step)


# ----------------------------------------------------------------------------------------------------------------------
# z-lab's reference entry point
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def dflash_spec_generate(
    drafter, target, input_ids, max_new_tokens, stop_token_ids, temperature=0.0, top_p=1.0, top_k=0
) -> torch.LongTensor:
    """`drafter.spec_generate(...)`: prompt + new tokens `[1, prompt + new]` through `target.generate`."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"spec_generate takes one sequence (batch 1), got {input_ids.shape[0]}.")
    do_sample = temperature > 0
    kwargs = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    return target.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        assistant_model=drafter,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=do_sample,
        eos_token_id=list(stop_token_ids) if stop_token_ids else None,
        pad_token_id=(list(stop_token_ids)[0] if stop_token_ids else target_text_config(target).pad_token_id),
        **kwargs,
    )
