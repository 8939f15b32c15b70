"""Command-line arguments of the training program: dataclasses parsed by `HfArgumentParser`.

`--config configs/NAME.yaml` supplies defaults (a YAML mapping of flag names to values); flags given on the
command line override it. An unknown YAML key or an invalid value is a usage error: one line naming the flag
(or the file and key), exit code 2, no traceback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from llada_trm.data.dataset import DataArguments
from llada_trm.training.truncation import TruncationConfig
from llada_trm.training.weighting import WeightingConfig

OBJECTIVES = ("hybrid", "llada_sft")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class UsageError(ValueError):
    """A flag, config file or value the program cannot run with; printed as one line, exit code 2."""


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="tiny-llada", metadata=_help(
        "LLaDA backbone: `tiny-llada` (shipped), a local directory, or a Hub name such as GSAI-ML/LLaDA-8B-Instruct"))
    objective: str = field(default="hybrid", metadata=_help("hybrid (backbone + refinement head) or llada_sft"))
    freeze_backbone: bool = field(default=True, metadata=_help("train only the head (--no_freeze_backbone: full)"))
    use_lora: bool = field(default=False, metadata=_help("LoRA adapters on the backbone (needs peft)"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute backbone activations"))
    chunk_size: int = field(default=16, metadata=_help("tokens per reasoning chunk (thought)"))
    mask_probability: float = field(default=0.3, metadata=_help("probability that a reasoning chunk is masked"))
    partial_chunk_masking: bool = field(default=False, metadata=_help(
        "mask only a random fraction (rate drawn per chunk) of a masked chunk's tokens, as between decode rounds"))
    head_hidden_size: int | None = field(default=None, metadata=_help("head width (default min(d_model, 1024))"))
    head_layers: int = field(default=2, metadata=_help("layers of the head's tiny transformer"))
    latent_steps: int = field(default=2, metadata=_help("latent updates z <- f(z + y + x) per refinement step"))
    max_recursive_steps: int = field(default=8, metadata=_help("refinement steps in training; cap at inference"))
    min_recursive_steps: int = field(default=2, metadata=_help("refinement steps before an early stop"))
    refine_confidence_threshold: float = field(default=0.9, metadata=_help("stop refining a chunk at this confidence"))
    detach_between_steps: bool = field(default=True, metadata=_help("detach y and z between refinement steps"))
    checkpoint_refinement_steps: bool | None = field(default=None, metadata=_help(
        "recompute each refinement step in backward: memory flat in the number of steps (default: with detaching)"))
    deep_supervision_weight: float = field(default=0.3, metadata=_help("masked chunks weigh 1 + this"))
    unmasked_chunk_weight: float = field(default=1.0, metadata=_help("weight of unmasked chunks"))
    step_weighting: str = field(default="linear", metadata=_help("linear (a_s = s) or uniform"))


@dataclass
class TrainArguments:
    output_dir: str = field(default="runs/llada-trm", metadata=_help("run directory: checkpoints, metrics, logs"))
    batch_size: int = field(default=8, metadata=_help("samples per device per micro-batch"))
    eval_batch_size: int | None = field(default=None, metadata=_help("default: --batch_size"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per optimiser step"))
    num_epochs: float = field(default=1.0, metadata=_help("passes over the training data"))
    max_steps: int | None = field(default=None, metadata=_help("optimiser steps (overrides --num_epochs)"))
    learning_rate: float = field(default=2e-3, metadata=_help("peak learning rate"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("transformers scheduler name"))
    warmup_ratio: float = field(default=0.05, metadata=_help("fraction of steps spent warming up"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping (0 disables)"))
    logging_steps: int = field(default=10, metadata=_help("optimiser steps between metric records"))
    eval_steps: int | None = field(default=None, metadata=_help("optimiser steps between evaluations (default: at the end)"))
    eval_max_samples: int = field(default=200, metadata=_help("held-out problems scored for exact match (0: none)"))
    eval_max_new_tokens: int | None = field(default=None, metadata=_help(
        "new-token budget of every decoder at evaluation (default: the longest reference reasoning + one chunk)"))
    eval_decode_steps_per_chunk: int = field(default=1, metadata=_help(
        "decode rounds per chunk of generate_with_refinement at evaluation"))
    save_steps: int | None = field(default=None, metadata=_help("optimiser steps between checkpoints (default: at the end)"))
    save_total_limit: int | None = field(default=2, metadata=_help("keep at most this many checkpoints"))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help("`latest` or a checkpoint directory"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "start a new run in an --output_dir that holds another run's checkpoints, removing them first"))
    report_to: str = field(default="none", metadata=_help("none, tensorboard, wandb (metrics.jsonl is always written)"))
    seed: int = field(default=42, metadata=_help("seed of initialisation, shuffling and mask draws"))
    mixed_precision: str = field(default="auto", metadata=_help("auto (bf16 on GPU, fp32 on CPU), no, bf16, fp16"))
    max_bad_steps: int = field(default=10, metadata=_help("stop after this many non-finite steps in a row"))
    debug_every: int = field(default=50, metadata=_help("with DEBUG=1: steps between chunk inspections"))
    dataloader_num_workers: int = field(default=0, metadata=_help("DataLoader worker processes"))
    token_grad_trace_every: int = field(default=0, metadata=_help(
        "optimiser steps between per-token gradient traces of one micro-batch (0 = off; docs/grad_trace.md)"))
    token_grad_trace_params: str | None = field(default=None, metadata=_help(
        "parameters the trace differentiates: comma-separated names or wildcards (default: the head's last layer "
        "and out_proj; the backbone's last layer for llada_sft)"))


# --truncation_<field> for every TruncationConfig field; None = not given, so the variable or preset applies.
TruncationArguments = dataclasses.make_dataclass(
    "TruncationArguments",
    [("truncation_preset", str | None, field(default=None, metadata=_help("strategy ladder rung: baseline, A1, A1b, A2, A3, A4, A5")))]
    + [
        (f"truncation_{f.name}", f.type if not isinstance(f.type, str) else eval(f.type) | None, field(default=None))  # noqa: S307
        for f in dataclasses.fields(TruncationConfig)
    ],
)


@dataclass
class RunArguments:
    model: ModelArguments
    data: DataArguments
    train: TrainArguments
    truncation: TruncationConfig
    weighting: WeightingConfig
    truncation_flags: dict  # the --truncation_* flags that were given, for the record


PARSED_TYPES = (ModelArguments, DataArguments, TrainArguments, TruncationArguments, WeightingConfig)


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(PARSED_TYPES, description="Train the LLaDA + recursive-refinement hybrid.")
    parser.add_argument("--config", default=None, help="YAML file of flag values; command-line flags override it")
    return parser


def _yaml_defaults(parser: HfArgumentParser, path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path}: invalid YAML ({error})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    return values


def parse_arguments(argv: list[str] | None = None, environ=None) -> RunArguments:
    """Parse flags (and the optional YAML config) into validated argument groups. Raises UsageError."""
    import os

    parser = make_parser()
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        parser.set_defaults(**_yaml_defaults(parser, config_path))
    model, data, train, truncation_args, weighting, _ = parser.parse_args_into_dataclasses(argv)
    flags = {k.removeprefix("truncation_"): v for k, v in vars(truncation_args).items() if v is not None}
    preset = flags.pop("preset", None)
    environ = os.environ if environ is None else environ
    try:
        truncation = (
            TruncationConfig.from_preset(preset, environ=environ, overrides=flags)
            if preset
            else TruncationConfig.from_env(environ=environ, overrides=flags)
        )
        data.validate()
        # Under LoRA the reference is the backbone with its adapters disabled (lora_reference.py).
        weighting.validate(has_frozen_reference=model.freeze_backbone or model.use_lora)
    except ValueError as error:
        raise UsageError(str(error)) from None
    validate(model, train)
    return RunArguments(model, data, train, truncation, weighting, dict(flags, **({"preset": preset} if preset else {})))


def validate(model: ModelArguments, train: TrainArguments) -> None:
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise UsageError(message)

    require(model.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {model.objective!r}")
    require(model.chunk_size > 0, f"--chunk_size must be positive, got {model.chunk_size}")
    require(0.0 <= model.mask_probability <= 1.0, f"--mask_probability must be in [0, 1], got {model.mask_probability}")
    for name in ("head_layers", "latent_steps", "max_recursive_steps", "min_recursive_steps", "lora_r"):
        require(getattr(model, name) >= 1, f"--{name} must be at least 1, got {getattr(model, name)}")
    require(
        model.min_recursive_steps <= model.max_recursive_steps,
        f"--min_recursive_steps ({model.min_recursive_steps}) must not exceed --max_recursive_steps ({model.max_recursive_steps})",
    )
    require(model.head_hidden_size is None or model.head_hidden_size > 0, f"--head_hidden_size must be positive, got {model.head_hidden_size}")
    require(model.step_weighting in ("linear", "uniform"), f"--step_weighting must be linear or uniform, got {model.step_weighting!r}")
    for name in ("deep_supervision_weight", "unmasked_chunk_weight", "refine_confidence_threshold"):
        require(getattr(model, name) >= 0, f"--{name} must be non-negative, got {getattr(model, name)}")
    for name in ("batch_size", "gradient_accumulation_steps", "logging_steps", "max_bad_steps", "debug_every",
                 "eval_decode_steps_per_chunk"):
        require(getattr(train, name) > 0, f"--{name} must be positive, got {getattr(train, name)}")
    for name in ("eval_batch_size", "max_steps", "eval_steps", "save_steps", "save_total_limit", "eval_max_new_tokens"):
        value = getattr(train, name)
        require(value is None or value > 0, f"--{name} must be positive, got {value}")
    require(train.num_epochs > 0, f"--num_epochs must be positive, got {train.num_epochs}")
    require(train.learning_rate > 0, f"--learning_rate must be positive, got {train.learning_rate}")
    require(0.0 <= train.warmup_ratio < 1.0, f"--warmup_ratio must be in [0, 1), got {train.warmup_ratio}")
    require(train.max_grad_norm >= 0, f"--max_grad_norm must be non-negative, got {train.max_grad_norm}")
    require(train.eval_max_samples >= 0, f"--eval_max_samples must be non-negative, got {train.eval_max_samples}")
    require(train.mixed_precision in MIXED_PRECISION, f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
    require(
        train.report_to in ("none", "tensorboard", "wandb", "all"),
        f"--report_to must be none, tensorboard, wandb or all, got {train.report_to!r}",
    )
    require(train.dataloader_num_workers >= 0, "--dataloader_num_workers must be non-negative")
    require(train.token_grad_trace_every >= 0,
            f"--token_grad_trace_every must be non-negative (0 = off), got {train.token_grad_trace_every}")
    if model.objective == "llada_sft":
        require(not model.freeze_backbone or model.use_lora,
                "--objective llada_sft trains the backbone: add --no_freeze_backbone or --use_lora")
