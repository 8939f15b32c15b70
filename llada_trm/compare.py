"""Hybrid vs the fine-tuned backbone at equal training compute: exact match against optimiser steps, seconds, FLOPs.

    python -m llada_trm.compare --output_dir runs/compare --max_steps 300 --eval_every 100 \
        [--methods hybrid,llada_sft,llada_sft_lora,block_sft_lora] [--extra "--batch_size 16"] [--hybrid_extra "..."]

Every method is an ordinary training run from the same backbone, on the same data, seed and number of optimiser
steps, trained in this process one after another: `hybrid` (frozen backbone + head), `llada_sft` (full fine-tuning,
`--objective llada_sft --no_freeze_backbone`), `llada_sft_lora` (`--use_lora`) and `block_sft_lora` (LoRA with the
block-causal, clean-context objective `--objective block_sft --use_lora`: the backbone adapted for one pass per
chunk; its adapters merge into a plain LLaDA). Each is scored on the same held-out problems (500; LLaDA's sampler the
first --eval_sampler_max_samples, 200) before training and every `--eval_every` steps with its best decoder: the
hybrid with generate_with_refinement, LLaDA SFT with LLaDA's sampler, block SFT with the chunk decoder at
--eval_decode_steps_per_chunk rounds (all rows are kept). Any training flag passes through `--extra` /
`--METHOD_extra`, checked by the training program's own parser. Compute is counted three ways:
optimiser steps, wall seconds inside optimiser steps (evaluation excluded) and FLOPs, measured with torch's
FlopCounterMode over one optimiser step of a throwaway copy of the run and multiplied by the steps (an estimate: later batches
differ in length). After training, each method's decoding frontier on the same problems (`--frontier_points`, a small
grid by default): exact match against tokens per backbone pass (TPF) and FLOPs per new token, and per method its
AUP and TPF within 1 point of its one-token exact match. Exact match comes with its standard error. Writes the
tables, `compare_summary.json` and `compare_accuracy.png` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import shlex
import sys
import tempfile
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode

from llada_trm.ablate import AblationUsageError, prepare_output, read_metrics
from llada_trm.cli import EXIT_USAGE, split_extra_flags
from llada_trm.inference.frontier import (
    FRONTIER_HEADER,
    PointError,
    format_method_scores,
    frontier_row,
    method_scores,
    parse_points,
)
from llada_trm.inference.reporting import cell, markdown_table, matplotlib_figure, standard_error
from llada_trm.train import USER_ERRORS
from llada_trm.training.arguments import parse_arguments
from llada_trm.training.held_out import decoding_frontier
from llada_trm.training.trainer import Trainer, TrainingError

SUMMARY_FILE = "compare_summary.json"
PLOT_FILE = "compare_accuracy.png"
METHODS = {
    # method: (training flags, the decoder that is its best, default learning rate; None: the training program's,
    # i.e. the embedded profile's or the --config's, so the hybrid is compared at the rate it is tuned for)
    "hybrid": (["--objective", "hybrid"], "hybrid_refined", None),
    "llada_sft": (["--objective", "llada_sft", "--no_freeze_backbone"], "backbone_llada_sampler", "5e-4"),
    "llada_sft_lora": (["--objective", "llada_sft", "--use_lora"], "backbone_llada_sampler", "2e-3"),
    # The competitor a user with a GPU would train for parallel decoding: the backbone itself adapted to one pass per
    # chunk (block diffusion, as dParallel and d3LLM adapt LLaDA-8B), read with the chunk decoder.
    "block_sft_lora": (["--objective", "block_sft", "--use_lora"], "backbone_chunked", "2e-3"),
}
# After training, every method's whole frontier: the sampler at one token and a chunk per step and with threshold
# decoding at 0.9/0.7/0.5, the chunk decoder at 16/2/1 rounds and with its threshold rule, and the hybrid likewise
# where there is a head. Each method's threshold chunk decoder is where its AUP is made (docs/evaluation.md).
FRONTIER_POINTS = ("sampler/k1,sampler/t0.9,sampler/t0.7,sampler/t0.5,sampler/k16,chunked/r16,chunked/r2,chunked/r1,"
                   "chunked/t0.9,hybrid/r16,hybrid/r2,hybrid/r1,hybrid/t0.9")
FRONTIER_FLOP_SAMPLE = 4  # problems decoded under FlopCounterMode per point
# Runner defaults, before --extra (which may override them): 500 held-out problems for the one-pass decoders.
RUNNER_DEFAULTS = ("--logging_steps", "10", "--eval_max_samples", "500", "--num_synthetic_eval", "500")
OWNED_FLAGS = ("--output_dir", "--objective", "--max_steps", "--eval_steps", "--seed", "--model_name_or_path")


class CompareUsageError(ValueError):
    """A flag the runner cannot work with; printed as one line, exit code 2."""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llada_trm.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--max_steps", type=int, default=300, help="optimiser steps of every method")
    parser.add_argument("--eval_every", type=int, default=100, help="optimiser steps between evaluations")
    parser.add_argument("--model_name_or_path", default="tiny-llada")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--extra", default="", help="training flags for every method (quoted)")
    for method in METHODS:
        parser.add_argument(f"--{method}_extra", default="", help=f"training flags for {method} only (quoted)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier runs in --output_dir")
    parser.add_argument("--frontier_points", default=FRONTIER_POINTS,
                        help="decoding frontier of each trained method (python -m llada_trm.frontier names; "
                             "hybrid points apply to the hybrid only); 'none' skips it")
    return parser


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CompareUsageError(f"--methods: unknown or empty {unknown or text!r}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def parse_extra(text: str, option: str = "--extra") -> list[str]:
    """The training flags of an --extra value; those the runner sets for every method are refused."""
    try:
        return split_extra_flags(text, option, OWNED_FLAGS, "method")
    except ValueError as error:
        raise CompareUsageError(str(error)) from None


def method_argv(method: str, options: argparse.Namespace) -> list[str]:
    """Runner defaults, then --extra and --METHOD_extra (which may override them), then what the runner owns."""
    flags, _, learning_rate = METHODS[method]
    extra = parse_extra(options.extra) + parse_extra(getattr(options, f"{method}_extra"), f"--{method}_extra")
    rate = ["--learning_rate", learning_rate] if learning_rate is not None else []
    return [*rate, *RUNNER_DEFAULTS, *extra, *flags,
            "--model_name_or_path", options.model_name_or_path, "--seed", str(options.seed),
            "--max_steps", str(options.max_steps), "--eval_steps", str(options.eval_every),
            "--output_dir", str(Path(options.output_dir) / method)]


def training_arguments(method: str, argv: list[str]):
    """The training program's own parse of one method's flags; its complaint (which names the flag) becomes one
    line. argparse reports a bad value by printing usage and exiting: that is caught and cut to its message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_arguments(argv)
    except ValueError as error:  # a UsageError, or HfArgumentParser's message about an unknown flag
        message = str(error)
    except SystemExit:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        message = lines[-1].split("error: ", 1)[-1] if lines else "invalid training flags"
    raise CompareUsageError(f"training flags of {method} (--extra / --{method}_extra): {message}")


