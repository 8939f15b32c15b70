"""Hybrid vs plain LLaDA SFT at equal training compute: exact match against optimiser steps, seconds and FLOPs.

    python -m llada_trm.compare --output_dir runs/compare --max_steps 300 --eval_every 100 \
        [--methods hybrid,llada_sft,llada_sft_lora] [--extra "--batch_size 16"] [--hybrid_extra "..."]

Every method is an ordinary training run from the same backbone, on the same data, seed and number of optimiser
steps, trained in this process one after another: `hybrid` (frozen backbone + head), `llada_sft` (full fine-tuning,
`--objective llada_sft --no_freeze_backbone`) and `llada_sft_lora` (`--use_lora`). Each is scored on the same
held-out problems before training and every `--eval_every` steps with its best decoder: the hybrid with
generate_with_refinement, a plain LLaDA with LLaDA's sampler (all rows are kept). Compute is counted three ways:
optimiser steps, wall seconds inside optimiser steps (evaluation excluded) and FLOPs, measured with torch's
FlopCounterMode over one optimiser step of a throwaway copy of the run and multiplied by the steps (an estimate: later batches
differ in length). After training, each method's decoding frontier on the same problems (`--frontier_points`, a small
grid by default): exact match against tokens per backbone pass (TPF) and FLOPs per new token. Writes the tables,
`compare_summary.json` and `compare_accuracy.png` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shlex
import sys
import tempfile
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode

from llada_trm.cli import EXIT_USAGE
from llada_trm.ablate import AblationUsageError, parse_extra, prepare_output, read_metrics, training_arguments
from llada_trm.train import USER_ERRORS
from llada_trm.inference.frontier import PointError, parse_points
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
}
# After training: the one-token sampler and its 0.9 threshold, the chunk decoder (and the hybrid) at 16 and 1 rounds.
FRONTIER_POINTS = "sampler/k1,sampler/t0.9,chunked/r16,chunked/r1,hybrid/r16,hybrid/r1"
FRONTIER_FLOP_SAMPLE = 4  # problems decoded under FlopCounterMode per point
OWNED_FLAGS = ("--output_dir", "--objective", "--max_steps", "--eval_steps", "--seed", "--model_name_or_path")


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
        raise AblationUsageError(f"--methods: unknown or empty {unknown or text!r}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def method_argv(method: str, options: argparse.Namespace) -> list[str]:
    """Runner defaults, then --extra and --METHOD_extra (which may override them), then what the runner owns."""
    flags, _, learning_rate = METHODS[method]
    extra = parse_extra(options.extra) + parse_extra(getattr(options, f"{method}_extra"))
    owned = [flag for flag in extra if flag.split("=")[0] in OWNED_FLAGS]
    if owned:
        raise AblationUsageError(f"--extra may not set {', '.join(owned)}: the runner sets it for every method")
    rate = ["--learning_rate", learning_rate] if learning_rate is not None else []
    return [*rate, "--logging_steps", "10", *extra, *flags,
            "--model_name_or_path", options.model_name_or_path, "--seed", str(options.seed),
            "--max_steps", str(options.max_steps), "--eval_steps", str(options.eval_every),
            "--output_dir", str(Path(options.output_dir) / method)]


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
        raise AblationUsageError("compare scores answers: it needs an evaluation split and --eval_max_samples > 0")
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
    for point in points:
        point["exact_match"] = point["accuracy"].get(best_decoder)
    run = {"method": method, "decoder": best_decoder, "flops_per_step": step_flops,
           "num_samples": before["eval_num_samples"], "points": points}
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
    header = ("method", "step", "train s", "GFLOPs", "exact match", "sampler", "chunked", "hybrid")
    lines = [header]
    for run in runs:
        for p in run["points"]:
            acc = p["accuracy"]
            cells = [acc.get(k) for k in ("backbone_llada_sampler", "backbone_chunked", "hybrid_refined")]
            lines.append((run["method"], str(p["step"]), f"{p['train_seconds']:.1f}", f"{p['flops'] / 1e9:.1f}",
                          "-" if p.get("exact_match") is None else f"{p['exact_match']:.3f}",
                          *("-" if c is None else f"{c:.3f}" for c in cells)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text += [f"{r['method']}: failed: {r['error']}" for r in runs if r.get("error")]
    return "\n".join(text)


def format_frontier(runs: list[dict]) -> str:
    """Each method's decoding frontier after training: exact match, TPF, MFLOPs per new token, tokens/s."""
    header = ("method", "point", "exact match", "TPF", "backbone MFLOP/tok", "head MFLOP/tok", "tokens/s")
    lines = [header]
    for run in runs:
        for p in (run.get("frontier") or {}).get("points", []):
            flops = [p.get(k) for k in ("backbone_flops_per_token", "head_flops_per_token")]
            lines.append((run["method"], p["name"], f"{p['accuracy']:.3f}", f"{p['tokens_per_pass']:.2f}",
                          *("-" if f is None else f"{f / 1e6:,.1f}" for f in flops), f"{p['tokens_per_second']:.1f}"))
    if len(lines) == 1:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def parse_frontier_points(text: str, chunk_sizes: set[int]) -> str | None:
    """The --frontier_points value checked against every run's chunk size before any training: None for 'none'."""
    if text.strip().lower() in ("none", ""):
        return None
    try:
        for chunk_size in chunk_sizes:
            parse_points(text, chunk_size)
    except PointError as error:
        raise AblationUsageError(f"--frontier_points: {error}") from error
    return text


def plot_accuracy(runs: list[dict], path: Path) -> Path | None:
    """Exact match against FLOPs and against training seconds, one line per method."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"note: matplotlib is not installed, so {PLOT_FILE} was skipped (pip install -e .[plot])")
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
            raise AblationUsageError("--max_steps and --eval_every must be positive")
        methods = parse_methods(options.methods)
        method_args = {m: training_arguments(method_argv(m, options)) for m in methods}  # check all first
        frontier_points = parse_frontier_points(options.frontier_points,
                                                {a.model.chunk_size for a in method_args.values()})
        prepare_output(Path(options.output_dir), methods, options.overwrite)
        runs = []
        for i, method in enumerate(methods, 1):
            print(f"\n=== {method} ({i}/{len(methods)}) ===", flush=True)
            runs.append(run_method(method, method_args[method], frontier_points))
            gc.collect()
    except (AblationUsageError, *USER_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    output = Path(options.output_dir)
    summary = {"command": command, "settings": vars(options),
               "headline": headline(runs), "runs": runs}
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_accuracy(runs, output / PLOT_FILE)
    print("\n" + format_table(runs))
    frontier_table = format_frontier(runs)
    if frontier_table:
        print("\ndecoding frontier after training (TPF = new tokens per backbone row-pass):\n" + frontier_table)
    print(json.dumps(summary["headline"], indent=2))
    print(f"summary: {output / SUMMARY_FILE}")
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
