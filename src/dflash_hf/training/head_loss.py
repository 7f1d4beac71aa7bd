"""Weighted cross-entropy through the target's frozen LM head, a chunk of rows at a time.

A training step drafts ~98K rows against a 49K vocabulary (SmolLM2, 64 sequences x 96 blocks): all logits at once
are 19 GB in fp32, written, read back by the softmax, and again for their gradient. The head is frozen, so the only
gradient needed is the one w.r.t. the drafter's hidden rows `[N, H]`. It is computed chunk by chunk during the forward
pass (logits, loss and gradient of one chunk, then the next) and only scaled in the backward pass: the logits of one
chunk exist at a time, and the result is the same loss and gradient as one big cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

# Logits elements per chunk (~1 GiB in fp32): large enough to keep the head matmul efficient. The row cap bounds the
# padding of a compiled step's last chunk when the vocabulary is small.
CHUNK_ELEMENTS = 2**28
MAX_CHUNK_ROWS = 8192


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a `vocab_size`-wide head: `CHUNK_ELEMENTS // vocab_size`, at most `MAX_CHUNK_ROWS`."""
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size))


def _chunk_loss(logits_fn, head, rows, targets, weights):
    """Weighted CE sum of one chunk of rows, and which rows' argmax is their target."""
    logits = logits_fn(rows, head).float()
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum(), logits.argmax(-1) == targets


_compiled_chunk_loss = None


def _chunk_loss_fn(compile: bool):
    # Compiled, the cast, softmax, loss and gradient of the logits become a few fused passes over a chunk instead of
    # a dozen eager ones; the logits are memory-bound, so that is most of the loss's time. Every chunk has the same
    # number of rows (the last one is padded), so one static compilation serves them all.
    global _compiled_chunk_loss
    if not compile:
        return _chunk_loss
    if _compiled_chunk_loss is None:
        _compiled_chunk_loss = torch.compile(_chunk_loss, dynamic=False)
    return _compiled_chunk_loss


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, weights, logits_fn, head, chunk_rows, compile):
        chunk_loss = _chunk_loss_fn(compile)
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.empty(targets.shape, dtype=torch.bool, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            piece, piece_targets, piece_weights = hidden[rows].detach(), targets[rows], weights[rows]
            n = piece.shape[0]
            if compile and n < chunk_rows:  # pad to the compiled shape: rows of weight 0 change nothing
                pad = chunk_rows - n
                piece = torch.cat([piece, piece.new_zeros(pad, piece.shape[1])])
                piece_targets = torch.cat([piece_targets, piece_targets.new_zeros(pad)])
                piece_weights = torch.cat([piece_weights, piece_weights.new_zeros(pad)])
            piece.requires_grad_(True)
            with torch.enable_grad():  # autograd.Function.forward runs without grad
                part, hits = chunk_loss(logits_fn, head, piece, piece_targets, piece_weights)
            (piece_grad,) = torch.autograd.grad(part, piece)
            grad[rows], correct[rows] = piece_grad[:n], hits[:n]
            total += part.detach()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None, None


def head_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    logits_fn: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor],
    head: torch.nn.Module,
    chunk_rows: int,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sum_i weights[i] * CE(logits_fn(hidden[i], head), targets[i])` and whether each row's argmax is its target.

    hidden `[N, H]` (differentiable), targets `[N]`, weights `[N]`; `logits_fn(rows, head)` maps `[n, H]` to `[n, V]`
    through the frozen `head` (gradients reach `hidden` only), `chunk_rows` rows at a time (`default_chunk_rows(V)`),
    with torch.compile if `compile` (every chunk then padded to `chunk_rows` rows, one compiled shape). Returns
    (scalar fp32 loss, bool `[N]`).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return _ChunkedHeadCrossEntropy.apply(hidden, targets, weights, logits_fn, head, int(chunk_rows), bool(compile))


__all__ = ["CHUNK_ELEMENTS", "MAX_CHUNK_ROWS", "default_chunk_rows", "head_cross_entropy"]