def flops_per_step(args) -> int:
    """FLOPs (forward, backward, recomputation) of one optimiser step of a throwaway copy of the run."""
    probe_args = copy.deepcopy(args)
    with tempfile.TemporaryDirectory() as scratch:
        probe_args.train.output_dir = scratch
        probe = Trainer(probe_args)
        with FlopCounterMode(display=False) as counter:
            probe.train_step(next(probe.windows()))
    return counter.get_total_flops()


def run_method(method: str, args, frontier_points: str | None = FRONTIER_POINTS) -> dict:
    """Train one method; its evaluation points [{step, train_seconds, flops, accuracy: {decoder: em}}, ...] and,
    unless `frontier_points` is None, its decoding frontier after training."""
    step_flops = flops_per_step(args)
    trainer = Trainer(args)
    before = trainer.answer_accuracy()
    if trainer.fair_eval is None:
        raise CompareUsageError("compare scores answers: it needs an evaluation split and --eval_max_samples > 0")
    points = [{"step": 0, "train_seconds": 0.0, "flops": 0, "accuracy": dict(trainer.fair_eval["accuracy"])}]
    try:
        trainer.train()
    except TrainingError as error:
        return {"method": method, "error": str(error), "points": points}
    for record in read_metrics(Path(args.train.output_dir) / "metrics.jsonl"):
        accuracy = {k.removeprefix("eval_accuracy_"): v for k, v in record.items() if k.startswith("eval_accuracy_")}
        if accuracy:
            points.append({"step": record["step"], "train_seconds": record["train_seconds"],
                           "flops": step_flops * record["step"], "accuracy": accuracy})
    best_decoder = METHODS[method][1]
    decoders = trainer.fair_eval["decoders"]
    num_samples = decoders[best_decoder]["num_samples"] if best_decoder in decoders else before["eval_num_samples"]
    for point in points:
        point["exact_match"] = point["accuracy"].get(best_decoder)
        if point["exact_match"] is not None:  # exact match is k / n, so k = round(p n)
            point["standard_error"] = standard_error(round(point["exact_match"] * num_samples), num_samples)
    run = {"method": method, "decoder": best_decoder, "flops_per_step": step_flops,
           "num_samples": num_samples, "points": points}
    if frontier_points is not None:
        run["frontier"] = decoding_frontier(trainer, frontier_points, flop_sample=FRONTIER_FLOP_SAMPLE)
    return run


