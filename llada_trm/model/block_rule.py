"""Which key a query may see, by blocks: the one rule behind the dense mask (attention.py) and FlexAttention's
mask_mod (flex_attention.py). Blocks: the prompt (and padding) is block 0, reasoning chunk k is block k + 1."""

from __future__ import annotations

import torch
from torch import Tensor


def block_ids(chunk_index: Tensor) -> Tensor:
    """Block of every position: 0 for prompt and pad (chunk_index -1), k + 1 for reasoning chunk k."""
    return chunk_index + 1


def block_rule(query_blocks: Tensor, key_blocks: Tensor, query_is_noisy: Tensor | None = None,
               key_is_noisy: Tensor | None = None) -> Tensor:
    """Whether each query may see each key by their blocks; broadcasts (the dense mask and FlexAttention's
    mask_mod both use it). Without a noisy copy: key block <= query block. With one: a clean query sees the
    clean keys of blocks up to its own; a noisy query sees the clean keys of earlier blocks and the noisy keys
    of its own block, never another block's noisy copy."""
    allowed = key_blocks <= query_blocks
    if query_is_noisy is None:
        return allowed
    noisy_in_own_block = query_is_noisy & (key_blocks == query_blocks)
    return torch.where(key_is_noisy, noisy_in_own_block, allowed & ~noisy_in_own_block)
