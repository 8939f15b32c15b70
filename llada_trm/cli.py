"""What every command-line program shares: the usage-error exit code, a one-line argparse parser, the scoring flags.

The programs are the modules at the package top, each started as `python -m llada_trm.<name>`: `train` (also
`train_llada_trm_hybrid_sft.py`), `generate`, `evaluate`, `frontier`, `inspect`, `compare`, `ablate`,
`pretrain`, `synthetic`, `distill` and `grad_trace`. Each parses flags, calls the stage packages below it and
turns a user mistake into one line and exit 2.
"""

import argparse
import sys

EXIT_USAGE = 2  # exit code of every command-line program for a user mistake (bad path or argument)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error: ...` line on stderr (exit 2) instead of usage plus message."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def add_scoring_flags(parser, backbone_help: str) -> None:
    """The flags `evaluate` and `frontier` share: the model (--checkpoint or --backbone), the held-out problems and
    the new-token budget."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="hybrid checkpoint directory (model + tokenizer files)")
    source.add_argument("--backbone", help=backbone_help)
    parser.add_argument("--dataset_name", default="synthetic")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_samples", type=int, default=200)
    parser.add_argument("--max_length", type=int, default=512,
                        help="longest prepared sample in tokens (at most the model's max_sequence_length)")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="new-token budget of every decoder (default: longest reference reasoning + one chunk)")
