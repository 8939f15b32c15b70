"""llada-trm: a frozen LLaDA masked-diffusion backbone with a recursive refinement head on 16-token chunks."""

from transformers import AutoConfig, AutoModel

from .collator import ChunkMaskingCollator
from .configuration_hybrid import HybridConfig
from .configuration_llada import LLaDAConfig, LLaDAConfigError
from .data import DataArguments, DataError, prepare_dataset
from .evaluation import chunk_decoder_accuracy, fair_evaluation, llada_sampler_accuracy
from .hybrid import HybridOutput, LLaDATRMHybrid
from .integrity import BrokenFileError
from .modeling_llada import CheckpointMismatchError, LLaDAModelLM
from .refinement_decoding import RefinementOutput, generate_with_refinement
from .truncation import TruncationConfig, truncation_keep_mask
from .weighting import WeightingConfig, token_weights

# `AutoConfig` / `AutoModel` know the official model_type "llada" without trust_remote_code.
AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

__all__ = [
    "BrokenFileError",
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
    "RefinementOutput",
    "WeightingConfig",
    "chunk_decoder_accuracy",
    "fair_evaluation",
    "llada_sampler_accuracy",
    "generate_with_refinement",
    "prepare_dataset",
    "token_weights",
    "truncation_keep_mask",
]
