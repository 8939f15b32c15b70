"""Run the truncation strategy ladder and compare the rungs in one table.

    python -m llada_trm.ablate --epochs 1 --output_dir runs/ablate [--rungs baseline,A2] [--extra "--batch_size 16"]

Each rung is an ordinary training run (`--truncation_preset RUNG`, its own directory under --output_dir,
evaluation at the end), trained in this process one after another with the same seed, data and schedule.
The runner then prints one table, writes `ablation_summary.json`, and plots the training curves to
`ablation_curves.png` (needs matplotlib). A rung stopped by non-finite steps is reported, not fatal.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import shutil
import sys
from pathlib import Path

from llada_trm.cli import EXIT_USAGE, split_extra_flags
from llada_trm.inference.reporting import cell, markdown_table, matplotlib_figure
from llada_trm.train import USER_ERRORS
from llada_trm.training.arguments import parse_arguments
from llada_trm.training.trainer import Trainer, TrainingError
from llada_trm.training.truncation import TRUNCATION_PRESETS

SUMMARY_FILE = "ablation_summary.json"
CURVES_FILE = "ablation_curves.png"
# Flags the runner sets itself for every rung; --extra may not change them.
OWNED_FLAGS = ("--output_dir", "--truncation_preset", "--model_name_or_path", "--seed", "--num_epochs")
# (row key, column header, format); None prints as "-".
COLUMNS = (
    ("rung", "rung", "{}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("raw_train_loss", "raw loss", "{:.4f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("eval_perplexity", "eval ppl", "{:.3f}"),
    ("batch_ratio", "trunc. ratio", "{:.4f}"),
    ("truncated_seqs", "trunc. seqs", "{:.2f}"),
    ("accuracy_refined", "accuracy", "{:.3f}"),
    ("empty_steps", "empty steps", "{}"),
    ("skipped_steps", "skipped steps", "{}"),
)
TABLE_NOTES = (
    "train loss: the training objective, mean over the last 10% of steps (empty steps left out), on the tokens "
    "the rung kept; raw loss: final-step CE over all valid tokens before the mask, last 10% of steps; eval loss: "
    "the objective on every supervised token, no truncation; eval ppl: exp(final-step CE); trunc. ratio / seqs: "
    "mean masked fraction of valid tokens / truncated sequences per micro-batch; accuracy: exact-match answers "
    "with refinement."
)


class AblationUsageError(ValueError):
    """A flag the runner cannot work with; printed as one line, exit code 2."""


# --------------------------------------------------------------------------- flags and per-rung arguments
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llada_trm.ablate", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1.0, help="training epochs of every rung (> 0)")
    parser.add_argument("--output_dir", default="runs/ablate", help="one sub-directory per rung, plus the summary")
    parser.add_argument("--rungs", default=",".join(TRUNCATION_PRESETS),
                        help=f"comma-separated rungs (default: all of {', '.join(TRUNCATION_PRESETS)})")
    parser.add_argument("--model_name_or_path", default="tiny-llada", help="backbone of every rung")
    parser.add_argument("--seed", type=int, default=0, help="seed of every rung (the same for all)")
    parser.add_argument("--extra", default="", help='more training flags for every rung, e.g. "--batch_size 16"; '
                        "they may override the runner's --logging_steps 1, --eval_max_samples 32 and "
                        "--truncation_log_every_n_steps 1")
    parser.add_argument("--overwrite", action="store_true", help="replace existing rung directories")
    return parser


def parse_rungs(text: str) -> list[str]:
    """Comma-separated rung names, matched case-insensitively, in the preset's own spelling."""
    known = {name.lower(): name for name in TRUNCATION_PRESETS}
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name.lower() not in known]
    if not names or unknown:
        raise AblationUsageError(f"--rungs: unknown rung(s) {', '.join(unknown) or '(none given)'}; "
                                 f"known rungs: {', '.join(TRUNCATION_PRESETS)}")
    rungs = [known[name.lower()] for name in names]
    if len(set(rungs)) != len(rungs):
        raise AblationUsageError(f"--rungs: each rung may appear once, got {text!r}")
    return rungs


def parse_extra(text: str) -> list[str]:
    try:
        return split_extra_flags(text, "--extra", OWNED_FLAGS, "rung")
    except ValueError as error:
        raise AblationUsageError(str(error)) from None


def rung_argv(rung: str, options: argparse.Namespace, extra: list[str]) -> list[str]:
    """Training flags of one rung: runner defaults, then --extra (which may override them), then the rung."""
    return [
        "--model_name_or_path", options.model_name_or_path, "--num_epochs", str(options.epochs),
        "--seed", str(options.seed), "--logging_steps", "1", "--eval_max_samples", "32",
        "--truncation_log_every_n_steps", "1",
        *extra,
        "--output_dir", str(Path(options.output_dir) / rung), "--truncation_preset", rung,
    ]


def training_arguments(argv: list[str]):
    try:
        return parse_arguments(argv)
    except ValueError as error:  # a UsageError, or HfArgumentParser's message about an unknown flag
        raise AblationUsageError(f"training flags: {error}") from None


# --------------------------------------------------------------------------- turning a run into a row
def read_metrics(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (training and evaluation)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def training_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r and not any(k.startswith("eval_") for k in r)]


def tail_mean(values: list[float], fraction: float = 0.1) -> float | None:
    """Mean of the last `fraction` of the values (at least one); None when there are none."""
    if not values:
        return None
    tail = values[-max(1, math.ceil(len(values) * fraction)):]
    return sum(tail) / len(tail)


def mean_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else None


