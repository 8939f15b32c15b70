"""What every command-line program shares: the usage-error exit code, a one-line argparse parser, the scoring flags.

The programs are the modules at the package top, each started as `python -m llada_trm.<name>`: `train` (also
`train_llada_trm_hybrid_sft.py`), `generate`, `evaluate`, `frontier`, `inspect`, `compare`, `ablate`,
`pretrain`, `synthetic`, `distill`, `merge_adapters` and `grad_trace`. Each parses flags, calls the stage packages
below it and turns a user mistake into one line and exit 2.
"""

import argparse
import shlex
import sys
import typing
from dataclasses import fields

from llada_trm.data.arguments import DataArguments
from llada_trm.inference.decoding_settings import DecodingSettings

EXIT_USAGE = 2  # exit code of every command-line program for a user mistake (bad path or argument)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error: ...` line on stderr (exit 2) instead of usage plus message."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def add_scoring_flags(parser, backbone_help: str, max_samples: int = 200) -> None:
    """The flags `evaluate` and `frontier` share: the model (--checkpoint or --backbone), the held-out problems and
    the new-token budget."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="hybrid checkpoint directory (model + tokenizer files)")
    source.add_argument("--backbone", help=backbone_help)
    parser.add_argument("--dataset_name", default="synthetic")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_samples", type=int, default=max_samples, help="held-out problems scored")
    # The data's max_length (DataArguments), not the decoder's: problems are prepared as for training.
    parser.add_argument("--max_length", type=int, default=_field_default(DataArguments, "max_length"),
                        help="longest prepared sample in tokens (at most the model's max_sequence_length)")
    add_decoding_flags(parser, "max_new_tokens")  # default None: the longest reference reasoning + one chunk


def _field_default(cls, name: str):
    return next(f.default for f in fields(cls) if f.name == name)


def add_decoding_flags(parser, *names: str) -> None:
    """`--<name>` for each named DecodingSettings field, with the field's type, default and help: a decoding
    setting has its one definition there, whichever program decodes. A boolean on by default is `--no_<name>`."""
    settings = {f.name: f for f in fields(DecodingSettings)}
    hints = typing.get_type_hints(DecodingSettings)
    for name in names:
        setting, kind = settings[name], hints[name]
        help, aliases = setting.metadata["help"], setting.metadata["aliases"]
        if kind is bool:
            flag, action = (f"--no_{name}", "store_false") if setting.default else (f"--{name}", "store_true")
            parser.add_argument(flag, *aliases, dest=name, action=action, default=setting.default, help=help)
        else:
            value_type = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(f"--{name}", *aliases, type=value_type, default=setting.default, help=help)


def decoding_settings(args: argparse.Namespace, **fixed) -> DecodingSettings:
    """The DecodingSettings of the parsed decoding flags, with `fixed` fields set by the program itself."""
    given = {f.name: getattr(args, f.name) for f in fields(DecodingSettings) if hasattr(args, f.name)}
    return DecodingSettings(**{**given, **fixed})


def split_extra_flags(text: str, option: str, owned_flags, runs: str) -> list[str]:
    """The training flags of a runner's `--extra` value (shell quoting). Raises ValueError for bad quoting or for a
    flag the runner sets itself for every one of its `runs` (the caller turns it into its usage error)."""
    try:
        flags = shlex.split(text)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from None
    owned = sorted({flag.split("=", 1)[0] for flag in flags} & set(owned_flags))
    if owned:
        raise ValueError(f"{option} may not set {', '.join(owned)}: the runner sets it for every {runs} "
                         f"(use the runner's own flag where there is one)")
    return flags
