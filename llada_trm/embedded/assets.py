"""Where the embedded default assets live inside the package: the tiny backbone and the training profile."""

from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"
TINY_LLADA_PATH = ASSETS_DIR / "tiny-llada"  # tokenizer + pretrained tiny backbone (official layout)
# What the training program changes of the library defaults for the embedded run (read by training/arguments.py).
EMBEDDED_PROFILE_FILE = Path(__file__).parent / "profile.yaml"


def resolve_backbone_path(name_or_path: str) -> str:
    """`tiny-llada` names the shipped backbone; anything else is a local path or a Hub name."""
    return str(TINY_LLADA_PATH) if name_or_path == "tiny-llada" else name_or_path
