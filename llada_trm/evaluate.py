"""Fair exact-match evaluation of a hybrid checkpoint or a plain LLaDA backbone on held-out problems.

    python -m llada_trm.evaluate --checkpoint runs/x/model --dataset_name synthetic --split test --max_samples 200
    python -m llada_trm.evaluate --backbone tiny-llada --split test        # the backbone alone (and an untrained head)

Scores the same problems with the same new-token budget three ways (temperature 0): the backbone with LLaDA's
sampler (one token per step, blocks of chunk_size), the backbone through the chunk decoder, and the hybrid with
generate_with_refinement; prints exact match, mean refinement steps per chunk and new tokens per second, and with
`--output_json` writes them as eval_results.json does. Bad paths or arguments print one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llada_trm.cli import EXIT_USAGE, add_decoding_flags, add_scoring_flags, decoding_settings
from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.inference.checkpoints import InferenceSetupError, load_for_inference
from llada_trm.inference.exact_match import default_new_token_budget, fair_evaluation, format_fair_table, scored_rows
from llada_trm.model.loading import resolve_device
from llada_trm.model.integrity import CheckpointMismatchError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scoring_flags(parser, "LLaDA model directory or tiny-llada: a fresh hybrid with an untrained head")
    add_decoding_flags(parser, "decode_steps_per_chunk")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    for name in ("max_samples", "max_length", "batch_size", "max_new_tokens", "decode_steps_per_chunk"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        model, tokenizer = load_for_inference(args.checkpoint, args.backbone, device)
        max_length = min(args.max_length, model.backbone.config.max_sequence_length)
        data_args = DataArguments(
            dataset_name=args.dataset_name, dataset_path=args.dataset_path, max_length=max_length,
            max_samples=args.max_samples, num_synthetic_eval=max(200, args.max_samples or 0),
        )
        chunk_size = model.config.chunk_size
        prepared = prepare_dataset(data_args, tokenizer, chunk_size, args.split)
        print(prepared.summary.format())
        rows, unscored = scored_rows(prepared.dataset, args.max_samples)
        budget = args.max_new_tokens or default_new_token_budget(rows, chunk_size)
        models = {"backbone_llada_sampler": model.backbone, "backbone_chunked": model, "hybrid_refined": model}
        evaluation = fair_evaluation(tokenizer, rows, budget, chunk_size, models, batch_size=args.batch_size,
                                     progress=not args.no_progress,
                                     settings=decoding_settings(args, max_new_tokens=None))
    except (InferenceSetupError, CheckpointMismatchError, ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, no traceback
        return EXIT_USAGE
    if unscored:
        print(f"{unscored} samples without a reference answer were not scored")
    print(f"exact match on {evaluation['num_samples']} problems, {budget} new tokens at most:")
    print(format_fair_table(evaluation))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(evaluation, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
