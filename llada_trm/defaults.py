"""Where the embedded default assets live inside the package."""

from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"
TINY_LLADA_PATH = ASSETS_DIR / "tiny-llada"  # tokenizer + pretrained tiny backbone (official layout)
