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

`threshold` switches to confidence-threshold parallel decoding (Fast-dLLM): a step commits every candidate at
or above the threshold, and at least the most confident one, so a block takes as many steps as its confidences
need instead of a fixed schedule. `counter` counts the backbone row-passes the run made (the cost side of
tokens per forward pass, docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

REMASKING_STRATEGIES = ("low_confidence", "random")


@dataclass
class PassCounter:
    """Backbone work of a decoding run, counted by the decoder: one forward over n rows adds n row-passes."""

    backbone_row_passes: int = 0
    backbone_forwards: int = 0

    def add(self, rows: int) -> None:
        self.backbone_row_passes += rows
        self.backbone_forwards += 1


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
                     remasking, mask_id, threshold) -> None:
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
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold < float("inf")):
        raise ValueError(f"threshold must be a finite number >= 0 or None, got {threshold!r}")
    if threshold is None and steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}")
    if block_length <= 0:
        raise ValueError(f"block_length must be positive, got {block_length}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if threshold is None and steps % num_blocks:
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
                  mask_id: int, cfg_scale: float, counter: PassCounter | None = None) -> Tensor:
    """Logits (B, L, V) of x; with cfg_scale > 0, pushed away from an unconditional copy (prompt masked).
    `counter` gets the rows of the backbone forward (twice the batch with guidance)."""
    if counter is not None:
        counter.add(len(x) * (1 if cfg_scale == 0 else 2))
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


def commit_above_threshold(x: Tensor, x0: Tensor, confidence: Tensor, threshold: float) -> Tensor:
    """Write x0 into x wherever confidence >= threshold, and at the most confident position of every row that has a
    finite confidence: each step commits at least one token, so decoding always moves on."""
    has_candidate = torch.isfinite(confidence).any(dim=1)
    commit = confidence >= threshold
    best = confidence.argmax(dim=1, keepdim=True)
    commit.scatter_(1, best, commit.gather(1, best) | has_candidate[:, None])
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


@dataclass
class SamplerStep:
    """What one sampler step needs besides the rows: the model, the answer's start and the proposal settings."""

    model: object
    prompt_length: int
    mask_id: int
    temperature: float
    cfg_scale: float
    remasking: str
    generator: torch.Generator | None
    counter: PassCounter | None

    def propose(self, x: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                block_end: int) -> tuple[Tensor, Tensor, Tensor]:
        """(current, x0, confidence) over the answer up to `block_end`: only it can be committed. Mask tokens of
        earlier blocks that the model filled with the mask id itself stay candidates, as in the official sampler."""
        logits = guided_logits(self.model, x, attention_mask, position_ids, self.prompt_length, self.mask_id,
                               self.cfg_scale, self.counter)
        window = slice(self.prompt_length, block_end)
        current = x[:, window]
        x0, confidence = propose(logits[:, window], current, self.mask_id, self.temperature, self.remasking,
                                 self.generator)
        return current, x0, confidence


def decode_block_by_schedule(step: SamplerStep, x: Tensor, attention_mask: Tensor | None,
                             position_ids: Tensor | None, block_end: int, block_length: int, steps: int) -> None:
    """LLaDA's block (in place): `steps` steps over the whole batch, each committing the schedule's count."""
    schedule = transfer_schedule((x[:, block_end - block_length:block_end] == step.mask_id).sum(dim=1), steps)
    for i in range(steps):
        current, x0, confidence = step.propose(x, attention_mask, position_ids, block_end)
        x[:, step.prompt_length:block_end] = commit_top_k(current, x0, confidence, schedule[:, i])


def decode_block_by_threshold(step: SamplerStep, x: Tensor, attention_mask: Tensor | None,
                              position_ids: Tensor | None, block_end: int, block_length: int, threshold: float) -> None:
    """Fast-dLLM's block (in place): steps over the rows whose block still holds a mask token, each committing every
    candidate at or above `threshold` and at least the most confident one; at most `block_length` steps."""
    for _ in range(block_length):
        open_rows = (x[:, block_end - block_length:block_end] == step.mask_id).any(dim=1)
        if not open_rows.any():
            return
        # Rows never attend to each other, so running only the open ones changes nothing for them.
        rows = slice(None) if bool(open_rows.all()) else open_rows.nonzero().flatten()
        current, x0, confidence = step.propose(x[rows], _rows_of(attention_mask, rows), _rows_of(position_ids, rows),
                                               block_end)
        x[rows, step.prompt_length:block_end] = commit_above_threshold(current, x0, confidence, threshold)


def _rows_of(t: Tensor | None, rows) -> Tensor | None:
    return None if t is None else t[rows]


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
    threshold: float | None = None,
    counter: PassCounter | None = None,
) -> Tensor:
    """LLaDA sampling. prompt (B, P) token ids, left-padded when `attention_mask` (B, P), 1 = real, is given.

    Returns (B, P + gen_length): the prompt unchanged, then the generated tokens. At temperature 0 with
    `low_confidence` remasking the result is deterministic; otherwise it depends only on `generator`
    (a torch.Generator on the prompt's device, or None for the global RNG).

    stop_token_ids: after each block, a row that holds one of these tokens with no mask token before it stops
    decoding (its later blocks are left as mask tokens). Committed tokens never change and rows never attend to
    each other, so at temperature 0 the text up to the stop token is exactly what the full run produces (an
    evaluation shortcut, not part of the official sampler; with sampling, the random draws then differ).

    threshold: confidence-threshold parallel decoding instead of the fixed schedule. Each step commits every
    candidate (a still-masked position of the answer up to the current block's end, as in the scheduled sampler)
    whose confidence is >= threshold, and always the most confident one. A row's block ends when it holds no mask
    token, or after `block_length` steps (each step commits at least once, so by then every position was
    committed; the cap only matters when the model commits the mask token itself). Only rows whose block is still
    open are run, so the step count follows each row's confidences; `steps` is ignored (and not checked).
    A threshold above 1 commits one token per step: the same tokens as `steps=gen_length`.
    With `remasking="random"` the confidences are uniform draws, so the threshold is a random fraction.

    counter: a `PassCounter` that gets the backbone row-passes of the run (rows that left the batch not counted).
    """
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    _check_arguments(model, prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
                     remasking, mask_id, threshold)
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
    steps_per_block = steps // num_blocks  # unused with a threshold
    active = torch.arange(batch, device=device)  # rows still decoding (all, unless stop_token_ids)
    out = x.clone() if stop_token_ids else x  # with stop tokens, x holds the active rows only
    step = SamplerStep(model, prompt_length, mask_id, temperature, cfg_scale, remasking, generator, counter)
    was_training = model.training
    model.eval()
    try:
        for block in range(num_blocks):
            block_end = prompt_length + (block + 1) * block_length
            if threshold is not None:
                decode_block_by_threshold(step, x, attention_mask, position_ids, block_end, block_length, threshold)
            else:
                decode_block_by_schedule(step, x, attention_mask, position_ids, block_end, block_length,
                                         steps_per_block)
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
