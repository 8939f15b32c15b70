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


def clean_context_pair(clean: Tensor, noisy: Tensor, attention_mask: Tensor, chunk_index: Tensor,
                       position_ids: Tensor | None = None, copied: Tensor | None = None) -> tuple[dict, Tensor]:
    """Model inputs (B, L + M) of clean-context training: `clean` (B, L), then the noisy copy, taken from `noisy`
    with the same chunk indices and positions. Also returns slot (B, L): the input column of each position's noisy
    copy, -1 where there is none.

    copied None: the copy is all of `noisy` (M = L, column L + t holds position t), its prompt and pad positions
    padding. copied (B, L) bool, whole chunks: only those reasoning positions are copied, packed to the left and
    right-padded to the longest row's M. Only chunks that hold a mask token need a copy: an unmasked chunk's copy
    equals its clean run (same tokens, positions and context), so leaving it out saves its compute and changes
    no output.
    """
    batch, length = clean.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=clean.device).expand(batch, length)
    reasoning = chunk_index >= 0
    if copied is None:
        copy = dict(input_ids=noisy, attention_mask=attention_mask * reasoning, chunk_index=chunk_index,
                    position_ids=position_ids)
        slot = torch.where(reasoning, torch.arange(length, device=clean.device) + length, -1)
    else:
        copied = copied & reasoning
        width = int(copied.sum(dim=1).max()) if batch else 0
        # Copied positions first, in order, then the rest (a stable sort on "not copied"); the rest is padding.
        order = torch.sort((~copied).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (B, M)
        padding = ~copied.gather(1, order)
        copy = dict(input_ids=noisy.gather(1, order).masked_fill(padding, 0), attention_mask=(~padding).long(),
                    chunk_index=chunk_index.gather(1, order).masked_fill(padding, -1),
                    position_ids=position_ids.gather(1, order).masked_fill(padding, 0))
        slot = torch.where(copied, length + copied.long().cumsum(dim=1) - 1, -1)
    total = length + copy["input_ids"].shape[1]
    inputs = {name: torch.cat((value, copy[name].to(value.dtype)), dim=1) for name, value in
              dict(input_ids=clean, attention_mask=attention_mask, chunk_index=chunk_index,
                   position_ids=position_ids).items()}
    inputs["noisy_copy"] = (torch.arange(total, device=clean.device) >= length).expand(batch, total)
    return inputs, slot