def compute_to_reach(run: dict, target: float, key: str) -> float | None:
    """The compute (`key` of a point) at which `run` first reaches exact match `target`; None if never."""
    reached = [p[key] for p in run["points"] if p.get("exact_match") is not None and p["exact_match"] >= target]
    return min(reached) if reached else None


def headline(runs: list[dict]) -> dict:
    """Best exact match per method, and the hybrid's compute to reach the best LLaDA SFT accuracy (in FLOPs and
    seconds) as a fraction of what that SFT run needed."""
    ok = [r for r in runs if not r.get("error")]
    best = {r["method"]: max(p["exact_match"] for p in r["points"] if p.get("exact_match") is not None) for r in ok}
    result = {"best_exact_match": best}
    sft = [r for r in ok if r["method"] != "hybrid"]
    hybrid = next((r for r in ok if r["method"] == "hybrid"), None)
    if sft and hybrid:
        target_run = max(sft, key=lambda r: best[r["method"]])
        target = best[target_run["method"]]
        result["target"] = {"method": target_run["method"], "exact_match": target}
        for key in ("flops", "train_seconds", "step"):
            needed, hybrid_needed = compute_to_reach(target_run, target, key), compute_to_reach(hybrid, target, key)
            ratio = hybrid_needed / needed if hybrid_needed is not None and needed else None
            result[f"hybrid_{key}_fraction"] = ratio
    return result


def format_table(runs: list[dict]) -> str:
    """One line per method and evaluation: compute so far, the method's own exact match with its standard error, and
    every decoder's exact match."""
    header = ("method", "step", "train s", "GFLOPs", "exact match", "s.e.", "sampler", "chunked", "hybrid")
    rows = []
    for run in runs:
        for p in run["points"]:
            acc = p["accuracy"]
            rows.append((run["method"], str(p["step"]), f"{p['train_seconds']:.1f}", f"{p['flops'] / 1e9:.1f}",
                         cell(p.get("exact_match"), "{:.3f}"), cell(p.get("standard_error"), "{:.3f}"),
                         *(cell(acc.get(k), "{:.3f}")
                           for k in ("backbone_llada_sampler", "backbone_chunked", "hybrid_refined"))))
    text = [markdown_table(header, rows)]
    text += [f"{r['method']}: failed: {r['error']}" for r in runs if r.get("error")]
    return "\n".join(text)


