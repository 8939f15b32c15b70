"""Configuration of the hybrid: which backbone, the refinement head's shape, recursion and loss settings.

A hybrid checkpoint of a frozen backbone holds this config (naming the backbone) and the head weights only.
Each field's `help` is also the help of its training flag (training/arguments.py derives the flags from here),
and `validate_architecture` is the one place these settings' ranges are checked.
"""

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

STEP_WEIGHTINGS = ("linear", "uniform")
SCORED_POSITIONS = ("all", "masked")


class HybridConfigError(ValueError):
    """A hybrid setting out of range, named by its field in backticks."""


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@strict
class HybridConfig(PreTrainedConfig):
    model_type = "llada_trm_hybrid"

    backbone_name_or_path: str = "tiny-llada"
    backbone_in_checkpoint: bool = False  # True: the (trained) backbone is saved in the `backbone/` subfolder
    freeze_backbone: bool = _setting(True, "train only the head (--no_freeze_backbone: full)")
    chunk_size: int = _setting(16, "tokens per reasoning chunk (thought)")
    # Refinement head; None = derived from the backbone's d_model when the model is built.
    head_hidden_size: int | None = _setting(None, "head width (default min(d_model, 1024))")
    head_layers: int = _setting(2, "layers of the head's tiny transformer")
    head_heads: int | None = _setting(None, "attention heads of the head (default max(1, head width // 64))")
    head_mlp_hidden_size: int | None = _setting(None, "MLP width of the head (default 3 x head width)")
    head_rope_theta: float = _setting(10000.0, "RoPE base of the head")
    head_rms_norm_eps: float = _setting(1e-5, "RMSNorm epsilon of the head")
    head_reads_layers: int = _setting(1, (
        "backbone layers the head reads: the last, and with n > 1 the n - 1 blocks before it (each through the "
        "backbone's final norm, concatenated into the head's input projection)"))
    head_init_std: float = _setting(0.02, "standard deviation of the head's initial weights")
    latent_steps: int = _setting(2, "latent updates z <- f(z + y + x) per refinement step")
    # Recursion
    max_recursive_steps: int = _setting(8, "refinement steps in training; cap at inference")
    min_recursive_steps: int = _setting(2, "refinement steps before an early stop")
    refine_confidence_threshold: float = _setting(0.9, "stop refining a chunk at this confidence")
    detach_between_steps: bool = _setting(True, "detach y and z between refinement steps")
    # None: on exactly when detach_between_steps is on. Detached steps only need their own activations in the
    # backward pass, and recomputing each step there keeps memory flat in the number of steps.
    checkpoint_refinement_steps: bool | None = _setting(None, (
        "recompute each refinement step in backward: memory flat in the number of steps (default: with detaching)"))
    clean_context: bool = _setting(False, (
        "train every chunk against the clean chunks before it, as decoding sees them (a noisy copy of the chunks "
        "after the clean ones, one pass; twice the sequence)"))
    draft_feedback: bool = _setting(False, (
        "feed each refinement step's draft (the input embeddings of its argmax tokens at still-masked positions) "
        "into the next step: a chunk's tokens condition on each other without another backbone pass"))
    # Deep-supervision loss
    deep_supervision_weight: float = _setting(0.3, "masked chunks weigh 1 + this")
    unmasked_chunk_weight: float = _setting(1.0, "weight of unmasked chunks")
    step_weighting: str = _setting("linear", "linear (a_s = s) or uniform")
    # The LM head (d_model x vocabulary) at every step is most of a step's cost at 8B (docs/performance.md).
    intermediate_step_positions: str = _setting("all", (
        "where the steps before the last are scored: all supervised positions, or `masked` (those whose input is "
        "the mask token; the last step: --final_step_positions)"))
    final_step_positions: str = _setting("all", (
        "where the last step is scored in training: all supervised positions, or `masked` (those whose input is "
        "the mask token; needs unmasked_chunk_weight 0, where the others weigh nothing, so the loss is unchanged; "
        "held-out evaluation scores all)"))

    def resolve_head_shape(self, backbone_d_model: int, backbone_layers: int | None = None) -> None:
        """Fill the derived head sizes from the backbone width (once, before the head is built); check that the
        backbone has the layers the head reads."""
        if backbone_layers is not None and self.head_reads_layers > backbone_layers:
            raise HybridConfigError(
                f"`head_reads_layers` ({self.head_reads_layers}) exceeds the backbone's {backbone_layers} layers")
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
        positive = ("chunk_size", "head_layers", "head_reads_layers", "latent_steps", "max_recursive_steps",
                    "min_recursive_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise HybridConfigError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        for name in ("head_hidden_size", "head_heads", "head_mlp_hidden_size"):  # None: derived later
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HybridConfigError(f"`{name}` must be positive, got {value}")
        if self.min_recursive_steps > self.max_recursive_steps:
            raise HybridConfigError(
                f"`min_recursive_steps` ({self.min_recursive_steps}) must not exceed "
                f"`max_recursive_steps` ({self.max_recursive_steps})"
            )
        if self.step_weighting not in STEP_WEIGHTINGS:
            raise HybridConfigError(
                f"`step_weighting` must be one of {', '.join(STEP_WEIGHTINGS)}, got {self.step_weighting!r}"
            )
        for name in ("intermediate_step_positions", "final_step_positions"):
            if getattr(self, name) not in SCORED_POSITIONS:
                raise HybridConfigError(
                    f"`{name}` must be one of {', '.join(SCORED_POSITIONS)}, got {getattr(self, name)!r}")
        if self.final_step_positions == "masked" and self.unmasked_chunk_weight != 0:
            raise HybridConfigError(
                f"`final_step_positions` masked leaves the unmasked positions out of the loss: it needs "
                f"`unmasked_chunk_weight` 0, got {self.unmasked_chunk_weight}")
        for name in ("deep_supervision_weight", "unmasked_chunk_weight", "refine_confidence_threshold"):
            if getattr(self, name) < 0:
                raise HybridConfigError(f"`{name}` must be non-negative, got {getattr(self, name)}")
        if self.head_hidden_size is not None and self.head_heads is not None:
            if self.head_hidden_size % self.head_heads or (self.head_hidden_size // self.head_heads) % 2:
                raise HybridConfigError(
                    f"`head_hidden_size` ({self.head_hidden_size}) must split into `head_heads` "
                    f"({self.head_heads}) heads of even size"
                )
