"""Native LLaDA (masked-diffusion LM) as a transformers `PreTrainedModel`, loading official checkpoints.

Matches the official architecture and weight names (`model.transformer.wte`, `.blocks.{i}.q_proj`, ...,
`.ln_f`, `.ff_out`): pre-norm RMSNorm computed in fp32, rotate-half RoPE in fp32, SwiGLU MLP, attention
with no causal mask. Added over the official code: a key-padding mask, block-causal attention built from
`chunk_index`, and a KV cache for block-by-block decoding. No `trust_remote_code` is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from llada_trm.model.attention import KVCache, attend, attention_allowed
from llada_trm.model.block_rule import block_ids
from llada_trm.model.configuration_llada import LLaDAConfig
from llada_trm.model.flex_attention import block_causal_block_mask, use_flex
from llada_trm.model.integrity import CheckpointMismatchError
from llada_trm.model.loading import checked_model_source, library_call


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, L, head_dim) in fp32; frequencies concatenated (rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, L, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """One LLaMA-style LLaDA block; also the building block of the refinement head's tiny transformer."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)  # gate
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)  # down

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        allowed: Tensor | None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, L, d). Returns the new x and this call's (keys, values) including `past`."""
        h = self.attn_norm(x)
        q = rearrange(self.q_proj(h), "b l (h d) -> b h l d", d=self.head_dim)
        k = rearrange(self.k_proj(h), "b l (h d) -> b h l d", d=self.head_dim)
        v = rearrange(self.v_proj(h), "b l (h d) -> b h l d", d=self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        attended = rearrange(attend(q, k, v, allowed), "b h l d -> b l (h d)")
        x = x + self.attn_out(attended)
        h = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x, (k, v)


@dataclass
class AttentionContext:
    """What every layer of one forward call shares: the mask, RoPE angles and the keys' blocks and padding."""

    allowed: Tensor | None  # (B, 1, L, past + L) bool, a FlexAttention BlockMask, or None (unmasked bidirectional)
    rope: tuple[Tensor, Tensor]
    key_blocks: Tensor  # (B, past + L)
    key_is_real: Tensor  # (B, past + L)


def attention_context(
    batch: int,
    length: int,
    head_dim: int,
    rope_theta: float,
    *,
    device: torch.device,
    attention_mask: Tensor | None = None,
    chunk_index: Tensor | None = None,
    position_ids: Tensor | None = None,
    past: KVCache | None = None,
    noisy_copy: Tensor | None = None,
) -> AttentionContext:
    """Build the masks of one call. `attention_mask` (B, L) and `chunk_index` (B, L) describe the L positions of
    this call only; the cache carries those of the earlier positions. noisy_copy (B, L) bool marks the noisy copy
    of clean-context training (attention.py); it needs chunk_index and explicit position_ids, and no cache."""
    past_length = past.length if past is not None else 0
    if noisy_copy is not None and (chunk_index is None or position_ids is None or past is not None):
        raise ValueError("noisy_copy needs chunk_index and position_ids (the clean positions), and no KV cache")
    if position_ids is None:
        position_ids = torch.arange(past_length, past_length + length, device=device).expand(batch, length)
    is_real = attention_mask.bool() if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
    blocks_now = block_ids(chunk_index) if chunk_index is not None else torch.zeros_like(is_real, dtype=torch.long)
    key_blocks, key_is_real = blocks_now, is_real
    if past is not None:
        key_blocks = torch.cat((past.key_blocks, blocks_now), dim=1)
        key_is_real = torch.cat((past.key_is_real, is_real), dim=1)
    # Plain bidirectional attention over unpadded input needs no mask at all (the fastest SDPA path).
    needs_mask = chunk_index is not None or not bool(key_is_real.all())
    allowed = None
    if needs_mask and use_flex(is_real.device, past_length, head_dim):
        allowed = block_causal_block_mask(blocks_now, key_blocks, key_is_real, noisy_copy)
    elif needs_mask:
        noisy = () if noisy_copy is None else (noisy_copy.bool(), noisy_copy.bool())
        allowed = attention_allowed(blocks_now, key_blocks, key_is_real, *noisy)
    return AttentionContext(allowed, rope_cos_sin(position_ids, head_dim, rope_theta), key_blocks, key_is_real)


def run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    context: AttentionContext,
    past: KVCache | None = None,
    use_cache: bool = False,
    checkpoint_fn=None,
    kept_outputs: list[Tensor] | None = None,
) -> tuple[Tensor, KVCache | None]:
    """Run a stack of LLaDA blocks; shared by the backbone and the refinement head's tiny transformer. With
    `kept_outputs` (a list of length n), it ends holding the outputs of the last n blocks, earliest first."""
    keep_from = len(blocks) - len(kept_outputs) if kept_outputs is not None else len(blocks)
    new_keys, new_values = [], []
    for i, block in enumerate(blocks):
        layer_past = (past.keys[i], past.values[i]) if past is not None else None
        if checkpoint_fn is not None:
            x, (k, v) = checkpoint_fn(block.__call__, x, context.rope, context.allowed, layer_past)
        else:
            x, (k, v) = block(x, context.rope, context.allowed, layer_past)
        if i >= keep_from:
            kept_outputs[i - keep_from] = x
        if use_cache:
            new_keys.append(k)
            new_values.append(v)
    cache = KVCache(new_keys, new_values, context.key_blocks, context.key_is_real) if use_cache else None
    return x, cache


