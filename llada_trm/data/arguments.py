"""The data flags (`DataArguments`) and the one reading of a split spec such as `train[:95%]`.

Both the data sources and the dataset preparation import this module; it imports neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# --dataset_name aliases: their Hub name and configuration, and a field mapping of their own.
ALIAS_HUB_NAMES = {"natural_reasoning": ("facebook/natural_reasoning", None), "gsm8k": ("openai/gsm8k", "main")}
_SPLIT_SPEC = re.compile(r"^(?P<name>[\w.-]+?)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


class DataArgumentError(ValueError):
    """An invalid data flag; the message names the flag."""


def parse_split(spec: str, flag: str = "split") -> re.Match:
    """The parts of a split spec: `name`, and the slice bounds `start` and `stop` (None when absent)."""
    match = _SPLIT_SPEC.match(spec)
    if match is None:
        raise DataArgumentError(f"{flag} must be a split name, optionally sliced "
                                f"(train, train[:90%], train[-200:]), got {spec!r}")
    return match


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DataArguments:
    dataset_name: str = field(default="synthetic", metadata=_help(
        "synthetic (embedded, offline), natural_reasoning, gsm8k, a Hub dataset name, or a local "
        ".jsonl/.json/.parquet/.csv file or directory"))
    dataset_config: str | None = field(default=None, metadata=_help("Hub dataset configuration name"))
    dataset_path: str | None = field(default=None, metadata=_help(
        "local file or directory read with the field mapping of --dataset_name (gsm8k, natural_reasoning; "
        "synthetic = the generic fields)"))
    train_split: str = field(default="train", metadata=_help("training split; slices like train[:95%%] work"))
    eval_split: str | None = field(default="validation", metadata=_help(
        "evaluation split (e.g. validation, train[95%%:]); none to disable"))
    question_field: str = field(default="question", metadata=_help("question field of question/reasoning records"))
    reasoning_field: str = field(default="reasoning", metadata=_help("reasoning field (string or list of steps)"))
    answer_field: str = field(default="answer", metadata=_help("final answer field (optional in records)"))
    text_field: str = field(default="text", metadata=_help("field of text records that contain the marker"))
    messages_field: str = field(default="messages", metadata=_help("field of chat records ([{role, content}])"))
    response_template: str | None = field(default=None, metadata=_help(
        "assistant header of your chat template, tried when the template-prefix method fails"))
    max_length: int = field(default=512, metadata=_help("maximum sample length in tokens (whole chunks)"))
    bad_sample_policy: str = field(default="skip", metadata=_help(
        "error: stop at the first bad record; skip: drop and count it"))
    max_bad_fraction: float = field(default=0.5, metadata=_help("stop when more than this fraction of records is bad"))
    num_synthetic_train: int = field(default=1000, metadata=_help("synthetic train problems"))
    num_synthetic_eval: int = field(default=200, metadata=_help("synthetic validation/test problems"))
    max_samples: int | None = field(default=None, metadata=_help("use only the first N records of each split"))
    preprocessing_num_workers: int | None = field(default=None, metadata=_help("processes for tokenisation"))
    cache_dir: str | None = field(default=None, metadata=_help("datasets cache directory"))

    def __post_init__(self):
        if self.eval_split is not None and self.eval_split.strip().lower() in ("", "none"):
            self.eval_split = None
        self.dataset_path = self.dataset_path or None
        self.response_template = self.response_template or None

    def validate(self) -> None:
        if self.max_length <= 0:
            raise DataArgumentError(f"--max_length must be positive, got {self.max_length}")
        if self.bad_sample_policy not in ("error", "skip"):
            raise DataArgumentError(f"--bad_sample_policy must be error or skip, got {self.bad_sample_policy!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise DataArgumentError(f"--max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        for name in ("num_synthetic_train", "num_synthetic_eval", "max_samples", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise DataArgumentError(f"--{name} must be positive, got {value}")
        if not self.dataset_name:
            raise DataArgumentError("--dataset_name must not be empty")
        if self.dataset_path and self.dataset_name not in ("synthetic", *ALIAS_HUB_NAMES):
            raise DataArgumentError(
                f"--dataset_path reads local files, so --dataset_name must name a field mapping "
                f"(synthetic, {', '.join(ALIAS_HUB_NAMES)}), got {self.dataset_name!r}")
        for flag in ("train_split", "eval_split"):
            if getattr(self, flag) is not None:
                parse_split(getattr(self, flag), f"--{flag}")
