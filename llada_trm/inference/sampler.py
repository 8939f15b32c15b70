"""Plain LLaDA sampling with the backbone alone (the official `generate`, plus batching and a seeded RNG).

The answer starts as `gen_length` mask tokens after the prompt and is decoded block by block (semi-
autoregressive when `block_length < gen_length`); inside a block, each step runs the full bidirectional
model and commits the most confident predictions of still-masked positions, so that the block is done
after `steps / num_blocks` steps. Differences from the official code, none of which changes its greedy
(temperature 0, `low_confidence`) output on an unpadded prompt free of mask tokens:
- a key-padding `attention_mask` for left-padded batches; real tokens get the positions they would have
  without padding, so each row decodes as it would alone (up to float rounding in attention);
- only positions after the prompt can be committed (a mask token inside a prompt stays as it is);
- every random draw comes from `generator`, and temperature 0 draws nothing;
- noise and confidences are computed only for the answer up to the current block's end: nothing else can
  be committed there.
"""

from __future__ import annotations

import torch
from torch import Tensor

REMASKING_STRATEGIES = ("low_confidence", "random")


def transfer_schedule(mask_count: Tensor, steps: int) -> Tensor:
    """(B,) masked positions of a block -> (B, steps) tokens to commit per step.

    LLaDA's noise schedule is linear, so every step should unmask the same number of tokens; the remainder
    goes to the first steps.
    """
    base = mask_count // steps
    remainder = mask_count % steps
    step = torch.arange(steps, device=mask_count.device)
    return base[:, None] + (step[None, :] < remainder[:, None]).long()


def gumbel_argmax(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Sample token ids from softmax(logits / temperature) by the Gumbel-max trick; plain argmax at 0.

    Written as argmax of exp(logits) / (-log U) ** temperature in float64, as in the official sampler:
    low-precision Gumbel noise is known to hurt generation quality for masked diffusion models.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.to(torch.float64)
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits.exp() / (-torch.log(uniform)) ** temperature).argmax(dim=-1)


