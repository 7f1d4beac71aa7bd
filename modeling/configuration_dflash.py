"""Configuration of a DFlash block-diffusion drafter.

A DFlash drafter is a small stack of Qwen3-style decoder layers. Its config is therefore a `Qwen3Config` with a few
extra fields that say how it reads its target:

- `target_layer_ids`: the target decoder layers whose outputs are concatenated into the context features.
- `mask_token_id`: the target vocabulary id whose embedding fills the masked slots of a draft block.
- `block_size`: tokens per draft block (anchor + `block_size - 1` drafts).
- optional `input_embedding_scale`, `output_multiplier`, `final_logit_softcapping`, `is_causal`.

Released z-lab checkpoints nest `mask_token_id` and `target_layer_ids` (and sometimes the optional keys) in a
`dflash_config` dict and use `model_type: "qwen3"`. This class accepts that layout as it is and exposes every field at
the top level as well, which is what transformers' native DFlash route reads.
"""

from __future__ import annotations

import json
import os

from transformers import Qwen3Config
from transformers.utils import CONFIG_NAME

# Largest sizes a config.json may ask for. Released drafters use block_size 16 and 1 to 8 layers; the headroom is
# generous, but without a bound a hostile config.json (block_size or num_hidden_layers of 200000) runs for minutes
# building the model before anything else can fail.
MAX_BLOCK_SIZE = 1024
MAX_DRAFT_LAYERS = 256

# Keys that may sit either in `dflash_config` or at the top level of config.json; `dflash_config` wins (as in z-lab's
# reference code and SGLang).
DFLASH_KEYS = (
    "mask_token_id",
    "target_layer_ids",
    "block_size",
    "num_target_layers",
    "input_embedding_scale",
    "output_multiplier",
    "final_logit_softcapping",
    "is_causal",
)


def build_target_layer_ids(num_target_layers: int, num_context_layers: int) -> list[int]:
    """The published spread rule for `target_layer_ids`.

    `n == 1` gives the middle layer; otherwise ids run from 1 to `L - 3` evenly, rounded with Python's round-half-even
    (which reproduces every released list, e.g. L=36, n=5 -> [1, 9, 17, 25, 33]).
    """
    if num_target_layers < 4 and num_context_layers > 1:
        raise ValueError(
            f"num_target_layers={num_target_layers} is too shallow for the spread rule with {num_context_layers} "
            "context layers; pass target_layer_ids explicitly."
        )
    if num_context_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_context_layers - 1))) for i in range(num_context_layers)]


def _check_integer(name: str, value, low: int | None = None, high: int | None = None) -> None:
    """A ValueError naming the field, the value and the allowed range unless `value` is an integer within it."""
    allowed = "an integer" if low is None else f"an integer in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"DFlashConfig {name} must be {allowed}, got {value!r} ({type(value).__name__}); fix "
                         "config.json.")
    if low is not None and not low <= value <= high:
        raise ValueError(f"DFlashConfig {name} {value} is outside {low}..{high}; fix config.json (released drafters "
                         "use block_size 16 and at most 8 layers).")