@dataclass
class LLaDAOutput(ModelOutput):
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None  # after ln_f, (B, L, d_model)
    # The last `read_layers` blocks' outputs, each through ln_f, earliest first: (B, L, read_layers x d_model).
    layer_states: Tensor | None = None
    cache: KVCache | None = None  # named `cache`: transformers >= 5.24 renames a `past_key_values` field to it

    @property
    def past_key_values(self) -> KVCache | None:
        return self.cache


class LLaDAModel(nn.Module):
    """The official module tree: everything lives under `transformer` (wte, blocks, ln_f, ff_out)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size, config.d_model),
                blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
                ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
            )
        )


class LLaDAPreTrainedModel(PreTrainedModel):
    config: LLaDAConfig
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but missing, unexpected or mis-shaped weights are an error, and a
        missing or damaged local directory is one `BrokenFileError` line naming the file (llada_trm.model.loading)."""
        source = checked_model_source(pretrained_model_name_or_path)
        wants_info = kwargs.pop("output_loading_info", False)
        load = super().from_pretrained
        name = None if source is None else str(source)  # None: weights from `state_dict=` / `config=` only
        model, info = library_call(source, lambda: load(name, *args, output_loading_info=True, **kwargs))
        problems = [f"{kind}: {sorted(map(str, keys))}" for kind, keys in info.items() if keys and kind != "error_msgs"]
        if problems:
            raise CheckpointMismatchError(f"checkpoint does not match {cls.__name__}: " + "; ".join(problems))
        return (model, info) if wants_info else model


class LLaDAModelLM(LLaDAPreTrainedModel):
    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.gradient_checkpointing = False  # switched by `gradient_checkpointing_enable()`
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Logits from final hidden states (after ln_f); the refinement head reuses it."""
        return self.model.transformer.ff_out(hidden)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        chunk_index: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        return_logits: bool = True,
        noisy_copy: Tensor | None = None,
        read_layers: int = 1,
        **unused,
    ) -> LLaDAOutput:
        """input_ids (B, L) or inputs_embeds (B, L, d); attention_mask (B, L) 1 = real token (this call's
        positions only when a cache is passed); chunk_index (B, L) switches on block-causal attention;
        noisy_copy (B, L) bool marks the noisy copy of clean-context training (model/attention.py);
        read_layers: how many of the last blocks' outputs `layer_states` holds (with output_hidden_states)."""
        if not 1 <= read_layers <= self.config.n_layers:
            raise ValueError(f"`read_layers` must be between 1 and the backbone's {self.config.n_layers} layers, "
                             f"got {read_layers}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        transformer = self.model.transformer
        x = transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        checkpoint_fn = self._gradient_checkpointing_func if self.gradient_checkpointing and self.training else None
        batch, length = x.shape[:2]
        context = attention_context(
            batch, length, self.config.head_dim, self.config.rope_theta, device=x.device,
            attention_mask=attention_mask, chunk_index=chunk_index, position_ids=position_ids, past=past_key_values,
            noisy_copy=noisy_copy,
        )
        kept = [None] * read_layers if output_hidden_states and read_layers > 1 else None
        x, cache = run_blocks(transformer.blocks, x, context, past_key_values, use_cache, checkpoint_fn,
                              kept_outputs=kept)
        hidden = transformer.ln_f(x)
        layer_states = None
        if output_hidden_states:  # the blocks before the last are read through ln_f too, so all share one scale
            earlier = [transformer.ln_f(state) for state in kept[:-1]] if kept else []  # kept[-1] is x itself
            layer_states = torch.cat([*earlier, hidden], -1) if earlier else hidden
        return LLaDAOutput(
            logits=transformer.ff_out(hidden) if return_logits else None,
            last_hidden_state=hidden if output_hidden_states else None,
            layer_states=layer_states,
            cache=cache,
        )