def _check_arguments(model, prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
                     remasking, mask_id) -> None:
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be a 2-D (batch, length) tensor of token ids, got shape {tuple(prompt.shape)}")
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"empty prompt (shape {tuple(prompt.shape)}): generation needs at least one prompt token")
    if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if attention_mask is not None:
        if attention_mask.shape != prompt.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match prompt shape {tuple(prompt.shape)}"
            )
        empty_rows = (~attention_mask.bool().any(dim=1)).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"empty prompt: attention_mask has no real token in row(s) {empty_rows}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}")
    if block_length <= 0:
        raise ValueError(f"block_length must be positive, got {block_length}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    max_length = model.config.max_sequence_length
    if prompt.shape[1] + gen_length > max_length:
        raise ValueError(
            f"prompt length ({prompt.shape[1]}) + gen_length ({gen_length}) exceeds the model's "
            f"max_sequence_length ({max_length})"
        )
    if remasking not in REMASKING_STRATEGIES:
        raise ValueError(f"unknown remasking {remasking!r}: expected one of {REMASKING_STRATEGIES}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if mask_id is None:
        raise ValueError("mask_id is not given and model.config.mask_token_id is not set")


def _twice(t: Tensor | None) -> Tensor | None:
    """The batch stacked on itself: the conditional and the unconditional copy share masks and positions."""
    return None if t is None else torch.cat((t, t), dim=0)


def guided_logits(model, x: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, prompt_length: int,
                  mask_id: int, cfg_scale: float) -> Tensor:
    """Logits (B, L, V) of x; with cfg_scale > 0, pushed away from an unconditional copy (prompt masked)."""
    if cfg_scale == 0:
        return model(input_ids=x, attention_mask=attention_mask, position_ids=position_ids).logits
    unconditional = x.clone()
    unconditional[:, :prompt_length] = mask_id
    logits = model(
        input_ids=torch.cat((x, unconditional), dim=0),
        attention_mask=_twice(attention_mask),
        position_ids=_twice(position_ids),
    ).logits
    conditional, unconditional_logits = logits.chunk(2, dim=0)
    return unconditional_logits + (cfg_scale + 1) * (conditional - unconditional_logits)


def commit_top_k(x: Tensor, x0: Tensor, confidence: Tensor, k: Tensor) -> Tensor:
    """Write x0 into x at the k[b] most confident positions of each row b (confidence -inf: never chosen
    while k[b] does not exceed the number of finite confidences)."""
    k_max = int(k.max())
    if k_max == 0:
        return x
    top = confidence.topk(k_max, dim=-1).indices  # (B, k_max), most confident first
    chosen = torch.arange(k_max, device=x.device)[None, :] < k[:, None]
    commit = torch.zeros_like(x, dtype=torch.bool).scatter_(1, top, chosen)
    return torch.where(commit, x0, x)


def propose(logits: Tensor, current: Tensor, mask_id: int, temperature: float, remasking: str,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Predicted tokens x0 (B, W) and their float64 confidence (B, W) for logits (B, W, V) of tokens `current`.

    Positions that are not masked keep their token and get confidence -inf, so they are never recommitted.
    """
    x0 = gumbel_argmax(logits, temperature, generator)
    if remasking == "low_confidence":
        # Confidence of the un-noised distribution, also when x0 was sampled with temperature.
        confidence = torch.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
    else:
        confidence = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    is_masked = current == mask_id
    return torch.where(is_masked, x0, current), torch.where(is_masked, confidence, -torch.inf)


def rows_stopped(answer: Tensor, stop_token_ids: tuple[int, ...], mask_id: int) -> Tensor:
    """(B,) whether each row of `answer` (B, W) holds a stop token preceded by no mask token."""
    is_stop = torch.isin(answer, torch.tensor(stop_token_ids, device=answer.device))
    masks_before = (answer == mask_id).long().cumsum(dim=1)
    return (is_stop & (masks_before == 0)).any(dim=1)


@torch.no_grad()
def generate(
    model,
    prompt: Tensor,
    attention_mask: Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    generator: torch.Generator | None = None,
    stop_token_ids: tuple[int, ...] = (),
) -> Tensor:
    """LLaDA sampling. prompt (B, P) token ids, left-padded when `attention_mask` (B, P), 1 = real, is given.

    Returns (B, P + gen_length): the prompt unchanged, then the generated tokens. At temperature 0 with
    `low_confidence` remasking the result is deterministic; otherwise it depends only on `generator`
    (a torch.Generator on the prompt's device, or None for the global RNG).

    stop_token_ids: after each block, a row that holds one of these tokens with no mask token before it stops
    decoding (its later blocks are left as mask tokens). Committed tokens never change and rows never attend to
    each other, so at temperature 0 the text up to the stop token is exactly what the full run produces (an
    evaluation shortcut, not part of the official sampler; with sampling, the random draws then differ).
    """
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    _check_arguments(model, prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
                     remasking, mask_id)
    batch, prompt_length = prompt.shape
    device = prompt.device
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt

    position_ids = None
    if attention_mask is not None:
        generated = torch.ones(batch, gen_length, dtype=torch.long, device=device)
        attention_mask = torch.cat((attention_mask.long().to(device), generated), dim=1)
        # Count positions over real tokens only, so that a padded row sees the positions it has unpadded.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    active = torch.arange(batch, device=device)  # rows still decoding (all, unless stop_token_ids)
    out = x.clone() if stop_token_ids else x  # with stop tokens, x holds the active rows only
    was_training = model.training
    model.eval()
    try:
        for block in range(num_blocks):
            block_start = prompt_length + block * block_length
            block_end = block_start + block_length
            schedule = transfer_schedule((x[:, block_start:block_end] == mask_id).sum(dim=1), steps_per_block)
            for step in range(steps_per_block):
                logits = guided_logits(model, x, attention_mask, position_ids, prompt_length, mask_id, cfg_scale)
                # Only the answer up to this block's end can be committed: mask tokens of earlier blocks
                # that the model filled with the mask id itself stay candidates, as in the official sampler.
                window = slice(prompt_length, block_end)
                current = x[:, window]
                x0, confidence = propose(logits[:, window], current, mask_id, temperature, remasking, generator)
                x[:, window] = commit_top_k(current, x0, confidence, schedule[:, step])
            if stop_token_ids:
                # Each row attends only to itself, so a finished row can leave the batch without changing others.
                running = ~rows_stopped(x[:, prompt_length:block_end], stop_token_ids, mask_id)
                if not running.all():
                    out[active] = x
                    active, x = active[running], x[running]
                    if attention_mask is not None:
                        attention_mask, position_ids = attention_mask[running], position_ids[running]
                if len(active) == 0:
                    break
        if stop_token_ids:
            out[active] = x
    finally:
        model.train(was_training)
    return out
