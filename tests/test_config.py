"""DFlashConfig: z-lab's config layout, the spread rule, per-layer attention settings."""

from __future__ import annotations

import pytest

from dflash_hf import DFlashConfig, build_target_layer_ids

# Every published list (docs/DFLASH.md, "Context features"): (target depth L, number of ids n) -> ids.
PUBLISHED_IDS = [
    (36, 5, [1, 9, 17, 25, 33]),  # Qwen3-4B / 8B
    (32, 5, [1, 8, 15, 22, 29]),  # LLaMA-3.1-8B, Qwen3.5-4B / 9B
    (64, 5, [1, 16, 31, 46, 61]),  # Qwen3.5 / 3.6-27B
    (40, 5, [1, 10, 19, 28, 37]),  # Qwen3.5 / 3.6-35B-A3B
    (30, 6, [1, 6, 11, 17, 22, 27]),  # gemma-4-26B-A4B
    (60, 6, [1, 12, 23, 35, 46, 57]),  # gemma-4-31B
    (30, 5, [1, 8, 14, 20, 27]),  # the round-half-even example
]

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("depth, count, expected", PUBLISHED_IDS)
def test_spread_rule_reproduces_published_ids(depth, count, expected):
    assert build_target_layer_ids(depth, count) == expected


def test_spread_rule_edge_cases():
    assert build_target_layer_ids(36, 1) == [18]
    assert build_target_layer_ids(9, 1) == [4]
    # The ids stop at L-3: the last layer (replaced by the post-norm state in HF's tuple) is never read.
    for depth in range(5, 80):
        ids = build_target_layer_ids(depth, 5)
        assert ids[0] == 1 and ids[-1] == depth - 3 and ids == sorted(ids)
    with pytest.raises(ValueError, match="num_target_layers=3"):
        build_target_layer_ids(3, 5)


@pytest.mark.parametrize("depth, count, expected", PUBLISHED_IDS)
def test_missing_target_layer_ids_fall_back_to_spread_rule(depth, count, expected):
    # z-lab's fallback uses as many ids as draft layers.
    config = DFlashConfig(**SMALL, num_hidden_layers=count, num_target_layers=depth, dflash_config={"mask_token_id": 4})
    assert config.target_layer_ids == expected
    assert config.dflash_config["target_layer_ids"] == expected
    # An explicit count overrides the draft depth (gemma: 6 ids, 5 layers).
    config = DFlashConfig(**SMALL, num_hidden_layers=5, num_target_layers=depth, num_context_layers=count)
    assert config.target_layer_ids == expected


def test_zlab_nested_keys_are_exposed_top_level():
    config = DFlashConfig(
        **SMALL, num_hidden_layers=5, block_size=16, num_target_layers=30,
        dflash_config={"mask_token_id": 4, "target_layer_ids": [1, 6, 11, 17, 22, 27], "final_logit_softcapping": 30.0},
    )
    assert config.mask_token_id == 4
    assert config.target_layer_ids == [1, 6, 11, 17, 22, 27]
    assert config.final_logit_softcapping == 30.0
    assert config.block_size == 16
    assert config.num_context_layers == 6
    assert config.model_type == "dflash_draft"


def test_nested_dflash_config_wins_over_top_level():
    config = DFlashConfig(
        **SMALL, num_hidden_layers=2, block_size=16, mask_token_id=7, output_multiplier=2.0, input_embedding_scale=3.0,
        dflash_config={"mask_token_id": 4, "target_layer_ids": [1, 2], "block_size": 8, "output_multiplier": 0.5},
    )
    assert (config.mask_token_id, config.block_size, config.output_multiplier) == (4, 8, 0.5)
    # Keys only at the top level are still read.
    assert config.input_embedding_scale == 3.0


def test_optional_keys_at_top_level():
    config = DFlashConfig(**SMALL, num_hidden_layers=2, final_logit_softcapping=30.0, output_multiplier=0.25,
                          input_embedding_scale=5.0, is_causal=False,
                          dflash_config={"mask_token_id": 4, "target_layer_ids": [0, 1]})
    assert config.final_logit_softcapping == 30.0
    assert config.output_multiplier == 0.25
    assert config.input_embedding_scale == 5.0
    assert config.is_causal is False


