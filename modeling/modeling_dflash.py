"""DFlash block-diffusion drafter (Chen, Liang, Liu 2026, arXiv 2602.06036), as transformers remote code.

One forward of this model drafts a whole block: the block `[anchor, MASK x (B-1)]` is embedded with the **target's**
embedding, every layer attends over `[context ; block]` where the context keys/values come from the target's hidden
states (projected once by `fc` + `hidden_norm`), and output row `k` (k >= 1), through the **target's** LM head, is the
token at position `start + k`. The weights follow z-lab's released layout (`fc`, `hidden_norm`, `layers.N.*`, `norm`,
no embedding, no head), so vLLM and SGLang load what we save.

Importing this module also routes `target.generate(assistant_model=drafter)` to the batched DFlash engine
(see `integration_dflash.py`).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from .compat_dflash import attention_interface
from .configuration_dflash import DFlashConfig
from .decoding_dflash import DFlashDecoder  # noqa: F401  (imported directly, so 4.57 copies it with the remote code)
from .generation_dflash import DFlashStats, dflash_spec_generate
from .integration_dflash import install_generate_integration
from .masks_dflash import additive_mask, block_visibility
from .verify_length_dflash import VerifyLengthPolicy  # noqa: F401  (imported directly, so 4.57 copies it too)


# from_pretrained kwargs that say where config.json lives (the set AutoModel forwards).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "resume_download", "revision", "subfolder",
               "token", "use_auth_token")


class DFlashDraftCache:
    """Per-layer K/V of the drafter's context rows: `[batch, kv_heads, seq, head_dim]` per layer.

    Between two draft calls it holds one row per committed token (block rows are cropped away right after each
    call). `window`, when set, bounds memory by keeping only the newest `window` context rows; the positions stay
    right because RoPE is applied before caching.
    """

    def __init__(self, window: int | None = None):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.window = window
        # Rows dropped from the front by the window: absolute key index = cached index + offset.
        self.offset = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        if len(self.keys) <= layer_idx:
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] + self.offset if len(self.keys) > layer_idx else 0

    def crop(self, length: int) -> None:
        """Keep the first `length` absolute rows (then apply the window)."""
        keep = max(length - self.offset, 0)
        drop_front = 0
        if self.window is not None and keep > self.window:
            drop_front = keep - self.window
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i][..., drop_front:keep, :]
            self.values[i] = self.values[i][..., drop_front:keep, :]
        self.offset += drop_front


def apply_rotary(x, cos, sin):
    """RoPE on `x` `[batch, heads, n, head_dim]` at the positions of `cos`/`sin` `[batch, n, head_dim]`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def build_block_attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    window: int | None,
    key_padding: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive mask `[batch or 1, 1, q_len, kv_len]` for block queries over `[cached ; ctx ; block]` keys.

    Keys are indexed by cache row, which is their absolute position, and the block queries are the last `q_len` rows;
    the rule is `masks_dflash.block_visibility`. `key_padding` is `[batch, kv_len]`, 1 for real keys. Returns None
    when nothing is masked.
    """
    if not causal and window is None and key_padding is None:
        return None
    query_idx = torch.arange(kv_len - q_len, kv_len, device=device)[None, :, None]
    key_idx = torch.arange(kv_len, device=device)[None, None, :]
    visible = block_visibility(query_idx, key_idx, causal=causal, window=window)  # [1, q_len, kv_len]
    if key_padding is not None:
        visible = visible & key_padding[:, None, -kv_len:].bool()
    return additive_mask(visible, dtype)


class DFlashAttention(nn.Module):
    """Qwen3 attention with KV injection: keys/values over `[context ; block]`, queries over the block only."""

    def __init__(self, config: DFlashConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # Read by transformers' sdpa/flash wrappers when no mask is passed.
        self.is_causal = config.layer_is_causal(layer_idx)
        self.sliding_window = config.layer_window(layer_idx)
        self.layer_type = config.layer_type(layer_idx)

    def keys_values(self, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values `[batch, kv_heads, n, head_dim]` of `rows` `[batch, n, hidden]` (context rows and
        block rows alike) at the positions of `cos`/`sin` `[batch, n, head_dim]`."""
        batch, n, _ = rows.shape
        k = self.k_norm(self.k_proj(rows).view(batch, n, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(rows).view(batch, n, -1, self.head_dim).transpose(1, 2)
        return apply_rotary(k, cos, sin), v

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states `[batch, block, hidden]`, context `[batch, n_ctx, hidden]` -> `[batch, block, hidden]`."""
        batch, q_len, _ = hidden_states.shape
        cos, sin = position_embeddings  # [batch, n_ctx + block, head_dim]: keys cover [context ; block]
        q = self.q_norm(self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim)).transpose(1, 2)
        q = apply_rotary(q, cos[:, -q_len:], sin[:, -q_len:])
        k, v = self.keys_values(torch.cat([context, hidden_states], dim=1), cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        implementation = self.config._attn_implementation or "eager"
        if isinstance(attention_mask, dict):  # one ready 4D mask per layer type (masks_dflash.drafter_block_masks)
            attention_mask = attention_mask[self.layer_type]
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask
        else:
            mask = None
            if not implementation.startswith("flash"):
                mask = build_block_attention_mask(
                    q_len,
                    k.shape[-2],
                    causal=self.is_causal,
                    window=self.sliding_window,
                    key_padding=attention_mask,
                    dtype=q.dtype,
                    device=q.device,
                )
            elif attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError(
                    f"attn_implementation={implementation!r} cannot apply a padding mask in the drafter; "
                    "load the drafter with attn_implementation='sdpa' for padded batches."
                )
        attn_output, _ = attention_interface(implementation)(
            self,
            q,
            k,
            v,
            mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            is_causal=self.is_causal if mask is None else False,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(batch, q_len, -1))


class DFlashDecoderLayer(nn.Module):
    """Pre-norm Qwen3 block whose attention reads the target context as extra keys/values."""

    def __init__(self, config: DFlashConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, context, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), context, position_embeddings, attention_mask, past_key_values, **kwargs
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DFlashPreTrainedModel(PreTrainedModel):
    config_class = DFlashConfig
    base_model_prefix = "dflash"
    main_input_name = "noise_embeds"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DFlashDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    # No `_init_weights` override: transformers' own covers Linear (normal, initializer_range) and RMSNorm (ones), and
    # in 5.x it also recomputes the rotary `inv_freq`, a non-persistent buffer that from_pretrained otherwise leaves
    # uninitialised after building the model on the meta device (RoPE silently lost).


class DFlashDraftModel(DFlashPreTrainedModel):
    """The DFlash drafter. See the module docstring for the architecture.

    Two call conventions are accepted:
    - transformers' native route: `forward(noise_embeds, context_hidden_states, position_ids, attention_mask,
      past_key_values | cache)` returning `BaseModelOutputWithPast(last_hidden_state=[batch, block, hidden])`;
    - z-lab's reference call: `forward(noise_embedding=..., target_hidden=..., position_ids=..., past_key_values=...)`
      returning the tensor `[batch, block, hidden]`.
    """

    # Marker read by the generate integration, which must recognise drafters loaded from any copy of this file.
    _is_dflash_drafter = True

    def __init__(self, config):
        if not isinstance(config, DFlashConfig):
            # A config of another copy of this class (remote code loaded twice) or a plain Qwen3Config.
            config = DFlashConfig.from_dict(config.to_dict())
        super().__init__(config)
        if not config.target_layer_ids:
            raise ValueError(
                "The drafter config has neither target_layer_ids nor num_target_layers; set "
                "dflash_config.target_layer_ids (e.g. [1, 9, 17, 25, 33] for a 36-layer target)."
            )
        hidden = config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList([DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.last_stats: DFlashStats | None = None
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading z-lab's config.json with `DFlashConfig`.

        `AutoModel.from_pretrained(repo, trust_remote_code=True)` on a released checkpoint (model_type "qwen3", no
        AutoConfig in auto_map) hands us a plain `Qwen3Config`, which has already dropped `sliding_window` (Qwen3
        keeps it only with `use_sliding_window`) although `layer_types` marks sliding layers. Re-read the same
        config.json with our class so nothing is lost.
        """
        if config is not None and not isinstance(config, (str, os.PathLike)) and getattr(
            config, "model_type", None
        ) != DFlashConfig.model_type:
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = DFlashConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        wants_info = bool(kwargs.pop("output_loading_info", False))
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, output_loading_info=True, **kwargs
        )
        missing = set(info.get("missing_keys") or [])
        if "fc.weight" in missing and all(f"layers.{i}.mlp.down_proj.weight" in missing for i in range(len(model.layers))):
            unexpected = sorted(info.get("unexpected_keys") or [])[:5]
            raise ValueError(
                f"No DFlash weight of {pretrained_model_name_or_path} matched (fc.weight and every layer are missing; "
                f"found e.g. {unexpected}). Save the weights unprefixed (fc.weight, layers.N.*, norm.weight), e.g. "
                "by stripping a 'model.' prefix, as z-lab's released checkpoints are."
            )
        return (model, info) if wants_info else model

    # The drafter borrows the target's embedding and head; it owns neither.
    def get_input_embeddings(self):
        return None

    def make_draft_cache(self) -> DFlashDraftCache:
        """A fresh draft KV cache for one generation (bounded by `config.draft_window` when set)."""
        return DFlashDraftCache(window=self.config.draft_window)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> list[int]:
        return self.config.target_layer_ids

    def project_context(self, target_features: torch.Tensor) -> torch.Tensor:
        """`[batch, n_ctx, len(ids) * hidden]` target features -> `[batch, n_ctx, hidden]` context rows."""
        return self.hidden_norm(self.fc(target_features))

    def forward(
        self,
        noise_embeds: torch.Tensor | None = None,
        context_hidden_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        use_cache: bool | None = None,
        noise_embedding: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
        cache_position: torch.LongTensor | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ):
        """Draft one block.

        Args:
            noise_embeds: `[batch, block, hidden]` target embeddings of `[anchor, MASK, ...]`.
            context_hidden_states: `[batch, n_ctx, len(ids) * hidden]` target features of the new context rows.
            position_ids: `[batch, n_ctx + block]` absolute positions of the context rows, then of the block.
            attention_mask: optional `[batch, cached + n_ctx + block]` key padding mask (1 = real token), a ready
                4D additive mask `[batch, 1, block, cached + n_ctx + block]` for every layer, or a dict of such masks
                keyed by layer type (`masks_dflash.drafter_block_masks`).
            past_key_values / cache: draft KV cache; the caller crops the block rows after the call.
            noise_embedding / target_hidden: z-lab's names for `noise_embeds` / `context_hidden_states`; with them
                the call returns the tensor `[batch, block, hidden]` instead of a model output.
            is_causal: accepted for z-lab's ref-v1 loop, which passes `is_causal=False`, and ignored: the attention
                pattern of each layer comes from the config (sliding layers causal, full layers not, or the
                config's `is_causal` for all), as in z-lab's ref-v2, vLLM and SGLang.
            use_cache / cache_position: accepted for transformers' callers and ignored (the cache is used if given).
        """
        reference_call = noise_embedding is not None
        noise_embeds = noise_embedding if reference_call else noise_embeds
        context_hidden_states = target_hidden if target_hidden is not None else context_hidden_states
        cache = cache if cache is not None else past_key_values
        if noise_embeds is None or context_hidden_states is None:
            raise ValueError("DFlashDraftModel needs noise_embeds [batch, block, hidden] and context_hidden_states.")
        batch, block, _ = noise_embeds.shape
        n_ctx = context_hidden_states.shape[1]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + n_ctx + block, device=noise_embeds.device).expand(batch, -1)
        context = self.project_context(context_hidden_states.to(self.fc.weight.dtype))
        hidden_states = noise_embeds.to(self.fc.weight.dtype)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, context, position_embeddings, attention_mask, cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        if reference_call:
            return hidden_states
        return BaseModelOutputWithPast(last_hidden_state=hidden_states)

    def write_context(self, context_hidden_states: torch.Tensor, position_ids: torch.LongTensor, cache) -> None:
        """Take context rows into `cache` without drafting: every layer gets the keys/values a `forward` would write
        for them. `context_hidden_states` `[batch, n_ctx, len(ids) * hidden]` (target features), `position_ids`
        `[batch, n_ctx]`. A decode step that verifies no draft uses it to keep the drafter's context complete."""
        context = self.project_context(context_hidden_states.to(self.fc.weight.dtype))
        cos, sin = self.rotary_emb(context, position_ids)
        for layer in self.layers:
            key, value = layer.self_attn.keys_values(context, cos, sin)
            cache.update(key, value, layer.self_attn.layer_idx)

    def compute_logits(self, hidden_states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Target head on draft rows, with `output_multiplier` and `final_logit_softcapping` where configured."""
        logits = lm_head(hidden_states)
        if self.config.output_multiplier is not None:
            logits = logits * self.config.output_multiplier
        cap = self.config.final_logit_softcapping
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    @torch.no_grad()
    def spec_generate(
        self,
        target: nn.Module,
        input_ids: torch.LongTensor,
        max_new_tokens: int = 2048,
        stop_token_ids: list[int] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> torch.LongTensor:
        """z-lab's reference entry point: prompt + generated ids `[1, prompt + new]`, greedy at temperature 0."""
        return dflash_spec_generate(
            self, target, input_ids, max_new_tokens, stop_token_ids, temperature=temperature, top_p=top_p, top_k=top_k
        )


# save_pretrained then writes auto_map and copies these files next to the weights, so the saved folder loads back with
# AutoModel.from_pretrained(folder, trust_remote_code=True) like a released checkpoint.
DFlashConfig.register_for_auto_class()
DFlashDraftModel.register_for_auto_class("AutoModel")

install_generate_integration()

__all__ = ["DFlashDraftModel", "DFlashPreTrainedModel", "DFlashDraftCache", "DFlashStats", "build_block_attention_mask"]
