"""A fused, chunked LM-head loss: per-token CE, p(label), max probability and argmax without (N, V) tensors.

The deep supervision scores every refinement step at every supervised position through the backbone's LM head.
At LLaDA's vocabulary (126,464) a plain `log_softmax(lm_head(u))` keeps an (N, V) fp32 tensor per step for
backward. `lm_head_scores` instead walks over the N rows in token chunks: logits of one chunk in the LM head's
compute dtype (bf16 matmul with fp32 accumulation on GPU), softmax statistics in fp32, then the chunk is freed.

Backward needs d CE / d u = (softmax - onehot(label)) @ W per row, times the incoming gradient of that row's CE
(a scalar per row). With a frozen LM head that (N, d) matrix is computed in the forward pass, while the chunk's
logits are at hand, so backward is one multiplication and the logits are never formed twice. When the LM head's
weight is trained, backward recomputes each chunk's logits instead (its gradient needs the full softmax).
The loss and gradients equal the plain computation (tests/test_lm_head_loss.py, float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# fp32 logits of one token chunk stay under this size (256 MiB: about 530 tokens at LLaDA's vocabulary).
CHUNK_BYTES = 256 * 2**20


@dataclass
class TokenScores:
    ce: Tensor  # (N,) fp32 cross-entropy against the label, differentiable; zeros without labels
    label_prob: Tensor  # (N,) p(label), detached; zeros without labels
    max_prob: Tensor  # (N,) largest softmax probability, detached
    prediction: Tensor  # (N,) argmax, long


def rows_per_chunk(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab_size))


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the LM head's matmul runs in: autocast's when it is on for the weight's device, else the weight's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_logits(inputs: Tensor, weight: Tensor) -> Tensor:
    """fp32 logits of one token chunk; inputs and weight are already in the compute dtype."""
    return F.linear(inputs, weight).float()


def _softmax_minus_onehot(logits: Tensor, log_normaliser: Tensor, targets: Tensor) -> Tensor:
    """d CE / d logits of a chunk, in place over its fp32 logits."""
    probs = logits.sub_(log_normaliser[:, None]).exp_()
    return probs.scatter_add_(1, targets[:, None], probs.new_full((len(targets), 1), -1.0))


class _ChunkedLMHeadScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: Tensor, weight: Tensor, targets: Tensor, rows: int, grad_enabled: bool):
        dtype = inputs.dtype
        count = inputs.shape[0]
        ce = inputs.new_empty(count, dtype=torch.float32)
        label_prob, max_prob = torch.empty_like(ce), torch.empty_like(ce)
        prediction = torch.empty(count, dtype=torch.long, device=inputs.device)
        log_normaliser = torch.empty_like(ce)
        # With a frozen LM head the gradient of u can be finished now, while the chunk's logits exist.
        # (needs_input_grad is set under no_grad too, hence grad_enabled from the caller.)
        early_grad = grad_enabled and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        grad_direction = torch.empty_like(inputs) if early_grad else None
        for start in range(0, count, rows):
            part = slice(start, start + rows)
            logits = _chunk_logits(inputs[part], weight)
            lse = torch.logsumexp(logits, dim=-1)
            max_logit, prediction[part] = logits.max(dim=-1)
            ce[part] = lse - logits.gather(1, targets[part, None]).squeeze(1)
            max_prob[part] = (max_logit - lse).exp()
            log_normaliser[part] = lse
            if early_grad:
                grad_direction[part] = _softmax_minus_onehot(logits, lse, targets[part]).to(dtype) @ weight
        label_prob.copy_((-ce).exp())
        ctx.rows, ctx.early_grad = rows, early_grad
        if early_grad:
            ctx.save_for_backward(grad_direction)
        else:
            ctx.save_for_backward(inputs, weight, targets, log_normaliser)
        ctx.mark_non_differentiable(label_prob, max_prob, prediction)
        return ce, label_prob, max_prob, prediction

    @staticmethod
    def backward(ctx, grad_ce, *unused):
        if ctx.early_grad:
            (grad_direction,) = ctx.saved_tensors
            grad_inputs = (grad_ce[:, None] * grad_direction.float()).to(grad_direction.dtype)
            return grad_inputs, None, None, None, None
        inputs, weight, targets, log_normaliser = ctx.saved_tensors
        grad_inputs = torch.empty_like(inputs) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, inputs.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            logits = _chunk_logits(inputs[part], weight)
            grad_logits = _softmax_minus_onehot(logits, log_normaliser[part], targets[part])
            grad_logits = grad_logits.mul_(grad_ce[part, None]).to(inputs.dtype)
            if grad_inputs is not None:
                grad_inputs[part] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ inputs[part]).float()  # chunk partials summed in fp32
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_inputs, grad_weight, None, None, None


def lm_head_scores(inputs: Tensor, weight: Tensor, targets: Tensor | None, chunk_bytes: int = CHUNK_BYTES
                   ) -> TokenScores:
    """Scores of the LM head `weight` (V, d) on `inputs` (N, d) against `targets` (N,) or None (no labels).

    The same values as fp32 `log_softmax(F.linear(inputs, weight))` read at the label and at the maximum, with
    the matmul in the compute dtype (autocast's, else the weight's); only CE carries a gradient.
    """
    dtype = compute_dtype(weight)
    rows = rows_per_chunk(weight.shape[0], chunk_bytes)
    labelled = targets is not None
    if not labelled:
        targets = torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
    with torch.autocast(inputs.device.type, enabled=False):
        ce, label_prob, max_prob, prediction = _ChunkedLMHeadScores.apply(
            inputs.to(dtype), weight.to(dtype), targets, rows, torch.is_grad_enabled()
        )
    if not labelled:
        zeros = torch.zeros_like(max_prob)
        return TokenScores(zeros, zeros, max_prob, prediction)
    return TokenScores(ce, label_prob, max_prob, prediction)
