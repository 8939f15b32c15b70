"""`python -m llada_trm.grad_trace {analyze,compare,render} RUN_DIR`: read, compare and render a per-token gradient
trace (the library is llada_trm/training/grad_trace/; docs/grad_trace.md)."""

from __future__ import annotations

import argparse
import json
import sys

from llada_trm.cli import EXIT_USAGE, OneLineParser
from llada_trm.training.grad_trace.analysis import (
    TraceInputError,
    analyze,
    format_comparison,
    format_summary,
    load_trace,
    write_summary,
)
from llada_trm.training.grad_trace.plots import write_plots
from llada_trm.training.grad_trace.render import write_page


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m llada_trm.grad_trace",
                           description="Analyse and render a per-token gradient trace.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    commands.add_parser("analyze", help="print the summary and write grad_trace_summary.json").add_argument("run_dir")
    compare = commands.add_parser("compare", help="two runs side by side")
    compare.add_argument("run_a")
    compare.add_argument("run_b")
    compare.add_argument("--output", help="also write both summaries to this JSON file")
    render = commands.add_parser("render", help="write grad_trace.html (and PNG plots with matplotlib)")
    render.add_argument("run_dir")
    render.add_argument("--output", help="HTML path (default RUN_DIR/grad_trace.html)")
    render.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "analyze":
        result = analyze(args.run_dir)
        print(format_summary(result))
        print(f"summary: {write_summary(args.run_dir, result)}")
    elif args.command == "compare":
        a, b = analyze(args.run_a), analyze(args.run_b)
        print(format_comparison(a, b))
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"a": a, "b": b}, f, indent=2)
            print(f"written: {args.output}")
    else:
        print(f"page: {write_page(args.run_dir, args.output)}")
        if not args.no_plots:
            for path in write_plots(args.run_dir, analyze(args.run_dir), load_trace(args.run_dir)["token"]):
                print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        run(args)
    except (TraceInputError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
