"""LLaDA configuration with the official field names (LLaDA-8B-Instruct `config.json`).

Defaults are those of LLaDA-8B-Instruct. Fields that decide the shape of the weights are *required* when a
config is read from a dictionary or a file (a missing `d_model` must not silently become 4096), and the
architecture switches this implementation does not support (`alibi`, other block types, ...) are rejected
with a message naming the field.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Fields without which the weight shapes are unknown: never defaulted when loading a config file.
REQUIRED_FIELDS = ("d_model", "n_heads", "n_layers", "vocab_size")


class LLaDAConfigError(ValueError):
    """A config.json that this implementation cannot or must not load."""


@strict
class LLaDAConfig(PreTrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_hidden_size: int | None = 12288
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    max_sequence_length: int = 4096
    rope: bool = True
    rope_theta: float = 500000.0
    rope_full_precision: bool = True
    rms_norm_eps: float = 1e-5
    layer_norm_type: str = "rms"
    activation_type: str = "silu"
    block_type: str = "llama"
    include_bias: bool = False
    include_qkv_bias: bool = False
    weight_tying: bool = False
    scale_logits: bool = False
    alibi: bool = False
    init_std: float = 0.02
    use_cache: bool = False
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = 126080
    mask_token_id: int = 126336
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:  # the name the rest of the HF ecosystem looks for
        return self.d_model

    def validate_architecture(self):
        """Reject every switch this implementation does not implement, naming the field."""
        unsupported = {
            "block_type": (self.block_type, "llama"),
            "layer_norm_type": (self.layer_norm_type, "rms"),
            "activation_type": (self.activation_type, "silu"),
            "alibi": (self.alibi, False),
            "rope": (self.rope, True),
            "include_bias": (self.include_bias, False),
            "include_qkv_bias": (self.include_qkv_bias, False),
            "scale_logits": (self.scale_logits, False),
        }
        for field, (value, supported) in unsupported.items():
            if value != supported:
                raise LLaDAConfigError(
                    f"LLaDA config field `{field}` = {value!r} is not supported (only {supported!r} is implemented)"
                )
        if self.d_model % self.n_heads:
            raise LLaDAConfigError(f"`d_model` ({self.d_model}) must be divisible by `n_heads` ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise LLaDAConfigError(f"`n_heads` ({self.n_heads}) must be divisible by `n_kv_heads` ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise LLaDAConfigError(f"head size d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise LLaDAConfigError(
                f"`embedding_size` ({self.embedding_size}) must be at least `vocab_size` ({self.vocab_size})"
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        missing = [field for field in REQUIRED_FIELDS if field not in config_dict]
        if missing:
            raise LLaDAConfigError(f"LLaDA config is missing required field(s): {', '.join(missing)}")
        return super().from_dict(config_dict, **kwargs)
