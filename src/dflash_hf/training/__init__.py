"""Training DFlash drafters: data from the target's own answers, the published recipe, evaluation of tau.

    >>> from dflash_hf.training import make_data, new_drafter_config, train_drafter
    >>> config = new_drafter_config(target, num_layers=4, tokenizer=tokenizer)
    >>> drafter = DFlashDraftModel(config)
    >>> result = train_drafter(target, drafter, "data.jsonl", epochs=6, output_dir="run")

`train_drafter` also takes token-id sequences held in memory (a list of lists or 1-D tensors, with the loss on every
token after the first), which is how tests get a small trained drafter quickly:

    >>> seqs = generate_responses(target, prompts, max_new_tokens=48, batch_size=8, pad_token_id=0)
    >>> train_drafter(target, drafter, [p + r for p, r in zip(prompts, seqs)], max_steps=60, num_anchors=16)
"""

from .data import as_examples, encode_prompt, generate_responses, load_jsonl, make_data, pad_token_id
from .packed import PackedDrafter, layer_attention_masks, packed_visibility
from .recipe import (
    TrainResult,
    count_parameters,
    default_gamma,
    evaluate_tau,
    new_drafter_config,
    pack_blocks,
    packed_loss,
    pick_mask_token_id,
    plot_curves,
    sample_anchors,
    save_drafter,
    target_features,
    train_drafter,
)

__all__ = [
    "PackedDrafter", "TrainResult", "as_examples", "count_parameters", "default_gamma", "encode_prompt",
    "evaluate_tau", "generate_responses", "layer_attention_masks", "load_jsonl", "make_data", "new_drafter_config",
    "pack_blocks", "packed_loss", "packed_visibility", "pad_token_id", "pick_mask_token_id", "plot_curves",
    "sample_anchors", "save_drafter", "target_features", "train_drafter",
]
