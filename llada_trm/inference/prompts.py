"""Decoder inputs: prompts of any accepted form -> token rows, left-padded batches and new-token budgets.

Text is rendered and tokenised as the data pipeline does (BOS first, `data.layout.encode_prompt`); id prompts lose
their leading padding. Rows are left-padded to a common multiple of `chunk_size`, so that generation starts on a
chunk boundary as in training. Shared by the chunk decoder and exact-match scoring.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from llada_trm.data.layout import MARKER, encode_prompt, render_prompt


def single_token_id(tokenizer, text: str) -> int | None:
    if tokenizer is None:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _encode_text(text: str, tokenizer) -> list[int]:
    """A question is rendered into the prompt layout; a text with the marker is used as it is. BOS first, as the
    data pipeline tokenises prompts."""
    if not text.strip():
        raise ValueError("empty prompt: generation needs a question or a prompt text")
    if MARKER not in text:
        text = render_prompt(text)
    elif text.rstrip(" ").endswith(MARKER):
        text = text.rstrip(" ") + "\n"  # training prompts always end with the newline after the marker
    return encode_prompt(tokenizer, text)


def prompt_token_lists(prompt, tokenizer, pad_id: int) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] | LongTensor (L,) or (B, L) -> one token list per row.

    Leading pad tokens of id prompts are taken as left padding and dropped.
    """
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass tokenizer=... or token ids")
        return [_encode_text(p, tokenizer) for p in prompt]
    if isinstance(prompt, Tensor):
        if prompt.dim() not in (1, 2) or prompt.is_floating_point() or prompt.dtype == torch.bool:
            raise ValueError(f"a tensor prompt must hold integer token ids of shape (L,) or (B, L), "
                             f"got {prompt.dtype} {tuple(prompt.shape)}")
        rows = [prompt.tolist()] if prompt.dim() == 1 else prompt.tolist()
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        rows = [list(prompt)]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(r, (list, tuple, Tensor)) for r in prompt):
        rows = [r.tolist() if isinstance(r, Tensor) else list(r) for r in prompt]
    elif isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError("empty prompt: no rows given")
    else:
        raise ValueError(f"prompt must be a str, a list of str, or token ids (list or LongTensor), got {type(prompt)}")
    stripped = []
    for i, row in enumerate(rows):
        start = next((j for j, t in enumerate(row) if t != pad_id), len(row))
        if start == len(row):
            raise ValueError(f"empty prompt: row {i} has no token besides padding")
        stripped.append([int(t) for t in row[start:]])
    return stripped


def _padded(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size) * chunk_size


def new_token_budgets(rows: list[list[int]], max_length: int, max_new_tokens: int | None, chunk_size: int,
                      max_sequence_length: int) -> list[int]:
    """Tokens each row may generate: up to `max_length` in total (prompt included) or `max_new_tokens`, and
    never past the model's maximum sequence length (whole chunks after the row's padded prompt)."""
    budgets, capped = [], False
    for i, row in enumerate(rows):
        padded = _padded(len(row), chunk_size)
        if padded + chunk_size > max_sequence_length:
            raise ValueError(f"prompt row {i} has {len(row)} tokens ({padded} padded to chunk_size {chunk_size}): "
                             f"with one chunk of {chunk_size} it is longer than the model's max_sequence_length "
                             f"({max_sequence_length})")
        if max_new_tokens is not None:
            wanted = max_new_tokens
        elif max_length <= len(row):
            raise ValueError(f"max_length ({max_length}) must be larger than the prompt ({len(row)} tokens in row {i})")
        else:
            wanted = max_length - len(row)
        room = (max_sequence_length - padded) // chunk_size * chunk_size
        capped |= len(row) + wanted > max_sequence_length  # not for the rounding to whole chunks at the end
        budgets.append(min(wanted, room))
    if capped:
        warnings.warn(f"generation is limited to the model's max_sequence_length ({max_sequence_length})", stacklevel=4)
    return budgets


def left_pad(rows: list[list[int]], chunk_size: int, pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Rows left-padded to a common multiple of chunk_size: ids (B, P) and attention mask (B, P), 1 = real."""
    width = max(_padded(len(row), chunk_size) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    return ids.to(device), mask.to(device)
