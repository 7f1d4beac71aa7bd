"""Released z-lab checkpoints load as they are; what we save keeps their layout.

Each test writes a real folder: config.json as z-lab ships it (model_type "qwen3", auto_map to
`dflash.DFlashDraftModel`, nested dflash_config), a bf16 model.safetensors with the released names and shapes, and
our remote-code files.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ZLAB_SPECS, greedy, random_prompt, target_for_spec, write_zlab_checkpoint, zlab_config_dict
from safetensors.torch import load_file
from transformers import AutoModel

from dflash_hf import DFlashDraftModel

RELEASED_KEY_SUFFIXES = {
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
}


def released_keys(num_layers: int) -> set[str]:
    return {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
        f"layers.{i}.{s}" for i in range(num_layers) for s in RELEASED_KEY_SUFFIXES
    }


def load_both(folder):
    """AutoModel with trust_remote_code (runs the copied remote code) and our class directly."""
    auto = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    direct, info = DFlashDraftModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    return auto, direct, info


@pytest.mark.parametrize("name", list(ZLAB_SPECS))
def test_released_checkpoint_loads_as_is(tmp_path, name, caplog):
    spec = ZLAB_SPECS[name]
    config = zlab_config_dict(spec)
    tensors = write_zlab_checkpoint(tmp_path, config)
    auto, direct, info = load_both(tmp_path)
    assert "to instantiate a model of type" not in caplog.text  # model_type "qwen3" is expected here

    assert type(auto).__name__ == "DFlashDraftModel"
    assert type(auto).__module__.startswith("transformers_modules")  # the copied remote code, not the package
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    for model in (auto, direct):
        c = model.config
        assert c.target_layer_ids == spec["target_layer_ids"]
        assert c.mask_token_id == spec["mask_token_id"]
        assert c.block_size == 16
        assert c.num_target_layers == spec["target_layers"]
        assert c.layer_types == spec["layer_types"]
        assert c.sliding_window == spec["sliding_window"]
        assert c.final_logit_softcapping == spec["extra"].get("final_logit_softcapping")
        assert (c.vocab_size, c.bos_token_id, c.eos_token_id, c.pad_token_id) == (
            config["vocab_size"], *spec["special"].values())
        # Sliding layers causal with the window, full layers bidirectional.
        attn = [layer.self_attn for layer in model.layers]
        assert [a.is_causal for a in attn] == [t == "sliding_attention" for t in spec["layer_types"]]
        assert [a.sliding_window for a in attn] == [
            spec["sliding_window"] if t == "sliding_attention" else None for t in spec["layer_types"]]
        # Every released tensor, bit for bit, and nothing else (no embedding, no head, no mask embedding).
        state = model.state_dict()
        assert set(state) == set(tensors) == released_keys(len(spec["layer_types"]))
        for key, value in tensors.items():
            assert torch.equal(state[key], value.float()), key
        assert model.get_input_embeddings() is None
    # The rope settings reach the rotary embedding (5.x builds the model on the meta device, so the non-persistent
    # inv_freq buffer must be recomputed after loading, not left empty).
    hd = config["head_dim"]
    expected = 1.0 / spec["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    for model in (auto, direct):
        torch.testing.assert_close(model.rotary_emb.inv_freq, expected)


@pytest.mark.parametrize("name", list(ZLAB_SPECS))
def test_released_checkpoint_drafts_for_its_target(tmp_path, name):
    """Loaded from the folder, the drafter runs inside target.generate and stays lossless (greedy, fp32)."""
    spec = ZLAB_SPECS[name]
    write_zlab_checkpoint(tmp_path, zlab_config_dict(spec))
    drafter = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    target = target_for_spec(spec)
    prompt = random_prompt(6, seed=1)
    expected = greedy(target, prompt, 12)
    assert torch.equal(greedy(target, prompt, 12, assistant_model=drafter), expected)
    assert sum(drafter.last_stats.acceptance_lengths) == expected.shape[1] - prompt.shape[1] - 1


def test_optional_keys_at_top_level_and_yarn(tmp_path):
    """ref-v2 reads the optional keys from dflash_config first, then the top level; YaRN rope_scaling is kept."""
    spec = ZLAB_SPECS["gemma-4-26b-a4b"]
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    config = zlab_config_dict(spec, nest_extras=False, rope_scaling=yarn)
    config["output_multiplier"] = 0.5
    config["input_embedding_scale"] = 5.656854
    write_zlab_checkpoint(tmp_path, config)
    auto = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    assert auto.config.final_logit_softcapping == 30.0
    assert auto.config.output_multiplier == 0.5
    assert auto.config.input_embedding_scale == pytest.approx(5.656854)
    assert auto.rotary_emb.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)


def test_missing_target_layer_ids_use_the_spread_rule(tmp_path):
    spec = ZLAB_SPECS["qwen3-8b-b16"]
    config = zlab_config_dict(spec)
    del config["dflash_config"]["target_layer_ids"]  # fc still has 5 x hidden inputs: 5 draft layers -> 5 ids
    write_zlab_checkpoint(tmp_path, config)
    assert "target_layer_ids" not in json.loads((tmp_path / "config.json").read_text())["dflash_config"]
    auto, direct, info = load_both(tmp_path)
    assert auto.config.target_layer_ids == direct.config.target_layer_ids == [1, 9, 17, 25, 33]
    assert not info["missing_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("name", ["qwen3-8b-b16", "gemma-4-26b-a4b"])
def test_save_pretrained_keeps_released_layout(tmp_path, name):
    spec = ZLAB_SPECS[name]
    tensors = write_zlab_checkpoint(tmp_path / "released", zlab_config_dict(spec))
    drafter = AutoModel.from_pretrained(tmp_path / "released", trust_remote_code=True)  # bf16 as stored (5.x)
    drafter = drafter.to(torch.bfloat16)
    drafter.save_pretrained(tmp_path / "saved")

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(tensors)  # no prefix, no embed_tokens, no lm_head
    for key, value in tensors.items():
        assert torch.equal(saved[key], value), key
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["dflash_config"]["mask_token_id"] == spec["mask_token_id"]
    assert config["dflash_config"]["target_layer_ids"] == spec["target_layer_ids"]
    assert config["block_size"] == 16 and config["layer_types"] == spec["layer_types"]
    assert config["architectures"] == ["DFlashDraftModel"]
    assert {"configuration_dflash.py", "modeling_dflash.py", "generation_dflash.py"} <= {
        p.name for p in (tmp_path / "saved").iterdir()}

    # The saved folder loads back through AutoModel (remote code) and computes the same thing.
    again = AutoModel.from_pretrained(tmp_path / "saved", trust_remote_code=True, dtype=torch.float32)
    drafter = AutoModel.from_pretrained(tmp_path / "released", trust_remote_code=True, dtype=torch.float32)
    assert again.config.sliding_window == spec["sliding_window"]
    g = torch.Generator().manual_seed(0)
    hidden = again.config.hidden_size
    noise = torch.randn(1, 16, hidden, generator=g)
    feats = torch.randn(1, 20, len(spec["target_layer_ids"]) * hidden, generator=g)
    positions = torch.arange(36)[None]
    with torch.no_grad():
        a = drafter(noise_embeds=noise, context_hidden_states=feats, position_ids=positions).last_hidden_state
        b = again(noise_embeds=noise, context_hidden_states=feats, position_ids=positions).last_hidden_state
    torch.testing.assert_close(a, b)
