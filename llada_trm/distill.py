"""Self-distillation data: the backbone's own decodes of the synthetic training problems, as a dataset directory.

    python -m llada_trm.distill --out runs/own_decodes                  # tiny-llada, 2,000 problems, threshold 0.9
    python train_llada_trm_hybrid_sft.py --mask_probability 0.3 --dataset_path runs/own_decodes

Writes `train.jsonl` (question/reasoning/answer records whose reasoning is the backbone's decode, by LLaDA's
sampler: inference/own_decodes.py), `validation.jsonl` and `test.jsonl` (the synthetic task's own, unchanged:
evaluation stays on ground truth) and `own_decodes.yaml` (how many decodes were right and kept; not a data file
extension, so the trainer reads the directory as its three splits). `--threshold`
above 1 decodes one token per step. Bad paths or arguments print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from llada_trm.cli import EXIT_USAGE, OneLineParser
from llada_trm.data.layout import render_reasoning, text_ids
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.inference.own_decodes import KEEP, own_decode_records
from llada_trm.model.integrity import CheckpointMismatchError
from llada_trm.model.loading import load_tokenizer, resolve_device
from llada_trm.model.modeling_llada import LLaDAModelLM

FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "own_decodes.yaml")


def parse_args(argv: list[str] | None = None):
    parser = OneLineParser(prog="python -m llada_trm.distill", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", required=True, help="dataset directory to write")
    parser.add_argument("--backbone", default="tiny-llada", help="LLaDA model directory (with its tokenizer)")
    parser.add_argument("--num", type=int, default=2000, help="synthetic training problems to decode")
    parser.add_argument("--num_eval", type=int, default=200, help="validation and test problems (ground truth)")
    parser.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the sampler")
    parser.add_argument("--keep", choices=KEEP, default="correct", help="which decodes become records")
    parser.add_argument("--block_length", type=int, default=16, help="sampler block length (the chunk size)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic problems")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("num", "num_eval", "block_length", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.threshold >= 0:
        parser.error(f"--threshold must be >= 0, got {args.threshold}")
    existing = [name for name in FILES if (Path(args.out) / name).exists()]
    if existing and not args.overwrite:
        parser.error(f"--out {args.out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    return args


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Written beside, then renamed: an interrupted run never leaves half a file under the final name."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        tokenizer = load_tokenizer(args.backbone)
        backbone = LLaDAModelLM.from_pretrained(args.backbone).to(device).eval()
    except (CheckpointMismatchError, ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return EXIT_USAGE
    problems = generate_split("train", args.num, args.seed)
    # The budget of evaluation: the longest reference reasoning (with its EOS) and one block more.
    longest = max(len(text_ids(tokenizer, render_reasoning(r["reasoning"], r["answer"]))) for r in problems)
    records, counts = own_decode_records(backbone, tokenizer, problems, longest + 1 + args.block_length,
                                         args.block_length, threshold=args.threshold, keep=args.keep,
                                         batch_size=args.batch_size, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", records)
    for split in ("validation", "test"):
        write_jsonl(out / f"{split}.jsonl", generate_split(split, args.num_eval, args.seed))
    counts.update(backbone=args.backbone, seed=args.seed)
    (out / "own_decodes.yaml").write_text(yaml.safe_dump(counts, sort_keys=False))
    print(f"{counts['correct']} of {counts['problems']} decodes answer right ({counts['tokens_per_pass']:.2f} tokens "
          f"per pass); {counts['kept']} kept ({args.keep}) in {out / 'train.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
