"""Generate reasoning with a hybrid checkpoint from the command line.

    python -m llada_trm.generate --checkpoint runs/x/checkpoint-500 --prompt "Mia has 3 apples. ..."
    python -m llada_trm.generate --backbone tiny-llada --prompt "..." --trace      # untrained head, to try
    python -m llada_trm.generate --checkpoint DIR --chat                          # questions from stdin

A checkpoint directory holds the hybrid (config + head weights) and the tokenizer files. Prints the reasoning,
then `Answer: ...` (the text inside <answer>...</answer>, or `(none)`). Bad paths or arguments print one line
on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import io
import sys

import torch

from llada_trm.cli import EXIT_USAGE, add_decoding_flags, decoding_settings
from llada_trm.data.layout import extract_answer
from llada_trm.data.sources import read_utf8_lines
from llada_trm.inference.checkpoints import InferenceSetupError, load_for_inference
from llada_trm.inference.chunk_decoding import format_trace
from llada_trm.model.loading import resolve_device
from llada_trm.model.integrity import CheckpointMismatchError


def answer_one(model, tokenizer, question: str, args) -> str:
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    max_length = min(args.max_length, model.backbone.config.max_sequence_length)
    settings = decoding_settings(args, max_length=max_length)
    out = model.generate_with_refinement(question, tokenizer=tokenizer, settings=settings, generator=generator)
    text = out.texts[0]
    answer = extract_answer(text)
    parts = [text.rstrip(), f"Answer: {answer if answer is not None else '(none)'}"]
    if args.return_trace:
        parts.append("Refinement trace:\n" + format_trace(out.trace[0]))
    return "\n".join(parts)


def chat(model, tokenizer, args) -> None:
    """Questions from stdin, read as UTF-8 whatever the locale; a line that is not UTF-8 is skipped with a line
    on stderr naming it (the data's default bad-sample policy), and the rest are answered."""
    interactive = sys.stdin.isatty()
    stdin = getattr(sys.stdin, "buffer", None) or io.BytesIO(sys.stdin.read().encode("utf-8"))
    lines, skipped = read_utf8_lines(stdin, "stdin"), 0
    while True:
        if interactive:
            print("question> ", end="", flush=True)
        line = next(lines, None)
        if line is not None and line.bad_offset is not None:
            skipped += 1
            print(f"skipped {line.problem(f'stdin line {line.number}')}; questions must be UTF-8", file=sys.stderr)
            continue
        if line is None or not line.text.strip():
            break
        print(answer_one(model, tokenizer, line.text.strip(), args), flush=True)
        print()
    if skipped:
        print(f"{skipped} stdin line(s) skipped: not UTF-8 text", file=sys.stderr)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="hybrid checkpoint directory (model + tokenizer files)")
    source.add_argument("--backbone", help="LLaDA model directory or tiny-llada: a fresh hybrid with an untrained head")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="a question, or a prompt text containing the reasoning marker")
    mode.add_argument("--chat", action="store_true", help="read questions from stdin until EOF or an empty line")
    add_decoding_flags(parser, "enable_refinement", "temperature", "max_length", "max_new_tokens",
                       "decode_steps_per_chunk", "commit_threshold", "return_trace")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (temperature > 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        model, tokenizer = load_for_inference(args.checkpoint, args.backbone, device)
        if args.chat:
            chat(model, tokenizer, args)
        else:
            print(answer_one(model, tokenizer, args.prompt, args))
    except (InferenceSetupError, CheckpointMismatchError, ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, no traceback
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
