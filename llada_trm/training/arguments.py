"""Command-line arguments of the training program: dataclasses parsed by `HfArgumentParser`.

`--config configs/NAME.yaml` supplies defaults (a YAML mapping of flag names to values); flags given on the
command line override it. An unknown YAML key or an invalid value is a usage error: one line naming the flag
(or the file and key), exit code 2, no traceback.

The hybrid's flags are HybridConfig's own fields (name, type, default, help), and its `validate_architecture`
is their only range check; the chunk-masking flags are `MaskingArguments`, shared with the inspect program.

The program's defaults are the library's (the dataclasses' and HybridConfig's, sized for an 8B backbone) except
where the embedded profile (llada_trm/embedded/profile.yaml) changes them: without `--config`, or with a config
that says `base: embedded`, the program runs the embedded default; any other config starts from the library's.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser, PreTrainedConfig

from llada_trm.data.arguments import DataArguments
from llada_trm.data.sources import read_utf8_text
from llada_trm.embedded.assets import EMBEDDED_PROFILE_FILE
from llada_trm.model.configuration_hybrid import HybridConfig, HybridConfigError
from llada_trm.training.truncation import TruncationConfig
from llada_trm.training.weighting import WeightingConfig

OBJECTIVES = ("hybrid", "llada_sft", "block_sft")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class UsageError(ValueError):
    """A flag, config file or value the program cannot run with; printed as one line, exit code 2."""


def as_usage_error(error: HybridConfigError) -> UsageError:
    """A HybridConfigError in the training flags' words: its fields are the flags' names (`chunk_size` ->
    --chunk_size)."""
    return UsageError(re.sub(r"`(\w+)`", r"--\1", str(error)))


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class MaskingArguments:
    """Which reasoning chunks the collator masks; shared by training and `python -m llada_trm.inspect`."""

    mask_probability: float = field(default=0.3, metadata=_help("probability that a reasoning chunk is masked"))
    partial_chunk_masking: bool = field(default=False, metadata=_help(
        "mask only a random fraction (rate drawn per chunk) of a masked chunk's tokens, as between decode rounds"))

    def validate(self) -> None:
        if not 0.0 <= self.mask_probability <= 1.0:
            raise UsageError(f"--mask_probability must be in [0, 1], got {self.mask_probability}")


@dataclass
class _BackboneArguments:
    model_name_or_path: str = field(default="tiny-llada", metadata=_help(
        "LLaDA backbone: `tiny-llada` (shipped), a local directory, or a Hub name such as GSAI-ML/LLaDA-8B-Instruct"))
    objective: str = field(default="hybrid", metadata=_help(
        "hybrid (backbone + refinement head), llada_sft (plain LLaDA SFT) or block_sft (the backbone block-causally "
        "with clean context: the adaptation stage before a head)"))
    use_lora: bool = field(default=False, metadata=_help("LoRA adapters on the backbone (needs peft)"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute backbone activations"))


# HybridConfig's own fields that are not flags: the backbone is --model_name_or_path, and whether a checkpoint
# holds the backbone is decided when it is saved.
_NOT_FLAGS = {"backbone_name_or_path", "backbone_in_checkpoint"} | {f.name for f in dataclasses.fields(PreTrainedConfig)}
HYBRID_FLAGS = {f.name: f for f in dataclasses.fields(HybridConfig) if f.name not in _NOT_FLAGS}


def _flag(name: str, kind, f: dataclasses.Field) -> tuple:
    return name, kind, field(default=f.default, metadata=f.metadata)


def _flags_of(cls) -> list[tuple]:
    hints = typing.get_type_hints(cls)
    return [_flag(f.name, hints[f.name], f) for f in dataclasses.fields(cls)]


# The backbone and masking flags, then --<field> for every HybridConfig setting (names, types, defaults and help
# come from the config). `.masking` gives the masking flags as the group the collator settings are.
ModelArguments = dataclasses.make_dataclass(
    "ModelArguments",
    _flags_of(_BackboneArguments) + _flags_of(MaskingArguments) + [_flag(n, f.type, f) for n, f in HYBRID_FLAGS.items()],
    namespace={
        "__module__": __name__,  # so that the arguments pickle like any class of this module
        "masking": property(lambda self: MaskingArguments(self.mask_probability, self.partial_chunk_masking)),
    },
)


def hybrid_config(model: ModelArguments) -> HybridConfig:
    """The HybridConfig the flags describe. Raises HybridConfigError (named by field) for a setting out of range."""
    settings = {name: getattr(model, name) for name in HYBRID_FLAGS}
    # LoRA trains adapters inside the backbone, so the hybrid must not freeze it as a whole.
    settings["freeze_backbone"] = model.freeze_backbone and not model.use_lora
    try:
        return HybridConfig(backbone_name_or_path=model.model_name_or_path, **settings)
    except StrictDataclassError as error:  # @strict wraps the validator's error
        if isinstance(error.__cause__, HybridConfigError):
            raise error.__cause__ from None
        raise


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
    eval_sampler_max_samples: int | None = field(default=200, metadata=_help(
        "of those, the first N scored with LLaDA's sampler, about 16x the cost of a pass per chunk (none: all)"))
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
    + [(f"truncation_{name}", kind | None, field(default=None)) for name, kind, _ in _flags_of(TruncationConfig)],
    namespace={"__module__": __name__},
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

def embedded_profile() -> dict:
    """The training program's defaults where they differ from the library's: llada_trm/embedded/profile.yaml, the
    one place that says what the embedded run changes. They live at the flag layer, not in HybridConfig or the
    dataclasses: `LLaDATRMHybrid.from_pretrained`, fresh heads, the benchmarks and the inspect program keep the
    library's defaults, and an 8B run states its sizes in its own config."""
    return _read_yaml(EMBEDDED_PROFILE_FILE, "the embedded profile")


