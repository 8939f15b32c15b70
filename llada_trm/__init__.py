"""llada-trm: a frozen LLaDA masked-diffusion backbone with a recursive refinement head on 16-token chunks."""

from transformers import AutoConfig, AutoModel

from llada_trm.data.collator import ChunkMaskingCollator
from llada_trm.data.dataset import DataArguments, DataError, prepare_dataset
from llada_trm.inference.chunk_decoding import RefinementOutput, generate_with_refinement
from llada_trm.inference.decoding_settings import DecodingSettings
from llada_trm.inference.exact_match import chunk_decoder_accuracy, fair_evaluation, llada_sampler_accuracy
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.configuration_llada import LLaDAConfig, LLaDAConfigError
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_outputs import HybridOutput
from llada_trm.model.integrity import BrokenFileError
from llada_trm.model.modeling_llada import CheckpointMismatchError, LLaDAModelLM
from llada_trm.training.truncation import TruncationConfig, truncation_keep_mask
from llada_trm.training.weighting import WeightingConfig, token_weights

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
    "DecodingSettings",
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
