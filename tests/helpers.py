"""Tiny real transformers models for the tests: random weights, real classes, built in code."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GemmaTokenizer, LlamaConfig, Qwen3Config

from dflash_hf import DFlashConfig, DFlashDraftModel

VOCAB = 96
MASK_ID = 5  # a real vocabulary id, as for SmolLM2 and Gemma


def tiny_target(family: str = "qwen3", *, layers: int = 6, hidden: int = 64, vocab: int = VOCAB, seed: int = 0,
                eos: int = 2, dtype=torch.float32):
    """A random decoder-only LM of `family` ('qwen3', 'llama' or 'gemma3') small enough for CPU tests."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=eos, pad_token_id=0, tie_word_embeddings=True)
    if family == "qwen3":
        config = Qwen3Config(**common)
    elif family == "llama":
        config = LlamaConfig(**common)
    elif family == "gemma3":
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(**common, sliding_window=16, query_pre_attn_scalar=hidden // 4,
                                  final_logit_softcapping=30.0)
        # A mix of local and global layers, so sliding target caches are exercised.
        config.layer_types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(layers)]
    else:
        raise ValueError(family)
    config._attn_implementation = "eager" if family == "gemma3" else "sdpa"
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    # Sharper distributions than N(0, 0.02) so greedy paths are far from ties and drafts are sometimes right.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def tiny_drafter(target, *, layers: int = 2, block_size: int = 8, layer_ids=None, seed: int = 1,
                 layer_types=None, sliding_window=None, dtype=torch.float32, **extra) -> DFlashDraftModel:
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    torch.manual_seed(seed)
    ids = layer_ids if layer_ids is not None else [1, text.num_hidden_layers - 3]
    config = DFlashConfig(
        hidden_size=text.hidden_size, intermediate_size=2 * text.hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=text.hidden_size // 4, vocab_size=text.vocab_size,
        rms_norm_eps=1e-6, max_position_embeddings=512, block_size=block_size, layer_types=layer_types,
        sliding_window=sliding_window, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id, num_target_layers=text.num_hidden_layers,
        dflash_config={"mask_token_id": MASK_ID, "target_layer_ids": ids}, **extra,
    )
    return DFlashDraftModel(config).to(dtype).eval()


def greedy(target, input_ids, max_new_tokens, **kw):
    return target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                           max_new_tokens=max_new_tokens, **kw)


def random_prompt(length: int, seed: int = 0, vocab: int = VOCAB) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, vocab, (1, length), generator=g)
