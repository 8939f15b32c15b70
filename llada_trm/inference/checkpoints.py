"""Loading a model for inference: a hybrid checkpoint directory, or a fresh hybrid on a backbone directory."""

from __future__ import annotations

from pathlib import Path

from llada_trm.embedded.assets import resolve_backbone_path
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.integrity import check_json
from llada_trm.model.loading import load_tokenizer


class InferenceSetupError(Exception):
    """A checkpoint or backbone that cannot be loaded; the message says which and why."""


def _load_tokenizer(directory: Path):
    if not (directory / "tokenizer_config.json").exists() and not (directory / "tokenizer.json").exists():
        raise InferenceSetupError(f"{directory} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return load_tokenizer(str(directory))


def load_for_inference(checkpoint: str | None = None, backbone: str | None = None, device: str | None = None,
                       chunk_size: int | None = None):
    """(hybrid, tokenizer) from a checkpoint directory, or a fresh hybrid (untrained head) on a backbone
    directory (`tiny-llada` = the shipped one; `chunk_size` sets its chunk length). Raises InferenceSetupError
    with a readable message."""
    if (checkpoint is None) == (backbone is None):
        raise InferenceSetupError("give exactly one of --checkpoint and --backbone")
    directory = Path(checkpoint if checkpoint is not None else resolve_backbone_path(backbone))
    if not directory.is_dir():
        raise InferenceSetupError(f"{directory} is not a directory")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise InferenceSetupError(f"{directory} has no config.json: not a model directory")
    config = check_json(config_file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if checkpoint is not None:
        if model_type != HybridConfig.model_type:
            raise InferenceSetupError(f"{directory} is not a hybrid checkpoint (model_type {model_type!r}, expected "
                                      f"{HybridConfig.model_type!r}); use --backbone for a plain LLaDA model")
        model = LLaDATRMHybrid.from_pretrained(directory)
    else:
        if model_type != "llada":
            raise InferenceSetupError(f"{directory} is not a LLaDA model directory (model_type {model_type!r}); "
                                      f"use --checkpoint for a hybrid checkpoint")
        if not (directory / "model.safetensors").exists() and not any(directory.glob("model-*.safetensors")):
            raise InferenceSetupError(f"{directory} has no model weights (model.safetensors)")
        chunking = {"chunk_size": chunk_size} if chunk_size is not None else {}
        model = LLaDATRMHybrid(HybridConfig(backbone_name_or_path=str(directory), **chunking))
    tokenizer = _load_tokenizer(directory)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