def make_parser(profile: bool = True) -> HfArgumentParser:
    """The training program's parser; its defaults are the library's, with the embedded profile on top when
    `profile` (no --config, or a config that says `base: embedded`)."""
    parser = HfArgumentParser(PARSED_TYPES, description="Train the LLaDA + recursive-refinement hybrid.")
    parser.add_argument("--config", default=None, help="YAML file of flag values; command-line flags override it. "
                        "It starts from the library defaults, or from the embedded profile with `base: embedded`")
    embedded = embedded_profile()
    if profile:
        parser.set_defaults(**_checked(parser, embedded, "the embedded profile"))
    # HfArgumentParser adds --no_<flag> only where the dataclass default is True; a profile default of True needs it
    # too, or the way to turn the default off would differ from every other boolean's.
    options = parser._option_string_actions
    for name, value in embedded.items():
        if value is True and f"--no_{name}" not in options:
            parser.add_argument(f"--no_{name}", action="store_false", dest=name,
                                help=f"turn off --{name} (on in the embedded profile)")
    return parser


def _read_yaml(file: Path, what: str) -> dict:
    if not file.is_file():
        raise UsageError(f"{what}: no such file")
    try:
        values = yaml.safe_load(read_utf8_text(file)) or {}  # not UTF-8: one line naming file and byte
    except yaml.YAMLError as error:
        raise UsageError(f"{what}: invalid YAML ({error})") from None
    if not isinstance(values, dict):
        raise UsageError(f"{what}: expected a mapping of flag names to values")
    return values


def _checked(parser: HfArgumentParser, values: dict, what: str) -> dict:
    """YAML values as parser defaults: every key a flag, and YAML's `1` for a float flag made 1.0 (argparse converts
    only the strings of the command line, and the hybrid's strict config refuses an int)."""
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UsageError(f"{what}: unknown key(s) {', '.join(unknown)}")
    return {key: float(value) if actions[key].type is float and type(value) is int else value
            for key, value in values.items()}


