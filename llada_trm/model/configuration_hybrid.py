"""Configuration of the hybrid: which backbone, the refinement head's shape, recursion and loss settings.

A hybrid checkpoint of a frozen backbone holds this config (naming the backbone) and the head weights only.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

STEP_WEIGHTINGS = ("linear", "uniform")


class HybridConfigError(ValueError):
    """A hybrid setting out of range, named by its field."""


@strict
class HybridConfig(PreTrainedConfig):
    model_type = "llada_trm_hybrid"

    backbone_name_or_path: str = "tiny-llada"
    backbone_in_checkpoint: bool = False  # True: the (trained) backbone is saved in the `backbone/` subfolder
    freeze_backbone: bool = True
    chunk_size: int = 16
    # Refinement head; None = derived from the backbone's d_model when the model is built.
    head_hidden_size: int | None = None
    head_layers: int = 2
    head_heads: int | None = None
    head_mlp_hidden_size: int | None = None
    head_rope_theta: float = 10000.0
    head_rms_norm_eps: float = 1e-5
    head_init_std: float = 0.02
    latent_steps: int = 2
    # Recursion
    max_recursive_steps: int = 8
    min_recursive_steps: int = 2
    refine_confidence_threshold: float = 0.9
    detach_between_steps: bool = True
    # None: on exactly when detach_between_steps is on. Detached steps only need their own activations in the
    # backward pass, and recomputing each step there keeps memory flat in the number of steps.
    checkpoint_refinement_steps: bool | None = None
    # Deep-supervision loss
    deep_supervision_weight: float = 0.3
    unmasked_chunk_weight: float = 1.0
    step_weighting: str = "linear"

    def resolve_head_shape(self, backbone_d_model: int) -> None:
        """Fill the derived head sizes from the backbone width (once, before the head is built)."""
        if self.head_hidden_size is None:
            self.head_hidden_size = min(backbone_d_model, 1024)
        if self.head_heads is None:
            self.head_heads = max(1, self.head_hidden_size // 64)
        if self.head_mlp_hidden_size is None:
            self.head_mlp_hidden_size = 3 * self.head_hidden_size

    @property
    def recompute_steps(self) -> bool:
        if self.checkpoint_refinement_steps is None:
            return self.detach_between_steps
        return self.checkpoint_refinement_steps

    def validate_architecture(self):
        positive = ("chunk_size", "head_layers", "latent_steps", "max_recursive_steps", "min_recursive_steps")
        for field in positive:
            if getattr(self, field) < 1:
                raise HybridConfigError(f"`{field}` must be at least 1, got {getattr(self, field)}")
        if self.min_recursive_steps > self.max_recursive_steps:
            raise HybridConfigError(
                f"`min_recursive_steps` ({self.min_recursive_steps}) must not exceed "
                f"`max_recursive_steps` ({self.max_recursive_steps})"
            )
        if self.step_weighting not in STEP_WEIGHTINGS:
            raise HybridConfigError(f"`step_weighting` must be one of {STEP_WEIGHTINGS}, got {self.step_weighting!r}")
        for field in ("deep_supervision_weight", "unmasked_chunk_weight", "refine_confidence_threshold"):
            if getattr(self, field) < 0:
                raise HybridConfigError(f"`{field}` must be non-negative, got {getattr(self, field)}")
        if self.head_hidden_size is not None and self.head_heads is not None:
            if self.head_hidden_size % self.head_heads or (self.head_hidden_size // self.head_heads) % 2:
                raise HybridConfigError(
                    f"`head_hidden_size` ({self.head_hidden_size}) must split into `head_heads` "
                    f"({self.head_heads}) heads of even size"
                )
