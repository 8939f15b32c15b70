"""Block-causal attention masks and the KV cache shared by the backbone and the refinement head.

Blocks: the prompt (and padding) is block 0, reasoning chunk k is block k + 1. A query in block b sees the
keys of blocks 0..b that are not padding. The mask is built here from `chunk_index` (-1 for prompt and pad,
k for reasoning chunk k) and the key-padding `attention_mask`, so collators never ship L x L masks.

Clean context (block diffusion, as in BD3-LM): a sequence may hold the clean reasoning chunks (x_0) followed by a
noisy copy of them (x_t), marked by `noisy_copy`, both with the same chunk indices and positions. A noisy chunk k
then sees the prompt, the clean chunks before k and its own noisy copy: exactly the context the chunk decoder
shows it, with every chunk of a sequence trained in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from llada_trm.model.block_rule import block_rule
from llada_trm.model.flex_attention import flex_attend, is_block_mask


def attention_allowed(query_blocks: Tensor, key_blocks: Tensor, key_is_real: Tensor,
                      query_is_noisy: Tensor | None = None, key_is_noisy: Tensor | None = None) -> Tensor:
    """Boolean mask (B, 1, Lq, Lk), True where the query may attend to the key.

    The queries are the last Lq of the Lk keys (a KV cache holds the first Lk - Lq). Every query may attend to
    its own position, so that a padding query, whose keys are all masked, does not turn into NaN in SDPA.
    query_is_noisy (B, Lq) / key_is_noisy (B, Lk): the clean-context copies (module docstring), or None.
    """
    num_queries, num_keys = query_blocks.shape[1], key_blocks.shape[1]
    noisy = (None, None) if query_is_noisy is None else (query_is_noisy[:, :, None], key_is_noisy[:, None, :])
    allowed = block_rule(query_blocks[:, :, None], key_blocks[:, None, :], *noisy) & key_is_real[:, None, :].bool()
    own_position = torch.eye(num_queries, dtype=torch.bool, device=allowed.device)
    allowed[:, :, num_keys - num_queries :] |= own_position
    return allowed[:, None]


def attend(query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None) -> Tensor:
    """SDPA over (B, heads, L, head_dim) tensors; key/value heads are repeated for grouped-query attention.
    `allowed` may also be a FlexAttention block mask (`flex_attention.py`), which runs FlexAttention instead."""
    if is_block_mask(allowed):
        return flex_attend(query, key, value, allowed)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=0.0, is_causal=False)


@dataclass
class KVCache:
    """Keys and values of every layer for the positions already encoded, plus their blocks and padding.

    Immutable in use: a forward that reads a cache never changes it, and a forward with `use_cache=True`
    returns a new, longer cache. That lets generation refine a masked chunk many times against the same
    context, then extend the context once with the committed chunk.
    """

    keys: list[Tensor]  # per layer (B, kv_heads, T, head_dim)
    values: list[Tensor]
    key_blocks: Tensor  # (B, T)
    key_is_real: Tensor  # (B, T) bool

    @property
    def length(self) -> int:
        return self.key_blocks.shape[1]

    def select_batch(self, rows: Tensor) -> "KVCache":
        """The cache of a subset of the batch rows (used when finished sequences leave a batch)."""
        return KVCache(
            [k[rows] for k in self.keys], [v[rows] for v in self.values], self.key_blocks[rows], self.key_is_real[rows]
        )


class CleanContextLayout(NamedTuple):
    inputs: dict  # model inputs (B, W) with `noisy_copy`
    copy_column: Tensor  # (B, L) the input column of each position's noisy copy, -1 where there is none
    clean_column: Tensor  # (B, L) the input column of each position's clean run, -1 where it was left out


def clean_context_pair(clean: Tensor, noisy: Tensor, attention_mask: Tensor, chunk_index: Tensor,
                       position_ids: Tensor | None = None, copied: Tensor | None = None,
                       kept: Tensor | None = None) -> CleanContextLayout:
    """Model inputs of clean-context training: the clean sequence `clean` (B, L), then a noisy copy taken from
    `noisy` with the same chunk indices and positions.

    copied None: the copy is all of `noisy` (W = 2L, column L + t holds position t), its prompt and pad positions
    padding. copied (B, L) bool, whole chunks: only those reasoning positions are copied, packed to the left and
    right-padded to the longest row. Only chunks that hold a mask token need a copy: an unmasked chunk's copy
    equals its clean run (same tokens, positions and context), so leaving it out saves its compute and changes
    no output.

    kept (B, L) bool, with `copied`: only these real clean positions are taken, and each row is its kept clean
    positions, then its copies, packed left and right-padded to the longest row. When only the copies are scored,
    a clean position is read only by the chunks after it: those after a row's last copied chunk (and padding) are
    read by nothing and can be left out. Attention and RoPE go by chunk index, position and `noisy_copy`, never
    by column, so the order of the columns changes no output.
    """
    batch, length = clean.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=clean.device).expand(batch, length)
    reasoning = chunk_index >= 0
    sources = dict(input_ids=(clean, noisy), attention_mask=(attention_mask, attention_mask * reasoning),
                   chunk_index=(chunk_index, chunk_index), position_ids=(position_ids, position_ids))
    if copied is None:
        inputs = {name: torch.cat((first, second.to(first.dtype)), dim=1) for name, (first, second) in sources.items()}
        inputs["noisy_copy"] = (torch.arange(2 * length, device=clean.device) >= length).expand(batch, 2 * length)
        positions = torch.arange(length, device=clean.device).expand(batch, length)
        return CleanContextLayout(inputs, torch.where(reasoning, positions + length, -1), positions)
    if kept is None:
        kept = torch.ones_like(reasoning)
    else:
        kept = kept & attention_mask.bool()
    taken = torch.cat((kept, copied & reasoning), dim=1)  # (B, 2L): clean sources, then noisy ones
    # At least one column, padding if nothing is taken (a batch with no masked chunk): every row keeps a column 0.
    width = max(int(taken.sum(dim=1).max()), 1) if batch else 0
    # Taken sources first, in order (a stable sort on "not taken"); the rest is padding.
    order = torch.sort((~taken).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (B, W)
    padding = ~taken.gather(1, order)
    fill = dict(input_ids=0, attention_mask=0, chunk_index=-1, position_ids=0)
    inputs = {name: torch.cat((first, second.to(first.dtype)), dim=1).gather(1, order).masked_fill(padding, fill[name])
              for name, (first, second) in sources.items()}
    inputs["noisy_copy"] = (order >= length) & ~padding
    column = order.new_full((batch, 2 * length), -1).scatter_(
        1, order, torch.arange(width, device=clean.device).expand(batch, width))
    column = column.masked_fill(~taken, -1)
    return CleanContextLayout(inputs, column[:, length:], column[:, :length])