def _config_file(path: str) -> tuple[dict, bool]:
    """A --config file's values, and whether it starts from the embedded profile (`base: embedded`)."""
    values = _read_yaml(Path(path), f"--config {path}")
    base = values.pop("base", None)
    if base not in (None, "embedded"):
        raise UsageError(f"--config {path}: `base` must be `embedded` (the embedded profile) or absent, got {base!r}")
    return values, base == "embedded"


def parse_arguments(argv: list[str] | None = None, environ=None) -> RunArguments:
    """Parse flags (and the optional YAML config) into validated argument groups. Raises UsageError."""
    import os

    config_path = make_parser().parse_known_args(argv)[0].config
    values, on_profile = _config_file(config_path) if config_path else ({}, True)
    parser = make_parser(profile=on_profile)
    parser.set_defaults(**_checked(parser, values, f"--config {config_path}"))
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
    reads_last_step_everywhere = truncation.enable or weighting.loss_weighting != "none"
    if on_profile and (reads_last_step_everywhere or model.unmasked_chunk_weight != 0):
        for name in set(NARROWED_SCORING_FLAGS) - _named_flags(argv, values, NARROWED_SCORING_FLAGS):
            setattr(model, name, "all")  # the profile's `masked` yields (NARROWED_SCORING_FLAGS)
    validate(model, train)
    if model.final_step_positions == "masked" and reads_last_step_everywhere:
        raise UsageError("--final_step_positions masked scores the last step at masked positions only, but token-level "
                         "truncation (TRUNCATION_ENABLE) and --loss_weighting read its loss at every supervised "
                         "position: use --final_step_positions all with them")
    return RunArguments(model, data, train, truncation, weighting, dict(flags, **({"preset": preset} if preset else {})))


# The embedded profile scores every refinement step at the masked inputs only: with unmasked chunks weighing 0 that is
# the loss and gradients of scoring everywhere, for less compute. Where something reads the other positions (unmasked
# chunks that weigh, truncation or token weighting, which read the last step's loss everywhere), the profile's value
# yields to the library's `all`; a value the user names is kept (and refused where it cannot work).
NARROWED_SCORING_FLAGS = ("intermediate_step_positions", "final_step_positions")


def _named_flags(argv: list[str] | None, config_values: dict, names: tuple[str, ...]) -> set[str]:
    """Which of `names` the command line or the --config file sets (argparse's abbreviations included)."""
    probe = make_parser(profile=False)
    probe.set_defaults(**{name: None for name in names})
    parsed = probe.parse_known_args(argv)[0]
    return {name for name in names if getattr(parsed, name) is not None or name in config_values}


def validate(model: ModelArguments, train: TrainArguments) -> None:
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise UsageError(message)

    require(model.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {model.objective!r}")
    require(model.lora_r >= 1, f"--lora_r must be at least 1, got {model.lora_r}")
    model.masking.validate()
    try:
        hybrid_config(model)
    except HybridConfigError as error:
        raise as_usage_error(error) from None
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
    require(train.eval_sampler_max_samples is None or train.eval_sampler_max_samples > 0,
            f"--eval_sampler_max_samples must be positive, got {train.eval_sampler_max_samples}")
    require(train.mixed_precision in MIXED_PRECISION, f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
    require(
        train.report_to in ("none", "tensorboard", "wandb", "all"),
        f"--report_to must be none, tensorboard, wandb or all, got {train.report_to!r}",
    )
    require(train.dataloader_num_workers >= 0, "--dataloader_num_workers must be non-negative")
    require(train.token_grad_trace_every >= 0,
            f"--token_grad_trace_every must be non-negative (0 = off), got {train.token_grad_trace_every}")
    if model.objective != "hybrid":
        require(not model.freeze_backbone or model.use_lora,
                f"--objective {model.objective} trains the backbone: add --no_freeze_backbone or --use_lora")