def trained_steps(records: list[dict]) -> list[dict]:
    """Training records of steps that updated the model: finite loss, not an empty (zero-loss) step."""
    kept, empty_before = [], 0
    for r in training_records(records):
        empty_now = r.get("empty_steps", empty_before)
        if math.isfinite(r["loss"]) and not (empty_now > empty_before and r["loss"] == 0.0):
            kept.append(r)
        empty_before = empty_now
    return kept


def rung_row(rung: str, summary: dict, records: list[dict]) -> dict:
    """One table row from the dict `Trainer.train()` returned and the run's metrics records."""
    train = training_records(records)
    steps = trained_steps(records)
    state = summary.get("state", {})
    return {
        "rung": rung,
        "steps": state.get("global_step"),
        "train_loss": tail_mean([r["loss"] for r in steps]),
        "raw_train_loss": tail_mean([r["truncation/raw_loss"] for r in train
                                     if math.isfinite(r.get("truncation/raw_loss", math.nan))]),
        "eval_loss": summary.get("eval_loss"),
        "eval_perplexity": summary.get("eval_perplexity"),
        "eval_backbone_loss": summary.get("eval_backbone_loss"),
        "batch_ratio": mean_of(train, "truncation/batch_ratio"),
        "truncated_seqs": mean_of(train, "truncation/truncated_seqs"),
        "accuracy_refined": summary.get("eval_accuracy_hybrid_refined"),
        "accuracy_backbone": summary.get("eval_accuracy_backbone_llada_sampler"),
        "empty_steps": state.get("empty_steps"),
        "skipped_steps": state.get("skipped_steps"),
        "error": summary.get("error"),
    }


# --------------------------------------------------------------------------- table, summary, plot
def format_table(rows: list[dict]) -> str:
    """A Markdown table (aligned, so it also reads in a terminal), one line per rung."""
    table = markdown_table([header for _, header, _ in COLUMNS],
                           [[cell(row.get(key), fmt) for key, _, fmt in COLUMNS] for row in rows])
    return "\n".join([table, *(f"{row['rung']}: failed: {row['error']}" for row in rows if row.get("error"))])


def write_summary(rows: list[dict], path: Path, settings: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "notes": TABLE_NOTES, "rungs": rows}, indent=2) + "\n")
    return path


def plot_curves(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """Training loss, raw loss and truncation batch ratio per step, all rungs in each panel.

    `curves` maps a rung to its metrics records. Returns the PNG's path, or None when matplotlib is missing.
    """
    Figure = matplotlib_figure(CURVES_FILE)
    if Figure is None:
        return None
    from matplotlib.lines import Line2D  # matplotlib is there
    panels = (("loss", "training loss (kept tokens; empty steps left out)"),
              ("truncation/raw_loss", "raw loss (all valid tokens, before the mask)"),
              ("truncation/batch_ratio", "truncation batch ratio"))
    colors = {rung: f"C{i % 10}" for i, rung in enumerate(curves)}  # one colour per rung in every panel
    figure = Figure(figsize=(16, 4.8), layout="constrained")
    for ax, (key, title) in zip(figure.subplots(1, len(panels)), panels):
        for rung, records in curves.items():
            steps = trained_steps(records) if key == "loss" else training_records(records)
            points = [(r["step"], r[key]) for r in steps if key in r]
            if points:
                ax.plot(*zip(*points), color=colors[rung], linewidth=1.2)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=color, label=rung) for rung, color in colors.items()]
    figure.legend(handles=handles, loc="outside right upper")
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- running the ladder
def run_rung(args) -> dict:
    """Train one rung (its parsed arguments); the summary dict of `Trainer.train()` (its eval_loss covers every token) or {'error': ...}."""
    trainer = Trainer(args)
    try:
        summary = trainer.train()
    except TrainingError as error:
        return {"error": str(error)}
    return summary


def prepare_output(output_dir: Path, rungs: list[str], overwrite: bool) -> None:
    for rung in rungs:
        directory = output_dir / rung
        if directory.exists() and any(directory.iterdir()):
            if not overwrite:
                raise AblationUsageError(f"{directory} already holds a run; pass --overwrite to replace it, "
                                         f"or choose another --output_dir")
            shutil.rmtree(directory)


def run_ladder(options: argparse.Namespace, rungs: list[str], extra: list[str]) -> list[dict]:
    rung_args = {rung: training_arguments(rung_argv(rung, options, extra)) for rung in rungs}  # check all first
    prepare_output(Path(options.output_dir), rungs, options.overwrite)
    rows, curves = [], {}
    for i, rung in enumerate(rungs, 1):
        print(f"\n=== rung {rung} ({i}/{len(rungs)}) ===", flush=True)
        summary = run_rung(rung_args[rung])
        metrics = Path(options.output_dir) / rung / "metrics.jsonl"
        curves[rung] = read_metrics(metrics) if metrics.exists() else []
        rows.append({**rung_row(rung, summary, curves[rung]), "output_dir": str(metrics.parent)})
        gc.collect()
    plot_curves(curves, Path(options.output_dir) / CURVES_FILE)
    return rows


def main(argv: list[str] | None = None) -> int:
    options = make_parser().parse_args(argv)
    command = "python -m llada_trm.ablate " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if not (math.isfinite(options.epochs) and options.epochs > 0):
            raise AblationUsageError(f"--epochs must be a positive number, got {options.epochs}")
        rungs, extra = parse_rungs(options.rungs), parse_extra(options.extra)
        rows = run_ladder(options, rungs, extra)
    except (AblationUsageError, *USER_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    settings = {"command": command, "rungs": rungs, "epochs": options.epochs, "seed": options.seed,
                "model_name_or_path": options.model_name_or_path, "extra": extra}
    summary = write_summary(rows, Path(options.output_dir) / SUMMARY_FILE, settings)
    print("\n" + format_table(rows) + "\n\n" + TABLE_NOTES)
    print(f"summary: {summary}")
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
