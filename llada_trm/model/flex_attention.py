"""Block-causal attention through FlexAttention: a block mask built from the blocks instead of an L x L tensor.

The rule is the one of `attention.attention_allowed`: a query in block b sees the non-padding keys of blocks
0..b, and always its own position. FlexAttention skips the tiles of the score matrix that the mask rules out
(every later chunk), where SDPA with a boolean mask computes them all and falls back to its slower kernels.

Backend choice (`LLADA_TRM_ATTENTION` or `set_attention_backend`):
- `auto` (default): FlexAttention, compiled, for CUDA passes without a KV cache (training, and the uncached
  reference decoder) when the head size suits its kernels; SDPA elsewhere. Decoding with a cache attends from one
  or two chunks of queries, where a small boolean mask costs nothing and varying lengths would recompile.
- `flex`: FlexAttention wherever it can run (eager and unfused on CPU, for tests against SDPA; CPU has no
  FlexAttention backward, so a CPU pass that needs gradients takes SDPA with the same mask, made dense);
- `sdpa`: never FlexAttention.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from llada_trm.model.block_rule import block_rule

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = create_block_mask = create_mask = flex_attention = None

BACKENDS = ("auto", "flex", "sdpa")
_settings = {"backend": os.environ.get("LLADA_TRM_ATTENTION", "auto").strip().lower() or "auto"}
_compiled: dict[str, object] = {}


def flex_available() -> bool:
    return flex_attention is not None


def set_attention_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _settings["backend"] = name


def attention_backend() -> str:
    backend = _settings["backend"]
    if backend not in BACKENDS:
        raise ValueError(f"LLADA_TRM_ATTENTION must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_flex(device: torch.device, past_length: int, head_dim: int) -> bool:
    """Whether a call on `device` with `past_length` cached keys attends through FlexAttention."""
    backend = attention_backend()
    if backend == "sdpa" or not flex_available():
        return False
    kernel_friendly = head_dim >= 16 and head_dim & (head_dim - 1) == 0  # powers of two: 16, 32, 64, 128, 256
    if device.type != "cuda":
        return backend == "flex"  # the eager implementation takes any head size
    return kernel_friendly and (backend == "flex" or past_length == 0)


def is_block_mask(mask: object) -> bool:
    return BlockMask is not None and isinstance(mask, BlockMask)


def block_causal_block_mask(query_blocks: Tensor, key_blocks: Tensor, key_is_real: Tensor,
                            noisy_copy: Tensor | None = None) -> "BlockMask":
    """The block mask of `attention_allowed`: the queries are the last Lq of the Lk keys. noisy_copy (B, L):
    the clean-context copies (no cache then, so queries and keys are the same positions)."""
    batch, num_queries = query_blocks.shape
    num_keys = key_blocks.shape[1]
    offset = num_keys - num_queries
    key_is_real = key_is_real.bool()

    def mask_mod(b, h, q, k):
        own_position = k == q + offset
        noisy = () if noisy_copy is None else (noisy_copy[b, q], noisy_copy[b, k])
        return (block_rule(query_blocks[b, q], key_blocks[b, k], *noisy) & key_is_real[b, k]) | own_position

    return create_block_mask(mask_mod, batch, None, num_queries, num_keys, device=query_blocks.device)


def _kernel(device: torch.device):
    """Compiled FlexAttention on CUDA (the fused kernel); eager elsewhere, which materialises the scores."""
    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(flex_attention)
    return _compiled["cuda"]


def flex_attend(query: Tensor, key: Tensor, value: Tensor, block_mask: "BlockMask") -> Tensor:
    """(B, heads, Lq, head_dim) attention under `block_mask`; grouped-query key/value heads are shared."""
    groups = query.shape[1] // key.shape[1]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type == "cpu" and needs_grad:
        return _dense_fallback(query, key, value, block_mask, groups)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _kernel(query.device)(query, key, value, block_mask=block_mask, enable_gqa=groups > 1)


def _dense_fallback(query: Tensor, key: Tensor, value: Tensor, block_mask: "BlockMask", groups: int) -> Tensor:
    """SDPA with the block mask's rule as a boolean mask (CPU training, where FlexAttention has no backward)."""
    batch, _, num_queries, _ = query.shape
    allowed = create_mask(block_mask.mask_mod, batch, None, num_queries, key.shape[2], device=query.device)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed)
