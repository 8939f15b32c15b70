"""llada-trm: a frozen LLaDA masked-diffusion backbone with a recursive refinement head on 16-token chunks."""

from .configuration_llada import LLaDAConfig, LLaDAConfigError
from .modeling_llada import CheckpointMismatchError, LLaDAModelLM

__all__ = ["LLaDAConfig", "LLaDAConfigError", "LLaDAModelLM", "CheckpointMismatchError"]
