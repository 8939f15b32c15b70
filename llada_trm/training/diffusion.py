"""LLaDA's masked-diffusion objectives: forward masking, the pretraining loss, the plain SFT loss and the
clean-context inputs of block diffusion (the block-causal adaptation of a backbone).

One t ~ U(0, 1) per sequence, p_mask = (1 - eps) t + eps, and every eligible token is replaced by the mask
token with probability p_mask. Losses divide each masked token's cross-entropy by p_mask (the ELBO weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llada_trm.model.attention import clean_context_pair

MASK_EPS = 1e-3


def forward_mask(
    input_ids: Tensor, eligible: Tensor, mask_token_id: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask eligible tokens at a per-sequence random rate. Returns (noisy ids, is_masked, p_mask (B, 1))."""
    batch = input_ids.shape[0]
    t = torch.rand(batch, 1, generator=generator, device=input_ids.device)
    p_mask = (1 - MASK_EPS) * t + MASK_EPS
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    is_masked = (draws < p_mask) & eligible.bool()
    noisy = torch.where(is_masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, is_masked, p_mask


def _masked_ce_over_p(logits: Tensor, targets: Tensor, is_masked: Tensor, p_mask: Tensor) -> Tensor:
    """(B, L) cross-entropy / p_mask at masked positions, 0 elsewhere (computed in fp32)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return torch.where(is_masked, ce / p_mask, torch.zeros_like(ce))


def llada_pretrain_loss(logits: Tensor, targets: Tensor, is_masked: Tensor, p_mask: Tensor) -> Tensor:
    """sum over masked tokens of CE / p_mask, divided by B * L (LLaDA pretraining)."""
    return _masked_ce_over_p(logits, targets, is_masked, p_mask).sum() / targets.numel()


def llada_sft_loss(logits: Tensor, targets: Tensor, is_masked: Tensor, p_mask: Tensor, is_response: Tensor) -> Tensor:
    """Per sequence: sum over masked response tokens of CE / p_mask over the response length; batch mean."""
    per_token = _masked_ce_over_p(logits, targets, is_masked, p_mask)
    response_length = is_response.sum(dim=1).clamp(min=1)
    return (per_token.sum(dim=1) / response_length).mean()


@torch.no_grad()
def masked_token_accuracy(
    model, input_ids: Tensor, eligible: Tensor, mask_rate: float, mask_token_id: int, generator: torch.Generator
) -> float:
    """Fraction of tokens masked at a fixed rate that the model's argmax recovers (attention over all tokens)."""
    is_masked = (torch.rand(input_ids.shape, generator=generator) < mask_rate) & eligible.bool()
    noisy = torch.where(is_masked, torch.full_like(input_ids, mask_token_id), input_ids)
    predicted = model(input_ids=noisy).logits.argmax(dim=-1)
    return (predicted[is_masked] == input_ids[is_masked]).float().mean().item()


def clean_context_inputs(input_ids: Tensor, attention_mask: Tensor, chunk_index: Tensor, is_response: Tensor,
                         mask_token_id: int, generator: torch.Generator | None = None) -> tuple[dict, Tensor, Tensor]:
    """Block diffusion with clean context (BD3-LM): the batch (B, L), then a noisy copy of its reasoning chunks.

    Each reasoning chunk of each row is masked at its own rate p = (1 - eps) t + eps, t ~ U(0, 1), so one pass
    trains every chunk against the clean chunks before it, as the chunk decoder shows them. Returns the model
    inputs (B, 2L) with `noisy_copy`, is_masked (B, L) and p_mask (B, L) of the noisy copy; the noisy copy's
    prompt and pad positions are padding (attention 0).
    """
    batch = input_ids.shape[0]
    num_chunks = max(1, int(chunk_index.max()) + 1)
    t = torch.rand(batch, num_chunks, generator=generator, device=input_ids.device)
    p_mask = ((1 - MASK_EPS) * t + MASK_EPS).gather(1, chunk_index.clamp(min=0))
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    is_masked = (draws < p_mask) & is_response.bool()
    noisy = torch.where(is_masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return clean_context_pair(input_ids, noisy, attention_mask, chunk_index).inputs, is_masked, p_mask
