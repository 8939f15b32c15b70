"""The DEBUG=1 chunk inspection without training: masks, inputs, targets and per-chunk predictions; or, with
--loss_by_kind, where the loss is: the head's and the backbone's CE at the masked positions by kind of token.

    python -m llada_trm.inspect --checkpoint runs/llada-trm/model --num_samples 2
    python -m llada_trm.inspect --backbone tiny-llada     # a fresh head: predicts what the backbone does
    python -m llada_trm.inspect --checkpoint runs/llada-trm/model --loss_by_kind --num_samples 500 --mask_probability 1
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
from transformers import HfArgumentParser

from llada_trm.cli import EXIT_USAGE
from llada_trm.data.arguments import DataArguments
from llada_trm.data.collator import ChunkMaskingCollator
from llada_trm.data.dataset import prepare_dataset
from llada_trm.data.layout import TOKEN_KINDS, token_kinds
from llada_trm.inference.checkpoints import InferenceSetupError, load_for_inference
from llada_trm.model.integrity import one_line
from llada_trm.model.integrity import CheckpointMismatchError
from llada_trm.training.arguments import MaskingArguments, UsageError
from llada_trm.training.debug_view import format_chunk_inspection
from llada_trm.training.objectives import MODEL_INPUTS


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, MaskingArguments]:
    parser = HfArgumentParser(MaskingArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a trained hybrid directory (with its tokenizer)")
    source.add_argument("--backbone", "--model_name_or_path", dest="backbone", default="tiny-llada",
                        help="backbone for a fresh, untrained head")
    parser.add_argument("--dataset_name", default="synthetic")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--chunk_size", type=int, default=16, help="fresh head only; a checkpoint has its own")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss_by_kind", action="store_true",
                        help="print the CE at the masked positions by kind of token (result, answer, number, text)")
    masking, args = parser.parse_args_into_dataclasses(argv)
    if args.num_samples <= 0:
        parser.error(f"--num_samples must be positive, got {args.num_samples}")
    try:
        masking.validate()
    except UsageError as error:
        parser.error(str(error))
    return args, masking


def main(argv: list[str] | None = None) -> int:
    args, masking = parse_args(argv)
    try:
        model, tokenizer = load_for_inference(checkpoint=args.checkpoint,
                                              backbone=None if args.checkpoint else args.backbone,
                                              chunk_size=None if args.checkpoint else args.chunk_size)
    except (InferenceSetupError, CheckpointMismatchError, OSError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    chunk_size = model.config.chunk_size
    data_args = DataArguments(dataset_name=args.dataset_name, dataset_path=args.dataset_path,
                              max_length=args.max_length, max_samples=args.num_samples, eval_split=args.split,
                              num_synthetic_train=args.num_samples, num_synthetic_eval=args.num_samples)
    try:
        data_args.validate()
        prepared = prepare_dataset(data_args, tokenizer, chunk_size, args.split)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    collator = ChunkMaskingCollator(tokenizer.mask_token_id, tokenizer.pad_token_id, chunk_size,
                                    masking.mask_probability, seed=args.seed,
                                    partial_chunk_masking=masking.partial_chunk_masking)
    features = [prepared.dataset[i] for i in range(min(args.num_samples, len(prepared.dataset)))]
    if args.loss_by_kind:
        print(f"CE at the masked positions by kind of token ({len(features)} {args.split} samples, mask probability "
              f"{masking.mask_probability}; head = its last refinement step):")
        print(format_loss_by_kind(loss_by_kind(model, tokenizer, collator, features)))
        return 0
    batch = collator(features)
    with torch.no_grad():
        output = model(**{k: batch[k] for k in MODEL_INPUTS})
    for sample in range(len(features)):
        print(format_chunk_inspection(tokenizer, batch, output, sample=sample, title=f"(sample {features[sample]['sample_id']})"))
    return 0


def loss_by_kind(model, tokenizer, collator, features: list[dict], batch_size: int = 32) -> dict[str, list]:
    """kind -> [summed head CE (last step), summed backbone CE, tokens] over the masked positions of `features`
    (`layout.token_kinds` of each sample's reasoning tokens)."""
    sums = {kind: [0.0, 0.0, 0] for kind in TOKEN_KINDS}
    piece_of = functools.lru_cache(maxsize=None)(lambda token_id: tokenizer.decode([token_id]))
    for start in range(0, len(features), batch_size):
        batch = collator(features[start : start + batch_size])
        with torch.no_grad():
            output = model(**{k: batch[k] for k in MODEL_INPUTS})
        for row in range(len(batch["labels"])):
            supervised = batch["labels"][row] != -100
            kinds = token_kinds([piece_of(int(t)) for t in batch["labels"][row][supervised]])
            masked = output.masked_positions[row][supervised].tolist()
            head = output.step_token_loss[-1][row][supervised].tolist()
            backbone = output.backbone_token_loss[row][supervised].tolist()
            for kind, is_masked, head_ce, backbone_ce in zip(kinds, masked, head, backbone):
                if is_masked:
                    entry = sums[kind]
                    entry[0], entry[1], entry[2] = entry[0] + head_ce, entry[1] + backbone_ce, entry[2] + 1
    return sums


def format_loss_by_kind(sums: dict[str, list]) -> str:
    total = sum(backbone for _, backbone, _ in sums.values()) or 1.0
    lines = ["| kind   | tokens | head CE | backbone CE | head - backbone | share of the backbone's loss |",
             "|--------|-------:|--------:|------------:|----------------:|-----------------------------:|"]
    for kind, (head, backbone, count) in sums.items():
        head_mean, backbone_mean = (head / count, backbone / count) if count else (float("nan"), float("nan"))
        lines.append(f"| {kind:6s} | {count:6d} | {head_mean:7.4f} | {backbone_mean:11.4f} | "
                     f"{head_mean - backbone_mean:+15.4f} | {backbone / total:28.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