class DFlashConfig(Qwen3Config):
    r"""Config of a [`DFlashDraftModel`].

    `block_size` must lie in 2..`MAX_BLOCK_SIZE` (1024) and `num_hidden_layers` in 1..`MAX_DRAFT_LAYERS` (256), and
    `mask_token_id` must be an integer (or unset): anything else is a ValueError naming the field, before any weight
    is allocated.

    Args:
        block_size (`int`, *optional*, defaults to 16): tokens per draft block, anchor included.
        target_layer_ids (`list[int]`, *optional*): target decoder layers read as context. Missing ids fall back to
            the spread rule over `num_target_layers` with `num_context_layers` ids, which defaults to the number of
            draft layers `num_hidden_layers` as in z-lab's reference code.
        mask_token_id (`int`, *optional*): target vocabulary id of the mask embedding.
        num_target_layers (`int`, *optional*): depth of the target; used only by the spread-rule fallback.
        dflash_config (`dict`, *optional*): z-lab's nested form of the DFlash keys; takes precedence over the
            top-level keys.
        input_embedding_scale (`float`, *optional*): if set, the block embedding is the target's **raw** embedding
            row times this factor; if unset, the target's embedding module is called (so a Gemma target applies its
            own `sqrt(hidden_size)` scale). Either way the scale is applied exactly once.
        output_multiplier (`float`, *optional*): multiplies the draft logits.
        final_logit_softcapping (`float`, *optional*): `cap * tanh(logits / cap)` on the draft logits.
        is_causal (`bool`, *optional*): overrides the per-layer default (sliding layers causal, full layers not).
        draft_window (`int`, *optional*): runtime bound on the draft KV cache (context rows kept), our addition.
    """

    model_type = "dflash_draft"

    def __init__(
        self,
        block_size: int = 16,
        target_layer_ids: list[int] | None = None,
        mask_token_id: int | None = None,
        num_target_layers: int | None = None,
        dflash_config: dict | None = None,
        input_embedding_scale: float | None = None,
        output_multiplier: float | None = None,
        final_logit_softcapping: float | None = None,
        is_causal: bool | None = None,
        num_context_layers: int | None = None,
        draft_window: int | None = None,
        **kwargs,
    ):
        top_level = {
            "block_size": block_size,
            "target_layer_ids": target_layer_ids,
            "mask_token_id": mask_token_id,
            "num_target_layers": num_target_layers,
            "input_embedding_scale": input_embedding_scale,
            "output_multiplier": output_multiplier,
            "final_logit_softcapping": final_logit_softcapping,
            "is_causal": is_causal,
        }
        nested = dict(dflash_config or {})
        for key in DFLASH_KEYS:
            value = nested.get(key, top_level[key])
            setattr(self, key, value)
        if self.block_size is None:
            self.block_size = 16
        _check_integer("block_size", self.block_size, 2, MAX_BLOCK_SIZE)
        if self.mask_token_id is not None:
            _check_integer("mask_token_id", self.mask_token_id)
        self.draft_window = draft_window

        # Qwen3Config drops `sliding_window` unless `use_sliding_window` is set, but released drafters mark their
        # sliding layers through `layer_types` alone; keep the window those layers need.
        sliding_window = kwargs.get("sliding_window")
        layer_types = kwargs.get("layer_types")
        super().__init__(**kwargs)
        _check_integer("num_hidden_layers", self.num_hidden_layers, 1, MAX_DRAFT_LAYERS)
        self._sync_legacy_rope_keys()

        if self.target_layer_ids is None and self.num_target_layers is not None:
            # z-lab's fallback: as many ids as draft layers (`build_target_layer_ids(L, num_hidden_layers)`).
            count = num_context_layers if num_context_layers is not None else self.num_hidden_layers
            self.target_layer_ids = build_target_layer_ids(int(self.num_target_layers), int(count))
        if self.target_layer_ids is not None:
            self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        self.num_context_layers = len(self.target_layer_ids) if self.target_layer_ids else num_context_layers
        # Keep the nested dict in sync so that what we save still reads correctly in vLLM / SGLang / z-lab code.
        nested.update(
            {k: getattr(self, k) for k in ("mask_token_id", "target_layer_ids") if getattr(self, k) is not None}
        )
        self.dflash_config = nested
        if layer_types is not None and "sliding_attention" in layer_types and sliding_window is not None:
            self.sliding_window = sliding_window
        if "sliding_attention" in (self.layer_types or []) and self.sliding_window is None:
            raise ValueError(
                f"layer_types {self.layer_types} has sliding layers but sliding_window is None; set sliding_window."
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """config.json as a dict; a released z-lab drafter's `model_type: "qwen3"` is read as ours.

        Every z-lab drafter config says "qwen3" (with `architectures: ["DFlashDraftModel"]`); it is a DFlash config
        all the same, so `from_pretrained` should not warn that the types differ.
        """
        folder = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(folder):
            path = os.path.join(folder, kwargs.get("_configuration_file") or CONFIG_NAME)
            if not os.path.isfile(path):
                # transformers would return a default config here; a drafter without its config.json is unusable.
                raise OSError(f"{path} does not exist: a DFlash drafter folder needs its config.json.")
            _check_json_object(path)
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "qwen3" and "DFlashDraftModel" in (config_dict.get("architectures") or []):
            config_dict = dict(config_dict, model_type=cls.model_type)
        return config_dict, kwargs

    def _sync_legacy_rope_keys(self) -> None:
        """Write `rope_theta` / `rope_scaling` beside 5.x's `rope_parameters`.

        transformers 5.x saves only `rope_parameters` (and `"rope_theta": null`); 4.57 reads `rope_theta` and would
        silently fall back to 10000, so a drafter saved on 5.x must carry both spellings.
        """
        params = getattr(self, "rope_parameters", None)
        if not isinstance(params, dict) or params.get("rope_theta") is None:
            return
        if getattr(self, "rope_theta", None) is None:
            self.rope_theta = params["rope_theta"]
        if params.get("rope_type", "default") != "default" and getattr(self, "rope_scaling", None) is None:
            self.rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}

    def layer_is_causal(self, layer_idx: int) -> bool:
        """Sliding layers are causal, full layers bidirectional, unless `is_causal` overrides all (z-lab ref-v2)."""
        if self.is_causal is not None:
            return bool(self.is_causal)
        return self.layer_type(layer_idx) == "sliding_attention"

    def layer_type(self, layer_idx: int) -> str:
        return self.layer_types[layer_idx] if self.layer_types else "full_attention"

    def layer_window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_type(layer_idx) == "sliding_attention" else None


def _check_json_object(path: str) -> None:
    """A config.json that parses to a list, a string or a number is a ValueError here; transformers would fail on it
    with a TypeError or AttributeError deep inside its loader. Text that is not JSON at all is left to transformers,
    which reports it as an OSError naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, ValueError):
        return
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of settings; a DFlash drafter's "
                         "config.json is a JSON object (re-download or re-export the drafter).")


__all__ = ["DFlashConfig", "MAX_BLOCK_SIZE", "MAX_DRAFT_LAYERS", "build_target_layer_ids"]
