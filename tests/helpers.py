"""Tiny real transformers models for the tests: random weights, real classes, built in code.

- `tiny_target(family)`: a random Qwen3 / LLaMA / Gemma3 causal LM small enough for CPU tests.
- `tiny_drafter(target)`: a random `DFlashDraftModel` that fits `target`.
- `OracleDrafter`: a drafter that drafts the target's own greedy continuation (drives the multi-token accept paths).
- `tiny_tokenizer()`: a real word-level fast tokenizer over the tiny vocabulary, built offline.
- `write_zlab_checkpoint(folder, spec)`: a folder laid out like a released z-lab drafter (config.json, safetensors,
  remote-code files), from the `ZLAB_SPECS` shapes (tiny versions of docs/DFLASH.md, "Released checkpoint shapes").
"""

from __future__ import annotations

import copy
import json
import shutil
import string
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from dflash_hf import DFlashConfig, DFlashDraftModel
from dflash_hf.export import remote_code_files
from dflash_hf.modeling.generation_dflash import embed_block

VOCAB = 96
MASK_ID = 5  # a real vocabulary id, as for SmolLM2 and Gemma



def tiny_target(family: str = "qwen3", *, layers: int = 6, hidden: int = 64, vocab: int = VOCAB, seed: int = 0,
                eos: int = 2, dtype=torch.float32, attn_implementation: str | None = None, heads: int = 4,
                tie: bool = False):
    """A random decoder-only LM of `family` ('qwen3', 'llama' or 'gemma3') small enough for CPU tests.

    Untied and rescaled so that greedy paths are varied (a tied, sharp head mostly repeats the current token) and far
    from ties (fp32 top-1/top-2 margins of 1e-3 and more, against ~1e-6 of verify-vs-step numerical noise).
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), head_dim=hidden // heads,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=eos, pad_token_id=0,
                  tie_word_embeddings=tie)
    if family == "qwen3":
        config = Qwen3Config(**common)
    elif family == "llama":
        config = LlamaConfig(**common)
    elif family == "gemma3":
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(**common, sliding_window=16, query_pre_attn_scalar=hidden // heads,
                                  final_logit_softcapping=30.0)
        # A mix of local and global layers, so sliding target caches are exercised.
        config.layer_types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(layers)]
    else:
        raise ValueError(family)
    config._attn_implementation = attn_implementation or ("eager" if family == "gemma3" else "sdpa")
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0 if ("embed" in name or "lm_head" in name) else 2.0)
    return model


def tiny_drafter(target, *, layers: int = 2, block_size: int = 8, layer_ids=None, seed: int = 1,
                 layer_types=None, sliding_window=None, dtype=torch.float32, mask_token_id: int = MASK_ID,
                 cls=None, **extra) -> DFlashDraftModel:
    """A random drafter that fits `target` (same hidden size, ids inside its depth, its special token ids)."""
    text = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    torch.manual_seed(seed)
    ids = layer_ids if layer_ids is not None else [1, text.num_hidden_layers - 3]
    config = DFlashConfig(
        hidden_size=text.hidden_size, intermediate_size=2 * text.hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=text.hidden_size // 4, vocab_size=text.vocab_size,
        rms_norm_eps=1e-6, max_position_embeddings=512, block_size=block_size, layer_types=layer_types,
        sliding_window=sliding_window, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id, num_target_layers=text.num_hidden_layers,
        dflash_config={"mask_token_id": mask_token_id, "target_layer_ids": ids}, **extra,
    )
    return (cls or DFlashDraftModel)(config).to(dtype).eval()


class OracleDrafter(DFlashDraftModel):
    """Test double that drafts what the target itself would say, to drive the accept paths deterministically.

    Random tiny drafters almost never guess right (tau == 1 every step), which would leave multi-token acceptance,
    an EOS inside a block, `max_new_tokens` inside a block and the bonus after a fully accepted block untested. This
    drafter runs the real DFlash forward (so the draft cache, masks and positions are exercised as usual) and then
    overwrites block rows 1..B-1 of what it returns with the target's own final normed hidden states along its
    greedy continuation of the committed prefix. The drafter's `compute_logits` applies the target LM head to what
    `forward` returns, so row k becomes exactly the token the target would produce at position `start + k`.

    `corrupt_every=c` (c >= 1) negates every row k with `k % c == 0`, so the head turns it into a wrong token (the
    argmin): acceptance then stops at that row and partial acceptance is exercised deterministically (tau <= c).

    How it knows the committed prefix: a forward pre-hook on the target records the ids it is fed at each position
    (the prompt at prefill, then each verified block); every position below the block start is committed. The anchor
    (block row 0, not yet fed to the target) is read back from the noise embedding as the nearest embedding row.
    Rollouts run on a private copy of the target, so they never fire hooks installed on the target itself. Call
    `close()` (or use it as a context manager) to remove the pre-hook.
    """

    def __init__(self, config, target, corrupt_every: int = 0):
        super().__init__(config)
        # Kept out of the module tree: not a parameter of the drafter, not moved by `.to()`, no hooks on it.
        self.__dict__["_reference"] = copy.deepcopy(target).eval()
        self.corrupt_every = corrupt_every
        self._seen: dict[int, int] = {}
        self._embedding_table: torch.Tensor | None = None
        self._handle = target.register_forward_pre_hook(self._record, with_kwargs=True)

    @classmethod
    def for_target(cls, target, *, corrupt_every: int = 0, **tiny_drafter_kwargs) -> "OracleDrafter":
        """Same shapes and random weights as `tiny_drafter(target, **tiny_drafter_kwargs)`."""
        base = tiny_drafter(target, **tiny_drafter_kwargs)
        oracle = cls(base.config, target, corrupt_every)
        oracle.load_state_dict(base.state_dict())
        return oracle.to(next(base.parameters()).dtype).eval()

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "OracleDrafter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = kwargs["cache_position"][None]
        for pos, tok in zip(positions[0].tolist(), ids[0].tolist()):
            self._seen[pos] = tok

    def _anchor_id(self, embedding: torch.Tensor) -> int:
        if self._embedding_table is None:
            vocab = self._reference.get_input_embeddings().weight.shape[0]
            self._embedding_table = embed_block(self, self._reference, torch.arange(vocab)[None])[0]
        return int((self._embedding_table - embedding.to(self._embedding_table.dtype)).norm(dim=-1).argmin())

    @torch.no_grad()
    def _greedy_rows(self, prefix: list[int], count: int) -> torch.Tensor:
        """`[count, hidden]`: the target's final normed hidden state before each of its next `count` greedy tokens."""
        reference = self._reference
        ids = torch.tensor([prefix])
        rows = []
        for _ in range(count):
            hidden = reference.get_decoder()(input_ids=ids).last_hidden_state[:, -1]  # [1, hidden]
            token = reference.get_output_embeddings()(hidden).argmax(-1, keepdim=True)
            rows.append(hidden[0])
            ids = torch.cat([ids, token], dim=1)
        return torch.stack(rows)

    def forward(self, noise_embeds=None, context_hidden_states=None, position_ids=None, *args, noise_embedding=None,
                **kwargs):
        out = super().forward(noise_embeds, context_hidden_states, position_ids, *args,
                              noise_embedding=noise_embedding, **kwargs)
        noise = noise_embedding if noise_embedding is not None else noise_embeds
        block = noise.shape[1]
        start = int(position_ids[0, -block])
        prefix = [self._seen[i] for i in range(start)] + [self._anchor_id(noise[0, 0])]
        hidden = (out if torch.is_tensor(out) else out.last_hidden_state).clone()
        hidden[0, 1:] = self._greedy_rows(prefix, block - 1).to(hidden.dtype)
        if self.corrupt_every:
            for k in range(self.corrupt_every, block, self.corrupt_every):
                hidden[0, k] = -hidden[0, k]
        if torch.is_tensor(out):
            return hidden
        out.last_hidden_state = hidden
        return out


