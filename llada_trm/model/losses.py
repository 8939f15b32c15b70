"""The deep-supervision loss: unshifted CE at every refinement step, chunk weights, globally normalised.

    L_s = sum_t tau_t c_t w_t l_{s,t} / N,  N = sum_t tau_t c_t over the *global* batch
    L   = sum_s a_s L_s / sum_s a_s,        a_s = s (linear) or 1 (uniform)

tau (truncation keep-mask) and w (token weights) are detached. Because L is linear in the per-token terms,
the trainer can back-propagate the un-normalised sum of each micro-batch and divide the gradients by the
global N once it is known: the gradient then does not depend on how the batch was split.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llada_trm.data.collator import positions_in_masked_chunks


def chunk_token_weights(
    chunk_index: Tensor, chunk_is_masked: Tensor, deep_supervision_weight: float, unmasked_chunk_weight: float,
    position_is_masked: Tensor | None = None,
) -> Tensor:
    """c_t (B, L): 1 + deep_supervision_weight in masked chunks, unmasked_chunk_weight in the others, 0 outside.

    position_is_masked (B, L), when given, decides per position instead (the positions whose input is the mask
    token): with partial chunk masking the visible tokens of a masked chunk are copies and weigh as unmasked ones.
    With whole-chunk masking both rules agree.
    """
    in_chunk = chunk_index >= 0
    if position_is_masked is None:
        position_is_masked = positions_in_masked_chunks(chunk_index, chunk_is_masked)
    weights = torch.where(position_is_masked & in_chunk, 1.0 + deep_supervision_weight, unmasked_chunk_weight)
    return weights * in_chunk


def step_weights(num_steps: int, scheme: str, device=None) -> Tensor:
    """a_s for s = 1..num_steps: `linear` (a_s = s) favours the later, better-refined steps."""
    steps = torch.arange(1, num_steps + 1, dtype=torch.float32, device=device)
    return steps if scheme == "linear" else torch.ones_like(steps)


def deep_supervision_loss(
    step_token_loss: Tensor,
    token_coefficient: Tensor,
    token_weight: Tensor | None = None,
    normalizer: Tensor | float | None = None,
    step_weighting: str = "linear",
) -> tuple[Tensor, Tensor]:
    """Returns (loss, N). step_token_loss (S, B, L); token_coefficient = tau * c (B, L), 0 where unsupervised.

    normalizer None: N is this batch's sum of tau * c; pass the global N (or 1.0 for the un-normalised sum).
    With N = 0 the loss is a zero that is still attached to the graph, so backward works on every rank.
    """
    coefficient = token_coefficient.detach()
    if token_weight is not None:
        coefficient = coefficient * token_weight.detach()
    per_step = (step_token_loss * coefficient).flatten(1).sum(dim=1)  # (S,)
    a = step_weights(per_step.shape[0], step_weighting, per_step.device)
    total = (a * per_step).sum() / a.sum()
    count = token_coefficient.detach().sum() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32)
    if float(count) <= 0:
        return total * 0.0, count
    return total / count, count


def hybrid_loss(output, step_weighting: str, keep: Tensor | None = None, token_weight: Tensor | None = None,
                normalizer: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """The deep-supervision loss of a `HybridOutput`, the one used by `model(**batch)` and by the trainer.

    keep: tau (B, L), the truncation keep-mask (None: every token); token_weight: w (B, L) (None: 1);
    normalizer as in `deep_supervision_loss` (None: this batch's sum of tau * c). Returns (loss, sum of tau * c).
    With all three None this is `output.loss`.
    """
    coefficient = output.chunk_weight if keep is None else output.chunk_weight * keep
    loss, _ = deep_supervision_loss(output.step_token_loss, coefficient, token_weight, normalizer, step_weighting)
    return loss, coefficient.sum().float()
