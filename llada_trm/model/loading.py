"""Loading backbones, tokenizers and devices with one-line errors instead of library tracebacks.

Every model directory is checked before a library reads it (integrity.py): config.json, the weights and the
tokenizer files must be present and well-formed, and a manifest, when the directory has one, must match.
What the libraries still reject is re-raised as a `BrokenFileError` naming the directory. A name that is not an
existing directory is tried on the Hub only if it has the form of a repo id (`org/name`); a missing local path
such as `runs/x/model` is reported as missing, not as a malformed repo id.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llada_trm.embedded.assets import resolve_backbone_path
from llada_trm.model.configuration_llada import LLaDAConfigError
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.integrity import (
    MANIFEST,
    BrokenFileError,
    CheckpointMismatchError,
    check_file,
    check_json,
    one_line,
    read_manifest,
    verify_manifest,
)

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Errors that libraries raise for unreadable inputs; anything else is a bug and keeps its traceback.
LIBRARY_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError)


class DeviceError(ValueError):
    """A --device this machine or this torch build cannot use."""


def _safetensors_error():
    from safetensors import SafetensorError

    return SafetensorError


def locate(name_or_path: str) -> Path | str:
    """An existing local directory (as a Path), or a Hub repo id (as a str). Raises BrokenFileError."""
    resolved = resolve_backbone_path(str(name_or_path))
    path = Path(resolved).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BrokenFileError(path, "is a file, expected a model directory")
        return path
    if HUB_REPO_ID.fullmatch(resolved) and ".." not in resolved:
        return resolved
    raise BrokenFileError(path, "no such directory")


def check_present_files(directory: Path, names) -> None:
    for name in names:
        path = directory / name
        if path.exists() or path.is_symlink():
            check_file(path)


def check_model_directory(directory: Path, model_type: str | None = "llada") -> dict:
    """config.json (of `model_type`) and loadable weights; returns the config."""
    if (directory / MANIFEST).exists():
        verify_manifest(directory)
    config_file = directory / "config.json"
    if not config_file.exists() and not config_file.is_dir():
        raise BrokenFileError(directory, "no config.json: not a model directory")
    config = check_json(config_file)
    if not isinstance(config, dict):
        raise BrokenFileError(config_file, "not a JSON object")
    if model_type is not None and config.get("model_type") != model_type:
        raise BrokenFileError(config_file, f"model_type {config.get('model_type')!r}, expected {model_type!r}")
    present = [name for name in WEIGHT_FILES if (directory / name).exists() or (directory / name).is_dir()]
    if not present:
        raise BrokenFileError(directory, "no model weights (model.safetensors)")
    check_present_files(directory, present)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(check_json(index).get("weight_map", {}).values()))
        check_present_files(directory, shards)
        for shard in shards:
            if not (directory / shard).exists():
                raise BrokenFileError(directory / shard, "missing (listed in model.safetensors.index.json)")
    return config


def check_tokenizer_directory(directory: Path) -> None:
    if not any((directory / name).exists() or (directory / name).is_dir() for name in TOKENIZER_FILES):
        raise BrokenFileError(directory, "no tokenizer files (tokenizer.json / tokenizer_config.json)")
    check_present_files(directory, [*TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja",
                                    "chat_template.json"])


def library_call(source, call):
    """Run a library loader; what it raises for unreadable input becomes one line naming `source`."""
    try:
        return call()
    except (CheckpointMismatchError, LLaDAConfigError, BrokenFileError):
        raise
    except (*LIBRARY_LOAD_ERRORS, _safetensors_error()) as error:
        raise BrokenFileError(source, f"cannot be loaded ({type(error).__name__}: {one_line(error)})") from None


def checked_model_source(name_or_path) -> Path | str:
    """A LLaDA model directory that passed `check_model_directory`, or a Hub repo id (None stays None)."""
    if name_or_path is None:
        return None
    source = locate(name_or_path)
    if isinstance(source, Path):
        check_model_directory(source)
    return source


def load_hybrid_config(directory: Path):
    """The HybridConfig of a checked hybrid directory (config.json of model_type llada_trm_hybrid, head weights)."""
    source = locate(directory)
    if not isinstance(source, Path):
        raise BrokenFileError(directory, "no such directory")
    config_file = source / "config.json"
    if config_file.exists() or config_file.is_dir():
        model_type = (check_json(config_file) or {}).get("model_type") if config_file.is_file() else None
        if model_type is not None and model_type != HybridConfig.model_type:
            raise BrokenFileError(config_file, f"model_type {model_type!r}: not a hybrid checkpoint "
                                               f"(expected {HybridConfig.model_type!r})")
    if not (source / MANIFEST).is_file():
        read_manifest(source)  # raises: every hybrid directory gets a manifest when saved; without it, incomplete
    check_model_directory(source, model_type=HybridConfig.model_type)
    return library_call(source, lambda: HybridConfig.from_pretrained(str(source)))


def load_tokenizer(name_or_path: str):
    """`AutoTokenizer.from_pretrained` on a checked directory (or a Hub repo id)."""
    from transformers import AutoTokenizer

    source = locate(name_or_path)
    if isinstance(source, Path):
        check_tokenizer_directory(source)
    tokenizer = library_call(source, lambda: AutoTokenizer.from_pretrained(str(source)))
    if tokenizer.mask_token_id is None:  # masking, training and decoding all need it
        raise BrokenFileError(source, "the tokenizer defines no mask token (LLaDA's <|mdm_mask|>); its "
                                      "tokenizer_config.json is missing or incomplete")
    return tokenizer


def resolve_device(spec: str | None) -> torch.device:
    """--device: default cuda when available, else cpu; a device this torch build or machine lacks is an error."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {spec}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise DeviceError(f"--device {spec}: this torch build has no CUDA support (install a CUDA build of "
                              f"torch, or use --device cpu)")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: no CUDA device is visible on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {spec}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {spec}: unsupported device type {device.type!r} (cpu, cuda, mps)")
    return device
