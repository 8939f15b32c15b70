"""Entry point of `train_llada_trm_hybrid_sft.py`: parse, train, print where the model is and how it does.

User mistakes (bad flags, config files, data, paths) print one line on stderr and exit with code 2; a run
stopped by repeated non-finite steps exits with code 1.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from llada_trm.cli import EXIT_USAGE
from llada_trm.data.arguments import DataArgumentError
from llada_trm.data.sources import DataError
from llada_trm.data.layout import extract_answer
from llada_trm.inference.chunk_decoding import format_trace
from llada_trm.inference.exact_match import (format_fair_table, format_hybrid_lead, hybrid_lead, is_correct,
                                              prompt_ids_of)
from llada_trm.inference.frontier import format_frontier_table
from llada_trm.model.configuration_hybrid import HybridConfigError
from llada_trm.model.configuration_llada import LLaDAConfigError
from llada_trm.model.integrity import CheckpointMismatchError
from llada_trm.training import held_out
from llada_trm.training.arguments import UsageError, parse_arguments
from llada_trm.training.trainer import Trainer, TrainingError

USER_ERRORS = (UsageError, DataError, DataArgumentError, LLaDAConfigError, HybridConfigError,
               CheckpointMismatchError, FileNotFoundError, OSError)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def print_summary(trainer: Trainer, summary: dict) -> None:
    if not trainer.accelerator.is_main_process:
        return
    print("\n=== done ===")
    print(f"steps: {summary['state']['global_step']} (empty {summary['state']['empty_steps']}, "
          f"skipped {summary['state']['skipped_steps']})")
    for key in sorted(k for k in summary if k.startswith("eval_") and not k.startswith("eval_accuracy_")):
        print(f"{key}: {summary[key]:.4f}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"model: {summary['model']}")
    if trainer.args.model.objective == "hybrid":
        sample_generation(trainer)
        print(f"generate: python -m llada_trm.generate --checkpoint {summary['model']} --prompt \"<question>\"")
    if trainer.fair_eval is not None:
        fair = trainer.fair_eval
        print(f"\nexact match on {fair['num_samples']} held-out problems ({trainer.args.data.eval_split} split, "
              f"{fair['max_new_tokens']} new tokens at most, temperature 0):")
        print(format_fair_table(fair))
        print(f"written to {Path(trainer.args.train.output_dir) / 'eval_results.json'}")
        print_decoding_cost(trainer)


def print_decoding_cost(trainer: Trainer) -> None:
    """A few cheap frontier points beside the table (TPF = new tokens per backbone row-pass; docs/evaluation.md),
    and the hybrid's lead over each backbone-only one on the problems both scored."""
    began = time.perf_counter()
    result = held_out.decoding_frontier(trainer)
    if result is None:
        return
    print(f"\ndecoding cost on the same problems ({time.perf_counter() - began:.0f} s; the full frontier: "
          f"python -m llada_trm.frontier --checkpoint DIR):")
    print(format_frontier_table(result))
    hybrid = trainer.fair_eval["decoders"].get("hybrid_refined")
    others = {p["name"]: p for p in result["points"] if p["kind"] != "hybrid"}
    if hybrid is not None and others:
        print(format_hybrid_lead(hybrid_lead({"hybrid_refined": hybrid, **others})))


def sample_generation(trainer: Trainer) -> None:
    """Decode the first held-out problem with the trained hybrid as the evaluation does (one round per chunk by
    default), say whether its answer is right, and show the head at work: steps and confidence per chunk."""
    data = trainer.eval_data or trainer.train_data
    row = data.dataset[0]
    prompt_ids = prompt_ids_of(row)
    model = trainer.accelerator.unwrap_model(trainer.model)
    budget = trainer.fair_eval["max_new_tokens"] if trainer.fair_eval else 256
    rounds = trainer.args.train.eval_decode_steps_per_chunk
    result = model.generate_with_refinement(prompt_ids, tokenizer=trainer.tokenizer, max_new_tokens=budget,
                                            decode_steps_per_chunk=rounds, return_trace=True)
    text = result.texts[0].strip()
    verdict = "right" if is_correct(text, row["answer"]) else "wrong"
    split = trainer.args.data.eval_split if trainer.eval_data is not None else trainer.args.data.train_split
    print(f"\nsample: the first {split} problem, decoded by the hybrid ({rounds} round(s) per chunk):")
    print("  prompt:", trainer.tokenizer.decode(prompt_ids, skip_special_tokens=True).strip().replace("\n", " "))
    print("  generation:", text.replace("\n", " | "))
    print(f"  answer: {extract_answer(text) or '(none)'}, reference: {row['answer']} -> {verdict}")
    print("  refinement (per chunk: steps taken, confidence after each step):")
    print(format_trace(result.trace[0]))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_arguments(argv)
    except ValueError as error:  # includes UsageError and HfArgumentParser's unknown-flag message
        return _fail(str(error), EXIT_USAGE)
    try:
        trainer = Trainer(args)
        summary = trainer.train()
    except TrainingError as error:
        return _fail(str(error), 1)
    except USER_ERRORS as error:
        return _fail(str(error), EXIT_USAGE)
    print_summary(trainer, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
