"""llada-trm: a frozen LLaDA masked-diffusion backbone with a recursive refinement head on 16-token chunks."""

from .collator import ChunkMaskingCollator
from .configuration_hybrid import HybridConfig
from .configuration_llada import LLaDAConfig, LLaDAConfigError
from .data import DataArguments, DataError, prepare_dataset
from .hybrid import HybridOutput, LLaDATRMHybrid
from .modeling_llada import CheckpointMismatchError, LLaDAModelLM
from .truncation import TruncationConfig, truncation_keep_mask
from .weighting import WeightingConfig, token_weights

__all__ = [
    "ChunkMaskingCollator",
    "CheckpointMismatchError",
    "DataArguments",
    "DataError",
    "HybridConfig",
    "HybridOutput",
    "LLaDAConfig",
    "LLaDAConfigError",
    "LLaDAModelLM",
    "LLaDATRMHybrid",
    "TruncationConfig",
    "WeightingConfig",
    "prepare_dataset",
    "token_weights",
    "truncation_keep_mask",
]
