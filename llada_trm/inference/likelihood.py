"""The log-likelihood of a continuation under a masked-diffusion LM: LLaDA's Monte Carlo estimate of its bound.

A masked-diffusion model has no left-to-right factorisation, so the harness's `loglikelihood` is scored the way the
LLaDA paper scores multiple-choice tasks: by the evidence lower bound of the continuation given the prompt,

    log p(a | p) >= E_{l ~ U{1..L}} E_{M: l of the L positions} [ (L / l) * sum_{i in M} log p(a_i | p, a with M masked) ]

estimated with `mc_num` draws (l and the masked positions M) and one bidirectional backbone pass per draw. Notable:
- every request draws from a fresh generator seeded with `seed`, so a value does not depend on which other
  requests ran, in which order, batch or process (choices of one length share their draws, which also lowers the
  variance of their difference);
- the draws are made in a fixed order (for each sample: l, then a permutation of the L positions, whose first l
  are masked), on the CPU, before any forward, so batching the forwards changes nothing but float rounding;
- `is_greedy` (the harness's second value) decodes the continuation's length with LLaDA's sampler from the prompt
  (one token per step, the most confident first, one block) and compares: what "greedy" means for this model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llada_trm.inference.sampler import PassCounter, generate


@dataclass
class MaskDraws:
    """The Monte Carlo draws of one request: which continuation positions each sample masks."""

    masked: torch.Tensor  # (mc_num, L) bool
    counts: torch.Tensor  # (mc_num,) masked positions per sample (l), 1..L


def draw_masks(length: int, mc_num: int, seed: int) -> MaskDraws:
    """`mc_num` samples over a continuation of `length` tokens: l uniform in 1..length, then l positions
    uniformly without replacement (the first l of a random permutation)."""
    if length < 1:
        raise ValueError("an empty continuation has no likelihood to estimate")
    if mc_num < 1:
        raise ValueError(f"mc_num must be positive, got {mc_num}")
    generator = torch.Generator().manual_seed(seed)
    masked = torch.zeros(mc_num, length, dtype=torch.bool)
    counts = torch.zeros(mc_num, dtype=torch.long)
    for sample in range(mc_num):
        count = int(torch.randint(1, length + 1, (1,), generator=generator))
        order = torch.randperm(length, generator=generator)
        masked[sample, order[:count]] = True
        counts[sample] = count
    return MaskDraws(masked, counts)


@torch.no_grad()
def masked_diffusion_loglikelihood(backbone, context_ids: list[int], continuation_ids: list[int], mc_num: int,
                                   seed: int, batch_size: int = 32, counter: PassCounter | None = None) -> float:
    """The Monte Carlo estimate of the bound on log p(continuation | context), in nats (module docstring).

    backbone: an `LLaDAModelLM` (run bidirectionally, no padding: every row of a forward has the same length).
    batch_size: draws per forward; `counter` gets the row-passes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    length = len(continuation_ids)
    draws = draw_masks(length, mc_num, seed)
    device = backbone.device
    context = torch.tensor(context_ids, dtype=torch.long, device=device)
    continuation = torch.tensor(continuation_ids, dtype=torch.long, device=device)
    mask_id = backbone.config.mask_token_id
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, mc_num, batch_size):
        masked = draws.masked[start:start + batch_size].to(device)
        counts = draws.counts[start:start + batch_size].to(device)
        noisy = torch.where(masked, torch.full_like(masked, mask_id, dtype=torch.long), continuation[None, :])
        rows = torch.cat((context[None, :].expand(len(noisy), -1), noisy), dim=1)
        if counter is not None:
            counter.add(len(rows))
        logits = backbone(input_ids=rows).logits[:, len(context_ids):].float()
        token_logp = logits.log_softmax(dim=-1).gather(-1, continuation[None, :, None].expand(len(rows), -1, 1))
        per_sample = (token_logp.squeeze(-1) * masked).sum(dim=1) * (length / counts)
        total += per_sample.double().sum().cpu()
    return float(total / mc_num)


@torch.no_grad()
def is_greedy_continuation(backbone, context_ids: list[int], continuation_ids: list[int],
                           counter: PassCounter | None = None) -> bool:
    """Whether LLaDA's sampler at temperature 0, one token per step over one block of the continuation's length,
    decodes exactly `continuation_ids` after `context_ids`."""
    length = len(continuation_ids)
    prompt = torch.tensor([context_ids], dtype=torch.long, device=backbone.device)
    out = generate(backbone, prompt, steps=length, gen_length=length, block_length=length, counter=counter)
    return out[0, len(context_ids):].tolist() == list(continuation_ids)
