"""Atomic, verifiable checkpoints on top of accelerate's state saving; nothing in them is unpickled freely.

A checkpoint is written to `.tmp-checkpoint-N`, finished with a `manifest.json` (every file and its size,
written last), and renamed to `checkpoint-N`: a crash mid-write never damages the last good checkpoint, and
older ones are rotated out only after the new one is in place. Each holds:
- accelerate's state: `model.safetensors` (the trainable weights only: with a frozen backbone just `head.*`)
  and `optimizer.bin` (a torch archive, loaded with `weights_only=True`, which cannot run code);
- `rng_state_R.json` + `rng_state_R.safetensors`: the RNG states of process R (Python, NumPy, torch, CUDA),
  stored without pickle. accelerate's own `random_states_R.pkl` is removed before the manifest is written;
- `scheduler.json`: the learning-rate scheduler's state (accelerate would pickle it as custom_checkpoint_0.pkl,
  a file it loads with `weights_only=False`);
- `model/`: the loadable hybrid (`LLaDATRMHybrid.from_pretrained`) plus the tokenizer, with its own manifest;
- `trainer_state.json`: step, epoch, position in the epoch and counters.
A checkpoint holding any `.pkl` file is refused: this project never writes one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llada_trm.model.integrity import (
    BrokenFileError,
    check_json,
    fsync_directory,
    one_line,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from llada_trm.model.integrity import CheckpointMismatchError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
ACCELERATE_RNG_PICKLE = "random_states_{}.pkl"


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints (`checkpoint-N`: a directory only gets that name once complete), oldest write
    first. An interrupted `.tmp-` directory is never one of them; whether their files are still intact is
    `validate_checkpoint`'s job."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir():
            found.append((written_at(path), step, path))
    return [path for _, _, path in sorted(found)]


def written_at(checkpoint: Path) -> int:
    """When the checkpoint was completed: its manifest's time, else (a damaged manifest) the directory's
    modification time, so that a damaged recent checkpoint is still tried, and reported, first."""
    try:
        return int(read_manifest(checkpoint).get("written_at_ns", 0))
    except (BrokenFileError, TypeError, ValueError):
        return checkpoint.stat().st_mtime_ns


def validate_checkpoint(path: Path) -> dict:
    """Every file of the checkpoint complete and well-formed, no pickle, a consistent trainer state; returns
    the trainer state. Raises BrokenFileError naming the first bad file."""
    path = Path(path)
    if not path.is_dir():
        raise BrokenFileError(path, "no such checkpoint directory" if not path.exists() else "is not a directory")
    verify_manifest(path)
    pickles = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.pkl"))
    if pickles:
        raise BrokenFileError(path / pickles[0], "a pickle file, which could run code when loaded; this project "
                                                 "never writes one, so the checkpoint is refused")
    state = check_json(path / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise BrokenFileError(path / STATE_FILE, "not a trainer state (no integer global_step)")
    step = checkpoint_step(path)
    if step is not None and step != state["global_step"]:
        raise BrokenFileError(path / STATE_FILE, f"records step {state['global_step']}, the directory name {step}")
    return state


def resolve_resume(spec: str | None, output_dir: str, say=print, run_id: str | None = None) -> Path | None:
    """`latest` -> the most recently written checkpoint of run `run_id` in output_dir that passes validation (a
    broken one is skipped, with a message; None if there is none yet); a path must be a valid checkpoint.
    Raises BrokenFileError."""
    if not spec:
        return None
    if spec != "latest":
        validate_checkpoint(Path(spec))
        return Path(spec)
    problems = []
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        try:
            validate_checkpoint(checkpoint)
            owner = read_manifest(checkpoint).get("run_id")
            if run_id is not None and owner not in (None, run_id):
                say(f"--resume_from_checkpoint latest: skipping {checkpoint.name}: written by another run ({owner})")
                continue
        except BrokenFileError as error:
            say(f"--resume_from_checkpoint latest: skipping {checkpoint.name}: {error}")
            problems.append(str(error))
            continue
        return checkpoint
    if problems:
        raise BrokenFileError(Path(output_dir), f"no usable checkpoint ({'; '.join(problems)})")
    return None


# Hybrid settings that shape the model or its training recursion: a resume that changes one would not continue
# the saved run (the weights may even load), so it is refused.
ARCHITECTURE_FIELDS = ("chunk_size", "head_hidden_size", "head_layers", "head_heads", "head_mlp_hidden_size",
                       "head_rope_theta", "head_rms_norm_eps", "latent_steps", "max_recursive_steps",
                       "detach_between_steps", "freeze_backbone", "draft_feedback", "head_reads_layers")


def architecture_changes(checkpoint: Path, config) -> list[tuple[str, object, object]]:
    """(field, saved value, this run's value) for each ARCHITECTURE_FIELDS entry on which the hybrid saved in
    `checkpoint`/model differs from `config` (this run's HybridConfig; a None field is derived from the backbone
    later and not compared); empty when the checkpoint holds no hybrid."""
    saved = check_json(Path(checkpoint) / "model" / "config.json")
    if saved.get("model_type") != config.model_type:
        return []
    current = {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}
    return [(name, saved[name], value) for name, value in current.items()
            if value is not None and name in saved and saved[name] != value]


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


# ---------------------------------------------------------------------- RNG and scheduler without pickle
def save_rng_state(directory: Path, rank: int) -> None:
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(python_state), gauss],
             "numpy": [name, [int(k) for k in keys], int(position), int(has_gauss), float(cached)]}
    (directory / f"rng_state_{rank}.json").write_text(json.dumps(plain) + "\n")
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(directory / f"rng_state_{rank}.safetensors"))


def load_rng_state(directory: Path, rank: int) -> None:
    plain_file, tensor_file = directory / f"rng_state_{rank}.json", directory / f"rng_state_{rank}.safetensors"
    plain = check_json(plain_file)
    try:
        version, python_state, gauss = plain["python"]
        random.setstate((version, tuple(python_state), gauss))
        name, keys, position, has_gauss, cached = plain["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    except (KeyError, TypeError, ValueError) as error:
        raise BrokenFileError(plain_file, f"not an RNG state ({one_line(error)})") from None
    tensors = load_file(str(tensor_file))
    try:
        torch.set_rng_state(tensors["torch"])
    except (KeyError, RuntimeError) as error:
        raise BrokenFileError(tensor_file, f"not an RNG state ({one_line(error)})") from None
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_scheduler_state(directory: Path, scheduler) -> None:
    (directory / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()) + "\n")


def load_scheduler_state(directory: Path, scheduler) -> None:
    path = directory / SCHEDULER_FILE
    state = check_json(path)
    try:
        scheduler.load_state_dict(state)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise BrokenFileError(path, f"not a scheduler state ({one_line(error)})") from None


# ---------------------------------------------------------------------- save and load
def save_checkpoint(accelerator, model, tokenizer, trainer_state: dict, output_dir: str, total_limit: int | None,
                    scheduler=None, run_id: str | None = None) -> Path:
    """Write checkpoint-{step} atomically on every process's behalf; returns its final path."""
    root = Path(output_dir)
    step = trainer_state["global_step"]
    final, staging = root / f"{PREFIX}{step}", root / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    rank = accelerator.process_index
    (staging / ACCELERATE_RNG_PICKLE.format(rank)).unlink(missing_ok=True)
    save_rng_state(staging, rank)
    full_state = accelerator.get_state_dict(model)  # a collective under FSDP / DeepSpeed: every rank calls it
    accelerator.wait_for_everyone()  # every process's RNG files are in place before the manifest lists them
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(staging / "model", state_dict=full_state)
        tokenizer.save_pretrained(staging / "model")
        write_manifest(staging / "model")
        if scheduler is not None:
            save_scheduler_state(staging, scheduler)
        (staging / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        write_manifest(staging, run_id=run_id, step=step)
        if final.exists():  # a re-run of the same step: replace it only now that the new one is complete
            discard(final)
        os.replace(staging, final)
        fsync_directory(root)
        rotate(root, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, scheduler=None) -> dict:
    """Validate, then restore accelerate's state (tensors: safetensors, or torch archives with
    weights_only=True), the RNG of this process and the scheduler; returns the trainer state."""
    checkpoint = Path(checkpoint)
    state = validate_checkpoint(checkpoint)
    from safetensors import SafetensorError

    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except (BrokenFileError, CheckpointMismatchError):
        raise
    except pickle.UnpicklingError as error:
        raise BrokenFileError(checkpoint, "refused: a torch archive holds objects that torch.load(weights_only=True) "
                                          f"does not allow, which could run code ({one_line(error)[:120]})") from None
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, SafetensorError) as error:
        raise BrokenFileError(checkpoint, f"cannot be restored ({type(error).__name__}: {one_line(error)})") from None
    load_rng_state(checkpoint, accelerator.process_index)
    if scheduler is not None:
        load_scheduler_state(checkpoint, scheduler)
    return state


def discard(checkpoint: Path) -> None:
    """Remove a checkpoint: renamed out of the listing first, so a crash mid-delete leaves no half checkpoint."""
    doomed = checkpoint.with_name(f".deleting-{checkpoint.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(root: Path, total_limit: int | None) -> None:
    """Keep the `total_limit` most recently written checkpoints."""
    if not total_limit:
        return
    for old in complete_checkpoints(root)[:-total_limit]:
        discard(old)