def format_frontier(runs: list[dict]) -> str:
    """Each method's decoding frontier after training: exact match and its standard error, TPF, MFLOPs per new
    token, tokens/s."""
    header = ("method", *FRONTIER_HEADER[:-1])  # steps/round is the frontier command's, not compare's
    rows = [(run["method"], *frontier_row(p)[:-1]) for run in runs for p in (run.get("frontier") or {}).get("points", [])]
    return markdown_table(header, rows) if rows else ""


def frontier_scores(runs: list[dict]) -> dict[str, dict]:
    """Each trained method's AUP (against the best exact match of all of them) and TPF within 1 point of its
    one-token exact match, from its frontier after training."""
    frontiers = {r["method"]: r["frontier"] for r in runs if r.get("frontier")}
    if not frontiers:
        return {}
    chunk_size = next(iter(frontiers.values()))["chunk_size"]
    return method_scores({method: f["points"] for method, f in frontiers.items()}, chunk_size)


def parse_frontier_points(text: str, chunk_sizes: set[int]) -> str | None:
    """The --frontier_points value checked against every run's chunk size before any training: None for 'none'."""
    if text.strip().lower() in ("none", ""):
        return None
    try:
        for chunk_size in chunk_sizes:
            parse_points(text, chunk_size)
    except PointError as error:
        raise CompareUsageError(f"--frontier_points: {error}") from error
    return text


def plot_accuracy(runs: list[dict], path: Path) -> Path | None:
    """Exact match against FLOPs and against training seconds, one line per method."""
    Figure = matplotlib_figure(PLOT_FILE)
    if Figure is None:
        return None
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    for ax, (key, label) in zip(figure.subplots(1, 2), (("flops", "training FLOPs (estimated)"),
                                                         ("train_seconds", "training wall seconds"))):
        for run in runs:
            points = [(p[key], p["exact_match"]) for p in run["points"] if p.get("exact_match") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{run['method']} ({run.get('decoder', '?')})")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out exact match")
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    options = make_parser().parse_args(argv)
    command = "python -m llada_trm.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if options.max_steps < 1 or options.eval_every < 1:
            raise CompareUsageError("--max_steps and --eval_every must be positive")
        methods = parse_methods(options.methods)
        method_args = {m: training_arguments(m, method_argv(m, options)) for m in methods}  # check all first
        frontier_points = parse_frontier_points(options.frontier_points,
                                                {a.model.chunk_size for a in method_args.values()})
        prepare_output(Path(options.output_dir), methods, options.overwrite)
        runs = []
        for i, method in enumerate(methods, 1):
            print(f"\n=== {method} ({i}/{len(methods)}) ===", flush=True)
            runs.append(run_method(method, method_args[method], frontier_points))
            gc.collect()
    except (CompareUsageError, AblationUsageError, *USER_ERRORS) as error:  # AblationUsageError: prepare_output's
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    output = Path(options.output_dir)
    summary = {"command": command, "settings": vars(options),
               "headline": headline(runs), "methods": frontier_scores(runs), "runs": runs}
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_accuracy(runs, output / PLOT_FILE)
    print("\n" + format_table(runs))
    frontier_table = format_frontier(runs)
    if frontier_table:
        print("\ndecoding frontier after training (TPF = new tokens per backbone row-pass):\n" + frontier_table)
        print("\neach method's frontier in one number (AUP: docs/evaluation.md):\n"
              + format_method_scores(summary["methods"]))
    print(json.dumps(summary["headline"], indent=2))
    print(f"summary: {output / SUMMARY_FILE}")
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
