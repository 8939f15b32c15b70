"""Atomic checkpoints on top of accelerate's state saving.

A checkpoint is written to `.tmp-checkpoint-N` and renamed to `checkpoint-N` only once complete (the rename
is atomic on one file system), so a crash mid-write never damages the last good checkpoint; older ones are
rotated out only after the new one is in place. Each holds:
- accelerate's state (optimiser, scheduler, RNG of every process, sampler) with the model weights reduced to
  the trainable part: with a frozen backbone only `head.*` is stored, never the backbone;
- `model/`: the loadable hybrid (`LLaDATRMHybrid.from_pretrained`) plus the tokenizer;
- `trainer_state.json`: step, epoch, position in the epoch and counters, written last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first (an interrupted `.tmp-` directory is never one of them)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(spec: str | None, output_dir: str) -> Path | None:
    """`latest` -> newest complete checkpoint of output_dir (None if there is none yet); a path must exist."""
    if not spec:
        return None
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a complete checkpoint (no {STATE_FILE})")
    return path


def trainable_prefixes(model) -> tuple[str, ...]:
    """State-dict prefixes that a checkpoint must keep: a frozen backbone is restored from its own source."""
    frozen = getattr(getattr(model, "config", None), "freeze_backbone", False) and hasattr(model, "head")
    return ("head.",) if frozen else ("",)


def register_state_hooks(accelerator) -> None:
    """Keep only the trainable weights in accelerate's state, and load them back strictly."""

    def on_save(models, weights, output_dir):
        for i, model in enumerate(models):
            prefixes = trainable_prefixes(accelerator.unwrap_model(model))
            if i < len(weights):
                weights[i] = {k: v for k, v in weights[i].items() if k.startswith(prefixes)}

    def on_load(models, input_dir):
        for model in list(models):
            unwrapped = accelerator.unwrap_model(model)
            if trainable_prefixes(unwrapped) != ("head.",):
                continue
            unwrapped.load_head_weights(Path(input_dir) / "model.safetensors")
            models.remove(model)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def save_checkpoint(accelerator, model, tokenizer, trainer_state: dict, output_dir: str, total_limit: int | None) -> Path:
    """Write checkpoint-{step} atomically on every process's behalf; returns its final path."""
    root = Path(output_dir)
    step = trainer_state["global_step"]
    final, staging = root / f"{PREFIX}{step}", root / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    full_state = accelerator.get_state_dict(model)  # a collective under FSDP / DeepSpeed: every rank calls it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(staging / "model", state_dict=full_state)
        tokenizer.save_pretrained(staging / "model")
        (staging / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():  # a re-run of the same step: replace it only now that the new one is complete
            shutil.rmtree(final)
        os.replace(staging, final)
        rotate(root, total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate(root: Path, total_limit: int | None) -> None:
    if not total_limit:
        return
    for old in complete_checkpoints(root)[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())