def test_layer_types_sliding_window_kept_without_use_sliding_window():
    # Released gemma / Qwen3.6 drafters mark sliding layers through layer_types only (use_sliding_window false).
    types = ["sliding_attention"] * 4 + ["full_attention"]
    config = DFlashConfig(**SMALL, num_hidden_layers=5, layer_types=types, sliding_window=2048,
                          use_sliding_window=False, dflash_config={"mask_token_id": 4, "target_layer_ids": [1, 2]})
    assert config.sliding_window == 2048
    assert [config.layer_window(i) for i in range(5)] == [2048] * 4 + [None]
    # ref-v2: sliding layers are causal, full layers bidirectional ...
    assert [config.layer_is_causal(i) for i in range(5)] == [True] * 4 + [False]
    # ... unless is_causal overrides every layer (DFlash2 configs write is_causal: false).
    forced = DFlashConfig(**SMALL, num_hidden_layers=5, layer_types=types, sliding_window=2048, is_causal=False)
    assert [forced.layer_is_causal(i) for i in range(5)] == [False] * 5
    forced = DFlashConfig(**SMALL, num_hidden_layers=5, layer_types=types, sliding_window=2048,
                          dflash_config={"is_causal": True})
    assert [forced.layer_is_causal(i) for i in range(5)] == [True] * 5


def test_missing_layer_types_means_all_full():
    config = DFlashConfig(**SMALL, num_hidden_layers=3, dflash_config={"mask_token_id": 4, "target_layer_ids": [0]})
    assert [config.layer_type(i) for i in range(3)] == ["full_attention"] * 3
    assert [config.layer_is_causal(i) for i in range(3)] == [False] * 3


def test_sliding_layers_without_window_are_rejected():
    with pytest.raises(ValueError, match="sliding_window"):
        DFlashConfig(**SMALL, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])


def test_default_config_and_dict_round_trip():
    assert DFlashConfig().target_layer_ids is None  # transformers instantiates the class bare for diffs
    config = DFlashConfig(**SMALL, num_hidden_layers=2, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                          dflash_config={"mask_token_id": 4, "target_layer_ids": [1, 3]})
    again = DFlashConfig.from_dict(config.to_dict())
    for key in ("target_layer_ids", "mask_token_id", "block_size", "layer_types", "sliding_window", "vocab_size",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(again, key) == getattr(config, key), key
    # Saved in both places, so vLLM / SGLang / z-lab code (nested) and transformers' native route (top level) read it.
    saved = config.to_dict()
    assert saved["dflash_config"] == {"mask_token_id": 4, "target_layer_ids": [1, 3]}
    assert saved["mask_token_id"] == 4 and saved["target_layer_ids"] == [1, 3]


@pytest.mark.parametrize("field, value, needles", [
    ("block_size", 200000, ("block_size 200000", "outside 2..1024")),
    ("block_size", 0, ("block_size 0", "outside 2..1024")),
    ("num_hidden_layers", 200000, ("num_hidden_layers 200000", "outside 1..256")),
    ("num_hidden_layers", 0, ("num_hidden_layers 0", "outside 1..256")),
    ("block_size", "16", ("block_size must be an integer in 2..1024", "'16' (str)")),
    ("mask_token_id", "abc", ("mask_token_id must be an integer", "'abc' (str)")),
    ("mask_token_id", True, ("mask_token_id must be an integer", "True (bool)")),
])
def test_sizes_and_ids_outside_their_bounds_are_rejected_by_name(field, value, needles):
    with pytest.raises(ValueError) as info:
        DFlashConfig(**SMALL, **{field: value})
    assert all(needle in str(info.value) for needle in needles), str(info.value)
    if field == "mask_token_id":  # the z-lab nested form is checked the same way
        with pytest.raises(ValueError, match="mask_token_id must be an integer"):
            DFlashConfig(**SMALL, dflash_config={"mask_token_id": value})


def test_the_bounds_themselves_are_accepted():
    from dflash_hf.modeling.configuration_dflash import MAX_BLOCK_SIZE, MAX_DRAFT_LAYERS

    config = DFlashConfig(**SMALL, block_size=MAX_BLOCK_SIZE, num_hidden_layers=MAX_DRAFT_LAYERS, mask_token_id=0)
    assert (config.block_size, config.num_hidden_layers, config.mask_token_id) == (1024, 256, 0)
    assert DFlashConfig(**SMALL, block_size=2, num_hidden_layers=1).block_size == 2
