"""Exact-match answer accuracy of a hybrid checkpoint, with and without refinement.

    python -m llada_trm.evaluate --checkpoint runs/x/checkpoint-500 --dataset_name synthetic --split test \
        --max_samples 100

Prints accuracy, mean refinement steps per chunk and tokens/s for `generate_with_refinement` with the head
and with the backbone alone (temperature 0). Bad paths or arguments print one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .data import DataArguments, prepare_dataset
from .evaluation import answer_accuracy
from .generate import EXIT_USAGE, InferenceSetupError, load_for_inference
from .loading import resolve_device
from .modeling_llada import CheckpointMismatchError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="hybrid checkpoint directory (model + tokenizer files)")
    source.add_argument("--backbone", help="LLaDA model directory or tiny-llada: a fresh hybrid with an untrained head")
    parser.add_argument("--dataset_name", default="synthetic")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=512,
                        help="total tokens per sample, prompt included (at most the model's max_sequence_length)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("max_samples", "max_length", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    return args


def format_results(results: dict[str, dict]) -> str:
    lines = [f"{'':<16}{'accuracy':>10}{'correct':>9}{'samples':>9}{'mean steps':>12}{'tokens/s':>11}"]
    for name, r in results.items():
        lines.append(f"{name:<16}{r['accuracy']:>10.3f}{r['correct']:>9}{r['num_samples']:>9}"
                     f"{r['mean_refinement_steps']:>12.2f}{r['tokens_per_second']:>11.1f}")
    return "\n".join(lines)


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
        prepared = prepare_dataset(data_args, tokenizer, model.config.chunk_size, args.split)
        print(prepared.summary.format())
        results = {}
        for name, refine in (("refinement", True), ("backbone only", False)):
            results[name] = answer_accuracy(model, tokenizer, prepared.dataset, max_length, enable_refinement=refine,
                                            batch_size=args.batch_size, max_samples=args.max_samples,
                                            progress=not args.no_progress)
    except (InferenceSetupError, CheckpointMismatchError, ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, no traceback
        return EXIT_USAGE
    if results["refinement"]["skipped_no_reference"]:
        print(f"{results['refinement']['skipped_no_reference']} samples without a reference answer were not scored")
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