def greedy(target, input_ids, max_new_tokens, **kw):
    return target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                           max_new_tokens=max_new_tokens, **kw)


class StopAfterToken:
    """A user stopping criterion (transformers' protocol): stops a row once `token` appears after `prompt_len`
    positions. Not an EOS id, so only the generic criteria path can stop there."""

    def __init__(self, token: int, prompt_len: int):
        self.token, self.prompt_len = token, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_len :] == self.token).any(-1)


def run_main(args, capsys) -> tuple[int, str, str]:
    """`(exit code, stdout, stderr)` of the console script's entry point run in-process (argparse errors exit
    through SystemExit)."""
    from dflash_hf.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Prompts (`[1, n]` or `[n]` each) -> left-padded `(input_ids, attention_mask)` `[batch, longest]`."""
    rows = [p.reshape(-1) for p in prompts]
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - row.numel():], mask[r, width - row.numel():] = row, 1
    return ids, mask


def assert_pipeline_matches_plain(target, drafter, prompts: list[torch.Tensor], max_new_tokens: int) -> None:
    """`pipeline(..., assistant_model=drafter)` on the decoded prompts, one left-padded batch, gives the texts of the
    plain pipeline run one prompt at a time."""
    from transformers import pipeline

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    texts = [tokenizer.decode(p.reshape(-1)) for p in prompts]
    reference = pipeline("text-generation", model=target, tokenizer=tokenizer)
    assisted = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)
    got = assisted(texts, max_new_tokens=max_new_tokens, do_sample=False, batch_size=len(texts))
    assert [g[0]["generated_text"] for g in got] == [
        reference(t, max_new_tokens=max_new_tokens, do_sample=False)[0]["generated_text"] for t in texts]


def random_prompt(length: int, seed: int = 0, vocab: int = VOCAB) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, vocab, (1, length), generator=g)


def first_new_token_after(sequence: list[int], index: int, block: int | None = None) -> tuple[int, int]:
    """(position, id) of the first token at or after `index` that does not occur before it: a token that, used as
    EOS, stops greedy generation exactly there.

    With `block`, only positions strictly inside a block of a fully accepting drafter qualify: position 0 comes
    from the prefill and each block then commits positions `1 + k*block ... (k+1)*block`, so positions `p` with
    `p % block` in {0, 1} (the bonus, or the first draft) are skipped.
    """
    for pos in range(index, len(sequence)):
        if block is not None and pos % block in (0, 1):
            continue
        if sequence[pos] not in sequence[:pos]:
            return pos, sequence[pos]
    raise AssertionError(f"no new token after index {index} in {sequence}")


def tiny_tokenizer(vocab: int = VOCAB):
    """A real `PreTrainedTokenizerFast` (tokenizers WordLevel) over ids 0..vocab-1: '<pad>' 0, '<bos>' 1, '<eos>' 2,
    '<unk>' 3, then words 'w4' ... Built offline, no Hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, as a word-level decoder should
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


