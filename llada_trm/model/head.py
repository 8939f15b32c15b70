"""The recursive refinement head: a tiny block-causal transformer that refines the backbone's hidden states.

    x = in_proj(h)                          h: backbone hidden states after ln_f, (B, L, d_model); with
                                            head_reads_layers n, the last n layers' (B, L, n x d_model)
    y = x, z = z_init
    per refinement step:
        repeat latent_steps times:  z <- f(z + y + x)      (latent reasoning)
        y <- y + f(y + z)                                   (delta update of the answer state)
    step logits = lm_head(h + out_proj(y))                  out_proj starts at zero: hybrid == backbone

With `draft_feedback`, step s + 1 reads x + draft_proj(e(draft_s)) at the positions still masked, where draft_s
is step s's argmax token and e the backbone's input embedding: the draft of a chunk reaches every token of it
through f's attention, so its tokens condition on each other without another backbone pass.

f is a stack of LLaDA blocks (RMSNorm, SwiGLU, RoPE) plus a final RMSNorm, with the same block-causal
attention as the backbone. Every call of f inside a step has its own index, so generation can keep one KV
cache per call and refine a new chunk against exactly the keys its context had in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llada_trm.model.attention import KVCache
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.configuration_llada import LLaDAConfig
from llada_trm.model.modeling_llada import AttentionContext, LLaDABlock, RMSNorm, run_blocks


@dataclass
class RefinementState:
    y: Tensor  # answer state (B, L, H)
    z: Tensor  # latent state (B, L, H)
    steps_done: int = 0

    def detached(self) -> "RefinementState":
        return RefinementState(self.y.detach(), self.z.detach(), self.steps_done)


def head_block_config(config: HybridConfig) -> LLaDAConfig:
    """The head's tiny transformer is made of LLaDA blocks of the head's width."""
    return LLaDAConfig(
        d_model=config.head_hidden_size,
        n_heads=config.head_heads,
        n_kv_heads=config.head_heads,
        n_layers=config.head_layers,
        mlp_hidden_size=config.head_mlp_hidden_size,
        vocab_size=1,
        embedding_size=1,
        rope_theta=config.head_rope_theta,
        rms_norm_eps=config.head_rms_norm_eps,
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
        mask_token_id=0,
    )


class RecursiveRefinementHead(nn.Module):
    def __init__(self, config: HybridConfig, backbone_d_model: int):
        super().__init__()
        self.config = config
        width = config.head_hidden_size
        self.block_config = head_block_config(config)
        self.in_proj = nn.Linear(config.head_reads_layers * backbone_d_model, width, bias=False)
        self.blocks = nn.ModuleList(LLaDABlock(self.block_config) for _ in range(config.head_layers))
        self.norm = RMSNorm(width, config.head_rms_norm_eps)
        self.out_proj = nn.Linear(width, backbone_d_model, bias=False)
        # The draft tokens' input embeddings (backbone width) into the head's width.
        self.draft_proj = nn.Linear(backbone_d_model, width, bias=False) if config.draft_feedback else None
        self.register_buffer("z_init", torch.zeros(width))
        self.reset_parameters()

    @property
    def calls_per_step(self) -> int:
        return self.config.latent_steps + 1

    def reset_parameters(self) -> None:
        std = self.config.head_init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.out_proj.weight)  # at initialisation the hybrid predicts what the backbone predicts
        nn.init.normal_(self.z_init, std=1.0)  # a fixed (not trained) starting point of the latent state

    def f(
        self, u: Tensor, context: AttentionContext, past: KVCache | None = None, use_cache: bool = False
    ) -> tuple[Tensor, KVCache | None]:
        out, cache = run_blocks(self.blocks, u, context, past, use_cache)
        return self.norm(out), cache

    def project_in(self, layer_states: Tensor) -> Tensor:
        """x = in_proj(h), h the backbone's `layer_states` (B, L, head_reads_layers x d_model), in the head's own
        dtype (the head trains in fp32 even on a bf16 backbone)."""
        return self.in_proj(layer_states.to(self.in_proj.weight.dtype))

    def initial_state(self, x: Tensor) -> RefinementState:
        return RefinementState(y=x, z=self.z_init.to(x.dtype).expand_as(x))

    def step(
        self,
        state: RefinementState,
        x: Tensor,
        context: AttentionContext,
        caches: list[KVCache] | None = None,
        collect_caches: list[KVCache] | None = None,
    ) -> RefinementState:
        """One refinement step. `caches[c]` is the context of call c of f (c counts calls over all steps);
        with `collect_caches` (a list) the caches of this step's calls, extended by these positions, are appended."""
        first_call = state.steps_done * self.calls_per_step
        call_inputs = [lambda y, z: z + y + x] * self.config.latent_steps + [lambda y, z: y + z]
        y, z = state.y, state.z
        for offset, make_input in enumerate(call_inputs):
            past = caches[first_call + offset] if caches is not None else None
            out, cache = self.f(make_input(y, z), context, past, use_cache=collect_caches is not None)
            if collect_caches is not None:
                collect_caches.append(cache)
            if offset < self.config.latent_steps:
                z = out
            else:
                y = y + out
        return RefinementState(y, z, state.steps_done + 1)
