"""The accuracy-vs-speed frontier of a checkpoint or a plain LLaDA: exact match against tokens per backbone pass.

    python -m llada_trm.frontier --checkpoint runs/x/model --split test --output_dir runs/frontier
    python -m llada_trm.frontier --backbone tiny-llada --points sampler/k1,sampler/t0.9,chunked/r1

Scores held-out problems with the same new-token budget (temperature 0) at every point: LLaDA's sampler at
1/2/4/8/16 tokens per step and with threshold decoding at 0.9/0.7/0.5, the chunk decoder on the backbone alone and
the hybrid at 16/4/2/1 rounds per chunk and with a 0.9 threshold inside the chunk (`--backbone`: no hybrid points).
The chunk decoders and the sampler at a chunk per step score `--max_samples` problems (500), the other sampler
points the first `--sampler_max_samples` of them (200: it re-runs the whole sequence at every step). Prints exact
match with its standard error, TPF (new tokens per backbone row-pass), backbone and head FLOPs per new token
(FlopCounterMode over the first `--flop_sample` problems) and tokens/s, then each decoder kind's AUP and TPF within
1 point of its one-token exact match; writes frontier.json and, with matplotlib, frontier.png. Bad paths or
arguments print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llada_trm.cli import EXIT_USAGE, OneLineParser, add_scoring_flags
from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.inference.checkpoints import InferenceSetupError, load_for_inference
from llada_trm.inference.exact_match import default_new_token_budget, scored_rows
from llada_trm.inference.frontier import (
    BACKBONE_KINDS,
    DECODER_KINDS,
    PLOT_FILE,
    format_frontier_table,
    format_method_scores,
    frontier,
    method_scores,
    parse_points,
    plot_frontier,
    points_by_kind,
    write_frontier,
)
from llada_trm.model.loading import resolve_device
from llada_trm.model.integrity import CheckpointMismatchError


class UsageError(Exception):
    """A bad flag value; the message names the flag."""


def make_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m llada_trm.frontier", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    # 500 problems: most points are one pass per chunk; the sampler's below a chunk per step take
    # --sampler_max_samples of them.
    add_scoring_flags(parser, "LLaDA model directory or tiny-llada: the backbone decoders only", max_samples=500)
    parser.add_argument("--points", default=None,
                        help="comma-separated points (default: all that apply), e.g. sampler/k1,sampler/t0.9,"
                             "chunked/r16,hybrid/t0.9; kN = N tokens per step, rN = N rounds per chunk, tX = threshold")
    parser.add_argument("--sampler_max_samples", type=int, default=200,
                        help="sampler points score only the first N of the problems (about 16x the cost of one pass "
                             "per chunk)")
    parser.add_argument("--batch_size", type=int, default=8, help="chunk decoder batch (the sampler takes >= 32)")
    parser.add_argument("--flop_sample", type=int, default=8,
                        help="problems decoded once more under FlopCounterMode for FLOPs per token (0: none)")
    parser.add_argument("--output_dir", default="runs/frontier", help="where frontier.json and frontier.png go")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    for name in ("max_samples", "sampler_max_samples", "max_length", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    if args.flop_sample < 0:
        parser.error(f"--flop_sample must be >= 0, got {args.flop_sample}")
    return args


def held_out_rows(args, tokenizer, chunk_size: int, max_sequence_length: int) -> list[dict]:
    data_args = DataArguments(dataset_name=args.dataset_name, dataset_path=args.dataset_path,
                              max_length=min(args.max_length, max_sequence_length), max_samples=args.max_samples,
                              num_synthetic_eval=max(200, args.max_samples))
    prepared = prepare_dataset(data_args, tokenizer, chunk_size, args.split)
    print(prepared.summary.format())
    rows, unscored = scored_rows(prepared.dataset, args.max_samples)
    if unscored:
        print(f"{unscored} samples without a reference answer were not scored")
    if not rows:
        raise UsageError(f"--split {args.split}: no problem with a reference answer to score")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    try:
        device = resolve_device(args.device)
        model, tokenizer = load_for_inference(args.checkpoint, args.backbone, device)
        chunk_size = model.config.chunk_size
        kinds = DECODER_KINDS if args.checkpoint is not None else BACKBONE_KINDS
        try:
            points = parse_points(args.points, chunk_size, kinds)
        except ValueError as error:
            raise UsageError(f"--points: {error}") from error
        rows = held_out_rows(args, tokenizer, chunk_size, model.backbone.config.max_sequence_length)
        budget = args.max_new_tokens or default_new_token_budget(rows, chunk_size)
        result = frontier(model, tokenizer, rows, budget, points, batch_size=args.batch_size,
                          flop_sample=args.flop_sample, progress=not args.no_progress,
                          sampler_max_samples=args.sampler_max_samples)
    except (UsageError, InferenceSetupError, CheckpointMismatchError, ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, no traceback
        return EXIT_USAGE
    result["seconds"] = time.perf_counter() - began
    result["model"] = args.checkpoint or args.backbone
    result["methods"] = method_scores(points_by_kind(result), result["chunk_size"])
    output = Path(args.output_dir)
    path = write_frontier(result, output)
    plot_frontier(result, output / PLOT_FILE)
    sampler = "" if result["sampler_num_samples"] == result["num_samples"] else \
        f", sampler points below a chunk per step on the first {result['sampler_num_samples']}"
    print(f"\nfrontier on {result['num_samples']} problems ({args.split} split{sampler}), {budget} new tokens at "
          f"most, temperature 0; FLOPs over the first {result['flop_sample']} problems; {result['seconds']:.0f} s in all:")
    print(format_frontier_table(result))
    print("\neach decoder kind as a method (AUP: docs/evaluation.md):")
    print(format_method_scores(result["methods"]))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