# ----------------------------------------------------------------------------------------------------------------------
# Released z-lab checkpoints, in tiny
# ----------------------------------------------------------------------------------------------------------------------

# Tiny versions of the released checkpoints (docs/DFLASH.md): the published target depth, ids, mask id, layer types and extras; small widths.
ZLAB_SPECS = {
    "qwen3-8b-b16": dict(
        target_layers=36, target_layer_ids=[1, 9, 17, 25, 33], mask_token_id=VOCAB - 1,  # past the real tokens
        layer_types=["full_attention"] * 5, sliding_window=None, extra={}, rope_theta=1e6, tie=True,
        special=dict(bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
    "qwen3.5-27b": dict(
        target_layers=64, target_layer_ids=[1, 16, 31, 46, 61], mask_token_id=VOCAB - 2,
        layer_types=["full_attention"] * 5, sliding_window=None, extra={}, rope_theta=1e7, tie=False,
        special=dict(bos_token_id=1, eos_token_id=2, pad_token_id=2),  # eos == pad, as released
    ),
    "gemma-4-26b-a4b": dict(
        target_layers=30, target_layer_ids=[1, 6, 11, 17, 22, 27], mask_token_id=4,  # a real token
        layer_types=["sliding_attention"] * 4 + ["full_attention"], sliding_window=6,
        extra={"final_logit_softcapping": 30.0}, rope_theta=1e6, tie=True,
        special=dict(bos_token_id=2, eos_token_id=1, pad_token_id=0),
    ),
}


def zlab_config_dict(spec: dict, *, hidden: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = VOCAB,
                     nest_extras: bool = True, rope_scaling: dict | None = None) -> dict:
    """config.json as z-lab ships it: a plain Qwen3 config (model_type "qwen3") plus DFlash extras."""
    dflash = {"mask_token_id": spec["mask_token_id"], "target_layer_ids": spec["target_layer_ids"]}
    config = {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3",
        "block_size": 16,
        "num_target_layers": spec["target_layers"],
        "dflash_config": dflash,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": len(spec["layer_types"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": spec["rope_theta"],
        "rope_scaling": rope_scaling,
        "max_position_embeddings": 4096,
        "vocab_size": vocab,
        "tie_word_embeddings": spec["tie"],
        "layer_types": spec["layer_types"],
        "sliding_window": spec["sliding_window"],
        "use_sliding_window": False,
        "max_window_layers": len(spec["layer_types"]),
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "bfloat16",
        "transformers_version": "4.57.1",
        **spec["special"],
    }
    (dflash if nest_extras else config).update(spec["extra"])
    return config


def zlab_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the released names and shapes (docs/DFLASH.md, "Released config and weight layout"), bf16, no prefix, no embedding or head."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    n_ids = len(config["dflash_config"].get("target_layer_ids") or [0] * config["num_hidden_layers"])

    def w(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"fc.weight": w(hidden, n_ids * hidden), "hidden_norm.weight": norm(hidden), "norm.weight": norm(hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": w(q_out, hidden), p + "self_attn.k_proj.weight": w(kv_out, hidden),
            p + "self_attn.v_proj.weight": w(kv_out, hidden), p + "self_attn.o_proj.weight": w(hidden, q_out),
            p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": norm(hidden), p + "post_attention_layernorm.weight": norm(hidden),
        }
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def copy_remote_code(folder: str | Path) -> None:
    """Put our remote-code .py files next to a checkpoint, as a Hub repo (and `dflash-hf export`) ships them."""
    for path in remote_code_files():
        shutil.copy(path, Path(folder) / path.name)


def write_zlab_checkpoint(folder: str | Path, config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write config.json, model.safetensors and the remote code; return the saved tensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = zlab_state_dict(config, seed)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    copy_remote_code(folder)
    return tensors


def target_for_spec(spec: dict, *, hidden: int = 32, heads: int = 4, seed: int = 0):
    """A tiny random Qwen3 target that a drafter of `spec` fits (published depth, same special ids)."""
    model = tiny_target("qwen3", layers=spec["target_layers"], hidden=hidden, heads=heads, seed=seed,
                        eos=spec["special"]["eos_token_id"], tie=spec["tie"])
    model.config.bos_token_id = spec["special"]["bos_token_id"]
    model.config.pad_token_id = spec["special"]["pad_token_id"]
    model.generation_config.bos_token_id = spec["special"]["bos_token_id"]
    model.generation_config.pad_token_id = spec["special"]["pad_token_id"]
    return model


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chat_tokenizer():
    """A real character-level fast tokenizer with a ChatML template, built offline (102 tokens: 5 specials, then
    printable characters). `<|spare|>` (id 4) is a special token that no template or stop rule uses."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|spare|>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|spare|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer
